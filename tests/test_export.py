"""ONNX export: onnxruntime runs the graph at sizes other than the traced one and matches PyTorch."""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from deformable_detr import DeformableDETR, build_model, save_checkpoint
from deformable_detr.cli import main
from deformable_detr.export import ExportError, export_model
from deformable_detr.model import transformer

from choices import TopKReplay

# None of these is the size export_model traces with (2 x 3 x 256 x 320); the last one's coarsest
# feature map is 1 x 1, where the trace's are all at least 2 x 2.
INPUT_SIZES = [(1, 3, 128, 160), (2, 3, 200, 136), (1, 3, 97, 243), (1, 3, 40, 56)]


def perturbed(model):
    # Away from the initialisation, whose zero sampling-offset and attention weights would hide the
    # sampling from the outputs.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def clearly_decided_images(model, size, *, margin: float = 1e-4, tries: int = 20) -> torch.Tensor:
    """Random images on which each of the model's top-k choices (the two-stage proposal selection)
    is decided by more than ``margin``: onnxruntime rounds differently from PyTorch, so a closer
    choice may legitimately go the other way, and the outputs compared would follow two choices."""
    for _ in range(tries):
        images = torch.randn(size)
        topk = TopKReplay()
        with torch.no_grad(), topk.recording():
            model.eval()(images)
        ranked = [input.sort(dim=-1, descending=True).values[..., : indices.shape[-1] + 1]
                  for input, indices in zip(topk.inputs, topk.indices)]
        if all((values[..., :-1] - values[..., 1:]).min() > margin for values in ranked):
            return images
    raise AssertionError(f"no input in {tries} tries whose top-k choices are all decided by {margin}")


def max_differences(model, session, size) -> tuple[float, float]:
    images = clearly_decided_images(model, size)
    with torch.no_grad():
        expected = model.eval()(images)
    logits, boxes = session.run(["pred_logits", "pred_boxes"], {"images": images.numpy()})
    return (
        np.abs(logits - expected["pred_logits"].numpy()).max(),
        np.abs(boxes - expected["pred_boxes"].numpy()).max(),
    )


@dataclass
class Exported:
    model: DeformableDETR
    path: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny preset (four levels, iterative box refinement) saved and exported once by the CLI.

    One encoder and two decoder layers (refinement between them) instead of three and three: the
    export's time grows with the layers (about 50 s here, 90 s for the whole preset, tested as slow).
    """
    torch.manual_seed(0)
    model = perturbed(build_model("tiny", encoder_layers=1, decoder_layers=2))
    folder = tmp_path_factory.mktemp("export")
    save_checkpoint(folder / "tiny.safetensors", model)
    assert main(["export", str(folder / "tiny.safetensors"), "--format", "onnx", "--out", str(folder / "tiny.onnx")]) == 0
    return Exported(model, folder / "tiny.onnx")


@pytest.fixture(scope="module")
def session(exported):
    return onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])


# The export takes most of a minute, so the tests of its graph are slow ones (CI runs them).
@pytest.mark.slow
@pytest.mark.parametrize("size", INPUT_SIZES, ids=lambda size: "x".join(map(str, size)))
def test_onnxruntime_matches_pytorch(exported, session, size):
    logits_difference, boxes_difference = max_differences(exported.model, session, size)
    assert logits_difference < 1e-4
    assert boxes_difference < 1e-4


@pytest.mark.slow
def test_batch_size_height_and_width_are_dynamic(exported, session):
    graph = onnx.load(exported.path).graph
    dims = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] for value in graph.input}
    assert dims == {"images": ["batch", 3, "height", "width"]}
    outputs = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] for value in graph.output}
    assert outputs == {"pred_logits": ["batch", 50, 91], "pred_boxes": ["batch", 50, 4]}
    logits, boxes = session.run(None, {"images": np.zeros((3, 3, 64, 96), np.float32)})
    assert logits.shape == (3, 50, 91) and boxes.shape == (3, 50, 4)


@pytest.mark.slow
def test_graph_uses_standard_onnx_ops_and_grid_sample(exported):
    model_proto = onnx.load(exported.path)
    onnx.checker.check_model(model_proto, full_check=True)
    assert {node.domain for node in model_proto.graph.node} <= {"", "ai.onnx"}  # no custom op
    assert "GridSample" in {node.op_type for node in model_proto.graph.node}


class FakeProgram:
    """What torch.onnx.export returns, as export_model uses it: a graph in ``opset`` that ``save``
    writes, or fails to write with ``save_error``."""

    def __init__(self, opset: int = 18, save_error: OSError | None = None) -> None:
        self.model = SimpleNamespace(opset_imports={"": opset})
        self.save_error = save_error
        self.steps: list[str] = []

    def optimize(self) -> None:
        self.steps.append("optimize")

    def save(self, destination, **kwargs) -> None:
        if self.save_error is not None:
            raise self.save_error
        Path(destination).write_bytes(b"graph")
        self.steps.append("save")


def fake_export(program: FakeProgram):
    def export(model, args, **kwargs):
        program.steps.append("export")
        return program

    return export


def test_export_names_each_long_step_as_it_starts(tmp_path, monkeypatch, capsys):
    program = FakeProgram()
    monkeypatch.setattr(torch.onnx, "export", fake_export(program))
    path = tmp_path / "model.onnx"
    export_model(build_model("tiny"), path)
    assert capsys.readouterr().out == (f"{path}: tracing the model (torch.export) and translating it to ONNX\n"
                                       f"{path}: optimising the graph (onnxscript)\n")
    assert program.steps == ["export", "optimize", "save"]
    assert path.read_bytes() == b"graph"


class FeedForward(torch.nn.Module):
    """An encoder layer's feed-forward block alone."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return transformer._add_feed_forward(x, layer.linear1, layer.dropout2, layer.linear2, layer.dropout3)


def test_the_feed_forward_block_traces_with_a_dynamic_batch():
    # torch.onnx.export tries torch.export's non-strict trace first and, where it fixes a dynamic
    # size, traces the whole model again in strict mode: one wasted trace, a third of the export.
    block = FeedForward(build_model("tiny").transformer.encoder.layers[0]).eval()
    with torch.no_grad():
        program = torch.export.export(block, (torch.zeros(2, 50, 128),), strict=False,
                                      dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    assert program.module()(torch.zeros(3, 50, 128)).shape == (3, 50, 128)


def test_failed_export_keeps_the_previous_file_and_the_models_mode(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")

    def failing_export(model, args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    model = build_model("tiny").train()
    with pytest.raises(RuntimeError, match="export failed"):
        export_model(model, path)
    assert model.training  # exported in eval mode, then put back
    assert path.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [path]


def test_unwritable_path_fails_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError) as error:
        export_model(build_model("tiny"), blocker / "model.onnx")
    assert str(error.value) == f"{blocker / 'model.onnx'}: {blocker} is a file, not a folder"


def test_a_checkpoint_path_for_the_model_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match=r"model is a PosixPath; .* load_pretrained\(path\) reads a checkpoint file"):
        export_model(tmp_path / "best.pt", tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_a_failed_write_names_the_file_not_the_temporary_one(tmp_path, monkeypatch):
    full_disk = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/the/temporary/file")
    monkeypatch.setattr(torch.onnx, "export", fake_export(FakeProgram(save_error=full_disk)))
    with pytest.raises(ExportError) as error:
        export_model(build_model("tiny"), tmp_path / "model.onnx")
    assert str(error.value) == f"{tmp_path / 'model.onnx'}: cannot write the ONNX file: No space left on device"
    assert not list(tmp_path.iterdir())


def test_a_graph_left_in_another_opset_is_not_written(tmp_path, monkeypatch):
    # What the exporter does when it cannot convert the graph: it logs why and keeps the opset it has.
    monkeypatch.setattr(torch.onnx, "export", fake_export(FakeProgram(opset=18)))
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError) as error:
        export_model(build_model("tiny"), path, opset=20)
    assert str(error.value) == f"{path}: the exporter could not convert the graph to ONNX opset 20 (it wrote 18)"
    assert not list(tmp_path.iterdir())


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "model.onnx")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "broken.pt: not a checkpoint" in error
    assert not (tmp_path / "model.onnx").exists()


def test_unsupported_format_and_opset_are_refused(tmp_path):
    model = build_model("tiny")
    with pytest.raises(ExportError, match="unsupported export format 'tflite'"):
        export_model(model, tmp_path / "model.tflite", format="tflite")
    for opset in (17, 26):
        with pytest.raises(ExportError, match=f"opset {opset} is not supported: the exporter writes opsets 18 to 25"):
            export_model(model, tmp_path / "model.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_cli_names_the_extra_to_install_where_the_exporter_is_missing(tmp_path, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what an install without the onnx extra imports
    save_checkpoint(tmp_path / "tiny.pt", build_model("tiny"))
    assert main(["export", str(tmp_path / "tiny.pt"), "--out", str(tmp_path / "model.onnx")]) == 1
    assert capsys.readouterr().err == (f"deformable-detr: error: ONNX export needs {missing}, not installed: "
                                       "install the package's onnx extra (pip install -e '.[onnx]' in its clone)\n")
    assert not (tmp_path / "model.onnx").exists()


def test_cli_refuses_an_opset_out_of_range_in_one_line(tmp_path, capsys):
    save_checkpoint(tmp_path / "tiny.pt", build_model("tiny"))
    assert main(["export", str(tmp_path / "tiny.pt"), "--out", str(tmp_path / "model.onnx"), "--opset", "99"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "deformable-detr: error: ONNX opset 99 is not supported: the exporter writes opsets 18 to 25\n"
    assert "written" not in captured.out and not (tmp_path / "model.onnx").exists()


# The whole tiny preset, and ResNet-50 presets with a small transformer to keep their export short.
SMALL_TRANSFORMER = {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "dim_feedforward": 128, "num_queries": 30}


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, overrides",
    [("tiny", {}), ("r50_two_stage", SMALL_TRANSFORMER), ("r50_single_scale_dc5", SMALL_TRANSFORMER)],
    ids=["tiny", "r50_two_stage", "r50_single_scale_dc5"],
)
def test_presets_export(tmp_path, preset, overrides):
    torch.manual_seed(0)
    model = perturbed(build_model(preset, **overrides))
    path = export_model(model, tmp_path / f"{preset}.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in INPUT_SIZES[:2]:
        assert max(max_differences(model, session, size)) < 1e-4
