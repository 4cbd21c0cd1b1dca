"""`deformable-detr <command>`: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .checkpoints import CheckpointError, read_checkpoint
from .config import PRESETS, get_config


def _presets(_: argparse.Namespace) -> None:
    from .model import build_model

    for name in PRESETS:
        model = build_model(name)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        config = get_config(name)
        print(
            f"{name:22s} {config.backbone:10s} d_model {config.d_model:4d}  levels {config.num_feature_levels}"
            f"  refine {config.with_box_refine!s:5s}  two-stage {config.two_stage!s:5s}  {trainable:>12,d} trainable parameters"
        )


def _inspect(args: argparse.Namespace) -> None:
    from .checkpoints import load_pretrained

    checkpoint = read_checkpoint(args.checkpoint)
    load_pretrained(args.checkpoint)  # proves the weights fit
    print(f"{args.checkpoint}: {checkpoint.source_format} checkpoint, loads with strict=True")
    for field, value in checkpoint.config.to_dict().items():
        print(f"  {field}: {value}")


def _demo(_: argparse.Namespace) -> None:
    print("deformable-detr demo: not yet (training and evaluation arrive with the training issue).")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deformable-detr", description="Deformable DETR object detection.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help="list the model presets").set_defaults(run=_presets)
    inspect = commands.add_parser("inspect", help="read a checkpoint (ours, reference or Hugging Face) and describe it")
    inspect.add_argument("checkpoint")
    inspect.set_defaults(run=_inspect)
    commands.add_parser("demo", help="train and evaluate the tiny model on synthetic data").set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, FileNotFoundError) as error:
        print(f"deformable-detr: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
