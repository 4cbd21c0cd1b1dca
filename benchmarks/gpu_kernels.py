"""What each Triton kernel configuration costs on GPUs, without a GPU: compiled ahead of time for
NVIDIA (sm_80, sm_90, sm_100) and AMD (gfx942) with Triton's own compilers, one row per
architecture, kernel, dtype, head width and configuration, with its registers, spills and shared
memory (``deformable_detr.ops.triton_resources``). Spill stores are what ``ptxas -v`` reports (on
AMD, the registers spilled); any spill is flagged.

    python benchmarks/gpu_kernels.py                      every configuration the launcher can pick
    python benchmarks/gpu_kernels.py --target sm_90 --dtype float32 --width 32
    python benchmarks/gpu_kernels.py --defaults-only      the untuned launch's configuration only
"""

from __future__ import annotations

import argparse
import time

import torch

from deformable_detr.ops import triton_resources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=list(triton_resources.TARGETS), action="append", help="repeat (default: all)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], action="append",
                        help="repeat (default: all)")
    parser.add_argument("--width", type=int, action="append", help="head width; repeat (default: "
                        f"{', '.join(map(str, triton_resources.HEAD_WIDTHS))})")
    parser.add_argument("--defaults-only", action="store_true", help="only the configuration an untuned launch runs")
    parser.add_argument("--workers", type=int, default=None, help="compiling processes (default: one a core)")
    args = parser.parse_args()
    targets = args.target or list(triton_resources.TARGETS)
    dtypes = tuple(getattr(torch, name) for name in args.dtype) if args.dtype else triton_resources.DTYPES
    widths = tuple(args.width or triton_resources.HEAD_WIDTHS)
    jobs = [
        (target, *choice) for target in targets
        for choice in triton_resources.launcher_choices(widths, dtypes, defaults_only=args.defaults_only)
    ]
    start = time.perf_counter()
    builds = triton_resources.build_all(jobs, workers=args.workers)
    header = f"{'target':7s} {'kernel':8s} {'dtype':8s} {'width':>5s} {'queries':>7s} {'block_d':>7s} {'warps':>5s}"
    print(header + f" {'registers':>9s} {'spill st':>8s} {'spill ld':>8s} {'shared':>7s}")
    for b in builds:
        flag = "  SPILLS" if b.spill_stores else ""
        print(f"{b.target:7s} {b.kernel:8s} {str(b.dtype).removeprefix('torch.'):8s} {b.head_width:5d} {b.block_q:7d} "
              f"{b.block_d:7d} {b.num_warps:5d} {b.registers:9d} {b.spill_stores:8d} {b.spill_loads:8d} "
              f"{b.shared_bytes:7d}{flag}")
    spilling = sum(1 for b in builds if b.spill_stores)
    print(f"{len(builds)} builds in {time.perf_counter() - start:.0f} s; {spilling} spill")


if __name__ == "__main__":
    main()
