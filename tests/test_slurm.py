"""scripts/slurm/*.sbatch on a real two-node Slurm cluster (tests/slurm_cluster.py), and multi-node
torchrun without Slurm: a two-node job trains as one node's two processes do, bit for bit, through a
requeue and a killed process; a two-node detect job merges what one process finds, and a job run
again after a cancel finishes the rest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import torch_threads

from deformable_detr import build_model, save_checkpoint
from deformable_detr.data import synthesize
from deformable_detr.predict import Detector, detect_files

from data_writers import write_decompression_bomb
from slurm_cluster import SlurmCluster, free_port, missing_daemons
from test_check_data import truncate
from test_preemption import BATCHES, ENVIRONMENT, arguments, assert_same_run, torchrun, updates_logged

SCRIPTS = Path(__file__).parents[1] / "scripts" / "slurm"
# The jobs find the package's torchrun and python first on their PATH (sbatch passes the environment on).
JOB_ENVIRONMENT = {**ENVIRONMENT, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def cluster():
    missing = missing_daemons()
    if missing:
        message = f"Slurm is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with SlurmCluster() as running:
        if running.without_namespaces:  # the tests still run, across loopback rather than a network
            warnings.warn(f"the Slurm nodes share 127.0.0.1, without network namespaces: {running.without_namespaces}",
                          stacklevel=1)
        running.environment.update(JOB_ENVIRONMENT)
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("shapes"), train=2 * BATCHES, val=2, image_size=96, seed=1)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """One node's two processes (torchrun --nproc-per-node 2), uninterrupted: what every job must equal."""
    run = tmp_path_factory.mktemp("straight")
    launcher = torchrun(run, data)
    _, err = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, err[-3000:]
    return run


def submit(cluster: SlurmCluster, script: str, log: Path, *options: str) -> str:
    """``sbatch --nodes 2 <options> scripts/slurm/<script> <options after -->``: the job's id."""
    separator = options.index("--") if "--" in options else len(options)
    return cluster.run("sbatch", "--parsable", "--nodes", "2", "--output", str(log), *options[:separator],
                       str(SCRIPTS / script), *options[separator + 1 :]).strip().split(";")[0]


def wait_for_job(cluster: SlurmCluster, job: str, log: Path, timeout: float = 900, *, hurry_requeue: bool = False) -> str:
    """The job's final state. ``hurry_requeue``: a requeued job is held back (two minutes, Slurm's own
    pause before it runs again); the test starts it a second after it shows PENDING, as ``scontrol
    update`` lets an admin."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if hurry_requeue and state == "PENDING" and cluster.job_field(job, "Reason") == "BeginTime":
            # Not in the second of the requeue: slurmd refuses a launch credential no newer, in whole
            # seconds, than the one it revoked at the requeue, and the job ends FAILED ("Job credential
            # revoked" in slurmctld's log); Slurm's hold is for that. PENDING shows once both nodes revoked.
            time.sleep(1)
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        time.sleep(1)
    raise AssertionError(f"job {job} still {state} after {timeout:.0f} s; its log:\n{log.read_text()[-3000:]}")


def wait_while_running(cluster: SlurmCluster, job: str, log: Path, condition, timeout: float = 600, poll: float = 0.2) -> None:
    """Return once ``condition()`` holds; fail if the job ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        running = cluster.job_field(job, "JobState") in ("PENDING", "RUNNING")
        assert running and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(poll)


@pytest.mark.slow
def test_a_two_node_job_trains_as_one_nodes_two_processes(cluster, data, straight, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = submit(cluster, "train.sbatch", log, "--", *arguments(data, run, "--batch-size", "1"))
    assert wait_for_job(cluster, job, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert f"2 node(s) x 1 process(es), rendezvous at {cluster.address('n1')}:" in text
    assert text.count("world: 2 node(s), 2 process(es), gloo, rank 0 on ") == 1
    assert_same_run(run, straight)


@pytest.mark.slow
def test_the_schedulers_warning_stops_the_job_which_requeues_itself_and_resumes(cluster, data, straight, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = submit(cluster, "train.sbatch", log, "--", *arguments(data, run, "--batch-size", "1"))
    wait_while_running(cluster, job, log, lambda: updates_logged(run) >= 2)
    # What --signal=B:USR1@300 sends five minutes before the time limit: USR1 to the batch shell alone.
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    assert wait_for_job(cluster, job, log, hurry_requeue=True) == "COMPLETED", (
        log.read_text()[-3000:] + "\nslurmctld:\n" + cluster.log("slurmctld")[-1500:])

    text = log.read_text()
    stop = next(line for line in text.splitlines() if line.startswith("stopped by SIGUSR1 at epoch 0, batch "))
    batch = int(stop.split("batch ")[1].split()[0])
    assert 2 <= batch < BATCHES, f"not stopped within the first epoch: {stop}"
    assert f"job {job}: stopped on the scheduler's warning; requeued" in text
    assert f"job {job} (restart 1)" in text
    assert f"resuming from {run / 'checkpoint.pt'} at epoch 0, batch {batch} of {BATCHES}" in text
    assert cluster.job_field(job, "Restarts") == "1"
    assert_same_run(run, straight)


def worker_of_job(job: str, rank: int) -> int:
    """The pid of the job's training process of ``rank`` (torchrun's worker, on whichever node)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = set(environ.read_bytes().split(b"\0"))
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if {f"SLURM_JOB_ID={job}".encode(), f"RANK={rank}".encode(), b"LOCAL_RANK=0"} <= variables:
            return int(environ.parent.name)
    raise AssertionError(f"no process of rank {rank} in job {job}")


@pytest.mark.slow
def test_a_process_killed_on_one_node_is_restarted_with_the_others_and_the_run_ends_bit_exact(
    cluster, data, straight, tmp_path
):
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = submit(cluster, "train.sbatch", log, "--export", "ALL,MAX_RESTARTS=1", "--",
                 *arguments(data, run, "--batch-size", "1", "--checkpoint-every", "1"))
    wait_while_running(cluster, job, log, lambda: updates_logged(run) > BATCHES + 1)
    os.kill(worker_of_job(job, 1), signal.SIGKILL)
    assert wait_for_job(cluster, job, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    # Both nodes' workers started again (a second world line) and went on from the last checkpoint.
    assert text.count("world: 2 node(s), 2 process(es), gloo") == 2
    assert f"resuming from {run / 'checkpoint.pt'} at epoch 1, batch " in text
    assert_same_run(run, straight)


@pytest.mark.slow
def test_two_torchrun_agents_without_slurm_train_as_one_nodes_two_processes(data, straight, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    agents = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                          "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                          "--rdzv-id", "two-agents", "-m", "deformable_detr.cli", "train",
                          *arguments(data, run, "--batch-size", "1")],
                         env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=900) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    assert "".join(out for out, _ in outputs).count("world: 2 node(s), 2 process(es), gloo, rank 0 on ") == 1
    assert_same_run(run, straight)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(checkpoint of a tiny model, a folder of 64 images with a decompression bomb, a truncated and an
    empty file among them, the bad files)."""
    folder = synthesize(tmp_path_factory.mktemp("images"), train=64, val=0, image_size=128, seed=2) / "train"
    bad = [write_decompression_bomb(folder / "000010x.png"), folder / "000020x.jpg", folder / "000030x.jpg"]
    shutil.copyfile(folder / "000020.jpg", bad[1])
    truncate(bad[1])
    bad[2].touch()
    checkpoint = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(checkpoint, build_model("tiny", num_classes=4), image_size=128)
    return checkpoint, folder, bad


@pytest.mark.slow
def test_detect_on_two_nodes_merges_one_processs_results_and_a_job_run_again_finishes_the_rest(
    cluster, images, tmp_path
):
    checkpoint, folder, bad = images
    detect = [str(checkpoint), str(folder), "--threshold", "0", "--batch-size", "2", "--device", "cpu"]
    expected = tmp_path / "expected"
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    with torch_threads(1):  # as each process of the job
        assert len(detect_files(detector, [folder], expected, threshold=0.0, batch_size=2, progress=False)) == 3

    out, log = tmp_path / "out", tmp_path / "job.log"
    progress = out / ".detect-progress"
    job = submit(cluster, "detect.sbatch", log, "--", *detect, "--out", str(out))
    wait_while_running(cluster, job, log, lambda: len(list(progress.glob("batch-*.json"))) >= 2, poll=0.05)
    cluster.run("scancel", job)
    assert wait_for_job(cluster, job, log) == "CANCELLED"
    parts = [json.loads(path.read_text()) for path in sorted(progress.glob("batch-*.json"))]
    assert 2 <= len(parts) < 34, "the job was not stopped halfway: more images?"
    done = {Path(result["file_name"]).stem for part in parts for result in part["results"]}
    drawn = {stem: (out / f"{stem}.png").stat().st_mtime_ns for stem in done}

    log = tmp_path / "again.log"
    job = submit(cluster, "detect.sbatch", log, "--", *detect, "--out", str(out))
    assert wait_for_job(cluster, job, log) == "FAILED" and cluster.job_field(job, "ExitCode") == "1:0"  # 3 files skipped
    text = log.read_text()
    assert f"{out}: {len(parts)} of 34 batches done by an earlier run; detecting the rest" in text
    assert "annotated images and detections.json; 3 file(s) failed" in text
    assert {stem: (out / f"{stem}.png").stat().st_mtime_ns for stem in done} == drawn  # not drawn again
    assert json.loads((out / "detections.json").read_text()) == json.loads((expected / "detections.json").read_text())
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in expected.iterdir())
    both = (tmp_path / "job.log").read_text() + text
    for path in bad:  # in the job whose process read it (or in both, if the first was stopped during its batch)
        assert f"skipped: {path}: cannot read image (" in both
