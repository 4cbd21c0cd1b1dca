"""The model under torch.compile: the fused op's fake and autograd registrations let it trace."""

from __future__ import annotations

import pytest
import torch

from deformable_detr import build_model

IMAGES = [torch.randn(3, 96, 128), torch.randn(3, 128, 96)]


def surrogate_loss(outputs):
    return outputs["pred_logits"].sigmoid().mean() + outputs["pred_boxes"].mean()


def gradients(model):
    # A compiled backward returns zeros where eager leaves None (heads of unused aux outputs).
    return {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


# Inductor, torch.compile's default, generates and builds C++ for the forward and backward: about
# 80 s here, so it runs with the slow tests.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_training_step_under_compile_matches_eager(backend):
    torch.manual_seed(0)
    model = build_model("tiny", dropout=0.0).train()
    with torch.no_grad():  # leave init, where zero weights hide the sampling from the loss
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    surrogate_loss(model(IMAGES)).backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    surrogate_loss(torch.compile(model, backend=backend)(IMAGES)).backward()
    actual = gradients(model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda mismatch, name=name: f"{name}: {mismatch}")


@pytest.mark.slow
def test_inference_under_inductor_matches_eager():
    model = build_model("tiny").eval()
    with torch.no_grad():
        expected = model(IMAGES)
        actual = torch.compile(model)(IMAGES)
    torch.testing.assert_close(actual["pred_boxes"], expected["pred_boxes"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"], rtol=1e-4, atol=1e-5)
