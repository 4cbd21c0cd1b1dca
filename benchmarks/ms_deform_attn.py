"""Reference vs fused multi-scale deformable attention at COCO scale, side by side in one process.

The encoder case has one query per position of an 800 x 1066 image's four levels (17,821); the
decoder case has 300 queries. Timings are interleaved (reference, fused, reference, ...) and the
median of the repeats is reported, with the peak memory each path allocates.

On the CPU the fused path is the CPU kernel. With ``--device cuda`` it is the Triton kernels, and
the reference also runs under ``torch.compile``; so it does on CPU tensors under
``TRITON_INTERPRET=1`` (with ``--tiny`` sizes: the interpreter is slow), to check this script
without a GPU. On a GPU each row also gives the fused path's first call (compiling and tuning the
kernels for that shape class) and its share of the bandwidth floor: the time the op's compulsory
DRAM traffic (``compulsory_bytes``) takes at the GPU's peak memory bandwidth, over the time measured.

Sampling locations: "local" (default) places each query's points a few pixels around its
reference point, as the model does (encoder: the query's own position); "uniform" spreads them
uniformly over the image, the worst case for caches.

    python benchmarks/ms_deform_attn.py [--repeats 5] [--threads N] [--locations local|uniform]
        [--device cpu|cuda] [--dtype float32 [--dtype bfloat16]] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from deformable_detr.environment import machine_summary
from deformable_detr.ops import cpu, load_triton_kernel, ms_deform_attn_reference

SPATIAL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]
BATCH, HEADS, CHANNELS, LEVELS, POINTS = 2, 8, 32, 4, 4
# The levels of a 48 x 64 image, one image, two heads, 20 decoder queries: only to check the script.
TINY = dict(spatial=[(6, 8), (3, 4), (2, 2), (1, 1)], batch=1, heads=2, decoder_queries=20)
COCO = dict(spatial=SPATIAL_SHAPES, batch=BATCH, heads=HEADS, decoder_queries=300)


def make_inputs(
    queries: int, requires_grad: bool, placement: str = "local", dtype: torch.dtype = torch.float32,
    device: str = "cpu", spatial: list[tuple[int, int]] = SPATIAL_SHAPES, batch: int = BATCH, heads: int = HEADS,
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(spatial)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.randn(batch, int(areas.sum()), heads, CHANNELS, generator=generator)
    shape = (batch, queries, heads, LEVELS, POINTS, 2)
    if placement == "uniform":
        locations = torch.rand(shape, generator=generator)
    else:
        # As in the model: a reference point per query (encoder: the pixel centres of every level;
        # decoder: anywhere) plus offsets of a few pixels on each level, some falling off the map.
        if queries == value.shape[1]:
            references = torch.cat([_pixel_centres(h, w) for h, w in spatial])[None].expand(batch, -1, -1)
        else:
            references = torch.rand(batch, queries, 2, generator=generator)
        sizes = spatial_shapes.flip(-1).float()  # (W, H) per level
        locations = references[:, :, None, None, None, :] + torch.randn(shape, generator=generator) * 4 / sizes[:, None]
    weights = torch.rand(batch, queries, heads, LEVELS, POINTS, generator=generator).softmax(-1)
    value, locations, weights = (t.to(device, dtype).requires_grad_(requires_grad) for t in (value, locations, weights))
    return value, spatial_shapes.to(device), level_start_index.to(device), locations, weights


def _pixel_centres(height: int, width: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([x.flatten() / width, y.flatten() / height], -1)


def compulsory_bytes(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor, backward: bool) -> int:
    """Bytes the op must move between DRAM and the GPU at least: each input read and each output
    written once. The backward (timed after its forward) also reads the upstream gradient, zeroes
    and writes back its float32 value-gradient buffer, and casts it to the value's dtype."""
    batch, _, heads, channels = value.shape
    output = batch * locations.shape[1] * heads * channels * value.element_size()
    inputs = sum(tensor.numel() * tensor.element_size() for tensor in (value, locations, weights))
    forward = inputs + output
    if not backward:
        return forward
    accumulation = value.numel() * 4
    cast = 0 if value.dtype == torch.float32 else value.numel() * (4 + value.element_size())
    return forward + inputs + output + 2 * accumulation + cast


def gather_bytes(value: torch.Tensor, locations: torch.Tensor, backward: bool) -> int:
    """Bytes the samples' corners read (and the backward's atomics add), each sample touching four
    rows of its head's channels: what goes through the caches, most of it served by L2 and L1."""
    samples = locations[..., 0].numel()
    corners = 4 * samples * value.shape[-1]
    return corners * value.element_size() * (2 if backward else 1) + (corners * 4 if backward else 0)


def peak_bandwidth() -> float:
    """The current GPU's peak DRAM bandwidth in bytes a second: memory clock (double data rate)
    times bus width."""
    properties = torch.cuda.get_device_properties()
    return properties.memory_clock_rate * 1e3 * 2 * properties.memory_bus_width / 8


def run(function, inputs, backward: bool) -> None:
    output = function(*inputs)
    if backward:
        output.backward(torch.ones_like(output))
        for tensor in inputs:
            tensor.grad = None
    if output.is_cuda:
        torch.cuda.synchronize()


def peak_memory_mb(function, inputs, backward: bool) -> float:
    """Peak bytes allocated during one call beyond those allocated before it: from the CUDA
    allocator's statistics, or on the CPU through the profiler's accounting."""
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(function, inputs, backward)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
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


def contenders(device: str) -> dict[str, Callable[..., torch.Tensor]]:
    """The reference and the device's fused kernel; with the Triton kernels, also the reference
    under torch.compile, the best a user gets from it without a kernel."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if cpu.load_extension() is None:
            raise SystemExit(f"the fused kernel could not be built: {cpu.build_failure()}")
        return {"reference": ms_deform_attn_reference, "fused": cpu.ms_deform_attn_cpu}
    kernels = load_triton_kernel()
    if kernels is None:
        raise SystemExit("the Triton kernels need Triton, which could not be imported")
    # One compiled graph for each case, dtype and direction (8 here; torch's default limit is 8).
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(ms_deform_attn_reference, dynamic=False)
    return {"reference": ms_deform_attn_reference, "compiled ref": compiled, "fused": kernels.ms_deform_attn_triton}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--locations", choices=["local", "uniform"], default="local")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], action="append",
                        help="repeat for several (default: float32)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, to check the script (N=1, M=2, a 48 x 64 image)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = dict(TINY if args.tiny else COCO)
    decoder_queries = sizes.pop("decoder_queries")
    paths = contenders(args.device)
    gpu = f"{torch.cuda.get_device_name()}; " if args.device == "cuda" else ""
    print(f"{gpu}{machine_summary()}; N={sizes['batch']} M={sizes['heads']} D={CHANNELS} "
          f"L={LEVELS} P={POINTS}, "
          f"{args.locations} locations, median of {args.repeats}")
    baselines = [name for name in paths if name != "fused"]
    labels = [f"{name} ms" for name in paths] + [f"fused vs {name}" for name in baselines]
    labels += [f"{name} peak MB" for name in paths]
    on_gpu = args.device == "cuda" and torch.cuda.is_available()
    if on_gpu:
        labels += ["fused 1st call s", "floor us", "of floor"]
        print(f"peak DRAM bandwidth {peak_bandwidth() / 1e12:.2f} TB/s")
    widths = [len(label) + 2 for label in labels]
    print(f"{'case':38s}" + "".join(f"{label:>{width}}" for label, width in zip(labels, widths)))
    encoder_queries = sum(h * w for h, w in sizes["spatial"])
    for dtype in args.dtype or ["float32"]:
        for case, queries in (("encoder", encoder_queries), ("decoder", decoder_queries)):
            for backward in (False, True):
                inputs = make_inputs(queries, backward, args.locations, getattr(torch, dtype), args.device, **sizes)
                times = {name: [] for name in paths}
                first_call = {}
                for name, function in paths.items():  # warm-up (and compilation, tuning)
                    start = time.perf_counter()
                    run(function, inputs, backward)
                    first_call[name] = time.perf_counter() - start
                for _ in range(args.repeats):
                    for name, function in paths.items():
                        start = time.perf_counter()
                        run(function, inputs, backward)
                        times[name].append(time.perf_counter() - start)
                median = {name: statistics.median(values) * 1000 for name, values in times.items()}
                peaks = {name: peak_memory_mb(function, inputs, backward) for name, function in paths.items()}
                cells = [f"{median[name]:.2f}" for name in paths]
                cells += [f"{median[name] / median['fused']:.1f}x" for name in baselines]
                cells += [f"{peaks[name]:.1f}" for name in paths]
                if on_gpu:
                    value, _, _, locations, weights = inputs
                    floor = compulsory_bytes(value, locations, weights, backward) / peak_bandwidth() * 1e3
                    cells += [f"{first_call['fused']:.2f}", f"{floor * 1e3:.0f}", f"{floor / median['fused']:.0%}"]
                label = f"{case} (Lq={queries}) {dtype} {'fwd+bwd' if backward else 'fwd'}"
                print(f"{label:38s}" + "".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)))


if __name__ == "__main__":
    main()
