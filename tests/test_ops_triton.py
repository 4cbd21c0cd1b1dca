"""The fused Triton kernels: ``ops_triton_checks.py`` run in a fresh process, under Triton's
interpreter on CPU tensors where there is no GPU.

Triton reads ``TRITON_INTERPRET`` when it is first imported, which this process has done already
(torch's custom-operator machinery imports it), and the interpreter must not reach other test modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS = Path(__file__).with_name("ops_triton_checks.py")


def run_checks(*arguments: str) -> None:
    """``ops_triton_checks.py`` (``arguments``: pytest's, to select some) in a process of its own."""
    environment = dict(os.environ)
    if not torch.cuda.is_available():
        environment["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS), *arguments],
        cwd=CHECKS.parents[1], env=environment, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


# Under the interpreter the checks take most of a minute: a slow test (CI runs it); on a GPU, seconds.
@pytest.mark.slow
def test_triton_kernels_equal_the_reference():
    run_checks()


def test_triton_kernels_index_a_level_past_2_24_pixels_and_heads_of_no_channels():
    # The checks the default suite runs too, a few seconds under the interpreter: a level whose
    # positions float32 cannot hold (the kernels once read and wrote past value and its gradient
    # there), and heads of no channels (once a division by zero).
    run_checks("-k", "past_2_24 or no_channels")
