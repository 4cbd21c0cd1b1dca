"""The benchmark scripts run, each in the smallest setting it offers, and report what they measure:
`make bench` and the scripts docs/ quotes are run by hand, so a script broken by a change elsewhere
would go unnoticed (two were: a model too narrow for transformers' twin, a new checkpoint field)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from deformable_detr import build_model, save_checkpoint
from deformable_detr.data import coco_split, synthesize

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SECONDS = r"[\d.]+ s"


def run_benchmark(script: str, *arguments: str | Path) -> str:
    """The standard output of ``benchmarks/<script> arguments``, which must succeed."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, arguments)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("script, arguments, report", [
    ("ms_deform_attn.py", ["--tiny", "--repeats", "1"], r"decoder \(Lq=20\) float32 fwd\+bwd +[\d.]+ +[\d.]+ +[\d.]+x"),
    ("train_step.py", ["--tiny", "--repeats", "1"], r"previous demo model \(fused op\) +[\d.]+ s/step"),
    ("check_data.py", ["--images", "20", "--repeats", "1"], rf"YOLO: first run {SECONDS}, cached {SECONDS}"),
    ("coco_eval.py", ["--images", "20", "--repeats", "1"], r"largest difference in the 12 metrics: [\d.e+-]+\nspeed-up [\d.]+x"),
])
def test_a_benchmark_runs_and_reports_its_timings(script, arguments, report):
    assert re.search(report, run_benchmark(script, *arguments))


@pytest.mark.slow  # 12 s, most of it building and loading transformers' twin
def test_the_model_benchmark_times_ours_against_transformers():
    # Its training case loads one set of weights into ours and a transformers twin, which exists only
    # at ResNet-18's full width: the tiny preset's narrow backbone must be widened for it.
    pytest.importorskip("transformers")
    assert re.search(r"transformers +[\d.]+ s/step", run_benchmark("model.py", "--skip-inference", "--repeats", "1"))


@pytest.mark.slow
def test_the_deployment_benchmark_times_each_path_and_its_logit_difference():
    pytest.importorskip("transformers")
    output = run_benchmark("deploy.py", "--image-size", "64", "96", "--repeats", "1")
    for contender in ("ours, float32", "ours, bfloat16", "transformers, float32"):
        assert re.search(rf"{contender} +{SECONDS} +[\d.]+x .* largest logit difference [\d.e+-]+", output), output


@pytest.mark.slow
def test_the_checkpoint_benchmark_reports_sizes_times_and_shares():
    output = run_benchmark("checkpoint.py", "--repeats", "1")
    for model in ("demo (tiny)", "r50"):
        assert re.search(rf"{re.escape(model)} +\d+ MB +{SECONDS} +{SECONDS} +every 10 min: [\d.]+%", output), output


@pytest.mark.slow
def test_the_training_batches_benchmark_times_each_way_of_loading():
    output = run_benchmark("train_batches.py", "--steps", "2", "--repeats", "1")
    for loading in ("largest image, 2 workers", "largest image, in-process", "multiple of 32, in-process"):
        assert re.search(rf"{loading} +[\d.]+ s/epoch +[\d.]+ images/s", output), output


@pytest.mark.slow
def test_the_demo_options_benchmark_prints_each_variants_curve(tmp_path):
    output = run_benchmark("demo_options.py", "--out", tmp_path, "--epochs", "1", "--images", "16", "4", "demo", "ema")
    assert re.search(r"^demo +AP [\d.]+ +\([\d.]+ training minutes\)$", output, re.MULTILINE), output
    assert re.search(r"^ema +AP [\d.]+ +raw [\d.]+ +\([\d.]+ training minutes\)$", output, re.MULTILINE), output


def test_the_bfloat16_cost_benchmark_compares_both_precisions(tmp_path):
    data = synthesize(tmp_path / "shapes", train=1, val=2, image_size=64, seed=1)
    val = coco_split(data, "val")
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model("tiny", num_classes=val.num_classes), class_names=val.category_names, image_size=64)
    # Every detection of an untrained model is compared: none would pass the default threshold.
    output = run_benchmark("bf16_cost.py", checkpoint, data, "--threshold", "0")
    assert re.search(r"AP bfloat16 - float32: [+-][\d.]+", output), output
    for difference in ("score", "box_pixels", "iou"):
        assert re.search(rf"{difference} +[\d.]+ / [\d.]+ / [\d.]+", output), output
