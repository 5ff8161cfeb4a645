"""The automatic dtype follows what the CPU's matmuls can do natively, caps included."""

from pathlib import Path

import torch

from deepsynapse.models.loading import cpu_supports_bf16, resolve_dtype


def _flags_have_bf16() -> bool:
    text = Path("/proc/cpuinfo").read_text()
    return "avx512_bf16" in text or "amx_bf16" in text


def test_a_onednn_cap_below_avx512_bf16_picks_fp32_and_says_why(monkeypatch):
    """Capped at AVX2, oneDNN emulates bf16 (1.1 GFLOP/s against fp32's 64 on an AMX core):
    auto must pick fp32 as on an AVX2-only CPU, which lets this machine stand in for one."""
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_supports_bf16()
    choice = resolve_dtype("auto")
    assert choice.dtype == torch.float32 and "ONEDNN" not in choice.reason
    assert "capped at AVX2" in choice.reason
    assert resolve_dtype("bf16").dtype == torch.bfloat16  # asked for: still given
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx512_core")  # the older name, any case
    assert not cpu_supports_bf16()


def test_a_cap_that_keeps_bf16_changes_nothing(monkeypatch):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for cap in ("AVX512_CORE_AMX", "ALL", "avx512_core_bf16"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu_supports_bf16() == _flags_have_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert cpu_supports_bf16() == _flags_have_bf16()
    expected = torch.bfloat16 if _flags_have_bf16() else torch.float32
    assert resolve_dtype("auto").dtype == expected
