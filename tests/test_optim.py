"""The published optimiser recipe."""

from __future__ import annotations

import pytest

from deformable_detr import build_model
from deformable_detr.train.optim import build_lr_scheduler, build_optimizer


def test_three_parameter_groups_with_the_published_learning_rates():
    model = build_model("tiny")
    optimizer = build_optimizer(model)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert {name: group["lr"] for name, group in groups.items()} == pytest.approx(
        {"rest": 2e-4, "backbone": 2e-5, "sampling": 2e-5}
    )
    assert all(group["weight_decay"] == 1e-4 for group in optimizer.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    backbone = {names[id(p)] for p in groups["backbone"]["params"]}
    sampling = {names[id(p)] for p in groups["sampling"]["params"]}
    assert backbone and all(n.startswith("backbone.0.body.layer") for n in backbone)
    assert sampling == {n for n in names.values() if "sampling_offsets" in n or "reference_points" in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grouped = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
    assert grouped == trainable  # every trainable parameter exactly once, frozen ones left out
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_learning_rate_drops_tenfold_at_the_drop_epoch():
    optimizer = build_optimizer(build_model("tiny"))
    scheduler = build_lr_scheduler(optimizer, lr_drop_epoch=2)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5])


def test_warmup_rises_linearly_then_the_rate_drops_by_epoch():
    optimizer = build_optimizer(build_model("tiny"), lr=1e-3, lr_backbone=1e-4)
    scheduler = build_lr_scheduler(optimizer, lr_drop_epoch=2, updates_per_epoch=3, warmup_updates=4)
    rates = []
    for _ in range(8):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    main, backbone = [r[0] for r in rates], [r[1] for r in rates]
    assert main == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4])
    assert backbone == pytest.approx([m / 10 for m in main])
