"""The average of the weights (EMA) and early stopping, each against its formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deformable_detr.train.early_stopping import EarlyStopping
from deformable_detr.train.ema import REFERENCE_BATCH, WeightAverage


def small_model() -> nn.Module:
    # A parameter, a float buffer and an integer one (batch norm's), and a layer shared twice.
    shared = nn.Linear(3, 3)
    return nn.Sequential(shared, nn.BatchNorm1d(3), shared)


def train_a_little(model: nn.Module, generator: torch.Generator) -> None:
    """An update's change: new weights and new batch-norm statistics."""
    model.train()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    model(torch.randn(4, 3, generator=generator))


def test_the_average_after_k_updates_is_the_formula_with_its_warmup_ramp_in_float64():
    generator = torch.Generator().manual_seed(0)
    model = small_model()
    average = WeightAverage(model, decay=0.9, warmup_updates=3)
    expected = {name: tensor.double() for name, tensor in model.state_dict().items()}
    for update in range(1, 8):
        train_a_little(model, generator)
        average.update(model)
        decay = 0.9 * (1 - math.exp(-update / 3))
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * tensor.double()
            else:
                expected[name] = tensor.double()
    assert average.updates == 7
    for name, tensor in average.model.state_dict().items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert average.model.state_dict()["1.num_batches_tracked"] == 7  # copied, not averaged


def test_with_decay_0_the_average_is_the_model():
    generator = torch.Generator().manual_seed(1)
    model = small_model()
    average = WeightAverage(model, decay=0.0, warmup_updates=0)
    for _ in range(3):
        train_a_little(model, generator)
        average.update(model)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(average.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_the_average_is_a_frozen_copy_in_eval_mode():
    model = small_model()
    average = WeightAverage(model, decay=0.5, warmup_updates=0)
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_decay_and_warmup_scale_with_the_batch_as_d_fines_rule():
    model = small_model()
    at_reference = WeightAverage.for_batch(model, decay=0.9998, warmup_updates=1000, batch=REFERENCE_BATCH)
    assert (at_reference.decay, at_reference.warmup_updates) == (0.9998, 1000)
    doubled = WeightAverage.for_batch(model, decay=0.9998, warmup_updates=1000, batch=2 * REFERENCE_BATCH)
    assert doubled.decay == pytest.approx(0.9996) and doubled.warmup_updates == 500
    eighth = WeightAverage.for_batch(model, decay=0.96, warmup_updates=25, batch=REFERENCE_BATCH // 4)
    assert eighth.decay == pytest.approx(0.99) and eighth.warmup_updates == 100
    with pytest.raises(ValueError, match=r"an EMA decay is in \[0, 1\)"):
        WeightAverage(model, decay=1.0, warmup_updates=0)


def test_the_state_continues_the_average_exactly():
    generator = torch.Generator().manual_seed(2)
    model = small_model()
    straight = WeightAverage(model, decay=0.8, warmup_updates=2)
    train_a_little(model, generator)
    straight.update(model)
    resumed = WeightAverage(small_model(), decay=0.1, warmup_updates=50)
    resumed.load_state_dict(straight.state_dict())
    train_a_little(model, generator)
    for average in (straight, resumed):
        average.update(model)
    assert resumed.updates == 2
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_early_stopping_counts_evaluations_without_an_improvement_beyond_the_minimum():
    stopping = EarlyStopping(patience=2, min_improvement=0.01)
    # 0.305 is better than 0.3, but not by more than 0.01: it counts as no improvement.
    decisions = [stopping.observe(ap) for ap in (0.1, 0.3, 0.305, 0.2, 0.32)]
    assert decisions == [False, False, False, True, False]
    assert EarlyStopping(patience=None).observe(0.0) is False
    with pytest.raises(ValueError, match=r"patience \(0\) is at least 1"):
        EarlyStopping(patience=0)
