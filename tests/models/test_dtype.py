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


def test_a_run_resumed_in_another_dtype_says_so(monkeypatch, tmp_path, capsys):
    """The trainer's frozen base takes auto's measured pick (bf16 where it measured 2.0x, fp32
    where 0.6x), decided by each invocation: a run started where bf16 paid and resumed where
    it does not goes on in fp32, and the resume says so (and logs it) rather than silently
    sampling otherwise than the uninterrupted run."""
    from conftest import EXTRA_REWARDS, TINY

    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer
    from deepsynapse.telemetry.run_logger import read_jsonl

    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    overrides = TINY + ["model.dtype=auto", "sft.steps=0", "eval.limit=0", "train.steps=1"]
    run_dir = tmp_path / "run"

    def train(speedup: float, steps: int, resume: bool) -> torch.dtype:
        monkeypatch.setattr(loading, "bf16_matmul_speedup", lambda: speedup)
        cfg = load_config(None, [*overrides, f"train.steps={steps}"])
        trainer = Trainer(cfg, run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS)
        trainer.train(resume=resume)
        frozen = {p.dtype for p in trainer.unwrapped.parameters() if not p.requires_grad}
        assert frozen == {trainer.dtype_choice.dtype}, frozen
        return trainer.dtype_choice.dtype

    assert train(2.0, 1, resume=False) == torch.bfloat16
    assert train(2.0, 2, resume=True) == torch.bfloat16  # the same dtype: nothing to say
    assert not [e for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "dtype_changed"]
    assert train(0.6, 3, resume=True) == torch.float32
    changed = [e for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "dtype_changed"]
    assert [(e["evidence"]["started"], e["evidence"]["now"]) for e in changed] == [
        ("torch.bfloat16", "torch.float32")
    ]
    assert "started in torch.bfloat16 and goes on in torch.float32" in capsys.readouterr().out
