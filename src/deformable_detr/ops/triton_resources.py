"""What the Triton kernels cost on GPUs this machine does not have: each configuration compiled
ahead of time with Triton's own compilers (the bundled ``ptxas`` for NVIDIA, the AMD backend's
LLVM for AMD), and the registers, spills and shared memory of the result.

A build specialises the kernel exactly as a launch would (the JIT's own argument binder), for the
arguments of the COCO encoder case: 17,821 positions and queries (not multiples of 16), 8 heads,
4 levels, 4 points, and the head width asked for. Used by ``tests/test_triton_compile.py`` (no
configuration may spill) and ``benchmarks/gpu_kernels.py`` (the table).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature

from . import triton_kernel

TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),  # A100
    "sm_90": GPUTarget("cuda", 90, 32),  # H100, H200
    "sm_100": GPUTarget("cuda", 100, 32),  # B200
    "gfx942": GPUTarget("hip", "gfx942", 64),  # MI300
}
KERNELS = {"forward": triton_kernel._forward_kernel, "backward": triton_kernel._backward_kernel}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEAD_WIDTHS = (32, 64, 71, 128, 1025)
"""The usual width (256 channels / 8 heads), powers of two around it, an odd one, and one split
into 17 channel blocks."""

POSITIONS = QUERIES = 17_821  # an 800 x 1066 image's four levels
HEADS, LEVELS, POINTS = 8, 4, 4


@dataclass(frozen=True)
class Build:
    """One kernel configuration compiled for one target, and what it costs a program."""

    target: str
    kernel: str
    dtype: torch.dtype
    head_width: int
    block_q: int
    block_d: int
    num_warps: int
    offsets: str  # "int32" or "int64"
    registers: int  # per thread; on AMD the vector registers
    spill_stores: int  # bytes per thread (on AMD: registers spilled)
    spill_loads: int
    shared_bytes: int


def launcher_choices(
    head_widths: tuple[int, ...] = HEAD_WIDTHS, dtypes: tuple[torch.dtype, ...] = DTYPES, *, defaults_only: bool = False
) -> Iterator[tuple[str, torch.dtype, int, triton.Config]]:
    """Every (kernel, dtype, head width, configuration) the launcher or the autotuner can run; with
    ``defaults_only``, only the configuration an untuned call runs."""
    for kernel in KERNELS:
        for dtype in dtypes:
            for width in head_widths:
                configs = triton_kernel.configs_for(width, dtype)
                for config in configs[:1] if defaults_only else configs:
                    yield kernel, dtype, width, config


def _arguments(kernel: str, dtype: torch.dtype, head_width: int) -> list:
    """Stand-ins for the launcher's arguments: tensors of the dtypes the model passes for values of
    ``dtype`` (16-byte aligned, as torch's allocations are), and the sizes of the COCO encoder case."""
    data, samples, integers = MockTensor(dtype), MockTensor(triton_kernel.sample_dtype(dtype)), MockTensor(torch.int32)
    pointers = [data, integers, integers, samples, samples]  # value, shapes, starts, locations, weights
    if kernel == "forward":
        pointers.append(data)  # output
    else:
        accumulation = MockTensor(torch.float64 if dtype == torch.float64 else torch.float32)
        summed = triton_kernel.splits_channels(head_width, dtype)
        sample_gradients = accumulation if summed else samples
        pointers += [data, accumulation, sample_gradients, sample_gradients]  # grad output, value, locations, weights
    work = (2 * QUERIES * HEADS).bit_length()
    return [*pointers, POSITIONS, QUERIES, HEADS, head_width, LEVELS, POINTS, work]


def compile_kernel(
    target: str, kernel: str, dtype: torch.dtype, head_width: int, config: triton.Config, *, offsets: tl.dtype = tl.int32
) -> triton.compiler.CompiledKernel:
    """Compile one configuration for ``target`` (a key of TARGETS) as a launch would specialise it."""
    function = KERNELS[kernel]
    meta = dict(
        BLOCK_D=triton_kernel.channel_block(head_width, dtype),
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        INDEX=offsets,
        **config.all_kwargs(),
    )
    if kernel == "backward":
        meta["SUMMED"] = triton_kernel.splits_channels(head_width, dtype)
    backend = make_backend(TARGETS[target])
    # The JIT's own binder and packing (private to Triton 3.8, which torch 2.14.1 pins): the same
    # signature, constants and alignment attributes as a launch with these arguments.
    binder = create_function_from_signature(function.signature, function.params, backend)
    bound, specialization, options = binder(*_arguments(kernel, dtype, head_width), **meta)
    options, signature, constants, attributes = function._pack_args(backend, meta, bound, specialization, options)
    source = ASTSource(function, signature, constants, attributes)
    return triton.compile(source, target=TARGETS[target], options=options.__dict__)


def _ptxas_log(compile_call) -> tuple[triton.compiler.CompiledKernel, str]:
    """Compile with Triton printing ptxas's verbose log, which it otherwise discards, and bypassing
    its cache (a cached kernel runs no ptxas)."""
    output = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(output):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = compile_call()
    return compiled, output.getvalue()


def build(
    target: str, kernel: str, dtype: torch.dtype, head_width: int, config: triton.Config, *, offsets: tl.dtype = tl.int32
) -> Build:
    """Compile one configuration and read its registers, spills and shared memory: from ptxas's
    log for NVIDIA, from the AMD code's metadata for AMD."""

    def compile_call():
        return compile_kernel(target, kernel, dtype, head_width, config, offsets=offsets)

    if TARGETS[target].backend == "cuda":
        compiled, log = _ptxas_log(compile_call)
        registers = int(re.search(r"Used (\d+) registers", log).group(1))
        stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    else:
        compiled = compile_call()
        fields = dict(re.findall(r"\.(\w+):\s*(\d+)", compiled.asm["amdgcn"]))
        registers = int(fields["vgpr_count"])
        stores = loads = int(fields["vgpr_spill_count"]) + int(fields["sgpr_spill_count"])
    return Build(
        target=target, kernel=kernel, dtype=dtype, head_width=head_width, block_q=config.kwargs["BLOCK_Q"],
        block_d=triton_kernel.channel_block(head_width, dtype), num_warps=config.num_warps, offsets=str(offsets).split(".")[-1],
        registers=registers, spill_stores=stores, spill_loads=loads, shared_bytes=compiled.metadata.shared,
    )


def _build_job(job: tuple) -> Build:
    target, kernel, dtype, head_width, config, offsets = job
    return build(target, kernel, dtype, head_width, config, offsets=getattr(tl, offsets))


def build_all(
    jobs: list[tuple[str, str, torch.dtype, int, triton.Config]], *, offsets: str = "int32", workers: int | None = None
) -> list[Build]:
    """``build`` for each (target, kernel, dtype, head width, configuration), in ``workers``
    processes (default: one a core), in order."""
    context = multiprocessing.get_context("spawn")  # a fresh Triton in each; no state forked from the caller
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count(), mp_context=context) as pool:
        return list(pool.map(_build_job, [(*job, offsets) for job in jobs]))
