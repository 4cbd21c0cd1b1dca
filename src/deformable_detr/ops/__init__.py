"""Multi-scale deformable attention, the core op of the model.

Every call in the model goes through :func:`ms_deform_attn`, which dispatches by device: the fused
kernel on the CPU (``cpu.py``, compiled on first use), the fused Triton kernels on CUDA
(``triton_kernel.py``, imported on first use and checked on each device and dtype before it is
trusted), the reference elsewhere.
:func:`ms_deform_attn_reference` is the specification. ``DEFORMABLE_DETR_OP=reference|cpu|triton|auto``
(or :func:`use_implementation`) forces a path. Whichever runs, the inputs are checked to agree
first, in one line that names the argument; the fused kernels guard their own memory as well (see
:func:`_readable_without_sync`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import itertools
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from . import cpu
from .reference import ms_deform_attn_reference
from .shapes import check_shapes

__all__ = [
    "IMPLEMENTATIONS",
    "implementation_for",
    "load_triton_kernel",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "triton_runs_on",
    "use_implementation",
]

IMPLEMENTATIONS = ("auto", "reference", "cpu", "triton")


def _checked(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown ms_deform_attn implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    return name


# Checked where it is used, so that a wrong value is one error there, not a failed import.
_REQUESTED = os.environ.get("DEFORMABLE_DETR_OP", "auto")
# A context variable: each thread (and task) forces its own, and torch.compile guards on it.
_implementation = contextvars.ContextVar("ms_deform_attn_implementation", default=_REQUESTED)
_triton_kernel: ModuleType | None = None
_triton_failure: str | None = None
_triton_checks: dict[tuple[torch.device, torch.dtype], bool] = {}


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Force ``"reference"``, ``"cpu"`` (the fused CPU kernel; an error where it cannot be built),
    ``"triton"`` (the fused Triton kernels, for CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``; an error where Triton is missing) or ``"auto"`` inside the block."""
    token = _implementation.set(_checked(name))
    try:
        yield
    finally:
        _implementation.reset(token)


def load_triton_kernel() -> ModuleType | None:
    """The Triton kernels' module, imported on first use, so that the package works where Triton
    is missing or broken (CPU-only installs).

    Returns None, with one warning, where Triton cannot be imported.
    """
    global _triton_kernel, _triton_failure
    if _triton_kernel is None and _triton_failure is None:
        try:
            _triton_kernel = importlib.import_module(f"{__name__}.triton_kernel")
        except ImportError as error:
            _triton_failure = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"deformable_detr: Triton could not be imported ({_triton_failure}); "
                "using the reference implementation on CUDA instead",
                RuntimeWarning,
                stacklevel=2,
            )
    return _triton_kernel


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    properties = torch.cuda.get_device_properties(device)
    # ROCm builds name the architecture (gfx942); CUDA ones give the compute capability.
    architecture = getattr(properties, "gcnArchName", "") or f"sm_{properties.major}{properties.minor}"
    return f"{device} ({properties.name}, {architecture})"


def triton_runs_on(device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the Triton kernels compile, launch and agree with the reference on ``device`` in
    ``dtype``: checked once per device and dtype, on a tiny input, the first time it is asked.
    Where they do not (an architecture or driver Triton does not support), warns once, naming the
    device, its architecture and the error. False where Triton cannot be imported.

    Under ``torch.compile`` the check cannot launch kernels: an unchecked pair counts as working
    there, and the compiled kernels fail loudly if it does not.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, dtype)
    if torch.compiler.is_compiling() or key in _triton_checks:
        return _triton_checks.get(key, True)
    kernels = load_triton_kernel()
    if kernels is None:
        return False
    try:
        kernels.check(device, dtype)
        _triton_checks[key] = True
    except Exception as error:  # any failure to compile, launch or agree means: do not use it here
        _triton_checks[key] = False
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(
            f"deformable_detr: the Triton kernels failed their first-use check on {_describe(device)} in {dtype} "
            f"({type(error).__name__}: {message}); using the reference implementation there instead",
            RuntimeWarning,
            stacklevel=2,
        )
    return _triton_checks[key]


def implementation_for(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """What :func:`ms_deform_attn` runs for tensors of ``dtype`` on ``device``: ``"cpu"`` (the
    fused CPU kernel), ``"triton"`` or ``"reference"``. Builds the CPU kernel, or imports Triton
    and checks it on the device (:func:`triton_runs_on`), where it must know whether they work;
    raises where a forced one does not."""
    device_type, requested = torch.device(device).type, _checked(_implementation.get())
    if requested == "cpu" and device_type != "cpu":
        raise RuntimeError(f"the fused CPU kernel was requested for {device_type} tensors; it takes CPU tensors")
    if requested in ("cpu", "auto") and device_type == "cpu":
        if _cpu_kernel_loads():
            return "cpu"
        if requested == "cpu":
            raise RuntimeError(f"the fused CPU kernel was requested but could not be built: {cpu.build_failure()}")
    if requested == "triton":
        if _triton_imports():
            return "triton"
        raise RuntimeError(f"the Triton kernels were requested but Triton could not be imported: {_triton_failure}")
    if requested == "auto" and device_type == "cuda" and _triton_imports():
        # Where no GPU is visible (asked by `deformable-detr info`): what one gets if it passes the check.
        if not torch.cuda.is_available() or triton_runs_on(device, dtype):
            return "triton"
    return "reference"


# Whether each fused path can run: asked once a process, whose answer stays. Under torch.compile they
# are answered as the trace reaches them (building or importing the kernels, which the trace could
# not follow) and enter the graph as constants, so that the op's first call may be a compiled one.
@torch.compiler.assume_constant_result
def _cpu_kernel_loads() -> bool:
    return cpu.load_extension() is not None


@torch.compiler.assume_constant_result
def _triton_imports() -> bool:
    return load_triton_kernel() is not None


def _readable_without_sync(tensor: Tensor) -> bool:
    """Whether the op may read ``tensor``'s values on every call: a CPU tensor, outside a trace.

    A CUDA tensor's values would cost a wait for the GPU per call (the model keeps spatial_shapes
    on the device), and a trace (torch.compile, torch.export and the ONNX export, torch.jit) has
    fake tensors or would freeze the values into the graph. Unread values cannot make a kernel reach
    outside its tensors: the CPU kernel refuses a level that does not fit in value's S positions,
    and the Triton kernels read such a level as zeros.
    """
    return tensor.is_cpu and not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def _check_levels(positions: int, spatial_shapes: Tensor, level_start_index: Tensor) -> None:
    """Raise ValueError unless every level of spatial_shapes is at least 1 x 1, their H * W add up
    to value's ``positions`` and level_start_index (where readable) is where each level starts:
    stricter than the kernels' own bounds, which only keep them inside their tensors."""
    sizes = spatial_shapes.tolist()
    for height, width in sizes:
        if height < 1 or width < 1:
            raise ValueError(f"ms_deform_attn: spatial_shapes has a level of {height}x{width}; levels must be at least 1x1")
    areas = [height * width for height, width in sizes]
    if sum(areas) != positions:
        levels = " + ".join(f"{height}x{width}" for height, width in sizes)
        raise ValueError(f"ms_deform_attn: value has {positions} positions but spatial_shapes needs {sum(areas)} ({levels})")
    if _readable_without_sync(level_start_index):
        given, starts = level_start_index.tolist(), list(itertools.accumulate(areas, initial=0))[:-1]
        if given != starts:
            raise ValueError(f"ms_deform_attn: level_start_index is {given} but spatial_shapes needs {starts}")


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with the reference CUDA kernel's signature and semantics.

    Shapes: value (N, S, M, D), spatial_shapes (L, 2) integer (H, W), level_start_index (L,)
    integer, sampling_locations (N, Lq, M, L, P, 2) normalised (x, y), attention_weights
    (N, Lq, M, L, P) -> (N, Lq, M * D). Differentiable with respect to value, sampling_locations and
    attention_weights; any floating dtype, any device.

    Raises:
        ValueError: in one line naming the argument, where the shapes disagree, or where the
            values of spatial_shapes and level_start_index, read where they are CPU tensors outside
            a trace, do not describe value's S positions (see :func:`_check_levels`).
    """
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _readable_without_sync(spatial_shapes):
        _check_levels(value.shape[1], spatial_shapes, level_start_index)
    implementation = implementation_for(value.device, value.dtype)
    if implementation == "cpu":
        sampling_locations, attention_weights = cpu.read_dtypes(value, sampling_locations, attention_weights)
        function = cpu.ms_deform_attn_cpu
    elif implementation == "triton":
        function = _triton_kernel.ms_deform_attn_triton
    else:
        function = ms_deform_attn_reference
    return function(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
