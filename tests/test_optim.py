"""The optimiser recipe: the published parameter groups and step schedule, and the cosine schedules."""

from __future__ import annotations

import math

import pytest
import torch

from deformable_detr import build_model
from deformable_detr.train.optim import LearningRateSchedule, build_lr_scheduler, build_optimizer


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


@pytest.mark.parametrize("epochs_by_time", [0.0, 2.4, 7.0])
def test_the_step_schedule_is_the_published_sequence_exactly(epochs_by_time):
    schedule = LearningRateSchedule(epochs=50, lr_drop_epoch=3, gamma=0.1, updates_per_epoch=7, warmup_updates=10)
    schedule.epochs_by_time = epochs_by_time
    for update in range(60):
        # The formula of the step schedule before the cosine ones joined it, written out.
        warmup = min(1.0, (update + 1) / 10)
        expected = warmup * 0.1 ** (max(update // 7, math.floor(epochs_by_time)) // 3)
        assert schedule(update) == expected


def closed_form(epoch: float, *, epochs: float, decline_start: float, floor: float) -> float:
    """The cosine schedules, after their warm-up: 1 until decline_start, then half a cosine to floor."""
    share = min(max((epoch - decline_start) / (epochs - decline_start), 0.0), 1.0)
    return floor + (1 - floor) * (1 + math.cos(math.pi * share)) / 2


@pytest.mark.parametrize("kind", ["cosine", "flat-cosine"])
def test_the_cosine_schedules_follow_their_closed_form(kind):
    # 10 updates an epoch, 20 epochs, a warm-up of half an epoch, the flat part to epoch 12.
    schedule = LearningRateSchedule(kind=kind, epochs=20, lr_drop_epoch=12, gamma=0.1, updates_per_epoch=10,
                                    warmup_epochs=0.5, min_lr_factor=0.05)
    decline_start = 0.5 if kind == "cosine" else 12
    # The warm-up: the share of it done once the update is.
    assert [schedule(update) for update in range(5)] == pytest.approx(
        [(update + 1) / 5 * closed_form(update / 10, epochs=20, decline_start=decline_start, floor=0.05)
         for update in range(5)], rel=1e-12)
    for update in (5, 37, 120, 121, 150, 199):
        expected = closed_form(update / 10, epochs=20, decline_start=decline_start, floor=0.05)
        assert schedule(update) == pytest.approx(expected, rel=1e-12), update
    assert schedule(199) == pytest.approx(0.05, abs=1e-3) and schedule(10**6) == pytest.approx(0.05)
    if kind == "flat-cosine":
        assert schedule(5) == schedule(120) == 1.0 and schedule(121) < 1.0


def test_a_warmup_in_epochs_and_a_cosine_follow_a_time_budget():
    schedule = LearningRateSchedule(kind="cosine", epochs=20, lr_drop_epoch=40, gamma=0.1, updates_per_epoch=100,
                                    warmup_epochs=1.0)
    schedule.epochs_by_time = 0.5  # 2.5 % of the budget: half the warm-up, whatever the updates say
    assert schedule(9) == pytest.approx(0.5 * closed_form(0.5, epochs=20, decline_start=1, floor=0))
    schedule.epochs_by_time = 10.0  # half the budget spent in two epochs of updates: the clock decides
    assert schedule(200) == pytest.approx(closed_form(10, epochs=20, decline_start=1, floor=0))
    schedule.epochs_by_time = 20.0
    assert schedule(200) == 0.0


def test_a_warmup_is_in_updates_or_in_epochs_and_the_schedule_is_a_known_one_that_drops_after_an_epoch_at_least():
    with pytest.raises(ValueError, match="in updates or in epochs, not both"):
        LearningRateSchedule(epochs=2, lr_drop_epoch=1, gamma=0.1, updates_per_epoch=1, warmup_updates=2,
                             warmup_epochs=0.5)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'; choose one of step, cosine, flat-cosine"):
        LearningRateSchedule(kind="linear", epochs=2, lr_drop_epoch=1, gamma=0.1, updates_per_epoch=1)
    with pytest.raises(ValueError, match="lr_drop_epoch must be at least 1 for the step schedule, got 0"):
        LearningRateSchedule(epochs=2, lr_drop_epoch=0, gamma=0.1, updates_per_epoch=1)
    assert LearningRateSchedule(kind="flat-cosine", epochs=2, lr_drop_epoch=0, gamma=0.1, updates_per_epoch=1)(0) == 1.0
