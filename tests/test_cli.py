"""The command line's defaults are the library's: each command's flags default to its function's."""

from __future__ import annotations

import inspect

import pytest

from deformable_detr.cli import build_parser
from deformable_detr.data import synthesize
from deformable_detr.evaluation import evaluate_checkpoint
from deformable_detr.explain import explain
from deformable_detr.explore import explore
from deformable_detr.export import export_model
from deformable_detr.predict import detect_files

COMMANDS = {
    "detect": (["detect", "model.pt", "photos", "--out", "out"], detect_files, ["threshold", "batch_size"]),
    "explain": (["explain", "model.pt", "a.jpg", "--out", "a.png"], explain, ["top_k", "threshold", "encoder_level"]),
    "explore": (["explore", "model.pt", "a.jpg", "--out", "a.html"], explore, ["encoder_layers", "max_bytes", "pad_to_multiple"]),
    "evaluate": (["evaluate", "model.pt", "--data", "data"], evaluate_checkpoint, ["split", "batch_size", "workers"]),
    "synthesize": (["synthesize", "data"], synthesize, ["image_size", "object_sizes", "seed"]),
    "export": (["export", "model.pt", "--out", "model.onnx"], export_model, ["format", "opset"]),
}


@pytest.mark.parametrize("argv, function, flags", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_commands_defaults_are_its_functions(argv, function, flags):
    args = vars(build_parser().parse_args(argv))
    parameters = inspect.signature(function).parameters
    assert {flag: args[flag] for flag in flags} == {flag: parameters[flag].default for flag in flags}
