"""Two CPU processes (gloo) train like one process with the same global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from deformable_detr import build_model
from deformable_detr.train import SetCriterion


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


def worker(rank: int, rendezvous: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = fresh_model()
        images, targets = global_batch()
        half = slice(2 * rank, 2 * rank + 2)
        results[rank] = loss_and_gradients(DistributedDataParallel(model), images[half], targets[half])
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2)
        results = dict(results)
    loss, gradients = loss_and_gradients(fresh_model(), *global_batch())
    # Each process divides by the averaged box count, so the mean of their losses is the global loss,
    # and DDP's averaged gradients are the global gradient.
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, loss, rtol=1e-5, atol=1e-5)
    for rank in (0, 1):
        assert results[rank][1].keys() == gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(results[rank][1][name], gradient, rtol=1e-3, atol=1e-6)
