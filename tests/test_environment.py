"""`deformable-detr info` and the machine line that labels measured figures."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from deformable_detr import environment, ops
from deformable_detr.cli import main
from deformable_detr.ops import cpu, use_implementation


def test_info_names_versions_processor_kernels_and_precision():
    report = dict(environment.report())
    assert report["deformable-detr"] == importlib.metadata.version("deformable-detr")
    assert report["torch"].startswith(torch.__version__)
    assert environment.cpu_name() in report["cpu"]
    for name, supported in environment.cpu_extensions().items():
        assert f"{name} {'yes' if supported else 'no'}" in report["cpu extensions"]
    assert ("in hardware" in report["training"]) == environment.native_bf16(torch.device("cpu"))
    assert "cpu tensors -> " in report["ms_deform_attn"]


def test_info_command_prints_the_report_one_topic_a_line(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    report = environment.report()
    assert len(lines) == len(report)
    for line, (topic, description) in zip(lines, report):
        assert line.startswith(topic) and line.endswith(description)


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"deformable-detr {importlib.metadata.version('deformable-detr')}"


def test_fused_kernel_status_says_whether_and_where_it_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFORMABLE_DETR_CACHE", str(tmp_path))
    status = dict(environment.report())["fused cpu kernel"]
    assert status.startswith("not built yet") and str(tmp_path) in status
    cpu.library_path().parent.mkdir(parents=True)
    cpu.library_path().touch()
    assert dict(environment.report())["fused cpu kernel"] == f"built, cached at {cpu.library_path()}"


def test_fused_kernel_status_says_where_its_source_is_missing(tmp_path, monkeypatch):
    """As an install without the package's data would have it: info reports it, where it stopped."""
    monkeypatch.setattr(cpu, "_SOURCE", tmp_path / "ms_deform_attn_cpu.cpp")
    status = dict(environment.report())["fused cpu kernel"]
    assert status.startswith("its source cannot be read ([Errno 2] No such file or directory") and \
        status.endswith(": the reference runs")


def test_op_path_follows_the_requested_implementation():
    with use_implementation("reference"):
        assert "cpu tensors -> the reference" in dict(environment.report())["ms_deform_attn"]


def test_machine_summary_names_the_processor_and_its_matrix_unit(monkeypatch):
    summary = environment.machine_summary()
    assert summary.startswith(environment.cpu_name())
    assert ("no AMX" not in summary) == environment.cpu_extensions()["AMX"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert "oneDNN limited to AVX512_CORE_BF16" in environment.machine_summary()


def test_bfloat16_is_emulated_where_the_instruction_set_is_limited_below_it(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    for variable in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(variable, raising=False)
    assert environment.native_bf16(torch.device("cpu"))
    for variable, limit in (("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2")):
        with monkeypatch.context() as limited:
            limited.setenv(variable, limit)
            assert not environment.native_bf16(torch.device("cpu"))


def test_bfloat16_support_takes_a_device_name_as_torch_does(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    for variable in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(variable, raising=False)
    assert environment.native_bf16("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not environment.native_bf16("cpu")


def test_fused_gpu_kernel_status_per_visible_gpu(monkeypatch):
    assert dict(environment.report())["fused gpu kernel"] == "no GPU visible" or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # The first GPU passes the check in float32 only, the second in neither.
    monkeypatch.setattr(ops, "triton_runs_on", lambda device, dtype: device.index == 0 and dtype == torch.float32)
    assert environment._fused_gpu_kernel() == "cuda:0 runs in float32; cuda:1 fails its check: the reference runs there"
