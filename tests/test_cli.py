"""The command line's defaults are the library's: each command's flags default to its function's, and its help
shows them."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

import pytest

from deformable_detr import __version__
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


def test_every_flag_with_a_default_shows_it_in_its_help():
    """`deformable-detr <command> --help` lists a command's flags with their defaults, as the README says."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [
        f"{name} {action.option_strings[0]}"
        for name, command in commands.items()
        for action in command._actions
        if action.option_strings and action.nargs != 0  # a switch's default is its absence
        and command.get_default(action.dest) is not None and "%(default)s" not in (action.help or "")
    ]
    assert silent == []


def test_python_dash_m_runs_the_command():
    ran = subprocess.run([sys.executable, "-m", "deformable_detr", "--version"], capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, f"deformable-detr {__version__}\n")
