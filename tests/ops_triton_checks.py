"""The fused Triton kernels against the reference: values, all three gradients, dtypes, registration.

With a GPU they run on CUDA tensors; elsewhere in Triton's interpreter on CPU tensors, which needs
``TRITON_INTERPRET=1`` set before Triton is first imported (Triton's own library functions are
defined compiled or interpreted at that moment). ``test_ops_triton.py`` runs this module in a
process of its own, so that no other test module runs under the interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/ops_triton_checks.py   # no GPU
    python -m pytest tests/ops_triton_checks.py                      # GPU
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import pytest
import torch
import triton
import triton.language as tl
from test_ops_cpu import with_borders

from deformable_detr import ops
from deformable_detr.ops import cpu, ms_deform_attn, ms_deform_attn_reference, use_implementation

from test_ops import MISMATCHES, forward_and_gradients, random_case, two_levels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.fail("without a GPU these checks need TRITON_INTERPRET=1 in the environment", pytrace=False)
triton_kernel = ops.load_triton_kernel()
assert triton_kernel.INTERPRETED == (DEVICE == "cpu")

# Small but awkward: head widths that are not powers of two or span several channel blocks, one
# level and five, one point and four, query counts over one block (32 queries at D=32), no queries.
CASES = {
    "D=1": dict(shapes=[(6, 7), (3, 4)], channels=1),
    "D=30": dict(shapes=[(6, 7), (3, 4), (2, 2)], channels=30, heads=3, batch=1),
    "D=32 P=4": dict(shapes=[(8, 9), (4, 5), (2, 3), (1, 2)], channels=32, heads=2, points=4, queries=7, batch=1),
    "D=71": dict(shapes=[(5, 5)], channels=71, heads=1),
    "D=130 (three channel blocks)": dict(shapes=[(4, 5), (2, 3)], channels=130, heads=2, queries=5, batch=1),
    "L=1 P=1": dict(shapes=[(9, 4)], points=1, channels=8),
    "L=5 P=4": dict(shapes=[(7, 5), (4, 3), (2, 2), (1, 3), (1, 1)], points=4, heads=1, channels=4, batch=1),
    "two query blocks": dict(shapes=[(5, 6)], queries=70, heads=1, channels=32, points=1, batch=1),
    "no queries": dict(shapes=[(4, 6), (2, 3)], queries=0, channels=4),
}
NAMES = ["output", "grad value", "grad locations", "grad weights"]


def on_device(value, spatial_shapes, level_start_index, locations, weights):
    """The Triton op on DEVICE, for CPU inputs and outputs (gradients flow back through the copies)."""
    inputs = (value, spatial_shapes, level_start_index, locations, weights)
    return triton_kernel.ms_deform_attn_triton(*(t.to(DEVICE) for t in inputs)).cpu()


def away_from_kinks(case, margin=0.01):
    """Move every sampling point at least ``margin`` px away from integer pixel coordinates, where
    bilinear interpolation has a kink and either one-sided derivative is right."""
    value, spatial_shapes, level_start_index, locations, weights = case
    sizes = spatial_shapes.flip(-1).to(locations.dtype)[:, None, :]  # (L, 1, 2) as (W, H)
    pixels = locations * sizes - 0.5
    nearest = pixels.round()
    nudged = nearest + torch.where(pixels < nearest, -margin, margin)
    pixels = torch.where((pixels - nearest).abs() < margin, nudged, pixels)
    return value, spatial_shapes, level_start_index, (pixels + 0.5) / sizes, weights


def cast(case, dtype):
    return [t.to(dtype) if t.is_floating_point() else t for t in case]


def assert_follows_float64_reference(inputs, tolerance):
    """The kernel against the float64 reference on the same (rounded) inputs: what remains is the
    kernel's own rounding. ``tolerance`` is relative to each value and, for values that are sums
    cancelling to near zero, to the tensor's largest (the location gradients reach the tens; in
    float32 the reference itself is off by 1e-5 there)."""
    expected = forward_and_gradients(ms_deform_attn_reference, cast(inputs, torch.float64))
    actual = forward_and_gradients(on_device, inputs)
    value, _, _, locations, weights = inputs
    dtypes = [value.dtype, value.dtype, locations.dtype, weights.dtype]
    for name, got, want, dtype in zip(NAMES, actual, expected, dtypes):
        assert got.dtype == dtype, name
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * scale, msg=name)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_equals_reference_forward_and_gradients(case, dtype, tolerance):
    assert_follows_float64_reference(cast(away_from_kinks(with_borders(random_case(**case))), dtype), tolerance)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_forward_on_borders_and_pixel_centres(dtype, tolerance):
    # Exact borders, pixel centres and points wholly outside, where the forward has no kink to avoid.
    inputs = cast(with_borders(random_case([(4, 5), (2, 3)], points=4)), dtype)
    expected = ms_deform_attn_reference(*cast(inputs, torch.float64))
    torch.testing.assert_close(on_device(*inputs).double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("channels", [32, 96], ids=["one channel block", "two channel blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_follows_float64(dtype, channels):
    case = away_from_kinks(random_case([(8, 10), (4, 5), (2, 3)], channels=channels, points=4, queries=20, seed=2))
    # Two units of the dtype's precision: the kernel accumulates in float32 and rounds once.
    assert_follows_float64_reference(cast(case, dtype), 2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("locations_dtype, weights_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["float32 locations (the model under autocast)", "float32 weights"])
def test_a_mix_of_dtypes(locations_dtype, weights_dtype):
    # Each input is read in its own dtype: under bfloat16 autocast the model hands over bfloat16
    # values and weights beside float32 sampling locations.
    value, spatial_shapes, level_start_index, locations, weights = away_from_kinks(
        random_case([(8, 10), (4, 5)], channels=16, points=4, queries=10, seed=3)
    )
    inputs = (value.bfloat16(), spatial_shapes, level_start_index, locations.to(locations_dtype), weights.to(weights_dtype))
    assert_follows_float64_reference(inputs, 2 * torch.finfo(torch.bfloat16).eps)


def test_value_gradient_under_contention():
    # 200 queries of each head sample the same few pixels: the value gradient's atomics collide.
    value, spatial_shapes, level_start_index, locations, weights = random_case([(3, 3)], queries=200, heads=1, channels=4)
    locations = 0.5 + (locations - 0.5) * 0.01  # all within 0.03 px of the middle pixel's centre
    inputs = away_from_kinks((value, spatial_shapes, level_start_index, locations, weights))
    assert_follows_float64_reference(cast(inputs, torch.float32), 1e-5)


def test_non_contiguous_inputs():
    case = away_from_kinks(random_case([(5, 6), (3, 3)], channels=6))
    value, spatial_shapes, level_start_index, locations, weights = case
    # Same values, laid out with other strides.
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights_t = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    expected = forward_and_gradients(ms_deform_attn_reference, case)
    actual = forward_and_gradients(on_device, (value_t, spatial_shapes, level_start_index, locations_t, weights_t))
    for name, got, want in zip(NAMES, actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


def test_64_bit_offsets_give_the_same_results(monkeypatch):
    # The path for images whose tensors hold 2**31 elements or more, on a small one.
    case = away_from_kinks(random_case([(6, 7), (3, 4)], channels=40, points=3, queries=9))
    narrow = forward_and_gradients(on_device, case)
    monkeypatch.setattr(triton_kernel, "offset_dtype", lambda *shapes: tl.int64)
    wide = forward_and_gradients(on_device, case)
    for name, got, want in zip(NAMES, wide, narrow):
        assert torch.equal(got, want), name


def test_heads_of_no_channels_give_empty_outputs_and_zero_gradients():
    # D = 0: nothing to launch (a head of no channels has no channel block to split it into).
    assert_follows_float64_reference(cast(random_case([(4, 6), (2, 3)], channels=0), torch.float32), 1e-5)


@pytest.mark.parametrize("offsets", [tl.int32, tl.int64], ids=["32-bit offsets", "64-bit offsets"])
def test_a_level_past_2_24_pixels_samples_and_scatters_exact_positions(monkeypatch, offsets):
    # One level of 4096 x 8192 = 2**25 pixels, where row * width + col in float32 would round odd
    # positions to even ones, and the last pixel's to the first past the level (past value). Pixel
    # centres of power-of-two sizes are exact in float32: each query reads one pixel, whose value is
    # its position less 2**24 (exact in float32), at a weight of a power of two (exact products).
    monkeypatch.setattr(triton_kernel, "offset_dtype", lambda *shapes: offsets)
    height, width = 4096, 8192
    pixels = torch.tensor([[4095, 8191], [4095, 8189], [4095, 8190], [3000, 1], [2048, 4095], [100, 3]])  # (row, col)
    positions = pixels[:, 0] * width + pixels[:, 1]
    assert ((pixels[:, 0].float() * width + pixels[:, 1].float()).long() != positions).any()  # float32 would miss
    value = (torch.arange(height * width, dtype=torch.int32) - 2**24).float().view(1, -1, 1, 1).requires_grad_()
    locations = ((pixels.flip(-1) + 0.5) / torch.tensor([width, height])).float().view(1, -1, 1, 1, 1, 2)
    weights = (2.0 ** torch.arange(len(pixels))).view(1, -1, 1, 1, 1)
    output = on_device(value, torch.tensor([[height, width]]), torch.tensor([0]), locations, weights)
    assert torch.equal(output.flatten(), weights.flatten() * (positions - 2**24).float())
    (grad_value,) = torch.autograd.grad(output.sum(), value)
    sampled = grad_value.flatten().nonzero().flatten()
    assert torch.equal(sampled, positions.sort().values)
    assert torch.equal(grad_value.flatten()[positions], weights.flatten())


@pytest.mark.parametrize("start", [23, 10**9, 2**40 + 5], ids=["partly past value", "far past value", "past 32 bits"])
def test_a_level_past_value_reads_as_zeros(start):
    # The op does not check levels against value on the GPU (reading them would wait for it): a
    # level that runs past value's 26 positions reads as zeros, as if it lay in zero rows after
    # value, and its gradient lands nowhere, rather than outside the tensors.
    value, spatial_shapes, _, locations, weights = away_from_kinks(random_case([(4, 5), (2, 3)], channels=8, queries=6))
    padded = torch.cat([value, value.new_zeros(2, 6, 2, 8)], dim=1)
    past = forward_and_gradients(on_device, (value, spatial_shapes, torch.tensor([0, start]), locations, weights))
    within = forward_and_gradients(on_device, (padded, spatial_shapes, torch.tensor([0, 26]), locations, weights))
    within[1] = within[1][:, :26]
    for name, got, want in zip(NAMES, past, within):
        assert torch.equal(got, want), name


# What the op checks from shapes alone, which its Triton operator checks again for direct calls.
SHAPE_MISMATCHES = {name: MISMATCHES[name] for name in (
    "value of more images", "weights of one of everything", "weights of other heads", "weights of other points",
    "locations of three coordinates", "starts of one level", "fractional sizes",
)}


@pytest.mark.parametrize("replacements, message", SHAPE_MISMATCHES.values(), ids=SHAPE_MISMATCHES.keys())
def test_the_operator_called_directly_refuses_shapes_that_disagree(replacements, message):
    arguments = [t.to(DEVICE) for t in two_levels(**replacements)]
    for call in (triton_kernel.ms_deform_attn_triton, functools.partial(triton_kernel.ms_deform_attn_triton_backward,
                                                                        torch.zeros(2, 3, 8, device=DEVICE))):
        with pytest.raises(ValueError) as error:
            call(*arguments)
        assert str(error.value) == f"ms_deform_attn: {message}"


def test_the_backward_called_directly_refuses_a_gradient_of_another_shape():
    arguments = [t.to(DEVICE) for t in two_levels()]
    with pytest.raises(ValueError, match=r"grad_output must be the output's \(N, Lq, M \* D\) = \(2, 3, 8\), got \(2, 3, 4\)"):
        triton_kernel.ms_deform_attn_triton_backward(torch.zeros(2, 3, 4, device=DEVICE, dtype=torch.float64), *arguments)

def test_tuning_runs_leave_the_gradients_right(monkeypatch):
    # The autotuner times each configuration by running it, into the same gradient buffers the
    # backward adds into: each run and the final one must start from zero. Timings are made up
    # (the interpreter's would mean nothing): the last configuration wins.
    timed = []

    def bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        timed.append(kernel_call)
        return [1.0 / len(timed)] * 3

    monkeypatch.setattr(triton_kernel, "TUNED", True)
    for tuner in (triton_kernel._tuned_forward, triton_kernel._tuned_backward):
        monkeypatch.setitem(tuner.__dict__, "do_bench", bench)  # what the do_bench property would cache
        monkeypatch.setattr(tuner, "cache", {})
    case = away_from_kinks(random_case([(4, 5), (2, 3)], channels=96, heads=2, queries=30, batch=1))
    assert_follows_float64_reference(cast(case, torch.float32), 1e-5)
    configs = triton_kernel.configs_for(96, torch.float32)
    assert len(timed) == 2 * len(configs) > 2
    assert triton_kernel._tuned_backward.best_config == configs[-1]


def broken_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, output_ptr,
    num_positions, num_queries, num_heads, num_channels, num_levels, num_points, work,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
):
    tl.static_assert(BLOCK_Q < 0, "this kernel does not compile")


def test_a_kernel_that_fails_its_first_use_check_falls_back_once(monkeypatch):
    monkeypatch.setattr(ops, "_triton_checks", {})
    monkeypatch.setattr(triton_kernel._tuned_forward, "fn", triton.jit(broken_forward_kernel))
    with pytest.warns(RuntimeWarning, match=r"failed their first-use check on cpu in torch.float32 \(.*does not compile"):
        assert not ops.triton_runs_on("cpu", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ops.triton_runs_on("cpu", torch.float32)  # checked once: no second warning
    monkeypatch.setattr(triton_kernel._tuned_forward, "fn", triton_kernel._forward_kernel)
    assert ops.triton_runs_on("cpu", torch.float64)  # each dtype has its own check


def test_the_check_runs_the_dtypes_the_model_passes(monkeypatch):
    # Under autocast the model passes float32 locations and weights beside bfloat16 values: a
    # specialisation of its own, which the check must be the one to compile first.
    seen = []
    correct = triton_kernel.forward
    monkeypatch.setattr(triton_kernel, "forward", lambda *args, **kwargs: seen.append([t.dtype for t in args]) or correct(*args, **kwargs))
    triton_kernel.check(torch.device(DEVICE), torch.bfloat16)
    assert seen == [[torch.bfloat16, torch.int64, torch.int64, torch.float32, torch.float32]]


def test_the_check_catches_a_kernel_that_computes_wrong(monkeypatch):
    correct = triton_kernel.forward
    monkeypatch.setattr(triton_kernel, "forward", lambda *args, **kwargs: correct(*args, **kwargs) * 1.01)
    with pytest.raises(RuntimeError, match="the output differs from the reference's"):
        triton_kernel.check(torch.device(DEVICE), torch.float32)


@pytest.mark.parametrize("runs", [True, False])
def test_auto_uses_the_triton_kernels_where_they_passed_their_check(monkeypatch, runs):
    checked = []
    monkeypatch.setattr(ops, "triton_runs_on", lambda device, dtype: checked.append((device, dtype)) or runs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with use_implementation("auto"):
        assert ops.implementation_for("cuda", torch.bfloat16) == ("triton" if runs else "reference")
    with use_implementation("triton"):  # forced: no check
        assert ops.implementation_for("cuda", torch.bfloat16) == "triton"
    assert checked == [("cuda", torch.bfloat16)]


def test_custom_op_registration():
    # Schema, fake (meta) implementation, autograd registration and dispatch, as torch checks them.
    case = random_case([(4, 5), (2, 2)], batch=1, queries=3, heads=1, channels=4, points=1)
    value, spatial_shapes, level_start_index, locations, weights = (t.to(DEVICE) for t in case)
    args = (value.requires_grad_(), spatial_shapes, level_start_index, locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(triton_kernel.ms_deform_attn_triton, args)


def test_traces_under_torch_compile():
    case = away_from_kinks(random_case([(4, 5), (2, 2)], batch=1, heads=1, channels=4, dtype=torch.float32))
    compiled = torch.compile(on_device, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(forward_and_gradients(compiled, case), forward_and_gradients(on_device, case))


def test_dispatch_follows_the_requested_implementation(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "ms_deform_attn_cpu", lambda *args: calls.append("cpu") or ms_deform_attn_reference(*args))
    monkeypatch.setattr(
        triton_kernel, "ms_deform_attn_triton", lambda *args: calls.append("triton") or ms_deform_attn_reference(*args)
    )
    case = [t.to(DEVICE) for t in random_case([(3, 3)])]
    for name in ("reference", "triton", "auto"):
        with use_implementation(name):
            ms_deform_attn(*case)
    # "auto": the fused kernel of the tensors' device.
    assert calls == ["triton", "triton" if DEVICE == "cuda" else "cpu"]


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_kernel, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_kernel.ms_deform_attn_triton(*random_case([(3, 3)]))


def test_without_triton_the_reference_runs_after_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_triton_kernel", None)
    monkeypatch.setattr(ops, "_triton_failure", None)
    monkeypatch.setitem(sys.modules, "deformable_detr.ops.triton_kernel", None)  # makes the import fail
    with pytest.warns(RuntimeWarning, match="Triton could not be imported .*using the reference") as warnings:
        assert ops.load_triton_kernel() is None
        assert ops.load_triton_kernel() is None
    assert len(warnings) == 1
    with use_implementation("triton"), pytest.raises(RuntimeError, match="Triton could not be imported"):
        ms_deform_attn(*random_case([(3, 3)]))
