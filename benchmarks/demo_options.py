"""The demo's recipe with training options, for AP-per-epoch curves against the demo as it is.

Every variant trains on the same synthetic data (the demo's, synthesised with its seed, or with
``--task crowded`` a harder set: three times the objects an image, a third of their size) with the
same seed, so its curve differs from the demo's by the options alone. Each run writes
``<out>/<task>/<variant>/train/log.jsonl``; several variants run one after another (or, as separate
commands, side by side), and a table of AP per epoch is printed at the end.

    python benchmarks/demo_options.py --out /tmp/options demo no_options mqs_only [--epochs 10] [--seed 43]
    python benchmarks/demo_options.py --out /tmp/options --task crowded demo ema flat_cosine
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deformable_detr.demo import run_demo

# name -> (ModelConfig changes, TrainConfig changes), on top of the demo's own recipe (which has
# denoising, mixed query selection and IoU-aware classification).
NO_DENOISING = {"denoising_groups": 0}
# An average of about the last epoch's weights (an update's decay 0.99 at the demo's batch of 8),
# its ramp a quarter of an epoch.
EMA = {"ema": 0.96, "ema_warmup": 25}
COSINE = {"lr_schedule": "cosine", "warmup_epochs": 0.5, "min_lr_factor": 0.05}
FLAT_COSINE = {**COSINE, "lr_schedule": "flat-cosine"}  # flat for the first half of the epochs (FLAT_SHARE)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "demo": ({}, {}),
    "no_options": ({**NO_DENOISING, "mixed_query_selection": False}, {"iou_aware_classification": False}),
    "mqs_only": (NO_DENOISING, {"iou_aware_classification": False}),
    "iou_aware_only": ({**NO_DENOISING, "mixed_query_selection": False}, {}),
    "without_denoising": (NO_DENOISING, {}),
    "lft": ({"look_forward_twice": True}, {}),
    "hybrid": ({"one_to_many_queries": 100}, {"one_to_many_repeats": 5}),
    # The recipe of later DETRs (docs/training-options.md#the-recipe-of-later-detrs-schedules-ema-early-stopping).
    "ema": ({}, EMA),
    "cosine": ({}, COSINE),
    "flat_cosine": ({}, FLAT_COSINE),
    "ema_cosine": ({}, {**EMA, **COSINE}),
    "ema_flat_cosine": ({}, {**EMA, **FLAT_COSINE}),
    "faster_ema": ({}, {**EMA, "ema": 0.92}),  # 0.98 an update at the demo's batch: half the span
    "late_flat_cosine": ({}, FLAT_COSINE),
}
# Where the flat-cosine variants' cosine begins, as a share of the epochs.
FLAT_SHARE = {"late_flat_cosine": 0.75}
# The synthetic tasks: the demo's, and one with more and smaller objects an image.
TASKS = {"demo": {}, "crowded": {"max_objects": 18, "object_sizes": (0.05, 0.2)}}


def curve(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--out", required=True, help="folder for the data and every variant's run")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each run, however long (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="training seed (default: the demo's); the data stay the task's")
    parser.add_argument("--task", choices=list(TASKS), default="demo", help="the synthetic data (default: %(default)s)")
    parser.add_argument("--images", type=int, nargs=2, default=(800, 100), metavar=("TRAIN", "VAL"),
                        help="images synthesised for training and validation (default: the demo's, %(default)s)")
    args = parser.parse_args()
    out = Path(args.out) / args.task
    for name in args.variants:
        model_options, train_options = VARIANTS[name]
        seed = {} if args.seed is None else {"seed": args.seed}
        if train_options.get("lr_schedule") == "flat-cosine":
            train_options = {**train_options, "lr_drop_epoch": round(args.epochs * FLAT_SHARE.get(name, 0.5))}
        run_demo(out / name, minutes=None, epochs=args.epochs, train_images=args.images[0], val_images=args.images[1],
                 data_options=TASKS[args.task], model_options=model_options, **train_options, **seed)
    for name in args.variants:
        records = curve(out / name / "train" / "log.jsonl")
        aps = " ".join(f"{r['AP']:.3f}" for r in records)
        raw = "  raw " + " ".join(f"{r['raw_AP']:.3f}" for r in records) if "raw_AP" in records[0] else ""
        print(f"{name:16s} AP {aps}{raw}  ({records[-1]['training_minutes']:.1f} training minutes)")


if __name__ == "__main__":
    main()
