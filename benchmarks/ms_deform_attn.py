"""Reference vs fused multi-scale deformable attention at COCO scale, side by side in one process.

The encoder case has one query per position of an 800 x 1066 image's four levels (17,821); the
decoder case has 300 queries. Timings are interleaved (reference, fused, reference, ...) and the
median of the repeats is reported, with the peak memory each path allocates.

Sampling locations: "local" (default) places each query's points a few pixels around its
reference point, as the model does (encoder: the query's own position); "uniform" spreads them
uniformly over the image, the worst case for caches.

    python benchmarks/ms_deform_attn.py [--repeats 5] [--threads N] [--locations local|uniform]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deformable_detr.ops import cpu, ms_deform_attn_reference

SPATIAL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]
BATCH, HEADS, CHANNELS, LEVELS, POINTS = 2, 8, 32, 4, 4


def make_inputs(queries: int, requires_grad: bool, placement: str = "local") -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(SPATIAL_SHAPES)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.randn(BATCH, int(areas.sum()), HEADS, CHANNELS, generator=generator)
    shape = (BATCH, queries, HEADS, LEVELS, POINTS, 2)
    if placement == "uniform":
        locations = torch.rand(shape, generator=generator)
    else:
        # As in the model: a reference point per query (encoder: the pixel centres of every level;
        # decoder: anywhere) plus offsets of a few pixels on each level, some falling off the map.
        if queries == value.shape[1]:
            references = torch.cat([_pixel_centres(h, w) for h, w in SPATIAL_SHAPES])[None].expand(BATCH, -1, -1)
        else:
            references = torch.rand(BATCH, queries, 2, generator=generator)
        sizes = spatial_shapes.flip(-1).float()  # (W, H) per level
        locations = references[:, :, None, None, None, :] + torch.randn(shape, generator=generator) * 4 / sizes[:, None]
    weights = torch.rand(BATCH, queries, HEADS, LEVELS, POINTS, generator=generator).softmax(-1)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(requires_grad)
    return value, spatial_shapes, level_start_index, locations, weights


def _pixel_centres(height: int, width: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([x.flatten() / width, y.flatten() / height], -1)


def run(function, inputs, backward: bool) -> None:
    output = function(*inputs)
    if backward:
        output.backward(torch.ones_like(output))
        for tensor in inputs:
            tensor.grad = None


def peak_memory_mb(function, inputs, backward: bool) -> float:
    """Peak bytes allocated by the CPU allocator during one call, through the profiler's accounting."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        run(function, inputs, backward)
    # Sum of allocations minus frees in time order; the running maximum is the peak.
    events = sorted(
        (event for event in profile.events() if event.self_cpu_memory_usage != 0), key=lambda event: event.time_range.start
    )
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--locations", choices=["local", "uniform"], default="local")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu.load_extension() is None:
        raise SystemExit(f"the fused kernel could not be built: {cpu.build_failure()}")
    paths = {"reference": ms_deform_attn_reference, "fused": cpu.ms_deform_attn_cpu}

    print(f"torch {torch.__version__}, {args.threads} threads, float32, N={BATCH} M={HEADS} D={CHANNELS} L={LEVELS} P={POINTS}, "
          f"{args.locations} locations, median of {args.repeats}")
    print(f"{'case':28s} {'reference ms':>13s} {'fused ms':>10s} {'speed-up':>9s} {'ref peak MB':>12s} {'fused peak MB':>14s}")
    for case, queries in (("encoder (Lq=17821)", sum(h * w for h, w in SPATIAL_SHAPES)), ("decoder (Lq=300)", 300)):
        for backward in (False, True):
            inputs = make_inputs(queries, requires_grad=backward, placement=args.locations)
            times = {name: [] for name in paths}
            for name, function in paths.items():  # warm-up
                run(function, inputs, backward)
            for _ in range(args.repeats):
                for name, function in paths.items():
                    start = time.perf_counter()
                    run(function, inputs, backward)
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(values) * 1000 for name, values in times.items()}
            peaks = {name: peak_memory_mb(function, inputs, backward) for name, function in paths.items()}
            label = f"{case} {'fwd+bwd' if backward else 'fwd'}"
            print(f"{label:28s} {median['reference']:13.1f} {median['fused']:10.1f} "
                  f"{median['reference'] / median['fused']:8.1f}x {peaks['reference']:12.1f} {peaks['fused']:14.1f}")


if __name__ == "__main__":
    main()
