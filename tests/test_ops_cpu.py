"""The fused CPU kernel against the reference: values, all three gradients, dtypes, registration."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig

import pytest
import torch
from conftest import torch_threads

from deformable_detr import build_model
from deformable_detr.ops import cpu, ms_deform_attn, ms_deform_attn_reference, use_implementation

from choices import TopKReplay
from test_ops import forward_and_gradients, random_case, two_levels, upstream_gradient

pytestmark = pytest.mark.skipif(cpu.load_extension() is None, reason=f"fused kernel not built: {cpu.build_failure()}")


@pytest.fixture(autouse=True)
def _two_threads_at_least():
    """The kernel splits its work among threads (the forward a head's queries, the backward heads):
    its tests run it on two at least, however many the suite gives each of its processes."""
    with torch_threads(max(torch.get_num_threads(), 2)):
        yield


def with_borders(case):
    """Replace a third of the locations with exact borders, pixel centres and out-of-map points."""
    value, spatial_shapes, level_start_index, locations, weights = case
    special = torch.tensor([0.0, 1.0, 0.5, -0.25, 1.25, 2.0, -1.0], dtype=locations.dtype)
    generator = torch.Generator().manual_seed(3)
    chosen = torch.rand(locations.shape, generator=generator) < 0.33
    picks = special[torch.randint(len(special), locations.shape, generator=generator)]
    return value, spatial_shapes, level_start_index, torch.where(chosen, picks, locations), weights


CASES = {
    "D=1": dict(shapes=[(6, 7), (3, 4)], channels=1),
    "D=30": dict(shapes=[(6, 7), (3, 4), (2, 2)], channels=30, heads=3),
    "D=32": dict(shapes=[(8, 9), (4, 5), (2, 3), (1, 2)], channels=32, heads=2, points=4, queries=7),
    "D=71": dict(shapes=[(5, 5)], channels=71, heads=1),
    # More samples than positions: the kernels gather from copies of each head's rows (as in the
    # encoder; D=32 too), where the other cases read value's layout (as in the decoder).
    "head copies D=30": dict(shapes=[(3, 4), (2, 2)], channels=30, heads=3, queries=12),
    # One head whose 131 queries the forward's threads split between them, each copying the head.
    "head copies, one head": dict(shapes=[(3, 4)], batch=1, heads=1, queries=131, channels=16),
    "L=1 P=1": dict(shapes=[(9, 4)], points=1, channels=8),
    "batch 3": dict(shapes=[(4, 6), (2, 3)], batch=3, channels=4),
    "no queries": dict(shapes=[(4, 6), (2, 3)], queries=0, channels=4),
}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_equals_reference_forward_and_gradients(case, dtype, tolerance):
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in with_borders(random_case(**case))]
    fused = forward_and_gradients(cpu.ms_deform_attn_cpu, inputs)
    reference = forward_and_gradients(ms_deform_attn_reference, inputs)
    assert all(t.is_contiguous() for t in fused), "laid out as the fake implementation says (torch.compile relies on it)"
    for name, actual, expected in zip(["output", "grad value", "grad locations", "grad weights"], fused, reference):
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=name)


def test_non_contiguous_inputs():
    value, spatial_shapes, level_start_index, locations, weights = random_case([(5, 6), (3, 3)], channels=6)
    # Same values, laid out with other strides.
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights_t = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    expected = ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations, weights)
    actual = cpu.ms_deform_attn_cpu(value_t, spatial_shapes, level_start_index, locations_t, weights_t)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_fused_gradcheck():
    value, spatial_shapes, level_start_index, locations, weights = random_case([(4, 3), (2, 2)], batch=2, queries=3, channels=3)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: cpu.ms_deform_attn_cpu(v, spatial_shapes, level_start_index, loc, w), inputs
    )


def test_large_outputs_reuse_freed_blocks_and_stay_right():
    # From 32 MB on the kernel keeps the blocks of freed outputs for the next call's, as here the value
    # gradient of 36 MB (r50's decoder at batch 2 and COCO size), which the backward zeroes and
    # accumulates into: the second call, in the first call's block, must not add to what it held.
    case = random_case([(100, 134), (50, 67), (25, 34), (13, 17)], batch=2, queries=20, heads=8, channels=32, points=4,
                       dtype=torch.float32)
    value = case[0]
    assert value.nbytes >= 32 << 20
    expected = forward_and_gradients(ms_deform_attn_reference, case)
    grad_output = upstream_gradient(expected[0])  # as forward_and_gradients gives the reference
    blocks = []
    for _ in range(2):
        output = cpu.ms_deform_attn_cpu(*case)
        gradients = cpu.ms_deform_attn_cpu_backward(grad_output, *case)
        for name, actual, wanted in zip(["output", "grad value", "grad locations", "grad weights"], [output, *gradients], expected):
            torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-4, msg=name)
        blocks.append(gradients[0].data_ptr())
        del output, gradients
    assert blocks[1] == blocks[0], "the second call's value gradient is not in the first one's block"

    # The profiler counts the block while a tensor holds it, as it counts torch's own allocations.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        gradients = cpu.ms_deform_attn_cpu_backward(grad_output, *case)
    allocated = {event.key: event.cpu_memory_usage for event in profile.key_averages()}
    assert allocated["deformable_detr::ms_deform_attn_cpu_backward"] == sum(gradient.nbytes for gradient in gradients)


def test_bfloat16_follows_float64():
    low = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in random_case([(6, 5), (3, 3)], channels=16)]
    # The reference in float64 on the same (rounded) inputs: what remains is the kernel's rounding.
    expected = forward_and_gradients(ms_deform_attn_reference, [t.double() if t.is_floating_point() else t for t in low])
    actual = forward_and_gradients(cpu.ms_deform_attn_cpu, low)
    for got, want in zip(actual, expected):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("channels", [16, 5], ids=["D=16", "D=5"])
def test_float32_locations_beside_bfloat16_values(channels):
    # Under autocast the model keeps its sampling locations float32 beside bfloat16 values.
    case = random_case([(6, 5), (3, 3)], channels=channels, queries=12)  # 12 x 4 samples > 39 positions: head copies
    value, spatial_shapes, level_start_index, locations, weights = case
    mixed = [value.to(torch.bfloat16), spatial_shapes, level_start_index, locations.float(), weights.to(torch.bfloat16)]
    expected = forward_and_gradients(ms_deform_attn_reference, [t.double() if t.is_floating_point() else t for t in mixed])
    actual = forward_and_gradients(cpu.ms_deform_attn_cpu, mixed)
    for name, dtype, got, want in zip(["output", "grad value", "grad locations", "grad weights"],
                                      [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16], actual, expected):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2, msg=name)
    with pytest.raises(RuntimeError, match="sampling_locations too or be float32"):
        cpu.ms_deform_attn_cpu(value.float(), spatial_shapes, level_start_index, locations, weights.float())


# What would make the kernels read or write outside their tensors, were the op called directly (a
# compiled graph, torch.ops), past ms_deform_attn's own checks. Levels of 4 x 4 and 2 x 2, 20 positions.
OUT_OF_BOUNDS = {
    "a start past value": (dict(level_start_index=torch.tensor([0, 17])), "level 1 of 2x2 from position 17 does not fit"),
    "a start far past value": (dict(level_start_index=torch.tensor([0, 2**62])), "from position 4611686018427387904"),
    "a negative start": (dict(level_start_index=torch.tensor([-1, 16])), "level 0 of 4x4 from position -1"),
    "a huge level": (dict(spatial_shapes=torch.tensor([[4, 4], [2**40, 2**40]])), "level 1 of 1099511627776x1099511627776"),
    "a negative level": (dict(spatial_shapes=torch.tensor([[4, 4], [-2, -2]])), "level 1 of -2x-2"),
    "value shorter than the levels": (dict(value=torch.zeros(2, 10, 2, 4, dtype=torch.float64)), "in value's 10 positions"),
    "value of more images": (dict(value=torch.zeros(3, 20, 2, 4, dtype=torch.float64)), "value's images (N) and heads"),
    "weights of fewer queries": (dict(attention_weights=torch.ones(2, 1, 2, 2, 2, dtype=torch.float64)),
                                 "attention_weights must be sampling_locations'"),
}


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float64, torch.float16)],
                         ids=["float32 weights beside bfloat16 values", "bfloat16 locations", "float64 locations"])
def test_the_public_op_takes_dtype_mixes_the_kernel_lacks(dtypes):
    """As the reference does: a CUDA autocast run gives float32 weights beside bfloat16 values."""
    value_dtype, location_dtype, weight_dtype = dtypes
    value, spatial_shapes, level_start_index, locations, weights = random_case([(6, 5), (3, 3)], channels=8)
    mixed = [value.to(value_dtype), spatial_shapes, level_start_index, locations.to(location_dtype), weights.to(weight_dtype)]
    expected = forward_and_gradients(ms_deform_attn_reference, [t.double() if t.is_floating_point() else t for t in mixed])
    with use_implementation("cpu"):
        actual = forward_and_gradients(ms_deform_attn, mixed)
    for name, dtype, got, want in zip(["output", "grad value", "grad locations", "grad weights"],
                                      [value_dtype, value_dtype, location_dtype, weight_dtype], actual, expected):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2, msg=name)


@pytest.mark.parametrize("replacements, message", OUT_OF_BOUNDS.values(), ids=OUT_OF_BOUNDS.keys())
def test_the_op_called_directly_refuses_what_it_cannot_index(replacements, message):
    arguments = two_levels(**replacements)
    with pytest.raises(ValueError, match=f"^ms_deform_attn_cpu: .*{re.escape(message)}"):
        cpu.ms_deform_attn_cpu(*arguments)
    with pytest.raises(ValueError, match=f"^ms_deform_attn_cpu: .*{re.escape(message)}"):
        cpu.ms_deform_attn_cpu_backward(torch.zeros(2, 3, 8, dtype=torch.float64), *arguments)


def test_the_backward_called_directly_refuses_a_gradient_of_another_shape():
    with pytest.raises(ValueError, match=r"grad_output must be the output's \(N, Lq, M \* D\), got \[2, 3, 4\]"):
        cpu.ms_deform_attn_cpu_backward(torch.zeros(2, 3, 4, dtype=torch.float64), *two_levels())


def test_custom_op_registration():
    # Schema, fake (meta) implementation, autograd registration and dispatch, as torch checks them.
    value, spatial_shapes, level_start_index, locations, weights = random_case([(4, 5), (2, 2)], channels=4)
    args = (value.requires_grad_(), spatial_shapes, level_start_index, locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(cpu.ms_deform_attn_cpu, args)


def test_the_profiler_records_forward_and_backward():
    # torch's profiler leaves out operators defined in Python unless they record themselves.
    case = random_case([(4, 5), (2, 2)], channels=4, dtype=torch.float32)
    with torch.profiler.profile() as profile:
        forward_and_gradients(ms_deform_attn, case)
    calls = {event.key: event.count for event in profile.key_averages()}
    assert calls.get("deformable_detr::ms_deform_attn_cpu") == 1
    assert calls.get("deformable_detr::ms_deform_attn_cpu_backward") == 1


def test_traces_under_torch_compile():
    case = random_case([(4, 5), (2, 2)], channels=4, dtype=torch.float32)
    compiled = torch.compile(cpu.ms_deform_attn_cpu, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        forward_and_gradients(compiled, case), forward_and_gradients(cpu.ms_deform_attn_cpu, case)
    )


def test_the_public_op_traces_whole_under_torch_compile():
    # Its checks of the level tensors' values are left out of the trace, which they would break.
    case = random_case([(4, 5), (2, 2)], channels=4, dtype=torch.float32)
    compiled = torch.compile(ms_deform_attn, backend="aot_eager", fullgraph=True)
    with use_implementation("cpu"):
        torch.testing.assert_close(forward_and_gradients(compiled, case), forward_and_gradients(ms_deform_attn, case))


def test_the_ops_first_call_in_a_process_may_be_a_compiled_one():
    """The kernel is loaded as the trace reaches it, outside the graph: a process whose first call is
    under torch.compile(fullgraph=True) traces it whole (test_the_public_op_traces_whole_under_torch_compile
    cannot tell: this module has loaded the kernel already)."""
    script = """
import torch
from deformable_detr.ops import cpu, ms_deform_attn
assert cpu._extension is None
value, locations, weights = torch.randn(1, 20, 2, 4), torch.rand(1, 3, 2, 1, 2, 2), torch.rand(1, 3, 2, 1, 2)
arguments = (value, torch.tensor([[4, 5]]), torch.tensor([0]), locations, weights)
compiled = torch.compile(ms_deform_attn, backend="aot_eager", fullgraph=True)(*arguments)
torch.testing.assert_close(compiled, ms_deform_attn(*arguments))
assert cpu._extension is not None
"""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]


def test_dispatch_follows_the_requested_implementation(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "ms_deform_attn_cpu", lambda *args: calls.append("cpu") or ms_deform_attn_reference(*args))
    case = random_case([(3, 3)])
    with use_implementation("reference"):
        ms_deform_attn(*case)
    assert calls == []
    for name in ("cpu", "auto"):
        with use_implementation(name):
            ms_deform_attn(*case)
    assert calls == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="unknown ms_deform_attn implementation"):
        with use_implementation("cuda-kernel"):
            pass


@pytest.mark.parametrize("preset", ["tiny", "r50_two_stage"])
def test_model_outputs_do_not_depend_on_the_op_path(preset):
    model = build_model(preset).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # leave init, where zero weights hide the sampling
            parameter.add_(torch.randn_like(parameter) * 0.02)
    images = [torch.randn(3, 128, 160), torch.randn(3, 112, 128)]
    topk = TopKReplay()
    with torch.no_grad():
        with use_implementation("reference"), topk.recording():
            expected = model(images)
        with use_implementation("cpu"), topk.replaying():
            actual = model(images)
    assert len(topk.indices) == int(model.config.two_stage)  # the proposal selection
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual["pred_boxes"], expected["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_an_avx2_limit_builds_the_kernel_without_avx512(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 limits torch's kernels, and so this one's build, to AVX2."""
    paths = {}
    for capability in ("AVX512", "AVX2"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        assert ("-mno-avx512f" in cpu._flags()) == (capability == "AVX2")
        paths[capability] = cpu.library_path()
    assert paths["AVX512"] != paths["AVX2"]  # cached apart


def test_builds_are_cached_apart_for_each_python(monkeypatch):
    """Another Python cannot import this one's build: it is cached by the extension suffix too."""
    own = cpu.library_path()
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: ".cpython-312-x86_64-linux-gnu.so")
    assert cpu.library_path() != own


def test_a_cached_library_that_does_not_load_is_built_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFORMABLE_DETR_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "_extension", None)
    monkeypatch.setattr(cpu, "_failure", None)
    library = cpu.library_path()
    library.parent.mkdir(parents=True)
    library.write_bytes(b"\x7fELF, damaged")  # or another Python's build
    built = []
    monkeypatch.setattr(cpu, "_build", lambda path: built.append(path) or "the module built anew")
    assert cpu.load_extension() == "the module built anew" and built == [library]


def test_a_build_publishes_the_library_only_once_it_is_whole(tmp_path, monkeypatch):
    """Processes that start together build at once; none may import a library still being linked."""
    import torch.utils.cpp_extension

    monkeypatch.setenv("DEFORMABLE_DETR_CACHE", str(tmp_path))
    library = cpu.library_path()
    seen_while_linking = []

    def link_in_pieces(name, build_directory, **_):
        with open(f"{build_directory}/{name}.so", "wb") as output:
            output.write(b"\x7fELF part")
            output.flush()
            seen_while_linking.append(library.exists())
            output.write(b" and the rest")
        return "the module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", link_in_pieces)
    assert cpu._build(library) == "the module"
    assert seen_while_linking == [False]
    assert library.read_bytes() == b"\x7fELF part and the rest"
    assert sorted(path.name for path in library.parent.iterdir()) == ["build", library.name]  # no temporary left
