"""The benchmark scripts run, each in the smallest setting it offers, and report their timings:
`make bench` is run by hand, so a script broken by a change elsewhere would go unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script, arguments, timing", [
    ("ms_deform_attn.py", ["--tiny"], r"decoder \(Lq=20\) float32 fwd\+bwd +[\d.]+ +[\d.]+ +[\d.]+x"),
    ("train_step.py", ["--tiny"], r"previous demo model \(fused op\) +[\d.]+ s/step"),
    # Its training case loads one set of weights into ours and a transformers twin, which exists only
    # at ResNet-18's full width: the tiny preset's narrow backbone must be widened for it.
    ("model.py", ["--skip-inference"], r"transformers +[\d.]+ s/step"),
])
def test_a_benchmark_runs_and_reports_its_timings(script, arguments, timing):
    if script == "model.py":
        pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments, "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(timing, result.stdout), result.stdout
