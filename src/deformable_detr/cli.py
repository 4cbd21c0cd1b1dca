"""`deformable-detr <command>`: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import signal
import sys
import threading
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__, export
from .checkpoints import LAYOUTS, load_pretrained, read_checkpoint
from .config import PRESETS, ModelConfig, get_config
from .data.formats import FORMATS
from .data.synthetic import synthesize
from .demo import EPOCHS, MINUTES, run_demo
from .distributed import is_main_process, setup_distributed, wait_for_all
from .evaluation import DEFAULT_BATCH_SIZE, evaluate_checkpoint, format_metrics
from .explain import explain
from .explore import explore
from .model import build_model
from .predict import Detector, detect_files
from .train import TrainConfig, TrainingError, TrainingStopped
from .train.checkpointing import with_recorded_settings
from .train.config import MODEL_OPTIONS, settings_named_as_flags
from .train.ema import DEFAULT_DECAY
from .train.optim import SCHEDULES


def _presets(_: argparse.Namespace) -> None:
    for name in PRESETS:
        with torch.device("meta"):  # shapes only: counts the parameters without allocating them
            model = build_model(name)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        config = get_config(name)
        print(
            f"{name:22s} {config.backbone:10s} d_model {config.d_model:4d}  levels {config.num_feature_levels}"
            f"  refine {config.with_box_refine!s:5s}  two-stage {config.two_stage!s:5s}  {trainable:>12,d} trainable parameters"
        )


def _info(_: argparse.Namespace) -> None:
    from .environment import report

    for topic, description in report():
        print(f"{topic:17s} {description}")


def _inspect(args: argparse.Namespace) -> None:
    checkpoint = read_checkpoint(args.checkpoint)
    checkpoint.build_model()  # proves the weights fit
    print(f"{args.checkpoint}: {checkpoint.source_format} checkpoint, loads with strict=True")
    for field, value in checkpoint.config.to_dict().items():
        print(f"  {field}: {value}")
    names = checkpoint.class_names
    print(f"  class names: {', '.join(names[i] for i in sorted(names)) if names else 'none (labels print as ids)'}")
    print(f"  image size: {checkpoint.image_size or f'not recorded ({checkpoint.input_size} is assumed)'}")
    if "ema" in checkpoint.extra:
        ema = checkpoint.extra["ema"]
        print(f"  weights: the average of the weights (EMA, {ema['updates']} updates, decay {ema['decay']:.6g} an update); "
              f"those as trained are kept for --resume")


def _detector(args: argparse.Namespace) -> Detector:
    options = {key: getattr(args, key) for key in _keyword_defaults(Detector.from_checkpoint) if hasattr(args, key)}
    return Detector.from_checkpoint(args.checkpoint, **options)


def _detect(args: argparse.Namespace) -> int:
    setup_distributed()  # under torchrun: the processes share the images, and each its own GPU
    detector = _detector(args)
    failures = detect_files(detector, args.inputs, args.out, threshold=args.threshold, batch_size=args.batch_size)
    if is_main_process():
        print(f"{args.out}: annotated images and detections.json" + (f"; {len(failures)} file(s) failed" if failures else ""))
    # Under torchrun all processes end alike, and after that line: torchrun stops the others as soon
    # as one fails, and each node's torchrun waits for every other to succeed before its own ends.
    wait_for_all()
    return 1 if failures else 0


def _explain(args: argparse.Namespace) -> None:
    from .visualize import save_image, writable_image_format

    writable_image_format(args.out)  # a picture that cannot be written is refused before the model loads and runs
    detector = _detector(args)
    picture = explain(detector, args.image, top_k=args.top_k, threshold=args.threshold,
                      encoder_point=args.encoder_point, encoder_level=args.encoder_level)
    save_image(picture, args.out)
    print(f"{args.out}: sampling points of up to {args.top_k} detections scoring at least {args.threshold}, "
          "and of one encoder query")


def _explore(args: argparse.Namespace) -> None:
    detector = _detector(args)
    page = explore(detector, args.images, **{key: getattr(args, key) for key in _keyword_defaults(explore)})
    for warning in page.warnings:
        print(warning, file=sys.stderr)
    page.save(args.out)
    print(f"{args.out}: where the model looks in {len(args.images)} image(s), {page.size / 1e6:.1f} MB; open it in a browser")


def _export(args: argparse.Namespace) -> None:
    export.export_model(load_pretrained(args.checkpoint), args.out, format=args.format, opset=args.opset)
    print(f"{args.out}: {args.format} graph with dynamic batch, height and width")


def _convert(args: argparse.Namespace) -> None:
    from .checkpoints import convert_checkpoint

    layout = convert_checkpoint(args.source, args.destination, layout=args.to)
    print(f"{args.destination}: written in the {layout} layout")


def _synthesize(args: argparse.Namespace) -> None:
    root = synthesize(args.out, train=args.train, val=args.val, image_size=args.image_size,
                      object_sizes=tuple(args.object_sizes), seed=args.seed)
    print(f"{root}: {args.train} training and {args.val} validation images with COCO annotations")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The flags given (one left out is None), with a resumed run's recorded settings for those left out."""
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    given = {key: value for key, value in vars(args).items() if key in fields and value is not None}
    options = dict(args.model_option or [])
    named = {flag: getattr(args, flag) for flag in _MODEL_FLAGS if getattr(args, flag) is not None}
    for key, value in named.items():
        if key in options and options[key] != value:
            raise ValueError(f"--model-option {key}={options[key]} and {_model_flag(key, value)} disagree: give one of them")
    return with_recorded_settings({**given, "model_overrides": {**options, **named}})


def _model_flag(key: str, value: Any) -> str:
    """How a model flag gives ``key`` ``value`` on the command line: ``--no-two-stage``, ``--num-queries 300``."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _train(args: argparse.Namespace) -> None:
    from .train import train

    with settings_named_as_flags():
        train(_train_config(args))  # it prints the best epoch, its metrics and where best.pt is


def _evaluate(args: argparse.Namespace) -> None:
    options = {key: getattr(args, key) for key in _keyword_defaults(evaluate_checkpoint)}
    _print_metrics(evaluate_checkpoint(args.checkpoint, args.data, **options))
    if args.report is not None and is_main_process():
        print(f"{args.report}/report.md: per-class AP, precision-recall curves, confusion matrix, errors")


def _check_data(args: argparse.Namespace) -> int:
    from .data import check_data

    report = check_data(args.data, format=args.format, splits=args.split)
    print(report)
    return 1 if report.stops_training else 0


def _print_metrics(record: dict) -> None:
    line = format_metrics(record)
    if line and is_main_process():  # under torchrun every process has the same metrics: the first one prints them
        print(line)


def _demo(args: argparse.Namespace) -> None:
    by_epochs = args.epochs is not None
    _print_metrics(run_demo(minutes=None if by_epochs else args.minutes, epochs=args.epochs if by_epochs else EPOCHS))


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The train command's flags, one per TrainConfig field. Left out, a flag is None, and the setting
    TrainConfig's default or, resuming, the run's (the help shows TrainConfig's: :class:`_TrainHelp`)."""
    parser.add_argument("--data", help="a COCO, Pascal VOC or YOLO data set (see check-data); resuming, default: the run's")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train-split", help="e.g. train2017 for COCO (default: %(default)s)")
    parser.add_argument("--val-split", help="e.g. val2017 for COCO; evaluated after every epoch (default: %(default)s, where the "
                                             "data set has it)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="default: the model of the --finetune-from checkpoint, or without one tiny")
    parser.add_argument("--num-classes", type=int, help="default: the largest category id + 1")
    parser.add_argument("--epochs", type=int, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, help="default: %(default)s")
    parser.add_argument("--lr", type=float, help="default: %(default)s")
    parser.add_argument("--lr-backbone", type=float, help="default: %(default)s")
    parser.add_argument("--weight-decay", type=float, help="default: %(default)s")
    parser.add_argument("--lr-schedule", choices=SCHEDULES,
                        help="step: the published tenfold drop every --lr-drop-epoch epochs; cosine: down to --min-lr-factor "
                             "at the last epoch; flat-cosine: flat until --lr-drop-epoch, then cosine (default: %(default)s)")
    parser.add_argument("--lr-drop-epoch", type=int,
                        help="the learning rate drops tenfold every this many epochs (step) or starts to fall after them "
                             "(flat-cosine) "
                             "(default: %(default)s)")
    parser.add_argument("--min-lr-factor", type=float,
                        help="the cosine schedules' last learning rate, as a share of --lr (default: %(default)s)")
    warmup = parser.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-steps", type=int, metavar="UPDATES",
                        help="optimiser updates of linear learning-rate warm-up (default: %(default)s)")
    warmup.add_argument("--warmup-epochs", type=float, metavar="EPOCHS",
                        help="the warm-up in epochs instead, fractions allowed (default: %(default)s)")
    parser.add_argument("--ema", type=float, nargs="?", const=DEFAULT_DECAY, metavar="DECAY",
                        help="evaluate and keep an exponential moving average of the weights, of this decay an "
                             "update at a global batch of 32, scaled to the run's (bare --ema: %(const)s)")
    parser.add_argument("--ema-warmup", type=float, metavar="UPDATES",
                        help="the EMA's warm-up ramp, in updates of 32 images (default: %(default)s)")
    parser.add_argument("--clip-max-norm", type=float, help="gradient clipping; 0 turns it off (default: %(default)s)")
    parser.add_argument("--accumulation-steps", type=int, help="batches per optimiser update (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", default=None,
                        help="bfloat16 autocast: faster where the hardware has it (AMX or AVX512-BF16 CPUs, Ampere+ GPUs)")
    parser.add_argument("--image-size", type=int, help="largest short side of the augmentation recipe (default: %(default)s)")
    parser.add_argument("--pad-to-multiple", type=int,
                        help="pad training batches to a multiple of this size; 32 makes CPU steps faster (default: %(default)s)")
    parser.add_argument("--workers", type=int,
                        help="data-loading processes; on a machine with few cores 0 can be faster (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="default: %(default)s")
    parser.add_argument("--resume", nargs="?", const=True, type=_resume_mode, metavar="auto",
                        help="continue the run in --output-dir, with its settings for the flags left out; `--resume "
                             "auto` continues it if there is one, else starts it (requeued jobs, torchrun --max-restarts)")
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="also write checkpoint.pt every N optimiser updates (default: after every epoch only)")
    parser.add_argument("--checkpoint-minutes", type=float, metavar="M",
                        help="also write checkpoint.pt once M minutes have passed since the last one")
    parser.add_argument("--finetune-from", help="checkpoint to start from; its class heads follow the data's classes by name")
    parser.add_argument("--backbone-weights", help="torchvision weights name (IMAGENET1K_V1) or local file")
    parser.add_argument("--max-minutes", type=float,
                        help="a training-time budget: stop once it has passed (within an epoch if need be); the "
                             "learning-rate schedule runs on the share of it spent, or of the epochs, whichever is further")
    parser.add_argument("--patience", type=int, metavar="N",
                        help="stop after N evaluations in a row without a better AP (default: never)")
    parser.add_argument("--min-improvement", type=float, metavar="AP",
                        help="what counts as better for --patience: an AP higher by more than this (default: %(default)s)")
    parser.add_argument("--no-report", dest="report", action="store_false", default=None,
                        help="at the end, no evaluation report of best.pt in OUTPUT_DIR/report (docs/report.md)")
    parser.add_argument("--rendezvous-timeout", type=float, metavar="SECONDS",
                        help="under torchrun: how long the processes wait for each other to join (default: %(default)s)")
    options = parser.add_argument_group("training-only options (off by default; the model trained keeps the published architecture)")
    options.add_argument("--look-forward-twice", action="store_true", default=None,
                         help="DINO: layer i's box loss also trains layer i-1's box (needs box refinement)")
    options.add_argument("--mixed-query-selection", action="store_true", default=None,
                         help="DINO: two-stage proposals give positions only; the content query is learned")
    options.add_argument("--denoising-groups", type=int,
                         help="DN-DETR: this many groups of noised target boxes to restore (needs two-stage)")
    options.add_argument("--one-to-many-queries", type=int,
                         help="H-DETR hybrid matching: this many extra queries, matched to every target k times")
    options.add_argument("--one-to-many-repeats", type=int, help="k of hybrid matching (default: %(default)s)")
    options.add_argument("--one-to-many-weight", type=float,
                         help="weight of the one-to-many group's loss (default: %(default)s)")
    options.add_argument("--iou-aware-classification", action="store_true", default=None,
                         help="varifocal loss: a matched query's class target is its box's IoU with the target's")


class _TrainHelp(argparse.HelpFormatter):
    """The train command's help, with each flag's default as TrainConfig has it: the flags default to
    None, so that one left out is told from one given (a resumed run takes the run's settings for those)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        field = _TRAIN_FIELDS.get(action.dest)
        if field is None or action.help is None:
            return action.help
        return action.help.replace("%(default)s", str(field.default))


_TRAIN_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}


def _add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bf16", dest="dtype", action="store_const", const=torch.bfloat16,
                        help="compute in bfloat16 autocast, post-process in float32: about twice as fast where the "
                             "hardware has it (AMX or AVX512-BF16 CPUs, Ampere+ GPUs); its AP cost: docs/performance.md")


def _add_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, help="data set format (default: detected from the files)")


# ModelConfig fields with a flag of their own; --model-option sets any field.
_MODEL_FLAGS = ("two_stage", "with_box_refine", "num_queries", "dropout", "backbone", "num_feature_levels",
                "look_forward_twice", "mixed_query_selection", "one_to_many_queries", "denoising_groups")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model options (default: the preset's)")
    group.add_argument("--two-stage", action=argparse.BooleanOptionalAction, help="queries from the encoder's proposals (needs box refinement)")
    group.add_argument("--with-box-refine", action=argparse.BooleanOptionalAction, help="iterative box refinement")
    group.add_argument("--num-queries", type=int)
    group.add_argument("--dropout", type=float)
    group.add_argument("--backbone", help="a torchvision ResNet: resnet18, resnet50, resnet101, ...")
    group.add_argument("--num-feature-levels", type=int)
    group.add_argument("--model-option", type=_model_option, action="append", metavar="KEY=VALUE",
                       help="any ModelConfig field but num_classes and backbone_weights (their own flags), e.g. "
                            "position_embedding=learned (repeatable)")


def _resume_mode(value: str) -> str:
    """``auto``, the one value ``--resume`` takes. A checkpoint's path, which other trainers' resume
    flags take, is refused naming the flags that continue its run: a run goes on from the
    checkpoint.pt of its output folder."""
    path = Path(value)
    if value == "auto":
        return value
    if not (path.suffix or path.exists()):
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from 'auto')")
    if path.is_dir():
        folder, instead = path, ""
    else:
        folder, instead = path.parent, f"; --finetune-from {value} starts a new run from its weights"
    raise argparse.ArgumentTypeError(f"{value}: --resume takes no path: it continues the run in --output-dir from "
                                     f"its checkpoint.pt (--output-dir {folder} --resume){instead}")


def _model_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as a ModelConfig field and its value, parsed by the field's type. (TrainConfig refuses in
    one line the fields that are not model options, with the flag that sets them.)"""
    key, separator, value = text.partition("=")
    field_types = typing.get_type_hints(ModelConfig)
    if not separator or key not in field_types:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with KEY one of {', '.join(MODEL_OPTIONS)}")
    field_type = field_types[key]
    if isinstance(field_type, types.UnionType):  # X | None
        if value.lower() in ("none", "null"):
            return key, None
        field_type = next(t for t in typing.get_args(field_type) if t is not type(None))
    if field_type is bool:
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if value.lower() not in truth:
            raise argparse.ArgumentTypeError(f"{key} takes true or false, not {value!r}")
        return key, truth[value.lower()]
    try:
        return key, field_type(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key} takes a {field_type.__name__}, not {value!r}") from None


def _keyword_defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """``function``'s keyword-only parameters that have defaults, and those: a command's defaults are its function's."""
    return {
        name: p.default for name, p in inspect.signature(function).parameters.items()
        if p.kind == p.KEYWORD_ONLY and p.default is not p.empty
    }


def build_parser() -> argparse.ArgumentParser:
    """Every command and its flags: what `main` parses, and what the docs' commands are checked against."""
    parser = argparse.ArgumentParser(prog="deformable-detr", description="Deformable DETR object detection.",
                                     epilog="Guides: README.md and docs/ in the repository.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, processor, kernels and precision: paste it into bug reports",
                        epilog="What decides the kernels and the figures: docs/performance.md").set_defaults(run=_info)
    commands.add_parser("presets", help="list the model presets").set_defaults(run=_presets)

    inspect = commands.add_parser("inspect", help="read a checkpoint (ours, reference or Hugging Face) and describe it",
                                  epilog="The checkpoint formats: docs/checkpoints.md")
    inspect.add_argument("checkpoint")
    inspect.set_defaults(run=_inspect)

    detect = commands.add_parser("detect", help="detect objects in images; write annotated copies and COCO results",
                                 epilog="Outputs, batches and padding, the Python Detector: docs/detect.md")
    detect.add_argument("checkpoint")
    detect.add_argument("inputs", nargs="+", help="image files and folders of images")
    detect.add_argument("--out", required=True, help="folder for the annotated images and detections.json")
    detect.add_argument("--threshold", type=float, help="lowest score kept (default: %(default)s)")
    detect.add_argument("--batch-size", type=int, help="(default: %(default)s)")
    detect.add_argument("--image-size", type=int, help="shorter side images are resized to (default: the checkpoint's)")
    detect.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda where there is one)")
    _add_precision_argument(detect)
    detect.set_defaults(run=_detect, **_keyword_defaults(detect_files), dtype=_keyword_defaults(Detector.from_checkpoint)["dtype"])

    explainer = commands.add_parser("explain", help="draw where the model looks: sampling points and attention weights",
                                    epilog="What the picture shows: docs/explain.md")
    explainer.add_argument("checkpoint")
    explainer.add_argument("image")
    explainer.add_argument("--out", required=True, help="picture to write (.png, .jpg)")
    explainer.add_argument("--top-k", type=int, help="detections to explain, one panel each (default: %(default)s)")
    explainer.add_argument("--threshold", type=float, help="lowest score of an explained detection (default: %(default)s)")
    explainer.add_argument("--encoder-point", type=float, nargs=2, metavar=("X", "Y"),
                           help="encoder query to show, as fractions of width and height (default: best detection's centre)")
    explainer.add_argument("--encoder-level", type=int, help="feature level of the encoder query (default: %(default)s)")
    explainer.add_argument("--image-size", type=int, help="shorter side the image is resized to (default: the checkpoint's)")
    explainer.add_argument("--device", help="cpu, cuda, ... (default: cuda where there is one)")
    _add_precision_argument(explainer)
    explainer.set_defaults(run=_explain, **_keyword_defaults(explain), dtype=_keyword_defaults(Detector.from_checkpoint)["dtype"])

    explorer = commands.add_parser("explore", help="an interactive page of where the model looks (one HTML file, no network)",
                                   epilog="What the page shows, its size budget and security: docs/explore.md")
    explorer.add_argument("checkpoint")
    explorer.add_argument("images", nargs="+", metavar="image", help="image files; several get a picker")
    explorer.add_argument("--out", required=True, help="the page to write (.html)")
    explorer.add_argument("--encoder-layers", choices=["last", "all"], help="encoder layers embedded (default: %(default)s)")
    explorer.add_argument("--max-bytes", type=int,
                          help="page budget; above it encoder queries are subsampled (default: %(default)s)")
    explorer.add_argument("--pad-to-multiple", type=int,
                          help="pad the model input to a multiple of this, as training batches are (default: %(default)s)")
    explorer.add_argument("--image-size", type=int, help="shorter side images are resized to (default: the checkpoint's)")
    explorer.add_argument("--device", help="cpu, cuda, ... (default: cuda where there is one)")
    explorer.set_defaults(run=_explore, **_keyword_defaults(explore))

    exporter = commands.add_parser("export", help="export the inference forward (ONNX), dynamic batch and image size",
                                   epilog="The graph's inputs, outputs and limits: docs/export.md")
    exporter.add_argument("checkpoint")
    exporter.add_argument("--format", choices=export.FORMATS, help="(default: %(default)s)")
    exporter.add_argument("--out", required=True)
    exporter.add_argument("--opset", type=int, help=f"ONNX opset, {export.MIN_OPSET} to {export.MAX_OPSET} (default: the exporter's)")
    exporter.set_defaults(run=_export, **_keyword_defaults(export.export_model))

    convert = commands.add_parser("convert", help="rewrite a checkpoint (ours, reference or Hugging Face) in the layout "
                                                  "the destination's name tells, or --to",
                                      epilog="The formats and what survives each: docs/checkpoints.md; the transformers "
                                             "folder: docs/export.md")
    convert.add_argument("source")
    convert.add_argument("destination", help="its name chooses the layout: .safetensors or .pt ours, .pth reference, "
                                             "a folder (a name without a suffix) huggingface")
    convert.add_argument("--to", choices=LAYOUTS, help="the layout to write (default: the one the destination's name chooses)")
    convert.set_defaults(run=_convert)

    synthesizer = commands.add_parser("synthesize", help="write a synthetic shapes data set in COCO format",
                                      epilog="A first run on it: docs/training.md")
    synthesizer.add_argument("out")
    synthesizer.add_argument("--train", type=int, default=800, help="training images (default: %(default)s)")
    synthesizer.add_argument("--val", type=int, default=100, help="validation images (default: %(default)s)")
    synthesizer.add_argument("--image-size", type=int, help="the longer side of every image (default: %(default)s)")
    synthesizer.add_argument("--object-sizes", type=float, nargs=2, metavar=("MIN", "MAX"),
                             help="object sizes as fractions of the shorter image side (default: %(default)s)")
    synthesizer.add_argument("--seed", type=int, help="(default: %(default)s)")
    synthesizer.set_defaults(run=_synthesize, **_keyword_defaults(synthesize))

    train = commands.add_parser("train", help="train on a COCO, Pascal VOC or YOLO data set", formatter_class=_TrainHelp,
                                epilog="Data formats, the recipe, torchrun: docs/training.md; stopping and resuming: "
                                       "docs/preemption.md; the training-only options: docs/training-options.md")
    _add_training_arguments(train)
    _add_format_argument(train)
    _add_model_arguments(train)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="COCO AP of a checkpoint on a data set",
                                   epilog="Data formats and torchrun: docs/training.md; the report: docs/report.md")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data", required=True, help="a COCO, Pascal VOC or YOLO data set")
    _add_format_argument(evaluate)
    evaluate.add_argument("--split", help="default: %(default)s")
    evaluate.add_argument("--batch-size", type=int,
                          help="images a batch, per process (default: the checkpoint's training batch, with which it "
                               f"reproduces the AP training reported; {DEFAULT_BATCH_SIZE} where it records none)")
    evaluate.add_argument("--image-size", type=int, help="shorter side images are resized to (default: the checkpoint's)")
    evaluate.add_argument("--workers", type=int, help="data-loading processes (default: %(default)s)")
    evaluate.add_argument("--report", metavar="DIR", help="also write a report: per-class AP, precision-recall "
                                                          "curves, confusion matrix, errors, worst images")
    _add_precision_argument(evaluate)
    evaluate.set_defaults(run=_evaluate, **_keyword_defaults(evaluate_checkpoint))

    check = commands.add_parser("check-data", help="what a data set holds and every problem in it, one line each",
                                epilog="The formats and the problems it finds: docs/training.md")
    check.add_argument("data", help="a COCO, Pascal VOC or YOLO data set")
    _add_format_argument(check)
    check.add_argument("--split", action="append", help="a split to check (repeatable; default: all)")
    check.set_defaults(run=_check_data)

    demo = commands.add_parser("demo", help="train and evaluate the tiny model on synthetic data",
                               epilog="What it trains, its measured curve and how it was tuned: docs/demo.md")
    budget = demo.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=MINUTES,
                        help="training minutes, the learning rate falling from 75%% of them on (default: %(default)s)")
    budget.add_argument("--epochs", type=int, help="train this many epochs instead, however long they take")
    demo.set_defaults(run=_demo)

    return parser


class Terminated(BaseException):
    """SIGTERM (``kill``, a scheduler cancelling the job), raised where the command is, as Ctrl-C
    raises KeyboardInterrupt: a file being written is then abandoned, its temporary file removed,
    where the signal's default action would end the process at once and leave it beside the outputs.
    Training stops more gently on it (``train.preemption``)."""


@contextlib.contextmanager
def _sigterm_raises_terminated() -> Iterator[None]:
    def terminate(_number: int, _frame: types.FrameType | None) -> None:
        raise Terminated

    # Python runs signal handlers in the main thread only, and lets only it install them.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be put back from here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        with _sigterm_raises_terminated():
            status = args.run(args)
    except (ValueError, TrainingError, OSError) as error:  # bad files and arguments; CheckpointError and DatasetError are ValueErrors
        print(f"deformable-detr: error: {error}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:  # a signal stopped training; it printed where and how to resume
        return stopped.status
    except KeyboardInterrupt:
        print("deformable-detr: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("deformable-detr: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        warnings.formatwarning = formatwarning
    return status or 0


def _one_line_warning(message: Warning | str, *_: Any, **__: Any) -> str:
    # A command's user needs the warning, not the library line that raised it.
    return f"deformable-detr: warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
