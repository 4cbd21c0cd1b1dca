"""The fused CPU kernel: compiled on first use with torch's extension tooling, cached on disk, and
registered as the custom operator ``deformable_detr::ms_deform_attn_cpu`` (autograd and fake tensor
support included, so it works under ``torch.compile`` and ``gradcheck``)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sysconfig
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..files import atomic_write, cache_folder
from .registration import fused_op, register_fused_op

_SOURCE = Path(__file__).parent / "csrc" / "ms_deform_attn_cpu.cpp"
_extension: ModuleType | None = None
_failure: str | None = None


def _flags() -> list[str]:
    """The compiler's flags: for this processor, without AVX-512 where torch's own kernels are
    limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``), so that the limit makes an AVX-512 machine stand
    in for an AVX2-only one in this kernel too."""
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        flags.append("-mno-avx512f")
    return flags


# The lines of /proc/cpuinfo that tell processors apart: x86's, and ARM's, which has neither of those.
_PROCESSOR_LINES = ("model name", "flags", "Features", "CPU implementer", "CPU part")


def _build_name() -> str:
    """A name unique to this source, compiler flags, torch version, Python and processor.

    The kernel is compiled with -march=native, so a cached build must not be reused on another
    processor (a shared home folder, a copied cache); nor after an edit, a torch upgrade, or by
    another Python, which cannot import it (its extension suffix names its version and ABI).
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        processor = "".join(sorted({line for line in lines if line.startswith(_PROCESSOR_LINES)}))
    except OSError:
        processor = ""
    processor += platform.processor() + platform.machine()
    key = "\n".join([_SOURCE.read_text(), " ".join(_flags()), torch.__version__,
                     sysconfig.get_config_var("EXT_SUFFIX"), processor])
    return f"ms_deform_attn_cpu_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def library_path() -> Path:
    """Where the kernel built for this source, torch and processor lives (or will, once built)."""
    name = _build_name()
    return cache_folder() / name / f"{name}.so"


def _import_built(library: Path) -> ModuleType | None:
    """The cached build, or None where there is none, or one this interpreter cannot load (damaged,
    say): it is then built anew over it."""
    if not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location(library.stem, library)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def _build(library: Path) -> ModuleType:
    """Build the kernel in a folder beside ``library``, then publish it there whole.

    Processes that start together (torchrun's, the test suite's workers) build at once: torch's
    lock on the build folder lets one compile while the others wait, and the library appears at
    ``library`` only by a rename, so that no process imports a file the linker is still writing.
    """
    # Said first, in one line: torch's build would end in ninja's "build stopped", the cause far above.
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler} is not on PATH (install one, e.g. g++, or set CXX)")
    if shutil.which("ninja") is None:
        import ninja  # the pip package ships the binary; a venv's bin folder may not be on PATH

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    load = _cpp_extension_load()
    build = library.parent / "build"
    build.mkdir(parents=True, exist_ok=True)
    module = load(name=library.stem, sources=[str(_SOURCE)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"], build_directory=str(build))
    with atomic_write(library) as temporary:
        shutil.copyfile(build / library.name, temporary)
    return module


def load_extension() -> ModuleType | None:
    """The compiled kernel: imported from the cache, or built there on first use (about 30 s).

    Returns None, with one warning, where it cannot be built (no compiler, say).
    """
    global _extension, _failure
    if _extension is not None or _failure is not None:
        return _extension
    try:
        # Named after its source, which may be missing (an install without the package's data).
        library = library_path()
        # Importing the cached library directly skips torch's build checks (about a second).
        _extension = _import_built(library) or _build(library)
    except Exception as error:  # any build failure means: use the reference implementation
        message = str(error).strip()
        _failure = f"{type(error).__name__}: {message.splitlines()[-1] if message else ''}"
        warnings.warn(
            f"deformable_detr: the fused CPU kernel could not be built ({_failure}); "
            "using the reference implementation instead",
            RuntimeWarning,
            stacklevel=2,
        )
    return _extension


def _cpp_extension_load() -> Callable[..., ModuleType]:
    """torch's ``cpp_extension.load``, imported without the warning its import logs on a machine
    without a GPU ("No CUDA runtime is found"), which says nothing of a CPU kernel's build."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.setLevel(level)
    return load


def read_dtypes(value: Tensor, locations: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``locations`` and ``weights`` in dtypes the kernel reads beside ``value``: the weights in
    value's, the locations in value's or float32 beside bfloat16 or float16 values (the model's
    autocast mix). Other mixes (a CUDA autocast's float32 weights, say) are cast, as the reference
    would compute them; the gradients return in each input's own dtype."""
    half = value.dtype in (torch.bfloat16, torch.float16)
    if locations.dtype != value.dtype and not (half and locations.dtype == torch.float32):
        locations = locations.to(torch.float32 if half else value.dtype)
    return locations, weights.to(value.dtype)


def build_failure() -> str | None:
    """Why the kernel could not be built, or None."""
    return _failure


@fused_op("deformable_detr::ms_deform_attn_cpu", device_types="cpu")
def ms_deform_attn_cpu(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The fused CPU forward; same signature and result as ``ms_deform_attn_reference``."""
    return load_extension().forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@fused_op("deformable_detr::ms_deform_attn_cpu_backward", device_types="cpu")
def ms_deform_attn_cpu_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients with respect to value, sampling_locations and attention_weights."""
    grads = load_extension().backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return tuple(grads)


register_fused_op(ms_deform_attn_cpu, ms_deform_attn_cpu_backward)
