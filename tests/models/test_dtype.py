"""The automatic dtype follows what the CPU's matmuls do: native bf16 instructions, caps
included, and bf16's measured speed against fp32's."""

from pathlib import Path

import pytest
import torch

from deepsynapse.models import loading
from deepsynapse.models.loading import bf16_matmul_speedup, cpu_supports_bf16, resolve_dtype


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
    pays = _flags_have_bf16() and bf16_matmul_speedup() >= 1.0
    assert resolve_dtype("auto").dtype == (torch.bfloat16 if pays else torch.float32)


def test_native_bf16_that_measures_slower_than_fp32_gets_fp32(monkeypatch):
    """An Intel Xeon with AVX512-BF16 and no AMX multiplied bf16 at 0.5-0.7x fp32 (2026-12-06)
    where an EPYC with the same flags ran 2.2x: auto goes by the measurement, and says it."""
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(loading, "bf16_matmul_speedup", lambda: 0.6)
    slow = resolve_dtype("auto")
    assert slow.dtype == torch.float32 and "0.60x fp32" in slow.reason
    monkeypatch.setattr(loading, "bf16_matmul_speedup", lambda: 2.2)
    fast = resolve_dtype("auto")
    assert fast.dtype == torch.bfloat16 and "2.2x fp32" in fast.reason
    assert resolve_dtype("fp32").dtype == torch.float32  # asked for: given, unmeasured


def test_no_native_bf16_is_never_probed(monkeypatch):
    """Emulated bf16 runs at ~1 GFLOP/s: probing it would cost seconds and say the obvious."""

    def probe():
        raise AssertionError("probed bf16 on a CPU without native bf16")

    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(loading, "bf16_matmul_speedup", probe)
    assert resolve_dtype("auto").dtype == torch.float32


def test_the_probe_measures_this_cpu():
    """The real probe: a positive, finite ratio, the same on a second call (measured once)."""
    if not cpu_supports_bf16():
        pytest.skip("no native bf16 here: auto never probes it")
    speedup = bf16_matmul_speedup()
    assert 0.05 < speedup < 50 and bf16_matmul_speedup() == speedup


def test_the_trainer_builds_its_policy_in_the_measured_pick(monkeypatch, tmp_path):
    """Switched on (auto) with bf16 measured slower, the trainer's frozen base is fp32, and
    the start line says why; measured faster, it is bf16."""
    from conftest import EXTRA_REWARDS, TINY

    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer

    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    for speedup, dtype in ((0.6, torch.float32), (2.0, torch.bfloat16)):
        monkeypatch.setattr(loading, "bf16_matmul_speedup", lambda s=speedup: s)
        cfg = load_config(None, TINY + ["model.dtype=auto"])
        trainer = Trainer(
            cfg, run_dir=tmp_path / str(speedup), progress=False, reward_fns=EXTRA_REWARDS
        )
        frozen = {p.dtype for p in trainer.unwrapped.parameters() if not p.requires_grad}
        assert trainer.dtype_choice.dtype == dtype and frozen == {dtype}, (speedup, frozen)
