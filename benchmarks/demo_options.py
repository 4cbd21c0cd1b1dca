"""The demo's recipe with training options, for AP-per-epoch curves against the demo as it is.

Every variant trains on the same synthetic data (the demo's, synthesised with its seed) with the
same seed, so its curve differs from the demo's by the options alone. Each run writes
``<out>/<variant>/train/log.jsonl``; several variants run one after another, and a table of AP per
epoch is printed at the end.

    python benchmarks/demo_options.py --out /tmp/options demo no_options mqs_only [--epochs 10] [--seed 43]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deformable_detr.demo import run_demo

# name -> (ModelConfig changes, TrainConfig changes), on top of the demo's own recipe (which has
# denoising, mixed query selection and IoU-aware classification).
NO_DENOISING = {"denoising_groups": 0}
VARIANTS: dict[str, tuple[dict, dict]] = {
    "demo": ({}, {}),
    "no_options": ({**NO_DENOISING, "mixed_query_selection": False}, {"iou_aware_classification": False}),
    "mqs_only": (NO_DENOISING, {"iou_aware_classification": False}),
    "iou_aware_only": ({**NO_DENOISING, "mixed_query_selection": False}, {}),
    "without_denoising": (NO_DENOISING, {}),
    "lft": ({"look_forward_twice": True}, {}),
    "hybrid": ({"one_to_many_queries": 100}, {"one_to_many_repeats": 5}),
}


def curve(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--out", required=True, help="folder for the data and every variant's run")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each run, however long (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="training seed (default: the demo's); the data stay the demo's")
    args = parser.parse_args()
    out = Path(args.out)
    for name in args.variants:
        model_options, train_options = VARIANTS[name]
        seed = {} if args.seed is None else {"seed": args.seed}
        run_demo(out / name, minutes=None, epochs=args.epochs, model_options=model_options, **train_options, **seed)
    for name in args.variants:
        records = curve(out / name / "train" / "log.jsonl")
        aps = " ".join(f"{r['AP']:.3f}" for r in records)
        print(f"{name:16s} AP {aps}  ({records[-1]['training_minutes']:.1f} training minutes)")


if __name__ == "__main__":
    main()
