"""Two CPU processes (gloo) train and evaluate like one process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from deformable_detr import build_model, load_pretrained, save_checkpoint
from deformable_detr.checkpoints import read_checkpoint
from deformable_detr.data import synthesize
from deformable_detr.distributed import share_buffers
from deformable_detr.evaluation import METRICS, evaluate_checkpoint
from deformable_detr.predict import Detector, detect_files
from deformable_detr.train import SetCriterion, TrainConfig, TrainingError, loop, train
from deformable_detr.train.criterion import average_num_boxes
from deformable_detr.train.ema import WeightAverage
from deformable_detr.train.engine import train_step

from choices import MatchReplay
from slurm_cluster import free_port


def global_batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 96, 96, generator=generator)
    targets = [
        {"labels": torch.randint(1, 4, (count,), generator=generator),
         "boxes": torch.rand(count, 2, generator=generator).mul(0.5).add(0.25).repeat(1, 2) * torch.tensor([1, 1, 0.4, 0.4])}
        for count in (1, 3, 2, 0)  # uneven: the box count is what the loss is normalised by
    ]
    return images, targets


def loss_and_gradients(model, images, targets):
    criterion = SetCriterion()
    loss = criterion.total_loss(criterion(model(images), targets))
    loss.backward()
    # (An optimiser step is no fair comparison: Adam divides by the gradient's own size, which
    # magnifies rounding in near-zero gradients.)
    named = model.module.named_parameters() if isinstance(model, DistributedDataParallel) else model.named_parameters()
    return loss.detach(), {name: p.grad.clone() for name, p in named if p.grad is not None}


def fresh_model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=4, dropout=0.0)



def in_two_processes(worker: Callable[..., None], tmp_path: Path, *arguments: object) -> dict:
    """Run ``worker(rank, rendezvous, results, *arguments)`` in two processes; what each put in
    ``results``, by rank."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(str(tmp_path / "rendezvous"), results, *arguments), nprocs=2)
        return dict(results)

def worker(rank: int, rendezvous: str, results: dict, matches: MatchReplay) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = fresh_model()
        images, targets = global_batch()
        half = slice(2 * rank, 2 * rank + 2)
        with matches.replaying(half):
            results[rank] = loss_and_gradients(DistributedDataParallel(model), images[half], targets[half])
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    # The processes make the one process's matching: a near-tie in a cost may round either way.
    matches = MatchReplay()
    with matches.recording():
        loss, gradients = loss_and_gradients(fresh_model(), *global_batch())
    results = in_two_processes(worker, tmp_path, matches)
    # Each process divides by the averaged box count, so the mean of their losses is the global loss,
    # and DDP's averaged gradients are the global gradient.
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, loss, rtol=1e-5, atol=1e-5)
    for rank in (0, 1):
        assert results[rank][1].keys() == gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(results[rank][1][name], gradient, rtol=1e-3, atol=1e-6)



def accumulation_worker(rank: int, rendezvous: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = DistributedDataParallel(fresh_model())
        reductions = []

        def counted(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counted)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        images, targets = global_batch()
        per_backward = []
        update_boxes = average_num_boxes(targets[2 * rank : 2 * rank + 2])
        for step in range(2):  # each process's two images, one a batch, one update
            image = 2 * rank + step
            train_step(model, SetCriterion(), optimizer, images[image : image + 1], None, targets[image : image + 1],
                       clip_max_norm=0.0, update_boxes=update_boxes, update=step == 1)
            per_backward.append(len(reductions))
        results[rank] = per_backward, {name: p.detach().clone() for name, p in model.module.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_accumulated_gradients_are_averaged_across_processes_once_an_update(tmp_path):
    results = in_two_processes(accumulation_worker, tmp_path)
    for rank in (0, 1):
        reductions, _ = results[rank]
        assert reductions[0] == 0 < reductions[1], "DDP reduced the gradients of a batch that did not update"
    # Reduced once, the processes' gradients are one average: both step to the same weights.
    initial = dict(fresh_model().named_parameters())
    moved = 0
    for name, parameter in results[0][1].items():
        torch.testing.assert_close(parameter, results[1][1][name], rtol=0, atol=0)
        moved += not torch.equal(parameter, initial[name])
    assert moved > 0


def denoising_worker(rank: int, rendezvous: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(build_model("tiny", num_classes=4, dropout=0.0, two_stage=True, denoising_groups=2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images, targets = global_batch()
        # Process 1 sees only an image without objects, twice: its denoising queries are padding.
        batch = slice(0, 2) if rank == 0 else slice(3, 4)
        criterion = SetCriterion()
        for _ in range(2):  # DDP reports a parameter left out of a step at the next one
            optimizer.zero_grad()
            criterion.total_loss(criterion(model(images[batch], targets=targets[batch]), targets[batch])).backward()
            optimizer.step()
        results[rank] = model.module.denoising_label_embed.weight.grad.clone()
    finally:
        dist.destroy_process_group()


def test_denoising_trains_under_ddp_when_a_process_has_no_objects(tmp_path):
    results = in_two_processes(denoising_worker, tmp_path)
    # Both processes took part in every step and hold the same averaged gradient.
    assert results[0].abs().sum() > 0
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


class RecordedAverage(WeightAverage):
    """The weight average, kept where a test can read it after training."""

    made: list[WeightAverage] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)


def averaging_worker(rank: int, rendezvous: str, results: dict, data: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        loop.WeightAverage = RecordedAverage
        # One update of one image on each process; the average keeps half of the weights it started from.
        train(TrainConfig(data=data, output_dir=str(Path(data) / "run"), epochs=1, batch_size=1, image_size=96,
                          workers=0, val_split=None, ema=0.5, ema_warmup=0))
        average = RecordedAverage.made[0].model
        share_buffers(average)  # batch norm's statistics, as before every evaluation
        results[rank] = average.state_dict()
    finally:
        dist.destroy_process_group()


def test_every_process_averages_the_weights_the_main_one_does(tmp_path):
    # Each process builds its model from its own seed; the wrap in DistributedDataParallel gives them
    # all the main process's weights, the weights every average must start from.
    data = synthesize(tmp_path / "data", train=2, val=1, image_size=96, seed=1)
    results = in_two_processes(averaging_worker, tmp_path, str(data))
    saved = read_checkpoint(data / "run" / "checkpoint.pt").extra["ema"]
    assert saved["updates"] == 1
    for rank in (0, 1):
        for name, tensor in saved["model"].items():
            torch.testing.assert_close(results[rank][name], tensor, rtol=0, atol=0, msg=f"{name} on process {rank}")


def resuming_worker(rank: int, rendezvous: str, results: dict, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        config = TrainConfig(data="", output_dir="run", resume="auto")
        outcome = [loop._resuming(config, Path(folder) / "shared" / "checkpoint.pt")]
        # The same name, each process's own file: as on each node's own disk.
        os.chdir(Path(folder) / f"node{rank}")
        try:
            outcome.append(loop._resuming(config, Path("run") / "checkpoint.pt"))
        except TrainingError as error:
            outcome.append(str(error))
        results[rank] = outcome
    finally:
        dist.destroy_process_group()


def test_processes_that_find_different_checkpoints_all_stop_in_one_line(tmp_path):
    for folder in ("shared", "node0/run", "node1/run"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "shared" / "checkpoint.pt").write_bytes(b"weights")
    (tmp_path / "node0" / "run" / "checkpoint.pt").write_bytes(b"weights")  # rank 0's node alone has one
    results = in_two_processes(resuming_worker, tmp_path, str(tmp_path))
    written = datetime.fromtimestamp((tmp_path / "node0" / "run" / "checkpoint.pt").stat().st_mtime)
    host = socket.gethostname()
    assert results[0] == results[1] == [True, (
        f"run/checkpoint.pt: the processes find different files there (0.0 MB written {written:%Y-%m-%d %H:%M:%S} on "
        f"{host}; none on {host}): the output directory must be one folder that every node shares")]


def first_run_worker(rank: int, rendezvous: str, results: dict, folder: str, command: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        os.chdir(Path(folder) / f"node{rank}")  # the same name, each process's own folder
        try:
            if command == "train":
                train(TrainConfig(data="nowhere", output_dir="run"))
            else:
                torch.manual_seed(0)
                detect_files(Detector(build_model("tiny", num_classes=3), image_size=64), [Path(folder) / "image.png"],
                             "run", progress=False)
        except (TrainingError, ValueError) as error:
            results[rank] = str(error)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("command", ["train", "detect"])
def test_a_first_run_on_each_nodes_own_disk_stops_before_it_begins(tmp_path, command):
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "image.png")
    results = in_two_processes(first_run_worker, tmp_path, str(tmp_path), command)
    host = socket.gethostname()
    assert results[0] == results[1]
    assert re.fullmatch(rf"run: the processes on {host} do not find the lock the main process holds there "
                        rf"\(run/\.lock, process \d+ on {host}\): the output directory must be one folder that "
                        rf"every node shares", results[0])
    if command == "train":
        assert not (tmp_path / "node0" / "run").exists()  # made by the run, which wrote nothing there


def test_sync_batch_norm_checkpoints_load_as_batch_norm(tmp_path):
    # Under DDP on CUDA the trainer converts trainable batch norm to SyncBatchNorm before saving.
    model = build_model("tiny", num_classes=4, backbone_norm="batch")
    names = list(model.state_dict())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(module, nn.SyncBatchNorm) for module in synced.modules())
    assert list(synced.state_dict()) == names
    save_checkpoint(tmp_path / "synced.pt", synced)
    loaded = load_pretrained(tmp_path / "synced.pt").state_dict()
    for name, tensor in synced.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    # Many objects per image, small ones included, and 13 validation images: a model trained for one
    # epoch then finds a few, so that the metrics compared are not all zeros; 13 is odd, so that the
    # distributed sampler pads one process's share with an image the other process also evaluates.
    return synthesize(tmp_path_factory.mktemp("shapes"), train=8, val=13, image_size=96, max_objects=20,
                      object_sizes=(0.05, 0.45), seed=3)


def torchrun(*arguments: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 <arguments>`` on the CPU, one thread per process, on a free port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *arguments]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


# Prints what evaluate_checkpoint (the evaluate command's function) returns on each process, in full
# precision: a model trained for one epoch scores ~1e-4, which the command's three decimals print as 0.
EVALUATE = """
import json, sys
from deformable_detr.distributed import rank
from deformable_detr.evaluation import evaluate_checkpoint
metrics = evaluate_checkpoint(sys.argv[1], sys.argv[2], batch_size=1, image_size=96, workers=0)
# One write of one line: print writes the line and its newline separately when unbuffered
# (PYTHONUNBUFFERED), and the two processes' lines could then interleave.
sys.stdout.write(json.dumps({"rank": rank(), **metrics}) + "\\n")
"""


def single_process_metrics(checkpoint, data) -> dict[str, float]:
    """What ``deformable-detr evaluate`` computes, in this process, with one thread like each torchrun worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate_checkpoint(checkpoint, data, batch_size=1, image_size=96, workers=0)
    finally:
        torch.set_num_threads(threads)


# Evaluation in batches of one: a batch pads its images to a common size, which changes the features
# near their borders, so batches composed differently (one process's sequential batches against two
# processes' interleaved shares) would score slightly differently. Alone, each image gets the same
# detections in any process, so the metrics are equal exactly.
def test_torchrun_trains_and_evaluates_like_one_process(shapes, tmp_path):
    run = tmp_path / "run"
    arguments = ["--data", str(shapes), "--output-dir", str(run), "--epochs", "1", "--batch-size", "1",
                 "--image-size", "96", "--workers", "0", "--seed", "3"]
    trained = torchrun("-m", "deformable_detr.cli", "train", *arguments)
    assert trained.returncode == 0, trained.stderr[-3000:]

    # The main process alone writes and prints: one log record, one TensorBoard file, no stray
    # temporary files, one line of metrics.
    assert sorted(path.name for path in run.iterdir()) == [".lock", "best.pt", "checkpoint.pt", "curves.png",
                                                           "log.jsonl", "report", "steps.jsonl", "tensorboard"]
    assert len(list((run / "tensorboard").iterdir())) == 1
    (record,) = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert record["epoch"] == 0
    assert trained.stdout.count("AP50") == 1

    expected = single_process_metrics(run / "checkpoint.pt", shapes)
    assert expected["AR100"] > 0, "nothing found: the comparison would be of zeros; pick another data seed"
    # Every process evaluated the model the main process saved, batch-norm statistics included.
    assert {name: record[name] for name in METRICS} == expected

    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE)
    evaluated = torchrun(str(script), str(run / "checkpoint.pt"), str(shapes))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    by_rank = {result.pop("rank"): result for result in map(json.loads, evaluated.stdout.splitlines())}
    assert by_rank == {0: expected, 1: expected}


def test_a_time_budget_stops_every_process_at_the_same_update(shapes, tmp_path):
    # The main process's clock decides for all: a process going on alone would wait for the others forever.
    arguments = ["--data", str(shapes), "--output-dir", str(tmp_path / "run"), "--epochs", "2", "--max-minutes",
                 "0.001", "--batch-size", "1", "--image-size", "96", "--workers", "0", "--no-report"]
    trained = torchrun("-m", "deformable_detr.cli", "train", *arguments)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.count("stopping at epoch 0, batch 1 of") == 1
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert record["epoch"] == 0 and record["batches"] == 1


def test_a_warning_when_torchrun_restarts_would_share_the_failed_groups_store(monkeypatch):
    from deformable_detr.distributed import _restarts_share_a_stale_store

    # What torchrun --max-restarts 1 gives its workers, and the same with the sharing turned off.
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert _restarts_share_a_stale_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert not _restarts_share_a_stale_store()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert not _restarts_share_a_stale_store()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rendezvous_that_never_completes_fails_in_one_line_naming_it_within_its_timeout(tmp_path, rank):
    # What torchrun gives each process of a two-process world, on a port nobody else serves: rank 0
    # serves the rendezvous and waits for rank 1, and rank 1 finds no one to join.
    port = free_port()
    environment = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "deformable_detr.cli", "train", "--data", str(tmp_path / "data"), "--output-dir",
               str(tmp_path / "run"), "--rendezvous-timeout", "1"]
    started = time.monotonic()
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"deformable-detr: error: rendezvous at 127.0.0.1:{port}: not every process "
                                    "joined within 1 s (")
    assert elapsed < 1 + 60, "slower than the timeout and the start of a Python process with torch"
    assert not (tmp_path / "run").exists()
