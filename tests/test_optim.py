"""The published optimiser recipe."""

from __future__ import annotations

import pytest
import torch

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


def test_fused_update_matches_torchs_reference_adamw():
    torch.manual_seed(0)
    model, reference_model = build_model("tiny", num_classes=3), build_model("tiny", num_classes=3)
    reference_model.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, lr=1e-3, lr_backbone=1e-4)
    assert all(group["fused"] for group in optimizer.param_groups)
    reference_parameters = dict(reference_model.named_parameters())
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    reference = torch.optim.AdamW(
        [{"params": [reference_parameters[names[id(p)]] for p in group["params"]], "lr": group["lr"],
          "weight_decay": group["weight_decay"]} for group in optimizer.param_groups],
        foreach=False, fused=False,
    )
    # The same gradients for both: a model's own would differ where the true gradient is zero
    # (attention key biases), and Adam scales rounding noise there up to the learning rate.
    for _ in range(3):
        for name, parameter in model.named_parameters():
            parameter.grad = torch.randn_like(parameter)
            reference_parameters[name].grad = parameter.grad.clone()
        optimizer.step()
        reference.step()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, reference_parameters[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_time_budget_drops_the_rate_at_its_share_or_at_the_epoch_whichever_comes_first():
    optimizer = build_optimizer(build_model("tiny"), lr=1e-3, lr_backbone=1e-4)
    scheduler = build_lr_scheduler(optimizer, lr_drop_epoch=9, updates_per_epoch=100)
    schedule = scheduler.lr_lambdas[0]
    assert schedule(50) == 1.0
    schedule.epochs_by_time = 8.99  # 89.9 % of the budget of a 10-epoch run
    assert schedule(50) == 1.0
    schedule.epochs_by_time = 9.0  # 90 %: the drop, in epoch 0 by the updates
    assert schedule(50) == pytest.approx(0.1)
    schedule.epochs_by_time = 2.0  # a slower clock than the updates: the epochs decide
    assert schedule(899) == 1.0 and schedule(900) == pytest.approx(0.1)
