"""Training that survives preemption: a run stopped anywhere within an epoch, by a signal or by
``kill -9``, and resumed ends with the uninterrupted run's weights and their average (EMA) bit for
bit, in one process, with loader workers and under torchrun; a signal as the run ends anyway ends it as
usual; a finished run resumed writes only a missing report; another number of processes and a second
signal each get their one line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import torch_threads

import deformable_detr
import deformable_detr.train
from deformable_detr.checkpoints import read_checkpoint
from deformable_detr.cli import main
from deformable_detr.data import synthesize
from deformable_detr.evaluation import format_metrics
from deformable_detr.files import exclusive_lock
from deformable_detr.train import (
    REQUEUE_STATUS,
    TrainConfig,
    TrainingError,
    TrainingStopped,
    checkpointing,
    engine,
    loop,
    preemption,
    train,
)
from deformable_detr.train.logger import Logger

BATCHES = 6  # per epoch: 12 training images in batches of 2
# Every source of randomness in training: dropout, denoising noise (two-stage), the augmentation
# recipe; and a warm-up and a cosine, so that each update has its own learning rate, and the
# average of the weights, its own decay.
MODEL = {"two_stage": True, "denoising_groups": 2}
RECIPE = {"warmup_epochs": 0.5, "lr_schedule": "flat-cosine", "lr_drop_epoch": 1, "ema": 0.9, "ema_warmup": 1}
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("shapes"), train=2 * BATCHES, val=2, image_size=96, seed=1)


def config(data, output_dir, **overrides) -> TrainConfig:
    settings = dict(preset="tiny", epochs=2, batch_size=2, image_size=96, workers=0, seed=3, model_overrides=MODEL,
                    **RECIPE)
    return TrainConfig(data=str(data), output_dir=str(output_dir), **{**settings, **overrides})


def arguments(data, output_dir, *extra: str) -> list[str]:
    """The command line of :func:`config`."""
    return ["--data", str(data), "--output-dir", str(output_dir), "--preset", "tiny", "--epochs", "2",
            "--batch-size", "2", "--image-size", "96", "--workers", "0", "--seed", "3", "--warmup-epochs", "0.5",
            "--lr-schedule", "flat-cosine", "--lr-drop-epoch", "1", "--ema", "0.9", "--ema-warmup", "1",
            "--two-stage", "--denoising-groups", "2", *extra]


@pytest.fixture(autouse=True)
def one_thread():
    # As each process of the subprocess tests has (ENVIRONMENT): the sums of a step are the same only
    # with the same number of threads. (And the machine's cores are not oversubscribed.)
    with torch_threads(1):
        yield


class Batches:
    """Wraps :func:`engine.train_step` to record the image ids of every batch trained, and to send
    this process ``signals[i]`` (a real signal) as batch i of the run (counted from 0) starts."""

    def __init__(self, monkeypatch, signals: dict[int, signal.Signals] | None = None) -> None:
        self.ids: list[list[int]] = []
        self.signals = signals or {}
        step = engine.train_step

        def recording_step(model, criterion, optimizer, images, padding_mask, targets, **options):
            if len(self.ids) in self.signals:
                os.kill(os.getpid(), self.signals[len(self.ids)])
            self.ids.append([int(target["image_id"]) for target in targets])
            return step(model, criterion, optimizer, images, padding_mask, targets, **options)

        monkeypatch.setattr(engine, "train_step", recording_step)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run, in one thread, and the image ids of its batches."""
    run = tmp_path_factory.mktemp("straight")
    with torch_threads(1), pytest.MonkeyPatch.context() as monkeypatch:
        batches = Batches(monkeypatch)
        train(config(data, run))
    return run, batches.ids


def assert_same_run(run: Path, expected: Path) -> None:
    """The same weights and average bit for bit, the same log of every update, the same epoch records (but
    the timings)."""
    state, expected_state = (read_checkpoint(path / "checkpoint.pt").extra for path in (run, expected))
    assert state["ema"]["updates"] == expected_state["ema"]["updates"] == 2 * BATCHES
    for weights, expected_weights in ((state["model"], expected_state["model"]),
                                      (state["ema"]["model"], expected_state["ema"]["model"])):
        assert weights.keys() == expected_weights.keys()
        for name in weights:
            torch.testing.assert_close(weights[name], expected_weights[name], rtol=0, atol=0, msg=name)
    assert log(run, "steps.jsonl") == log(expected, "steps.jsonl")
    timings = ("images_per_s", "training_minutes")
    epochs, expected_epochs = ([{k: v for k, v in r.items() if k not in timings} for r in log(path, "log.jsonl")]
                               for path in (run, expected))
    assert epochs == expected_epochs


def log(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def position(run: Path) -> tuple[int, int]:
    """(epoch, batches into it) where a resume of ``run`` goes on."""
    extra = read_checkpoint(run / "checkpoint.pt").extra
    progress = extra["epoch_progress"]
    return extra["epoch"] + 1, progress["batches"] if progress else 0


def test_signals_within_an_epoch_stop_cleanly_and_the_resumed_run_is_the_uninterrupted_one(
    data, straight, tmp_path, monkeypatch, capsys
):
    expected, expected_ids = straight
    run = config(data, tmp_path / "run")
    # SIGUSR1 as batch 1 of epoch 1 starts: the update finishes, the checkpoint is written, and the run stops.
    batches = Batches(monkeypatch, {BATCHES + 1: signal.SIGUSR1})
    with pytest.raises(TrainingStopped) as stopped:
        train(run)
    assert stopped.value.status == REQUEUE_STATUS == 75
    line = f"stopped by SIGUSR1 at epoch 1, batch 2 of {BATCHES}: {tmp_path / 'run' / 'checkpoint.pt'} is written"
    assert capsys.readouterr().out.splitlines()[-1].startswith(line)
    assert position(tmp_path / "run") == (1, 2)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored

    # Resumed, it reads no image of the batches it skips; SIGTERM stops it again in the same epoch.
    batches.signals = {BATCHES + 3: signal.SIGTERM}
    with pytest.raises(TrainingStopped):
        train(dataclasses.replace(run, resume="auto"))
    assert f"resuming from {tmp_path / 'run' / 'checkpoint.pt'} at epoch 1, batch 2 of {BATCHES}" in capsys.readouterr().out
    assert position(tmp_path / "run") == (1, 4)

    train(dataclasses.replace(run, resume=True))
    # The same samples in the same order, each batch once.
    assert batches.ids == expected_ids
    assert_same_run(tmp_path / "run", expected)


def test_a_second_signal_during_the_save_stops_at_once_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = config(data, tmp_path / "run", checkpoint_every=2)
    Batches(monkeypatch, {3: signal.SIGTERM})  # the clean stop writes the checkpoint of update 4
    save = torch.save

    def save_then_signal_again(payload, file):
        save(payload, file)
        if (payload.get("epoch_progress") or {}).get("batches") == 4:  # written, not yet in place
            time.sleep(preemption.SAME_REQUEST_SECONDS)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises within this call

    monkeypatch.setattr(torch, "save", save_then_signal_again)
    with pytest.raises(TrainingStopped) as stopped:
        train(run)
    assert stopped.value.status == 128 + signal.SIGTERM
    last = tmp_path / "run" / "checkpoint.pt"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"second signal (SIGTERM): stopped at once, without writing a checkpoint; {last} is the last one written"
    )
    # The checkpoint of update 2, whole; the abandoned write's temporary file removed.
    assert position(tmp_path / "run") == (0, 2)
    assert [path.name for path in (tmp_path / "run").iterdir() if path.name.endswith(".tmp")] == []


def test_a_repeated_signal_within_a_second_is_the_same_request(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the tests were started in the background
    with preemption.StopSignals(tmp_path / "checkpoint.pt") as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # as torchrun passes a terminal's Ctrl-C on to its workers
        assert signals.received == "SIGINT"
        time.sleep(preemption.SAME_REQUEST_SECONDS)
        with pytest.raises(TrainingStopped, match=r"second signal \(SIGINT\).*none was written yet") as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next instruction, within this call
    assert stopped.value.status == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before, "the handler in place before is restored"


def test_a_finished_run_resumed_says_so_exits_0_and_writes_only_the_report_it_lacks(data, straight, tmp_path, capsys):
    expected, _ = straight
    run = tmp_path / "run"
    shutil.copytree(expected, run)
    before = {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert main(["train", *arguments(data, run, "--resume")]) == 0
    best = read_checkpoint(run / "best.pt").extra["best"]
    conclusion = [f"report of best.pt: {run / 'report' / 'report.md'}; training curves: {run / 'curves.png'}",
                  f"best epoch {best['epoch']}: {format_metrics(best)}; {run / 'best.pt'}"]
    assert capsys.readouterr().out.splitlines() == [
        f"{run / 'checkpoint.pt'}: the run is already complete: it is at epoch 2 and --epochs is 2 (a larger --epochs "
        f"trains on)", *conclusion]
    assert {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before

    # As a run stopped or killed before it wrote its report leaves it.
    shutil.rmtree(run / "report")
    assert main(["train", *arguments(data, run, "--resume", "auto")]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == conclusion
    reported = json.loads((run / "report" / "per_class.json").read_text())["metrics"]
    assert (run / "report" / "report.md").is_file() and reported == pytest.approx({key: best[key] for key in reported})


def test_a_finished_run_resumed_removes_what_a_kill_left_half_written(data, straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    abandoned = [run / ".checkpoint.pt.k3j9x2.tmp", run / ".best.pt.a8f0q1.tmp"]
    for path in abandoned:
        path.write_bytes(b"half a checkpoint")
    assert main(["train", *arguments(data, run, "--resume")]) == 0
    assert "the run is already complete" in capsys.readouterr().out
    assert not any(path.exists() for path in abandoned)


class Killed(Exception):
    """A kill, where a test cannot take one."""


def test_a_kill_between_best_pt_and_the_checkpoint_leaves_them_agreeing(data, tmp_path, monkeypatch):
    """best.pt is written before checkpoint.pt: a kill between them leaves a checkpoint from before
    the epoch, whose resumed run writes the same best.pt again."""

    def killed(source, destination):
        raise Killed

    run = tmp_path / "run"
    monkeypatch.setattr(loop, "_copy_atomically", killed)
    with pytest.raises(Killed):
        train(config(data, run, epochs=1))
    monkeypatch.undo()
    assert (run / "best.pt").is_file() and not (run / "checkpoint.pt").exists()
    train(config(data, run, epochs=1, resume="auto"))
    best, last = read_checkpoint(run / "best.pt").extra, read_checkpoint(run / "checkpoint.pt").extra
    assert best["epoch"] == last["best"]["epoch"] == 0 and best["best"] == last["best"]


def test_a_checkpoint_that_is_no_training_checkpoint_is_refused_in_one_line(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    deformable_detr.save_checkpoint(run / "checkpoint.pt", deformable_detr.build_model("tiny"))
    with pytest.raises(TrainingError) as refused:
        train(config(data, run, resume=True))
    assert str(refused.value) == (
        f"{run / 'checkpoint.pt'}: not a training checkpoint this version resumes (no train_config, world_size, "
        f"optimizer, scheduler, early_stopping, epoch, epoch_progress, best, training_seconds); start a new run from "
        f"its weights with finetune_from='{run / 'checkpoint.pt'}'")


def test_a_signal_during_the_last_epochs_evaluation_lets_the_run_end_with_its_report(data, tmp_path, monkeypatch,
                                                                                     capsys):
    def signalled_detect_all(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return detect_all(*args, **kwargs)

    detect_all = loop.detect_all
    monkeypatch.setattr(loop, "detect_all", signalled_detect_all)
    train(config(data, tmp_path / "run", epochs=1))  # nothing left to train, so no stop to requeue on
    assert capsys.readouterr().out.splitlines()[-1].startswith("best epoch 0: AP ")
    assert (tmp_path / "run" / "report" / "report.md").is_file() and position(tmp_path / "run") == (1, 0)


def test_another_number_of_processes_is_refused_in_one_line(data, straight, tmp_path, capsys):
    expected, _ = straight
    run = tmp_path / "run"
    shutil.copytree(expected, run)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload["world_size"] = 2  # as a torchrun run with two processes saves it (tested under torchrun below)
    torch.save(payload, run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", *arguments(data, run, "--resume", "auto", "--epochs", "3")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(
        f"deformable-detr: error: {run / 'checkpoint.pt'}: the run was trained by 2 process(es), now 1: resume it with 2"
    )


def test_a_folder_another_run_holds_is_refused_in_one_line_by_a_resumed_run_after_its_wait(data, tmp_path,
                                                                                            monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(loop, "OUTPUT_LOCK_WAIT_SECONDS", 0.5)
    holder = f"process {os.getpid()} on {socket.gethostname()} holds {run / '.lock'}"
    with exclusive_lock(run / ".lock"):  # as another run's main process holds it
        with pytest.raises(TrainingError) as refused:
            train(config(data, run))
        assert str(refused.value) == (f"{run}: another run is writing there ({holder}): let it end, or use another "
                                      f"output directory")
        started = time.monotonic()
        with pytest.raises(TrainingError) as refused:
            train(config(data, run, resume="auto"))  # a requeued job's, its predecessor ending
        assert time.monotonic() - started >= 0.5
        assert str(refused.value).startswith(f"{run}: another run is writing there still after 0.5 s ({holder}): ")
    assert list(run.iterdir()) == [run / ".lock"]


def test_resume_auto_starts_a_run_or_continues_it(data, tmp_path, monkeypatch):
    run = config(data, tmp_path / "run", epochs=1, resume="auto", val_split=None)
    batches = Batches(monkeypatch)
    train(run)
    assert position(tmp_path / "run") == (1, 0) and len(batches.ids) == BATCHES
    train(dataclasses.replace(run, epochs=2))
    assert position(tmp_path / "run") == (2, 0) and len(batches.ids) == 2 * BATCHES
    with pytest.raises(TrainingError, match="checkpoint.pt exists: pass resume=True to continue"):
        train(dataclasses.replace(run, resume=False))


def test_checkpoints_within_an_epoch_every_n_updates(data, tmp_path, monkeypatch):
    written = []
    save = torch.save

    def recording_save(payload, file):
        written.append((payload["epoch"], (payload["epoch_progress"] or {}).get("batches")))
        save(payload, file)

    monkeypatch.setattr(torch, "save", recording_save)
    train(config(data, tmp_path / "run", epochs=1, val_split=None, accumulation_steps=2, checkpoint_every=2))
    # Every second update (of 2 batches each); the last update's is the epoch's own, after it.
    assert written == [(-1, 4), (0, None)]


def test_a_checkpoint_is_due_every_n_updates_and_m_minutes_after_the_last(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: now[0])
    schedule = checkpointing.CheckpointSchedule(every=3, minutes=0.5)
    assert [schedule.due(update) for update in (1, 2, 3, 4, 6)] == [False, False, True, False, True]
    now[0] += 29
    assert not schedule.due(4)
    now[0] += 2
    assert schedule.due(4)
    schedule.written()
    assert not schedule.due(4)
    assert not checkpointing.CheckpointSchedule(every=None, minutes=None).due(3)


def test_the_log_of_a_killed_run_is_cut_back_to_its_checkpoint(tmp_path):
    steps = [json.dumps({"loss": 1.0, "update": update}) + "\n" for update in (1, 2, 3, 4)]
    (tmp_path / "steps.jsonl").write_text("".join(steps) + '{"loss": 0.')  # killed while writing
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 0, "update": 2}) + "\n" + json.dumps({"epoch": 1, "update": 4}) + "\n")
    Logger(tmp_path, since_update=3).close()
    assert (tmp_path / "steps.jsonl").read_text() == "".join(steps[:3])
    assert log(tmp_path, "log.jsonl") == [{"epoch": 0, "update": 2}]


def test_cli_resume_and_checkpoint_flags(monkeypatch, capsys):
    configs = []
    monkeypatch.setattr(deformable_detr.train, "train", configs.append)
    for flags in ([], ["--resume"], ["--resume", "auto"], ["--checkpoint-every", "500", "--checkpoint-minutes", "15"]):
        assert main(["train", "--data", "data", "--output-dir", "run", *flags]) == 0
    assert [c.resume for c in configs] == [False, True, "auto", False]
    assert (configs[0].checkpoint_every, configs[0].checkpoint_minutes) == (None, None)
    assert (configs[3].checkpoint_every, configs[3].checkpoint_minutes) == (500, 15.0)
    with pytest.raises(SystemExit):
        main(["train", "--data", "data", "--output-dir", "run", "--resume", "always"])
    assert "invalid choice: 'always'" in capsys.readouterr().err


@pytest.mark.parametrize("given, hint", [
    ("runs/a/checkpoint.pt", "(--output-dir runs/a --resume); --finetune-from runs/a/checkpoint.pt starts a new run "
                             "from its weights"),
    (".", "(--output-dir . --resume)"),
])  # fmt: skip
def test_a_path_given_to_resume_is_refused_naming_the_output_dir_to_give(capsys, given, hint):
    """As other trainers' resume flags take a checkpoint's path, where this run goes on from its output folder's."""
    with pytest.raises(SystemExit):
        main(["train", "--data", "data", "--output-dir", "run", "--resume", given])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"deformable-detr train: error: argument --resume: {given}: --resume takes no path: it continues the run in "
        f"--output-dir from its checkpoint.pt {hint}")


# Slow: each test starts training processes, and each process spends seconds importing torch.


@pytest.fixture
def started():
    """The processes a test starts (append them): those still running at its end are killed, with their
    children (torchrun's workers), so that a failed test leaves none behind."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            for pid in map(int, children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.communicate()


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"ended early: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def updates_logged(run: Path) -> int:
    path = run / "steps.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_and_kill_9_within_an_epoch_then_the_resumed_run_is_the_uninterrupted_one(
    data, straight, tmp_path, started, workers
):
    expected, _ = straight
    run = tmp_path / "run"
    command = [sys.executable, "-m", "deformable_detr.cli", "train", *arguments(data, run, "--workers", str(workers))]
    # A SIGTERM after the first update of epoch 1.
    process = subprocess.Popen(command, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(process)
    wait_for(lambda: updates_logged(run) > BATCHES, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == REQUEUE_STATUS, err[-3000:]
    assert out.splitlines()[-1].startswith("stopped by SIGTERM at epoch 1, batch ")
    first_stop = position(run)
    assert first_stop[0] == 1 and 0 < first_stop[1] < BATCHES

    # Resumed with a checkpoint every update, and killed outright after the first one it writes.
    process = subprocess.Popen([*command, "--resume", "auto", "--checkpoint-every", "1"], env=ENVIRONMENT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(process)
    written = (run / "checkpoint.pt").stat().st_mtime_ns
    wait_for(lambda: (run / "checkpoint.pt").stat().st_mtime_ns != written, process)
    process.kill()
    process.communicate(timeout=60)
    killed = position(run)
    assert killed[0] == 1 and first_stop[1] < killed[1] < BATCHES, "not killed within the epoch: a slower machine?"
    assert updates_logged(run) >= BATCHES + killed[1]  # what the killed run logged past its checkpoint is dropped

    finished = subprocess.run([*command, "--resume"], env=ENVIRONMENT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming from {run / 'checkpoint.pt'} at epoch 1, batch {killed[1]} of {BATCHES}" in finished.stdout
    # Loader workers or none, the same samples and augmentations: the in-process run without workers.
    assert_same_run(run, expected)


def torchrun(run: Path, data: Path, *train_options: str, restarts: int = 0) -> subprocess.Popen:
    """Two gloo processes training as :func:`config` says, with batches of one each (the same global
    batch of 2), on a free port, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(restarts), "-m", "deformable_detr.cli", "train",
               *arguments(data, run, "--batch-size", "1", *train_options)]
    # A restarted group would otherwise rendezvous on the failed one's store (pytorch#135712).
    environment = {**ENVIRONMENT, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank``."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_torchrun_stops_cleanly_restarts_a_group_whose_worker_died_and_ends_as_the_uninterrupted_run(
    data, tmp_path, capsys, started
):
    straight_run = tmp_path / "straight"
    uninterrupted = torchrun(straight_run, data)
    started.append(uninterrupted)
    _, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err[-3000:]

    # SIGTERM to torchrun, which passes it on to both workers: they stop after the same update.
    run = tmp_path / "run"
    launcher = torchrun(run, data, "--resume", "auto")
    started.append(launcher)
    wait_for(lambda: updates_logged(run) > 1, launcher)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=600)
    assert out.count("stopped by SIGTERM at epoch 0, batch ") == 1  # the main process's line
    assert position(run)[0] == 0 and 1 < position(run)[1] < BATCHES

    # A worker killed in epoch 1: torchrun restarts the group, which goes on from the last checkpoint.
    launcher = torchrun(run, data, "--resume", "auto", "--checkpoint-every", "1", restarts=1)
    started.append(launcher)
    wait_for(lambda: updates_logged(run) > BATCHES + 1, launcher)
    os.kill(worker_of_rank(launcher, 1), signal.SIGKILL)
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    assert "resuming from" in out and "at epoch 1, batch " in out, out
    assert_same_run(run, straight_run)

    # The two-process run resumed by one process: refused in one line.
    capsys.readouterr()
    assert main(["train", *arguments(data, run, "--batch-size", "1", "--resume", "--epochs", "3")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "the run was trained by 2 process(es), now 1: resume it with 2" in error


def test_a_resumed_run_does_not_read_its_backbone_weights_again(data, tmp_path):
    # Its checkpoint holds them: a file since moved, or a name a node without internet cannot
    # download, does not stop the resume, and its checkpoints still name the weights it started from.
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    run = config(data, tmp_path / "run", epochs=1, val_split=None, backbone_weights=str(weights),
                 model_overrides={**MODEL, "backbone_width": 64})
    train(run)
    weights.unlink()
    train(dataclasses.replace(run, epochs=2, resume=True))
    assert position(tmp_path / "run") == (2, 0)
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt").config.backbone_weights == str(weights)
