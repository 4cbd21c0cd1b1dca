"""What this installation runs on, for bug reports and for labelling measured figures.

Rounding, and with it every figure this package measures, depends on the processor: oneDNN picks
AMX, AVX-512 or AVX2 kernels, and each sums in its own order. ``deformable-detr info`` prints the
whole report; the benchmarks print :func:`machine_summary` above their tables.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from . import ops
from .ops import cpu


def cpu_name() -> str:
    """The processor's model name, as ``lscpu`` shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_extensions() -> dict[str, bool]:
    """The vector and matrix extensions that decide which kernels oneDNN and torch run."""
    return {
        "AVX2": torch.cpu._is_avx2_supported(),
        "AVX-512": torch.cpu._is_avx512_supported(),
        "AVX512-BF16": torch.cpu._is_avx512_bf16_supported(),
        "AMX": torch.cpu._is_amx_tile_supported(),
    }


# oneDNN's instruction-set limits (ONEDNN_MAX_CPU_ISA) below bfloat16 arithmetic: under them it emulates bfloat16.
_ISA_LIMITS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` (a torch.device or its name: "cpu", "cuda:1") computes in bfloat16 in
    hardware (CUDA GPUs from Ampere on; CPUs with AMX or AVX512-BF16, unless ``ONEDNN_MAX_CPU_ISA``
    or ``ATEN_CPU_CAPABILITY`` keeps torch from using them), where bf16 autocast makes training
    faster; elsewhere it is emulated, and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    limited = (os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISA_LIMITS_WITHOUT_BF16
               or os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"))
    hardware = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return device.type == "cpu" and hardware and not limited


def usable_device(name: torch.device | str | None) -> torch.device:
    """``name`` as a device this process can use (None: CUDA where there is one), or a ValueError
    that says why not, where torch would fail deep inside the first copy to it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {str(name)!r}: expected cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise ValueError(f"device {str(name)!r}: {visible or 'no'} CUDA GPU{'' if visible == 1 else 's'} visible here")
    return device


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_summary() -> str:
    """One line that labels a measured figure: processor, cores, extensions, torch, threads."""
    extensions = cpu_extensions()
    present = [name for name, supported in extensions.items() if supported and name != "AMX"]
    matrix = "AMX" if extensions["AMX"] else "no AMX"
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    limited = f" (oneDNN limited to {limit})" if limit else ""
    return (f"{cpu_name()}, {_cores()} cores, {' '.join(present) or 'no AVX2'}, {matrix}{limited}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cuda() -> str:
    # ROCm builds of torch report AMD GPUs as cuda devices too.
    platform = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}" if torch.version.hip else None
    if platform is None:
        return "none (a CPU build of torch)"
    if not torch.cuda.is_available():
        return f"{platform} build, no GPU"
    devices = ", ".join(
        f"{torch.cuda.get_device_name(index)} (compute {'.'.join(map(str, torch.cuda.get_device_capability(index)))})"
        for index in range(torch.cuda.device_count())
    )
    return f"{platform}: {devices}"


def _fused_gpu_kernel() -> str:
    """Per visible GPU, whether the Triton kernels pass their first-use check there (a failure's
    reason comes as the check's warning)."""
    if not torch.cuda.is_available():
        return "no GPU visible"
    verdicts = []
    for index in range(torch.cuda.device_count()):
        passed = [str(dtype).removeprefix("torch.") for dtype in (torch.float32, torch.bfloat16)
                  if ops.triton_runs_on(torch.device("cuda", index), dtype)]
        verdict = f"runs in {' and '.join(passed)}" if passed else "fails its check: the reference runs there"
        verdicts.append(f"cuda:{index} {verdict}")
    return "; ".join(verdicts)


def _fused_cpu_kernel() -> str:
    try:
        library = cpu.library_path()  # named after its source
    except OSError as error:
        return f"its source cannot be read ({error}): the reference runs"
    if library.is_file():
        return f"built, cached at {library}"
    if cpu.build_failure():
        return f"cannot be built ({cpu.build_failure()}): the reference runs"
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return "not built, and no C++ compiler found: the reference will run"
    return f"not built yet: builds on first use (about 30 s, {compiler}) into {library.parent}"


_KERNELS = {"cpu": "the fused CPU kernel", "triton": "the Triton kernels", "reference": "the reference (grid_sample)"}


def _implementation(device: str) -> str:
    try:
        return _KERNELS[ops.implementation_for(device)]
    except RuntimeError as error:  # a forced kernel that cannot run
        return f"error: {error}"


def _training_precision(device: torch.device) -> str:
    if native_bf16(device):
        return "float32; --bf16 runs bfloat16 autocast in hardware"
    return "float32; --bf16 would emulate bfloat16 here (slower)"


def report() -> list[tuple[str, str]]:
    """The report ``deformable-detr info`` prints, as (topic, description) pairs."""
    extensions = ", ".join(f"{name} {'yes' if supported else 'no'}" for name, supported in cpu_extensions().items())
    training_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [
        ("deformable-detr", _version("deformable-detr")),
        ("python", sys.version.split()[0]),
        ("torch", f"{torch.__version__}; torchvision {_version('torchvision')}; triton {_version('triton')}"),
        ("cuda", _cuda()),
        ("cpu", f"{cpu_name()}, {_cores()} cores, {torch.get_num_threads()} torch threads"),
        ("cpu extensions", f"{extensions}; torch's kernels: {torch.backends.cpu.get_cpu_capability()}"),
        ("onednn isa limit", os.environ.get("ONEDNN_MAX_CPU_ISA", "none")),
        # First: on a new machine, asking which kernel runs on the CPU builds the fused kernel.
        ("ms_deform_attn", "; ".join(f"{device} tensors -> {_implementation(device)}" for device in ("cpu", "cuda"))
         + f" (DEFORMABLE_DETR_OP={os.environ.get('DEFORMABLE_DETR_OP', 'auto')})"),
        ("fused cpu kernel", _fused_cpu_kernel()),
        ("fused gpu kernel", _fused_gpu_kernel()),
        ("training", f"on {training_device}, {_training_precision(training_device)}"),
    ]
