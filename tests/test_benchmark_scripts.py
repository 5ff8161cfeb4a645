"""The benchmark scripts: their configurations are valid and do what they claim; --quick runs.

Fast tests check that every ablation configuration loads through the strict config and
switches exactly its part, and that the TRL comparison's DeepSynapse side is plain GRPO at
the shared settings. The slow tests run each script's ``--quick`` mode end to end in a
subprocess (tiny random model) and check the printed table and the JSON written.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepsynapse.config import load_config
from deepsynapse.control.build import build_controllers
from deepsynapse.control.knobs import Knobs
from deepsynapse.data.synthetic import generate_problems
from deepsynapse.rewards.engine import RewardEngine

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import ablation  # noqa: E402
import vs_trl  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


def _ablation_config(name: str, study: ablation.Study | None = None):
    st = study or ablation.Study(verifier_backbone="hashing")
    return load_config(
        None, ablation.run_overrides(st, name, "tiny-random", "synthetic", seed=0, threads=1)
    )


def test_every_ablation_configuration_builds_its_rewards_and_controllers():
    parts = ablation.parts_for(steps=3, max_new_tokens=64)
    names = ablation.config_names(parts, "part")
    assert names[:2] == ["plain", "full"] and len(names) == len(parts) + 2
    names += ablation.config_names(parts, "family")[2:]
    problems = generate_problems(8, seed=0, difficulty=(1, 3))
    for name in names:
        cfg = _ablation_config(name)
        engine = RewardEngine(cfg, seed=0)  # unknown reward names fail here
        knobs = Knobs(
            temperature=1.0,
            beta=cfg.grpo.beta,
            reward_weights=dict(cfg.rewards.weights),
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        build_controllers(cfg.control, base=knobs, total_steps=cfg.train.steps, problems=problems)
        assert engine.components, name


def test_plain_is_grpo_only_and_each_minus_config_differs_from_full():
    plain = _ablation_config("plain")
    assert not any(getattr(plain.control, s).enabled for s in vars(plain.control))
    assert plain.rewards.allocator == "static" and plain.rewards.calibration == "none"
    assert not (plain.hypernet.enabled or plain.memory.enabled or plain.discovery.enabled)
    assert set(plain.rewards.weights) == set(ablation.BASE_REWARDS)
    full = _ablation_config("full").to_dict()
    for part in ablation.parts_for(3, 64):
        minus = _ablation_config(f"full-{part.name}").to_dict()
        assert minus != full, f"removing {part.name} changes nothing"
        assert minus["train"] == full["train"] and minus["rollout"] == full["rollout"]
    # A part goes with the part it needs.
    assert "dynamic_lora" not in {
        p.name for p in ablation.active_parts("full-curriculum", ablation.parts_for(3, 64))
    }
    with pytest.raises(ValueError, match="unknown part or family 'nothing'"):
        ablation.active_parts("full-nothing", ablation.parts_for(3, 64))


def test_the_default_study_removes_each_family_and_every_part_has_one():
    parts = ablation.parts_for(3, 64)
    assert ablation.Study().ablate == "family"
    names = ablation.config_names(parts)  # the default: families
    assert names == ["plain", "full", *(f"full-{f}" for f in ablation.FAMILIES)]
    grouped = [n for members in ablation.FAMILIES.values() for n in members]
    assert sorted(grouped) == sorted(p.name for p in parts)  # each part in exactly one family
    full = {p.name for p in ablation.active_parts("full", parts)}
    for family, members in ablation.FAMILIES.items():
        kept = {p.name for p in ablation.active_parts(f"full-{family}", parts)}
        assert kept == full - set(members), family
    # plain and full are the same runs whichever study asks for them (so they are reused).
    st_family, st_part = ablation.Study(), ablation.Study(ablate="part")
    for config in ("plain", "full"):
        a = ablation.run_overrides(st_family, config, "m", "gsm8k", 0, 1)
        assert a == ablation.run_overrides(st_part, config, "m", "gsm8k", 0, 1)
    with pytest.raises(ValueError, match="--ablate must be one of"):
        ablation.config_names(parts, "layer")


def test_trl_comparison_runs_deepsynapse_as_plain_grpo_at_the_shared_settings(tmp_path):
    s = vs_trl.Settings(model="tiny-random", steps=2, max_new_tokens=32)
    cfg = load_config(None, vs_trl.deepsynapse_overrides(s, "gsm8k", tmp_path))
    assert not any(getattr(cfg.control, sec).enabled for sec in vars(cfg.control))
    assert cfg.sft.steps == 0 and cfg.eval.limit == 0
    assert cfg.rewards.weights == vs_trl.REWARD_WEIGHTS
    assert (cfg.rollout.num_generations, cfg.rollout.max_new_tokens) == (4, 32)
    assert (cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size) == (4, 16)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.grpo.beta) == (16, 32.0, 0.04)
    assert (cfg.grpo.epsilon_low, cfg.grpo.epsilon_high) == (0.2, 0.28)
    assert cfg.grpo.loss_aggregation == "token" and cfg.grpo.advantage == "grpo"


def test_summary_ratios_use_warm_steps():
    def run(name, walls, rss):
        return {
            "trainer": name,
            "setup_s": 1.0,
            "peak_rss_mb": rss,
            "steps": [{"wall_s": w, "completion_tokens": 100.0} for w in walls],
        }

    summary = vs_trl.summarize(
        [run("trl", [99.0, 4.0, 4.0], 200.0), run("deepsynapse", [50.0, 2.0, 2.0], 100.0)]
    )
    ratios = summary["ratio_deepsynapse_over_trl"]
    assert ratios["steps_per_s"] == pytest.approx(2.0)  # first steps left out
    assert ratios["peak_rss"] == pytest.approx(0.5)


def _run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCH.parent,
    )


@pytest.mark.slow
def test_ablation_quick_prints_a_table_and_writes_results(tmp_path):
    stem = tmp_path / "results" / "ablation-quick"
    proc = _run_script(
        "ablation.py", "--quick", "--out-dir", str(tmp_path / "runs"), "--results", str(stem)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| plain" in proc.stdout and "| full" in proc.stdout
    data = json.loads(stem.with_suffix(".json").read_text())
    rows = data["summary"]["synthetic"]
    assert rows["plain"]["seeds"] == 1 and rows["full"]["seeds"] == 1
    assert data["failed"] == 0 and data["skipped"] == 0
    assert stem.with_suffix(".png").stat().st_size > 1000
    run_dir = tmp_path / "runs" / "runs" / "full-synthetic-seed0"
    assert (run_dir / "summary.json").is_file() and (run_dir / "eval_before.json").is_file()
    assert not (run_dir / "checkpoints").exists()  # removed unless --keep-checkpoints


@pytest.mark.slow
def test_vs_trl_quick_deepsynapse_side(tmp_path):
    out = tmp_path / "vs.json"
    proc = _run_script("vs_trl.py", "--quick", "--only", "deepsynapse", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| deepsynapse" in proc.stdout
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert run["steps"][0]["completion_tokens"] > 0 and run["peak_rss_mb"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install --no-deps trl)")
def test_vs_trl_quick_against_trl(tmp_path):
    out = tmp_path / "vs.json"
    proc = _run_script("vs_trl.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| trl" in proc.stdout and "DeepSynapse / TRL: steps/s x" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["trainer"] for r in data["runs"]] == ["trl", "deepsynapse"]
    assert data["summary"]["ratio_deepsynapse_over_trl"]["steps_per_s"] > 0


def test_a_cut_study_reuses_runs_finished_with_the_same_settings(tmp_path):
    spec = {"overrides": ["lora.r=8"], "run_dir": str(tmp_path / "run"), "eval_before": None}
    assert ablation.stored_result(spec) is None  # nothing ran yet
    (tmp_path / "run").mkdir()
    child_spec = {"kind": "run", **spec, "keep_checkpoints": False}
    stored = {"spec": ablation._identity(child_spec), "result": {"accuracy": 0.25}}
    (tmp_path / "run" / ablation.RESULT_FILE).write_text(json.dumps(stored))
    assert ablation.stored_result(spec) == {"accuracy": 0.25}
    assert ablation.stored_result({**spec, "overrides": ["lora.r=16"]}) is None  # other run
    (tmp_path / "run" / ablation.RESULT_FILE).write_text("{not json")
    assert ablation.stored_result(spec) is None
