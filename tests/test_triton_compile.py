"""The Triton kernels compiled ahead of time for GPUs this machine does not have, with Triton's own
compilers: the launcher's defaults compile for sm_80 (A100), sm_90 (H100, H200), sm_100 (B200) and
gfx942 (MI300), and no NVIDIA build spills registers. ``-m slow`` compiles every configuration the
launcher or the autotuner can pick, for every target."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from deformable_detr.ops import triton_kernel, triton_resources

NVIDIA = ("sm_80", "sm_90", "sm_100")


def _jobs(targets: tuple[str, ...], *, defaults_only: bool, **choices) -> list[tuple]:
    return [
        (target, *choice) for target in targets
        for choice in triton_resources.launcher_choices(defaults_only=defaults_only, **choices)
    ]


def _table(builds: list[triton_resources.Build]) -> str:
    return "\n".join(
        f"{b.target} {b.kernel} {b.dtype} width {b.head_width} queries {b.block_q} warps {b.num_warps} offsets "
        f"{b.offsets}: {b.registers} registers, {b.spill_stores} B spill stores" for b in builds
    )


def _assert_compiled_without_spills(jobs: list[tuple], builds: list[triton_resources.Build]) -> None:
    assert [(b.target, b.kernel, b.dtype, b.head_width, b.block_q, b.num_warps) for b in builds] == [
        (target, kernel, dtype, width, config.kwargs["BLOCK_Q"], config.num_warps)
        for target, kernel, dtype, width, config in jobs
    ]
    assert all(b.registers > 0 for b in builds)
    spilling = [b for b in builds if b.target in NVIDIA and b.spill_stores]
    assert not spilling, "configurations that spill:\n" + _table(spilling)


def test_the_launchers_defaults_compile_without_spills_on_every_target():
    jobs = _jobs(tuple(triton_resources.TARGETS), defaults_only=True)
    _assert_compiled_without_spills(jobs, triton_resources.build_all(jobs))


def test_wide_offsets_compile_without_spills():
    # The 64-bit path, for images whose tensors hold 2**31 elements or more.
    jobs = _jobs(("sm_90",), defaults_only=True, dtypes=(torch.float32, torch.bfloat16))
    builds = triton_resources.build_all(jobs, offsets="int64")
    assert {b.offsets for b in builds} == {"int64"}
    _assert_compiled_without_spills(jobs, builds)


@pytest.mark.slow
def test_every_configuration_compiles_without_spills_on_every_target():
    jobs = _jobs(tuple(triton_resources.TARGETS), defaults_only=False)
    _assert_compiled_without_spills(jobs, triton_resources.build_all(jobs))


def test_the_check_sees_a_spill():
    # 128 queries of 64 channels on 2 warps, 128 elements a thread: a tile the launcher never runs,
    # which spills; the check above would name it.
    config = triton.Config({"BLOCK_Q": 128}, num_warps=2)
    assert config not in triton_kernel.configs_for(128, torch.float32)
    build = triton_resources.build("sm_90", "backward", torch.float32, 128, config)
    assert build.spill_stores > 0
    with pytest.raises(AssertionError, match="configurations that spill:\n.*sm_90 backward torch.float32 width 128 queries 128"):
        _assert_compiled_without_spills([("sm_90", "backward", torch.float32, 128, config)], [build])


def test_the_check_sees_a_compile_error():
    # A block of 24 queries: tl.arange takes powers of two only.
    with pytest.raises(CompilationError) as error:
        triton_resources.build("sm_90", "forward", torch.float32, 32, triton.Config({"BLOCK_Q": 24}, num_warps=4))
    assert "power of 2" in str(error.value.__cause__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("width", [1, 8, 30, 32, 64, 71, 128, 1025, 3096])
def test_every_head_width_has_a_configuration(width, dtype):
    configs = triton_kernel.configs_for(width, dtype)
    assert configs
    block_d = triton_kernel.channel_block(width, dtype)
    limit = triton_kernel.elements_per_thread(width, dtype)
    assert all(config.kwargs["BLOCK_Q"] * block_d <= limit * 32 * config.num_warps for config in configs)


def test_offsets_are_32_bit_unless_an_image_needs_64():
    # Shapes only: (N, S, M, D) values and (N, Lq, M, L, P, 2) locations.
    assert triton_kernel.offset_dtype(torch.Size([64, 100_000, 8, 32]), torch.Size([64, 100_000, 8, 4, 4, 2])) == tl.int32
    assert triton_kernel.offset_dtype(torch.Size([1, 2**24, 8, 16]), torch.Size([1, 300, 8, 4, 4, 2])) == tl.int64
    assert triton_kernel.offset_dtype(torch.Size([1, 100, 8, 32]), torch.Size([1, 2**23, 8, 4, 4, 2])) == tl.int64
    assert triton_kernel.offset_dtype(torch.Size([1, 100, 1, 2**16]), torch.Size([1, 2**15, 1, 1, 1, 2])) == tl.int64
