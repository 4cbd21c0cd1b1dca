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


# Under the interpreter the checks take most of a minute: a slow test (CI runs it); on a GPU, seconds.
@pytest.mark.slow
def test_triton_kernels_equal_the_reference():
    environment = dict(os.environ)
    if not torch.cuda.is_available():
        environment["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
        cwd=CHECKS.parents[1], env=environment, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
