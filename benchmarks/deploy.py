"""CPU inference of r50 at 1 x 800 x 1066 on the paths users deploy a detector with, in one run,
interleaved, median of the repeats, with the largest logit difference of each from ours in float32:

- ours in float32 and in bfloat16 autocast (``Detector(dtype=...)``'s model and forward);
- transformers in float32, loading the folder ``save_huggingface`` writes (same random weights);
- with ``--onnx GRAPH`` (what ``deformable-detr export`` writes for the same weights, see
  ``--save``): ONNX Runtime, and OpenVINO in f32 and with its bf16 precision hint where installed
  (``pip install -e .[deploy]``).

    python benchmarks/deploy.py --save r50.safetensors     # then: deformable-detr export r50.safetensors --out r50.onnx
    python benchmarks/deploy.py --load r50.safetensors --onnx r50.onnx [--repeats 3] [--image-size 800 1066]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from deformable_detr import build_model, load_pretrained, save_checkpoint
from deformable_detr.environment import machine_summary
from deformable_detr.huggingface import save_huggingface
from deformable_detr.precision import forward, inference_model

from model import median_times

BASELINE = "ours, float32"


def contenders(model: torch.nn.Module, images: torch.Tensor, onnx: str | None) -> dict[str, Callable[[], np.ndarray]]:
    """Name -> a function returning the logits (1, Q, C) of one forward."""

    def ours(dtype: torch.dtype) -> Callable[[], np.ndarray]:
        runner = inference_model(model, dtype)
        return lambda: forward(runner, images, dtype=dtype)["pred_logits"].numpy()

    runs = {BASELINE: ours(torch.float32), "ours, bfloat16": ours(torch.bfloat16)}
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        save_huggingface(folder, model)
        twin = transformers.DeformableDetrForObjectDetection.from_pretrained(folder).eval()
    runs["transformers, float32"] = lambda: twin(pixel_values=images).logits.numpy()
    if onnx is None:
        return runs
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.numpy()}
    runs["ONNX Runtime"] = lambda: session.run(None, feed)[0]
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        core = openvino.Core()
        for hint in ("f32", "bf16"):
            compiled = core.compile_model(onnx, "CPU", {"INFERENCE_PRECISION_HINT": hint})
            runs[f"OpenVINO, {hint} hint"] = lambda compiled=compiled: compiled(images.numpy())[0]
    else:
        print("OpenVINO not installed (pip install -e .[deploy]): left out")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", help="write the random r50 to this checkpoint (for export) and stop")
    parser.add_argument("--load", help="the r50 checkpoint to time (default: random weights)")
    parser.add_argument("--onnx", help="the graph `deformable-detr export` wrote for the same checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1066), metavar=("HEIGHT", "WIDTH"),
                        help="the input's size (default: %(default)s, COCO's; a small one checks the script)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_pretrained(args.load) if args.load else build_model("r50", backbone_weights=None).eval()
    if args.save:
        save_checkpoint(args.save, model)
        return
    print(machine_summary())
    height, width = args.image_size
    images = torch.randn(1, 3, height, width)
    runs = contenders(model, images, args.onnx)
    with torch.no_grad():
        reference = runs[BASELINE]()
        logits = {name: run() for name, run in runs.items()}
        times = median_times({name: lambda run=run: run() for name, run in runs.items()}, args.repeats)
    print(f"\nr50 inference, 1 x 3 x {height} x {width}, median of {args.repeats}, interleaved")
    for name, seconds in times.items():
        difference = np.abs(logits[name].astype(np.float32) - reference).max()
        print(f"  {name:24s} {seconds:7.3f} s   {seconds / times[BASELINE]:5.2f}x the time of ours in float32"
              f"   largest logit difference {difference:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
