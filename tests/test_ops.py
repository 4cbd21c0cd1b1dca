"""The reference op against an independent, loop-based bilinear sampler."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from deformable_detr.ops import ms_deform_attn, ms_deform_attn_reference, use_implementation


def loop_sampler(value, spatial_shapes, level_start_index, locations, weights):
    """Multi-scale deformable attention written one sample at a time, straight from the definition."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    output = torch.zeros(batch, queries, heads, channels, dtype=value.dtype)
    for n in range(batch):
        for q in range(queries):
            for m in range(heads):
                for level in range(levels):
                    height, width = (int(v) for v in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for p in range(points):
                        # Pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H).
                        x = float(locations[n, q, m, level, p, 0]) * width - 0.5
                        y = float(locations[n, q, m, level, p, 1]) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(channels, dtype=value.dtype)
                        for yc in (y0, y0 + 1):
                            for xc in (x0, x0 + 1):
                                if 0 <= yc < height and 0 <= xc < width:
                                    corner_weight = (1 - abs(x - xc)) * (1 - abs(y - yc))
                                    sample += corner_weight * value[n, start + yc * width + xc, m]
                        output[n, q, m] += weights[n, q, m, level, p] * sample
    return output.flatten(2)


def random_case(shapes, *, batch=2, queries=5, heads=2, channels=3, points=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(areas.sum()), heads, channels, generator=generator, dtype=dtype)
    # Locations spread beyond [0, 1] so that samples fall partly or wholly outside the map.
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def upstream_gradient(output):
    """The gradient flowing into ``output`` in these tests: the same for every implementation."""
    return torch.randn(output.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(output.dtype)


def forward_and_gradients(function, case):
    value, spatial_shapes, level_start_index, locations, weights = (t.clone() for t in case)
    differentiable = [t.requires_grad_() for t in (value, locations, weights)]
    output = function(value, spatial_shapes, level_start_index, locations, weights)
    output.backward(upstream_gradient(output))
    return [output.detach()] + [t.grad for t in differentiable]


CASES = {
    "multi-level": dict(shapes=[(6, 7), (3, 4), (2, 2)]),
    "one level": dict(shapes=[(5, 9)]),
    "one point": dict(shapes=[(4, 4), (2, 3)], points=1),
    "odd channels": dict(shapes=[(3, 5), (2, 2)], channels=5),
    "one channel": dict(shapes=[(3, 3)], channels=1, heads=3),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reference_equals_loop_sampler(case):
    inputs = random_case(**case)
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), loop_sampler(*inputs), rtol=1e-12, atol=1e-12)


def test_reference_on_borders_and_pixel_centres():
    value, spatial_shapes, level_start_index, locations, weights = random_case([(4, 5), (2, 3)], points=4)
    # Exactly on the map's border, exactly on pixel centres, and half a pixel beyond the border.
    special = torch.tensor([0.0, 1.0, 0.5 / 4, 1.5 / 4, 3.5 / 4, -0.5 / 4, 1 + 0.5 / 4, 0.25], dtype=torch.float64)
    picks = torch.randint(len(special), locations.shape, generator=torch.Generator().manual_seed(1))
    locations = special[picks]
    inputs = (value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), loop_sampler(*inputs), rtol=1e-12, atol=1e-12)


def test_samples_wholly_outside_read_zero():
    value, spatial_shapes, level_start_index, locations, weights = random_case([(3, 3)])
    far_outside = torch.full_like(locations, 1.5)
    output = ms_deform_attn_reference(value, spatial_shapes, level_start_index, far_outside, weights)
    assert torch.count_nonzero(output) == 0


def test_reference_gradcheck_value_locations_and_weights():
    value, spatial_shapes, level_start_index, locations, weights = random_case(
        [(4, 3), (2, 2)], batch=1, queries=3, channels=2
    )
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_reference(v, spatial_shapes, level_start_index, loc, w), inputs
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes_follow_float64(dtype):
    # Through the public dispatch: the fused kernel on the CPU, the reference elsewhere.
    inputs = random_case([(6, 5), (3, 3)], channels=8)
    expected = ms_deform_attn(*inputs)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    output = ms_deform_attn(value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype))
    assert output.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(output.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("batch", [1, 2], ids=["one image", "two images"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_reference_in_half_precision_follows_float64(dtype, batch):
    # With one image each level's value map is a strided view, which torch's CPU grid_sample
    # misreads in bfloat16; in either precision grid_sample would round the pixel coordinates.
    case = random_case([(16, 20), (8, 10), (4, 5), (2, 3)], batch=batch, queries=40, heads=8, channels=32, points=4, seed=2)
    low = [t.to(dtype) if t.is_floating_point() else t for t in case]
    # The float64 reference on the same rounded inputs: what remains is the op's own rounding.
    expected = forward_and_gradients(ms_deform_attn_reference, [t.double() if t.is_floating_point() else t for t in low])
    actual = forward_and_gradients(ms_deform_attn_reference, low)
    # Two units of the dtype's precision, relative to each value and to the tensor's scale (the
    # location gradients reach the hundreds).
    tolerance = 2 * torch.finfo(dtype).eps
    for name, got, want in zip(["output", "grad value", "grad locations", "grad weights"], actual, expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * want.abs().max().item(), msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    inputs = random_case([(6, 7), (3, 4)], channels=4)
    gpu_inputs = [t.cuda() for t in inputs]
    torch.testing.assert_close(ms_deform_attn(*gpu_inputs).cpu(), ms_deform_attn(*inputs), rtol=1e-10, atol=1e-10)


def test_without_a_compiler_the_reference_runs_after_one_warning(monkeypatch):
    from deformable_detr.ops import cpu, use_implementation

    def no_compiler(library):
        raise RuntimeError("error: command 'c++' failed: No such file or directory")

    monkeypatch.setattr(cpu, "_extension", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setattr(cpu, "_import_built", lambda library: None)
    monkeypatch.setattr(cpu, "_build", no_compiler)
    inputs = random_case([(4, 5), (2, 2)])
    with pytest.warns(RuntimeWarning, match="could not be built .*using the reference") as warnings:
        output = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    assert len(warnings) == 1
    torch.testing.assert_close(output, ms_deform_attn_reference(*inputs), rtol=0, atol=0)
    with use_implementation("cpu"), pytest.raises(RuntimeError, match="requested but could not be built"):
        ms_deform_attn(*inputs)


def test_a_missing_compiler_is_named_in_the_one_warning(tmp_path, monkeypatch):
    from deformable_detr.ops import cpu

    monkeypatch.setenv("DEFORMABLE_DETR_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-c++")
    monkeypatch.setattr(cpu, "_extension", None)
    monkeypatch.setattr(cpu, "_failure", None)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(RuntimeError: no C\+\+ compiler: no-such-c\+\+ is not "
                                            r"on PATH \(install one, e.g. g\+\+, or set CXX\)\); using the reference"):
        assert cpu.load_extension() is None


def test_a_missing_kernel_source_falls_back_to_the_reference_with_one_warning(tmp_path, monkeypatch):
    """As an install without the package's data would have it."""
    from deformable_detr.ops import cpu

    monkeypatch.setenv("DEFORMABLE_DETR_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "_SOURCE", tmp_path / "ms_deform_attn_cpu.cpp")
    monkeypatch.setattr(cpu, "_extension", None)
    monkeypatch.setattr(cpu, "_failure", None)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(FileNotFoundError: .*ms_deform_attn_cpu.cpp'\); using"):
        assert cpu.load_extension() is None


def test_building_the_kernel_logs_nothing_of_cuda(tmp_path):
    """torch's extension builder logs, as it is imported on a machine without a GPU but with a CUDA
    folder, that it found no CUDA runtime: noise in the output of the first command that builds the
    CPU kernel. (The environment makes such a machine of any.)"""
    script = "from deformable_detr.ops import cpu; cpu._cpp_extension_load()"
    machine = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=machine)
    assert (ran.returncode, ran.stderr) == (0, "")


def test_an_unknown_implementation_in_the_environment_is_one_error_where_the_op_runs_not_at_import():
    script = """
import torch
from deformable_detr.ops import implementation_for
try:
    implementation_for("cpu")
except ValueError as error:
    print(error)
"""
    environment = {**os.environ, "DEFORMABLE_DETR_OP": "CPU", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout == "unknown ms_deform_attn implementation 'CPU'; choose from auto, reference, cpu, triton\n"


def test_each_thread_forces_its_own_implementation():
    """An export forces the reference in its thread (export.py); other threads keep theirs, and blocks
    left in another order than entered restore each thread's own."""
    from deformable_detr.ops import implementation_for

    default = implementation_for("cpu")
    entered, first_left = threading.Barrier(2), threading.Event()
    seen = {}

    def forcing(name, leaves_first):
        with use_implementation(name):
            entered.wait()
            if not leaves_first:
                first_left.wait()
            seen[name] = implementation_for("cpu")
        if leaves_first:
            first_left.set()
        seen[f"{name} after"] = implementation_for("cpu")

    threads = [threading.Thread(target=forcing, args=("reference", True)), threading.Thread(target=forcing, args=("cpu", False))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"reference": "reference", "cpu": "cpu", "reference after": default, "cpu after": default}
    assert implementation_for("cpu") == default


def test_the_cpu_kernel_forced_for_tensors_elsewhere_is_an_error_not_the_reference():
    on_meta = [t.to("meta") for t in random_case([(4, 5), (2, 2)])]
    with use_implementation("cpu"), pytest.raises(RuntimeError, match="requested for meta tensors; it takes CPU tensors"):
        ms_deform_attn(*on_meta)


ARGUMENTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def two_levels(**replacements):
    """The arguments of a valid call on levels of 4 x 4 and 2 x 2 (20 positions) for 2 images,
    3 queries, 2 heads and 2 points, some replaced."""
    valid = dict(zip(ARGUMENTS, random_case([(4, 4), (2, 2)], queries=3, channels=4)))
    return [replacements.get(name, valid[name]) for name in ARGUMENTS]


# Before the op checked its inputs, most of these made the fused CPU kernel read out of bounds (the
# far start and the huge level crashed the process) and the reference fail with torch's own errors.
MISMATCHES = {
    "value shorter than the levels": (
        dict(value=torch.zeros(2, 10, 2, 4)), "value has 10 positions but spatial_shapes needs 20 (4x4 + 2x2)"
    ),
    "value of more images": (
        dict(value=torch.zeros(3, 20, 2, 4)), "sampling_locations has N = 2 but value has N = 3 (the number of images)"
    ),
    "weights of one of everything": (
        dict(attention_weights=torch.ones(1, 1, 1, 1, 1)),
        "attention_weights has N = 1 but value has N = 2 (the number of images)",
    ),
    "weights of other heads": (
        dict(attention_weights=torch.ones(2, 3, 4, 2, 2)),
        "attention_weights has M = 4 but value has M = 2 (the number of heads)",
    ),
    "weights of other points": (
        dict(attention_weights=torch.ones(2, 3, 2, 2, 5)),
        "attention_weights has P = 5 but sampling_locations has P = 2 (the number of points)",
    ),
    "locations of three coordinates": (
        dict(sampling_locations=torch.zeros(2, 3, 2, 2, 2, 3)),
        "sampling_locations must be (N, Lq, M, L, P, 2), got shape (2, 3, 2, 2, 2, 3)",
    ),
    "a start past value": (
        dict(level_start_index=torch.tensor([0, 100])), "level_start_index is [0, 100] but spatial_shapes needs [0, 16]"
    ),
    "a start far past value": (
        dict(level_start_index=torch.tensor([0, 10**9])),
        "level_start_index is [0, 1000000000] but spatial_shapes needs [0, 16]",
    ),
    "starts of one level": (
        dict(level_start_index=torch.tensor([0])),
        "level_start_index has L = 1 but sampling_locations has L = 2 (the number of levels)",
    ),
    "a huge level": (
        dict(spatial_shapes=torch.tensor([[4, 4], [100000, 100000]])),
        "value has 20 positions but spatial_shapes needs 10000000016 (4x4 + 100000x100000)",
    ),
    "an empty level": (
        dict(spatial_shapes=torch.tensor([[5, 4], [0, 2]])),
        "spatial_shapes has a level of 0x2; levels must be at least 1x1",
    ),
    "fractional sizes": (
        dict(spatial_shapes=torch.tensor([[4.0, 4.0], [2.0, 2.0]])),
        "spatial_shapes must hold integers, got torch.float32",
    ),
}


@pytest.mark.parametrize("implementation", ["reference", "cpu"])
@pytest.mark.parametrize("replacements, message", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_inputs_that_disagree_are_refused_in_one_line(replacements, message, implementation):
    with use_implementation(implementation), pytest.raises(ValueError) as error:
        ms_deform_attn(*two_levels(**replacements))
    assert str(error.value) == f"ms_deform_attn: {message}"


def test_level_values_off_the_cpu_are_not_read_but_their_shapes_are(monkeypatch):
    # Reading a CUDA tensor's values would wait for the GPU on every call; meta tensors have none.
    monkeypatch.setattr("deformable_detr.ops.ms_deform_attn_reference", lambda *arguments: "dispatched")
    on_meta = [t.to("meta") for t in two_levels()]
    assert ms_deform_attn(*on_meta) == "dispatched"
    on_meta[ARGUMENTS.index("level_start_index")] = torch.zeros(3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="level_start_index has L = 3 but sampling_locations has L = 2"):
        ms_deform_attn(*on_meta)
