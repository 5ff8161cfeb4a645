"""The benchmark scripts: their configurations are valid and do what they claim; --quick runs.

Fast tests check that every ablation configuration loads through the strict config and
switches exactly its part, and that the TRL comparison's DeepSynapse side is plain GRPO at
the shared settings. The slow tests run each script's ``--quick`` mode end to end in a
subprocess (tiny random model) and check the printed table and the JSON written.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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
import from_start  # noqa: E402
import learning  # noqa: E402
import soak  # noqa: E402
import vs_trl  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


def _ablation_config(name: str, study: ablation.Study | None = None):
    st = study or ablation.Study(verifier_backbone="hashing")
    return load_config(
        None, ablation.run_overrides(st, name, "tiny-random", "synthetic", seed=0, threads=1)
    )


def test_every_ablation_configuration_builds_its_rewards_and_controllers():
    parts = ablation.parts_for(max_new_tokens=64)
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


def test_every_learning_configuration_on_the_hour_recipe_builds_its_controllers(tmp_path):
    """On the recipe the hour studies run, not the ablation's common settings: its curriculum
    phases weight rewards (``structure``) that some removals take away, and a phase naming a
    reward the run does not compute is refused when the controllers are built."""
    recipe = learning.recipe_path(learning.RECIPE)
    recipe_cfg = load_config(recipe)
    st = learning.resolve(learning.Learning(), recipe_cfg)
    parts = ablation.parts_for(recipe_cfg.rollout.max_new_tokens)
    names = ablation.config_names(parts, "part") + ablation.config_names(parts, "family")[2:]
    names += [f"full-critique-{f}" for f in ablation.FAMILIES if f != "critique"]
    problems = generate_problems(8, seed=0, difficulty=(1, 3))
    for name in dict.fromkeys(names):
        cfg = load_config(recipe, learning.run_overrides(st, name, 0, tmp_path, recipe_cfg))
        knobs = Knobs(
            temperature=1.0,
            beta=cfg.grpo.beta,
            reward_weights=dict(cfg.rewards.weights),
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        build_controllers(cfg.control, base=knobs, total_steps=100, problems=problems)
    plain = learning.run_overrides(st, "plain", 0, tmp_path, recipe_cfg)
    assert not any(o.startswith("control.curriculum.phases=") for o in plain)  # runs unchanged
    fixed = learning.run_overrides(st, "full-critique-reward_terms", 0, tmp_path, recipe_cfg)
    assert any(o.startswith("control.curriculum.phases=") for o in fixed)


def test_the_shipped_hour_recipe_is_the_configuration_measured_against_plain(tmp_path):
    """The defaults that ship are the ones measured: ``configs/hour-cpu.yaml`` as a user runs
    it trains what the hour studies ran as ``full-critique-memory-hypernet`` (every part and
    reward on but the critique schema, the neural memory and the hypernetwork, which barely
    acted in full-critique's hour runs and cost nothing removed from a shared start), not an
    unmeasured mix of parts."""
    recipe = learning.recipe_path(learning.RECIPE)
    recipe_cfg = load_config(recipe)
    st = learning.resolve(learning.Learning(), recipe_cfg)
    studied = load_config(
        recipe, learning.run_overrides(st, "full-critique-memory-hypernet", 0, tmp_path, recipe_cfg)
    ).to_dict()
    assert not studied["memory"]["enabled"] and not studied["hypernet"]["enabled"]
    assert studied["control"]["sft_mixing"]["enabled"]  # the one part measured to help
    shipped = recipe_cfg.to_dict()
    # what the study sets to measure (budget, seed, checkpoints, probes, decoder), and the
    # default phases' ranks, which the recipe's explicit phases override
    measuring = {"train", "probes", "eval", "rollout.backend", "control.curriculum.default_ranks"}
    differ = [
        change
        for change in learning.config_diff(shipped, studied)
        if not any(
            change.startswith(f"{key}.") or change.startswith(f"{key}:") for key in measuring
        )
    ]
    assert differ == [], differ


def test_plain_is_grpo_only_and_each_minus_config_differs_from_full():
    plain = _ablation_config("plain")
    assert not any(getattr(plain.control, s).enabled for s in vars(plain.control))
    assert plain.rewards.allocator == "static" and plain.rewards.calibration == "none"
    assert not (plain.hypernet.enabled or plain.memory.enabled or plain.discovery.enabled)
    assert set(plain.rewards.weights) == set(ablation.BASE_REWARDS)
    full = _ablation_config("full").to_dict()
    for part in ablation.parts_for(64):
        minus = _ablation_config(f"full-{part.name}").to_dict()
        assert minus != full, f"removing {part.name} changes nothing"
        assert minus["train"] == full["train"]
        longer = part.answer_tokens  # removing the critique gives back its fields' tokens
        rollout = {**full["rollout"], "max_new_tokens": full["rollout"]["max_new_tokens"] - longer}
        assert minus["rollout"] == rollout
    # A part goes with the part it needs.
    assert "dynamic_lora" not in {
        p.name for p in ablation.active_parts("full-curriculum", ablation.parts_for(64))
    }
    with pytest.raises(ValueError, match="unknown part or family 'nothing'"):
        ablation.active_parts("full-nothing", ablation.parts_for(64))
    # Removals chain: the one-hour ablation is taken against full-critique.
    parts = ablation.parts_for(64)
    both = {p.name for p in ablation.active_parts("full-critique-schedule", parts)}
    minus_critique = {p.name for p in ablation.active_parts("full-critique", parts)}
    assert both == minus_critique - set(ablation.FAMILIES["schedule"])
    assert "critique" not in both and both < minus_critique
    with pytest.raises(ValueError, match="unknown part or family 'nothing'"):
        ablation.active_parts("full-critique-nothing", parts)


def test_the_default_study_removes_each_family_and_every_part_has_one():
    parts = ablation.parts_for(64)
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


# ------------------------------------------------------------------ learning.py


def _learning_runs(tmp_path, configs=("plain", "full"), seeds=(0, 1)):
    """Runs of the quick study on the demo recipe, with their run folders under tmp_path."""
    st = learning.replace(learning.QUICK, configs=tuple(configs), seeds=tuple(seeds))
    recipe = learning.recipe_path(learning.FALLBACK_RECIPE)
    recipe_cfg = load_config(recipe, list(st.extra))
    st = learning.resolve(st, recipe_cfg)
    runs = learning.plan_runs(st, list(configs), tmp_path, recipe_cfg)
    return st, recipe, runs


def _records(prefix, correct, lenient=None):
    lenient = correct if lenient is None else lenient
    return {
        "n": len(correct),
        "records": [
            {"id": f"{prefix}{i}", "correct": c, "lenient_correct": lc, "format_valid": c}
            for i, (c, lc) in enumerate(zip(correct, lenient, strict=True))
        ],
    }


def _fabricate_finished(run, recipe, start, final, gsm_start, gsm_final, svamp=None):
    """A finished run folder as the trainer and this script leave it (no model involved).

    ``svamp``: its (start, final) outcomes; by default GSM8K's, on SVAMP's problems."""
    from deepsynapse.checkpoint import save_tree
    from deepsynapse.config import save_config

    d = run.run_dir
    (d / "learning").mkdir(parents=True)
    save_config(load_config(recipe, run.overrides), d / "config.yaml")
    (d / "eval_before.json").write_text(json.dumps(_records("h", [False] * len(start))))
    (d / "eval_after_sft.json").write_text(json.dumps(_records("h", start)))
    (d / "eval_after.json").write_text(json.dumps(_records("h", final)))
    (d / "learning" / "gsm8k_start.json").write_text(json.dumps(_records("g", gsm_start)))
    (d / "learning" / "gsm8k_final.json").write_text(json.dumps(_records("g", gsm_final)))
    sv_start, sv_final = svamp or (gsm_start, gsm_final)
    (d / "learning" / "svamp_start.json").write_text(json.dumps(_records("s", sv_start)))
    (d / "learning" / "svamp_final.json").write_text(json.dumps(_records("s", sv_final)))
    rows = [{"step": 0, "sft/step": k, "timing/sft_step": 2.0} for k in (1, 2)]
    rows += [{"step": k, "timing/step": 5.0, "completion/truncated_rate": k / 4} for k in (1, 2)]
    rows[-1]["accuracy/heldout"] = 0.5
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"steps": 2}))
    for step in (0, 1, 2):
        ckpt = d / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        save_tree({"sft_done": True, "step": step}, ckpt, "trainer_state")
        (ckpt / "COMPLETE").write_text("{}")


def test_learning_plain_is_plain_and_full_is_full_on_top_of_a_recipe_that_turns_parts_on(tmp_path):
    st, recipe, runs = _learning_runs(tmp_path, ("plain", "full", "full-reward_weighting"), (0,))
    demo = load_config(recipe)
    assert demo.control.curriculum.enabled and demo.rewards.allocator == "neural"  # the trap
    cfgs = {r.config: load_config(recipe, r.overrides) for r in runs}
    plain, full = cfgs["plain"], cfgs["full"]
    assert not any(getattr(plain.control, s).enabled for s in vars(plain.control))
    assert plain.rewards.allocator == "static" and plain.rewards.calibration == "none"
    assert not (plain.discovery.enabled or plain.hypernet.enabled or plain.memory.enabled)
    assert not plain.lora.module_scales and set(plain.rewards.weights) == set(ablation.BASE_REWARDS)
    assert all(getattr(full.control, s).enabled for s in vars(full.control))
    assert full.hypernet.enabled and full.memory.enabled and full.rewards.schema == "deepsynapse"
    minus = cfgs["full-reward_weighting"]
    assert minus.rewards.allocator == "static" and not minus.discovery.enabled
    assert minus.hypernet.enabled  # only its family goes
    # the critique schema's answers are longer: its budgets grow by its fields' tokens
    longer = ablation.CRITIQUE_TOKENS
    assert (
        plain.rollout.max_new_tokens == load_config(recipe, list(st.extra)).rollout.max_new_tokens
    )
    assert full.rollout.max_new_tokens == plain.rollout.max_new_tokens + longer
    assert full.rewards.length_budget == full.rollout.max_new_tokens
    assert full.eval.max_new_tokens == plain.eval.max_new_tokens + longer
    assert full.probes.max_new_tokens == plain.probes.max_new_tokens + longer
    assert minus.rollout.max_new_tokens == full.rollout.max_new_tokens
    for cfg in cfgs.values():  # what every run shares: equal wall-clock on the set of record
        assert cfg.train.time_budget == st.budget and cfg.data.eval == "synthetic"
        assert cfg.train.keep_checkpoints >= 1000 and cfg.probes.every == st.probe_every
        assert cfg.model.name == "tiny-random"
    assert [(r.seed, r.config) for r in _learning_runs(tmp_path, ("plain", "full"))[2]] == [
        (0, "plain"),
        (0, "full"),
        (1, "plain"),
        (1, "full"),
    ]  # seed by seed: a time cut leaves every configuration with equal seeds


def test_learning_settings_left_open_are_the_recipes():
    bare = load_config(None, ["train.save_every=7"])  # no probes, no budget
    st = learning.resolve(learning.Learning(), bare)
    assert (st.budget, st.save_every, st.eval_limit) == ("60m", 7, bare.eval.limit)
    assert (st.probe_every, st.probe_heldout, st.probe_per_skill) == (10, 48, 2)
    hour = load_config(None, ["train.time_budget=45m", "probes.every=5", "probes.heldout=32"])
    st = learning.resolve(learning.Learning(probe_heldout=16), hour)
    assert (st.budget, st.probe_every, st.probe_heldout) == ("45m", 5, 16)  # given wins


def test_learning_a_slice_of_one_seed_keeps_the_studys_other_kept_seeds(tmp_path):
    """``--seeds 6`` after seed 5 reports both: seeds whose every configuration left a record."""
    records = tmp_path / "study.runs"
    for name in ("plain-seed5", "full-seed5", "plain-seed4", "full-x-seed4", "plain-seedx"):
        (records / name).mkdir(parents=True)
        (records / name / "record.json").write_text("{}")
    assert learning.kept_seeds(records, ["plain", "full"]) == {5}
    assert learning.kept_seeds(records, ["plain"]) == {4, 5}
    assert learning.kept_seeds(records, ["plain", "full", "full-x"]) == set()
    assert learning.kept_seeds(tmp_path / "none.runs", ["plain"]) == set()


def test_learning_run_folders_are_finished_resumable_new_or_in_conflict(tmp_path):
    from deepsynapse.checkpoint import save_tree
    from deepsynapse.config import save_config

    st, recipe, runs = _learning_runs(tmp_path, ("plain", "full"), (0,))
    plain, full = runs
    expected = load_config(recipe, plain.overrides).to_dict()
    assert learning.inspect_run(plain.run_dir, expected)[0] == "todo"
    plain.run_dir.mkdir(parents=True)
    save_config(load_config(recipe, plain.overrides), plain.run_dir / "config.yaml")
    assert learning.inspect_run(plain.run_dir, expected) == (
        "todo",
        "no complete checkpoint (started over)",
    )
    ckpt = plain.run_dir / "checkpoints" / "step-0"
    ckpt.mkdir(parents=True)
    save_tree({"sft_done": False}, ckpt, "trainer_state")
    assert learning.inspect_run(plain.run_dir, expected)[0] == "todo"  # not COMPLETE
    (ckpt / "COMPLETE").write_text("{}")
    assert learning.inspect_run(plain.run_dir, expected) == ("resumable", "from step-0")
    assert learning.start_checkpoint(plain.run_dir)[0] is None  # mid-warm-up: not GRPO's start
    (plain.run_dir / "summary.json").write_text("{}")
    assert learning.inspect_run(plain.run_dir, expected)[0] == "finished"
    other = load_config(recipe, full.overrides).to_dict()  # another configuration's settings
    state, detail = learning.inspect_run(plain.run_dir, other)
    assert state == "conflict" and "control.accumulation.enabled: False vs True" in detail
    # Where a run lives is not what it is.
    moved = load_config(recipe, [*plain.overrides, "train.output_dir=/elsewhere"]).to_dict()
    assert learning.inspect_run(plain.run_dir, moved)[0] == "finished"


def test_learning_shares_the_untrained_models_evaluation_only_where_it_is_the_same(tmp_path):
    from deepsynapse.config import save_config

    st, recipe, runs = _learning_runs(tmp_path, ("plain", "full"), (0, 1))
    plain0, full0, plain1, full1 = runs
    expected = {r.run_dir: load_config(recipe, r.overrides).to_dict() for r in runs}

    def share(run, cores=(0,), **changed):
        settings = json.loads(json.dumps(expected[run.run_dir]))
        for key, value in changed.items():
            section, name = key.split("__")
            settings[section][name] = value
        return learning.share_before(run.run_dir, settings, list(cores))

    assert share(plain1) is None  # nothing evaluated yet
    d = plain0.run_dir  # plain seed 0 has evaluated the untrained model, one core beside full
    (d / "learning").mkdir(parents=True)
    save_config(load_config(recipe, plain0.overrides), d / "config.yaml")
    made = {**_records("h", [False, True]), "seconds": 600.0, "backend": "ours"}
    (d / "eval_before.json").write_text(json.dumps(made))
    row = {"action": "trained", "cpu_class": learning.machine_info()["cpu_class"], "cores": [1]}
    (d / "learning" / "machines.jsonl").write_text(json.dumps(row) + "\n")
    assert share(plain1) is None  # in what dtype it decoded is not known yet
    start = {"kind": "start", "evidence": {"dtype": "torch.float32"}}
    (d / "events.jsonl").write_text(json.dumps(start) + "\n")
    assert share(plain1) == str(d)  # another seed: the same untrained model, the same answers
    shared = json.loads((plain1.run_dir / "eval_before.json").read_text())
    assert shared == {**made, "dtype": "torch.float32", "shared_from": str(d)}
    assert learning.inspect_run(plain1.run_dir, expected[plain1.run_dir])[0] == "todo"
    # Never across what the untrained model's answers depend on, nor another share of cores.
    assert share(full1) is None  # its schema, memory and hypernetwork
    assert share(full0, eval__limit=7) is None
    assert share(plain1, data__synthetic_variants=0.5) == str(d)  # what training draws only
    assert share(plain1, data__synthetic_variant_kinds=["compare"]) == str(d)
    assert expected[plain1.run_dir]["data"]["eval_difficulty"] is None  # so the set follows:
    assert share(plain1, data__synthetic_difficulty=[2, 3]) is None
    assert share(plain1, cores=(0, 1)) is None
    assert share(plain1, rollout__backend="auto") is None  # the decoder is picked at run time
    row["cpu_class"] = "another class"
    (d / "learning" / "machines.jsonl").write_text(json.dumps(row) + "\n")
    assert share(plain1) is None


def test_learning_keeps_the_start_point_and_asks_only_for_missing_evaluations(tmp_path):
    st, recipe, runs = _learning_runs(tmp_path, ("plain",), (0,))
    (run,) = runs
    _fabricate_finished(run, recipe, [True], [True], [False] * 4, [True] * 4)
    assert learning.prune_checkpoints(run.run_dir) == ["step-1"]
    kept = sorted(p.name for p in (run.run_dir / "checkpoints").iterdir())
    assert kept == ["step-0", "step-2"]
    assert learning.start_checkpoint(run.run_dir) == ("step-0", "")
    cfg = load_config(run.run_dir / "config.yaml")
    assert learning.eval_jobs(st, run.run_dir, cfg) == ([], [])  # all cached at 4 problems
    jobs, _ = learning.eval_jobs(learning.replace(st, gsm8k_limit=8), run.run_dir, cfg)
    assert [(j.name, j.checkpoint, j.limit) for j in jobs] == [
        ("gsm8k_final.json", None, 8),
        ("gsm8k_start.json", "step-0", 8),
    ]  # another limit: evaluated again
    cmd = learning.eval_command(run.run_dir, "step-0", "gsm8k", 8, cfg, tmp_path / "o.json")
    assert cmd[-14:] == [
        "--checkpoint",
        "step-0",
        "--data",
        "gsm8k",
        "--split",
        "test",
        "--limit",
        "8",
        "--max-new-tokens",
        str(cfg.eval.max_new_tokens),
        "--batch-size",
        str(cfg.eval.batch_size),
        "--output",
        str(tmp_path / "o.json"),
    ]
    jobs, _ = learning.eval_jobs(learning.replace(st, svamp_limit=0), run.run_dir, cfg)
    assert [(j.name, j.data, j.limit) for j in jobs] == [
        ("svamp_final.json", "svamp", 1000),
        ("svamp_start.json", "svamp", 1000),
    ]  # the outside set at the model's level, 0 = all of it
    shutil.rmtree(run.run_dir / "checkpoints" / "step-0")
    jobs, notes = learning.eval_jobs(learning.replace(st, gsm8k_limit=8), run.run_dir, cfg)
    assert [j.name for j in jobs] == ["gsm8k_final.json"]
    assert any("step-0 was not kept" in n for n in notes)


def test_a_finished_runs_record_restores_it_on_a_machine_without_the_folder(tmp_path):
    """Machines change between sessions and take runs/ along: the committed record must let
    the next slice read, pair and time the run as if its folder were still there."""
    from deepsynapse.checkpoint import save_tree

    st, recipe, runs = _learning_runs(tmp_path / "runs", ("plain",), (0,))
    (run,) = runs
    _fabricate_finished(run, recipe, [True, False], [True, True], [False] * 4, [True] * 4)
    ckpt = run.run_dir / "checkpoints" / "step-2"
    save_tree({"sft_done": True, "step": 2, "budget": {"elapsed": 3599.5}}, ckpt, "trainer_state")
    before = learning.read_run(run, st).numbers
    record = tmp_path / "results" / "study.runs" / run.run_dir.name
    assert learning.archive_run(run.run_dir, record)
    assert not learning.archive_run(run.run_dir, record)  # same bytes: nothing to commit
    assert not any(p.name.startswith("step-") for p in record.rglob("*"))  # no checkpoints

    shutil.rmtree(run.run_dir)  # the fresh machine
    assert learning.restore_run(record, run.run_dir)
    assert not learning.restore_run(record, run.run_dir)  # never over a run folder
    expected = load_config(recipe, run.overrides).to_dict()
    assert learning.inspect_run(run.run_dir, expected)[0] == "finished"
    after = learning.read_run(run, st).numbers
    assert after["budget_elapsed_s"] == 3599.5
    for key in ("heldout", "gsm8k", "curve", "training", "grpo_steps", "sft_s"):
        assert after[key] == before[key], key
    cfg = load_config(run.run_dir / "config.yaml")
    assert learning.eval_jobs(st, run.run_dir, cfg) == ([], [])
    jobs, notes = learning.eval_jobs(learning.replace(st, gsm8k_limit=8), run.run_dir, cfg)
    assert jobs == [] and "restored, no checkpoint" in notes[0]  # cannot evaluate: says so
    assert not learning.archive_run(run.run_dir, record)  # the restored run is the same record


def test_learning_report_pairs_runs_per_seed_and_averages_over_seeds(tmp_path):
    st, recipe, runs = _learning_runs(tmp_path, ("plain", "full"), (0, 1))
    T, F = True, False
    outcomes = {  # (held-out start, end, GSM8K start, end) on 4 problems each
        ("plain", 0): ([F, F, T, F], [F, T, T, F], [F] * 4, [F, F, F, T]),
        ("full", 0): ([F, F, T, F], [T, T, T, F], [F] * 4, [T, F, F, T]),
        ("plain", 1): ([F, F, F, F], [F, F, F, F], [F] * 4, [F] * 4),
        ("full", 1): ([F, F, F, F], [T, T, F, F], [F] * 4, [F] * 4),
    }
    svamp = {("plain", 0): ([F] * 4, [T, F, F, F]), ("full", 0): ([F] * 4, [T, T, T, F])}
    for run in runs:
        key = (run.config, run.seed)
        _fabricate_finished(run, recipe, *outcomes[key], svamp=svamp.get(key, ([F] * 4,) * 2))
    results = [learning.read_run(r, st) for r in runs]
    first = results[0].numbers
    assert (first["config"], first["sft_steps"], first["grpo_steps"]) == ("plain", 2, 2)
    assert first["heldout"]["start"]["accuracy"] == 0.25
    assert first["heldout"]["final"]["accuracy"] == 0.5
    assert first["heldout"]["gain"]["strict"]["delta"] == 0.25
    assert first["heldout"]["gain"]["strict"]["fixed"] == 1
    assert first["gsm8k"]["gain"]["lenient"]["delta"] == 0.25
    curve = first["curve"]
    assert curve["clock"] == "steps" and curve["grpo_start_s"] == 4.0 and curve["end_s"] == 14.0
    # start (first 3 problems of eval_after_sft), the probe at step 2, the end
    assert curve["points"] == [[4.0, 1 / 3], [14.0, 0.5], [14.0, 2 / 3]]
    assert first["training"]["completion/truncated_rate"] == 0.375  # mean over the GRPO steps
    assert first["training"]["hypernet/scale_saturated"] is None  # never logged
    machine = {"cpu": "test", "cpu_class": "avx2 only"}
    report = learning.build_report(st, recipe, ["plain", "full"], results, [], "", machine)
    fvp = report["full_vs_plain"]["full - plain"]
    assert fvp["per_seed"][0]["heldout"]["strict"]["delta"] == 0.25
    assert fvp["per_seed"][1]["heldout"]["strict"]["delta"] == 0.5
    assert fvp["mean"]["heldout_strict"]["mean"] == pytest.approx(0.375)
    assert fvp["mean"]["gsm8k_strict"]["mean"] == pytest.approx(0.125)
    assert fvp["per_seed"][0]["svamp"]["strict"]["delta"] == 0.5  # each outside set paired
    assert first["svamp"]["gain"]["strict"]["delta"] == 0.25
    pooled = fvp["pooled"]["heldout_strict"]  # 8 (seed, problem) pairs: 3 fixed, 0 broken
    assert (pooled["seeds"], pooled["n"], pooled["fixed"], pooled["broken"]) == (2, 8, 3, 0)
    assert pooled["delta"] == pytest.approx(0.375)
    assert pooled["delta_ci"][0] <= 0.375 <= pooled["delta_ci"][1]
    seeds = report["across_seeds"]["full"]
    assert seeds["heldout_final"]["per_seed"] == [0.75, 0.5]
    assert seeds["heldout_gain_strict"]["mean"] == pytest.approx(0.5)
    text = learning.markdown(report)
    for heading in (
        "Per run, held-out",
        "GSM8K test transfer",
        "SVAMP transfer (first 4 problems)",
        "Across seeds",
        "vs plain, paired",
    ):
        assert heading in text
    saw = text.split("what its GRPO steps saw")[1]  # format valid, truncated, ...: means
    assert re.search(r"\| plain +\| 0 +\| - +\| 0\.38 +\| - +\|", saw)
    assert "| full - plain | mean of 2" in text and "avx2 only" in text
    assert "+37.5 ± 17.7 pts" in text and "| full - plain | pooled over 2 | +37.5 pts [" in text
    json.dumps(report)  # the results file holds it
    assert learning.plot(report, tmp_path / "curves.png").stat().st_size > 0
    # An ablation row: full minus a family, against full.
    _, _, minus = _learning_runs(tmp_path / "m", ("full-adaptive_policy",), (0,))
    _fabricate_finished(minus[0], recipe, [F] * 4, [F, T, T, F], [F] * 4, [F] * 4)
    more = [*results, learning.read_run(minus[0], st)]
    configs = ["plain", "full", "full-adaptive_policy"]
    report = learning.build_report(st, recipe, configs, more, ["x: train"], "", machine)
    abl = report["ablation"]["full-adaptive_policy - full"]
    assert abl["per_seed"][0]["heldout"]["strict"]["delta"] == -0.25
    # full minus a part is also paired against plain (a study may run it without full)
    assert report["full_vs_plain"]["full-adaptive_policy - plain"]["per_seed"][0]["heldout"][
        "strict"
    ]["delta"] == pytest.approx(0.0)  # both end at 2 of 4, the same problems
    alone = learning.build_report(
        st, recipe, ["plain", "full-adaptive_policy"], [results[0], more[-1]], [], "", machine
    )
    assert list(alone["full_vs_plain"]) == ["full-adaptive_policy - plain"]
    assert "| full-adaptive_policy - plain | 0" in learning.markdown(alone)
    assert "Ablation" in learning.markdown(report) and "**Partial:**" in learning.markdown(report)
    # A chained removal is paired against the configuration it was removed from.
    _, _, chained = _learning_runs(tmp_path / "c", ("full-adaptive_policy-schedule",), (0,))
    _fabricate_finished(chained[0], recipe, [F] * 4, [T, T, T, F], [F] * 4, [F] * 4)
    configs = [*configs, "full-adaptive_policy-schedule"]
    report = learning.build_report(
        st, recipe, configs, [*more, learning.read_run(chained[0], st)], [], "", machine
    )
    abl = report["ablation"]["full-adaptive_policy-schedule - full-adaptive_policy"]
    assert abl["per_seed"][0]["heldout"]["strict"]["delta"] == 0.25  # 3 of 4 against 2 of 4
    assert "full-adaptive_policy-schedule - full" not in report["ablation"]


def test_learning_side_by_side_pins_each_run_to_its_share_and_records_where_it_ran(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    assert learning.core_shares(2, [3, 1]) == [(1,), (3,)]
    with pytest.raises(SystemExit, match="need a core each"):
        learning.core_shares(len(cores) + 1, cores)
    # The child sees only its share, and as many torch threads.
    show = (
        "import os; print('pinned', sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
    )
    log = tmp_path / "child.log"
    rc = learning.run_logged([sys.executable, "-c", show], log, cores=[cores[-1]])
    assert rc == 0 and f"pinned [{cores[-1]}] 1" in log.read_text()
    # Each training invocation notes where it ran; the tables show it per run.
    st, recipe, runs = _learning_runs(tmp_path, ("plain", "full"), (0,))
    for run in runs:
        _fabricate_finished(run, recipe, [False] * 4, [False] * 4, [False] * 4, [False] * 4)
    learning.record_machine(runs[1].run_dir, "trained", [cores[-1]], ["plain-seed0"])
    results = [learning.read_run(r, st) for r in runs]
    assert results[0].numbers["machines"] == []
    where_full = results[1].numbers["machines"][0]
    assert where_full["cores"] == [cores[-1]]
    assert where_full["allocator"] in ("glibc", "tcmalloc") and "code" in where_full
    text = learning.markdown(
        learning.build_report(st, recipe, ["plain", "full"], results, [], "", {})
    )
    where = text.split("where it trained")[1]
    assert "| plain " in where and "not recorded" in where
    assert f"1 of {os.cpu_count()} cores, " in where and ", beside plain-seed0" in where


def test_learning_side_by_side_fills_a_reused_runs_core_with_the_next_run(tmp_path):
    st, recipe, runs = _learning_runs(tmp_path, ("plain", "full"), (0, 1))
    _fabricate_finished(runs[0], recipe, [False] * 4, [False] * 4, [False] * 4, [False] * 4)
    for run in runs:
        run.state, _ = learning.inspect_run(
            run.run_dir, load_config(recipe, run.overrides).to_dict()
        )
    groups = learning.side_by_side_groups(runs, 2)
    names = [[learning.run_name(r.config, r.seed) for r in g] for g in groups]
    # plain seed 0 is reused: full seed 0 trains beside plain seed 1, not beside an idle core.
    assert names == [["full-seed0", "plain-seed1"], ["full-seed1"]]


def test_learning_override_values_read_back_as_written():
    from deepsynapse.config import parse_override

    for key, value in [
        ("rewards.allocator", "static"),
        ("rewards.calibration", "none"),
        ("x.y", "true"),
        ("x.y", ""),
        ("lora.alpha", 32.0),
        ("control.curriculum.default_ranks", []),
        ("rewards.allocator_options", {}),
        ("x.y", False),
    ]:
        assert parse_override(learning.override_text(key, value))[1] == value


@pytest.mark.slow
@pytest.mark.parametrize("side_by_side", [False, True], ids=["one-at-a-time", "side-by-side"])
def test_learning_quick_trains_evaluates_and_writes_results(tmp_path, side_by_side):
    stem = tmp_path / "results" / "learning-quick"
    args = ["--quick", "--out-dir", str(tmp_path / "runs"), "--results", str(stem)]
    if side_by_side and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--side-by-side needs a core for each of plain and full")
    proc = _run_script("learning.py", *args, *(["--side-by-side"] if side_by_side else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| full - plain | 0" in proc.stdout
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["config"], r["seed"]) for r in data["runs"]] == [("plain", 0), ("full", 0)]
    assert not data["left"] and all(not r["errors"] for r in data["invocation"])
    for r in data["runs"]:
        assert r["heldout"]["final"]["n"] == 6 and r["gsm8k"]["final"]["n"] == 4
        assert r["svamp"]["final"]["n"] == 4 and r["svamp"]["start"]["n"] == 4
        assert r["grpo_steps"] >= 1 and r["curve"]["points"]
        (where,) = r["machines"]
        assert len(where["cores"]) == len(os.sched_getaffinity(0)) // (2 if side_by_side else 1)
        assert where["beside"] == (
            [f"{'full' if r['config'] == 'plain' else 'plain'}-seed0"] if side_by_side else []
        )
    assert stem.with_suffix(".png").is_file() and stem.with_suffix(".md").is_file()


@pytest.mark.slow
def test_part_costs_quick_times_each_configuration(tmp_path):
    stem = tmp_path / "part-costs-quick"
    proc = _run_script("part_costs.py", "--quick", "--results", str(stem))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| plain" in proc.stdout and "| full" in proc.stdout
    data = json.loads(stem.with_suffix(".json").read_text())
    for config in ("plain", "full"):
        costs = data["results"][config]
        assert costs["sft_step_s"] > 0 and costs["grpo_step_s"] > 0
        assert costs["eval_s_per_problem"] > 0 and costs["update_s"] > 0
    # full scores the contrastive reward (a policy pass), plain only string rewards
    assert data["results"]["full"]["costliest_reward"] is not None


def test_hypernet_decode_quick_times_the_three_ways(tmp_path):
    out = tmp_path / "hypernet-decode.json"
    proc = _run_script("hypernet_decode.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["decoding"].split(",")[-1].strip() for r in rows] == [
        "LoRA merged (plain GRPO)",
        "hooks on lora_B",
        "swapped forward",
    ]
    assert all(r["tokens"] > 0 and r["best_s"] > 0 for r in rows)
    assert rows[0]["vs_merged"] == 1.0 and "| per-row scales, swapped forward" in proc.stdout


def test_from_start_reach_pairs_greedy_with_samples_and_counts_the_headroom():
    greedy = {"records": [{"id": i, "correct": c} for i, c in enumerate([1, 0, 0, 1])]}
    samples = [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    sampled = {
        "accuracy": 0.25,
        "sample_accuracy": (0.5 + 0.25) / 4,  # as the harness summarises the samples
        "pass_at_k": 0.5,
        "records": [{"id": i, "samples_correct": s} for i, s in enumerate(samples)],
    }
    r = from_start.reach(greedy, sampled)
    assert r["n"] == 4 and r["greedy"] == 0.5 and r["majority"] == 0.25
    assert r["sample_accuracy"] == (0.5 + 0.25) / 4 and r["pass_at_k"] == 0.5
    assert r["headroom"] == 0.25  # problem 1: greedy wrong, one sample right
    assert r["signal"][4] == pytest.approx((1 - 0.5**4 * 2 + 1 - 0.25**4 - 0.75**4) / 4)
    with pytest.raises(ValueError, match="not in the greedy"):
        from_start.reach({"records": []}, sampled)


def test_from_start_pairs_the_variants_end_with_the_sources_end(tmp_path):
    st, recipe, (source,) = _learning_runs(tmp_path / "a", ("plain",), (0,))
    _, _, (variant,) = _learning_runs(tmp_path / "b", ("plain",), (0,))
    start = [True, False, False, True]
    _fabricate_finished(source, recipe, start, [True, True, False, True], [False], [False])
    _fabricate_finished(variant, recipe, start, [False, True, True, True], [False], [False])
    result = from_start.against_source(source.run_dir, variant.run_dir)
    assert result["source_gain"]["strict"]["delta"] == 0.25
    assert result["gain"]["strict"]["delta"] == 0.25
    vs = result["vs_source"]["strict"]
    assert (vs["delta"], vs["fixed"], vs["broken"]) == (0.0, 1, 1)
    assert result["variant"] == {"grpo_steps": 2, "grpo_s": 10.0}
    text = "\n".join(from_start.summary_lines(result))
    assert "variant - source, end (strict): +0.0 pts" in text and "1 fixed, 1 broken" in text


def test_from_start_rebases_the_start_of_grpo_onto_the_variants_rewards(tmp_path):
    """The reward families' GRPO ablation needs the start rewritten for another reward set;
    a checkpoint whose reward side has learned anything must be refused."""
    from deepsynapse.checkpoint import load_tree, save_tree
    from deepsynapse.config import save_config

    st, recipe, (run,) = _learning_runs(tmp_path, ("full-critique",), (0,))
    cfg = load_config(recipe, run.overrides)
    dest = tmp_path / "variant"
    (dest / "checkpoints" / "step-0").mkdir(parents=True)
    save_config(cfg, dest / "config.yaml")
    state = {
        "step": 0,
        "identity": {"model": "tiny-random", "rewards": sorted(cfg.rewards.weights)},
        "rewards": {
            "fusion": {"stats": {}},
            "memory": {"problems": []},
            "verifier": {"updates": 0},
        },
        "controllers": {"allocator": {"batches": 0}, "curriculum": {"index": 0}},
    }
    save_tree(state, dest / "checkpoints" / "step-0", "trainer_state")
    assert from_start.rebase_rewards(dest, []) is None  # same rewards: untouched
    fewer = "rewards.weights={correctness: 1.0, strict_format: 0.3, soft_format: 0.2}"
    assert "-> correctness, soft_format, strict_format" in from_start.rebase_rewards(dest, [fewer])
    new = load_tree(dest / "checkpoints" / "step-0", "trainer_state")
    assert new["identity"] == {
        "model": "tiny-random",
        "rewards": ["correctness", "soft_format", "strict_format"],
    }
    assert "verifier" not in new["rewards"] and list(new["controllers"]) == ["curriculum"]

    state["rewards"]["memory"]["problems"] = [{"id": "p0"}]  # the reward side has learned
    save_tree(state, dest / "checkpoints" / "step-0", "trainer_state")
    with pytest.raises(SystemExit, match="episodic memory: only the start of GRPO"):
        from_start.rebase_rewards(dest, [fewer])


def test_from_start_drops_the_memory_and_hypernetwork_at_identity_from_the_start(tmp_path):
    """A variant without the neural memory or the hypernetwork from a full-critique start: their
    state, identity entries and optimizer groups go; a module that moved is refused."""
    import torch

    from deepsynapse.checkpoint import load_tree, save_tree
    from deepsynapse.config import save_config

    st, recipe, (run,) = _learning_runs(tmp_path, ("full-critique",), (0,))
    cfg = load_config(recipe, run.overrides)
    dest = tmp_path / "variant"
    folder = dest / "checkpoints" / "step-0"
    folder.mkdir(parents=True)
    save_config(cfg, dest / "config.yaml")
    memory = {k: torch.zeros(2) for k in ("gate", "keys", "values", "out.weight")}
    hypernet = {k: torch.zeros(2) for k in ("down.weight", "down.bias", "up.weight", "up.bias")}
    hypernet["down.weight"] = torch.ones(2)  # trained layers before the zeroed output: identity
    state = {
        "step": 0,
        "identity": {"model": "tiny-random", "memory": [32, 4, 0.5], "hypernet": "layer"},
        "adaptive": {"lora": {"rank": 16}, "memory": memory, "hypernet": hypernet, "context": {}},
    }
    groups = [
        {"lr_mult": 1.0, "params": list(range(10))},
        {"lr_mult": cfg.memory.lr_mult, "params": [10, 11, 12, 13]},
        {"lr_mult": cfg.hypernet.lr_mult, "params": [14, 15, 16]},  # 3 tensors: not the 4
        {"lr_mult": cfg.hypernet.lr_mult, "params": [17, 18, 19, 20, 21]},
    ]
    save_tree(state, folder, "trainer_state")
    save_tree({"state": {}, "param_groups": groups}, folder, "optimizer")
    assert from_start.rebase_adaptive(dest, []) is None  # both kept: untouched

    off = ["memory.enabled=false"]
    assert from_start.rebase_adaptive(dest, off) == "dropped the memory (at identity)"
    new = load_tree(folder, "trainer_state")
    assert new["identity"] == {"model": "tiny-random", "memory": None, "hypernet": "layer"}
    assert set(new["adaptive"]) == {"lora", "hypernet", "context"}
    kept = load_tree(folder, "optimizer")["param_groups"]
    assert [g["params"][0] for g in kept] == [0, 14, 17]

    with pytest.raises(SystemExit, match="0 optimizer groups could be the hypernet's"):
        from_start.rebase_adaptive(dest, [*off, "hypernet.enabled=false"])
    memory["gate"] = torch.tensor([0.01, 0.0])  # the gate opened: no longer identity
    save_tree(state, folder, "trainer_state")
    save_tree({"state": {}, "param_groups": groups}, folder, "optimizer")
    with pytest.raises(SystemExit, match="the memory has moved off identity"):
        from_start.rebase_adaptive(dest, off)


def test_from_start_refuses_a_source_without_a_start_of_grpo_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no complete start-of-GRPO checkpoint"):
        from_start.branch(tmp_path / "src", tmp_path / "dest")


def test_from_start_as_a_learning_config_is_that_configuration_from_the_sources_warm_up(tmp_path):
    """``--as``: the variant's settings are exactly the ablation run's, and nothing that the
    warm-up trained with may differ (its checkpoint holds that warm-up)."""
    from deepsynapse.config import save_config

    st, recipe, (source,) = _learning_runs(tmp_path, ("full-critique",), (3,))
    source.run_dir.mkdir(parents=True)
    save_config(load_config(recipe, source.overrides), source.run_dir / "config.yaml")
    as_ = functools.partial(from_start.as_learning_config, st=st, recipe=str(recipe))

    overrides = as_(source.run_dir, "full-critique-optimisation")
    variant = load_config(source.run_dir / "config.yaml", overrides).to_dict()
    _, _, (target,) = _learning_runs(tmp_path, ("full-critique-optimisation",), (3,))
    assert learning.config_diff(variant, load_config(recipe, target.overrides).to_dict()) == []
    assert learning.config_diff(variant, load_config(recipe, source.overrides).to_dict())
    assert not any(o.startswith(("train.run_name=", "train.output_dir=")) for o in overrides)

    with pytest.raises(SystemExit, match="changes the warm-up.*lora.module_scales"):
        as_(source.run_dir, "full-critique-adaptive_policy")
    # ... unless the overrides given with it set the warm-up's keys back to the source's
    given = ("lora.module_scales=true",)
    back = as_(source.run_dir, "full-critique-adaptive_policy", given=given)
    back_cfg = load_config(source.run_dir / "config.yaml", [*back, *given])
    assert back_cfg.lora.module_scales and not back_cfg.hypernet.enabled
    stray = load_config(recipe, [*source.overrides, "grpo.beta=0.5"])
    save_config(stray, source.run_dir / "config.yaml")
    with pytest.raises(SystemExit, match="not learning.py's full-critique at seed 3.*grpo.beta"):
        as_(source.run_dir, "full-critique-optimisation")


@pytest.mark.slow
def test_from_start_quick_branches_a_run_and_reports_its_reach(tmp_path):
    proc = _run_script("from_start.py", "--quick", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dest = tmp_path / "quick-source-g4"
    assert "pass@8" in proc.stdout and (dest / "reach.json").is_file()
    start = "checkpoints/step-0/trainer_state.safetensors"
    assert (dest / start).read_bytes() == (tmp_path / "quick-source" / start).read_bytes()
    rows = [json.loads(x) for x in (dest / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if "groups/drawn" in r]
    assert [r["step"] for r in grpo] == [1, 2]  # the source's GRPO step replaced, not kept
    reach = json.loads((dest / "reach.json").read_text())
    assert reach["start"]["checkpoint"] == "step-0" and reach["end"]["checkpoint"] == "step-2"

    # A variant with fewer rewards from the same start: rebased, resumed, trained, paired
    # (the recipe's phases weight structure: kept).
    weights = (
        "rewards.weights={correctness: 1.0, strict_format: 0.3, soft_format: 0.2, "
        "structure: 0.3, length_penalty: 0.1}"
    )
    proc = _run_script(
        "from_start.py",
        str(tmp_path / "quick-source"),
        "fewer",
        "rollout.num_generations=4",
        "train.steps=2",
        weights,
        "--out-dir",
        str(tmp_path),
        "--results-dir",
        str(tmp_path / "kept"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "start of GRPO rebased: rewards" in proc.stdout
    assert "variant - source, end (strict)" in proc.stdout
    kept = tmp_path / "kept" / "quick-source-fewer.json"
    assert json.loads(kept.read_text())["variant"]["grpo_steps"] == 2
    assert (tmp_path / "kept" / "runs" / "quick-source-fewer" / "record.json").is_file()


@pytest.mark.heavy
def test_sft_step_quick_times_our_step_beside_a_bare_one_on_the_same_examples(tmp_path):
    stem = tmp_path / "sft-step"
    proc = _run_script("sft_step.py", "--quick", "--results", str(stem))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(stem.with_suffix(".json").read_text())["results"]["plain"]
    # the same model and examples, LoRA's B still zero: the first losses agree
    assert r["first_loss"]["ours"] == pytest.approx(r["first_loss"]["bare"], rel=1e-3)
    assert len(r["ours_steps_s"]) == len(r["bare_steps_s"]) == 3
    assert r["tokens"] > r["target_tokens"] > 0 and r["floor_s"] > 0
    assert r["padded_ours"] >= r["tokens"] and r["padded_bare"] >= r["tokens"]
    assert "| plain " in stem.with_suffix(".md").read_text()


def test_prefill_prefix_times_both_prefills_on_the_same_tokens(tmp_path):
    stem = tmp_path / "prefill-prefix"
    proc = _run_script(
        "prefill_prefix.py",
        "--model",
        "tiny-random",
        "--repeats",
        "1",
        "--quick",
        "--results",
        str(stem),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["common_prefix_tokens"] >= 32  # the chat template and system prompt
    assert len(report["results"]) == 2
    greedy, sampled = report["results"].values()
    assert greedy["same_share"] == 1.0 and sampled["same_share"] > 0.5, report["results"]
    assert all(r["once_s"] > 0 and r["per_prompt_s"] > 0 for r in (greedy, sampled))
    assert "prefix once s" in stem.with_suffix(".md").read_text()


def test_from_start_summary_pools_each_variant_over_its_sources_seeds(tmp_path):
    records, results = tmp_path / "results", tmp_path / "results" / "from-start"
    results.mkdir(parents=True)
    ends = {  # (source's end, variant's end) on the same four problems
        ("x", 1): ([True, True, False, False], [False, True, False, False]),
        ("x", 2): ([True, False, True, False], [False, False, False, False]),
        ("y", 1): ([True, True, False, False], [True, True, True, False]),  # seed 1's source
    }
    for (name, seed), (source_end, variant_end) in ends.items():
        source = tmp_path / "runs" / "study" / f"full-seed{seed}"
        variant = tmp_path / "runs" / "from-start" / f"full-seed{seed}-{name}"
        for run, end in ((source, source_end), (variant, variant_end)):
            run.mkdir(parents=True, exist_ok=True)
            (run / "eval_after_sft.json").write_text(json.dumps(_records("h", [False] * 4)))
            # y's variant gets every number right, but in format only where strict says so
            lenient = [True] * 4 if run is variant and name == "y" else end
            (run / "eval_after.json").write_text(json.dumps(_records("h", end, lenient)))
        result = from_start.against_source(source, variant)
        (results / f"{variant.name}.json").write_text(json.dumps(result))
        learning.archive_run(source, records / "study.runs" / source.name)
        learning.archive_run(variant, results / "runs" / variant.name)
    plain = tmp_path / "runs" / "study" / "plain-seed1"  # plain kept at seed 1 only
    plain.mkdir()
    (plain / "eval_after_sft.json").write_text(json.dumps(_records("h", [False] * 4)))
    (plain / "eval_after.json").write_text(json.dumps(_records("h", [True, False, False, False])))
    learning.archive_run(plain, records / "study.runs" / plain.name)
    shutil.rmtree(tmp_path / "runs")  # the summary reads the kept records only

    rows = from_start.pooled_variants(results, records)
    assert [(r["study"], r["source"], r["variant"], r["seeds"]) for r in rows] == [
        ("study", "full", "x", [1, 2]),
        ("study", "full", "y", [1]),
    ]
    x = rows[0]
    assert x["per_seed"] == [-0.25, -0.5]
    assert (x["strict"]["delta"], x["strict"]["fixed"], x["strict"]["broken"]) == (-0.375, 0, 3)
    assert x["strict"]["n"] == 8 and x["strict"]["seeds"] == 2
    assert rows[1]["strict"]["delta"] == 0.25 and rows[1]["lenient"]["delta"] == 0.5
    # y's end against plain's at seed 1 (3 of 4 against 1 of 4); x lacks plain at seed 2
    assert x["vs_plain"] is None
    y_plain = rows[1]["vs_plain"]
    assert (y_plain["delta"], y_plain["fixed"], y_plain["broken"]) == (0.5, 2, 0)
    table = from_start.pooled_table(rows)
    assert "-37.5 pts" in table and "pooled (lenient)" in table
    assert "+25.0 pts" in table and "+50.0 pts" in table  # y: strict and lenient apart
    assert "against plain's end (strict)" in table

    (records / "study.runs" / "full-seed2" / "eval_after.json.gz").unlink()
    with pytest.raises(FileNotFoundError, match="full-seed2-x.json"):
        from_start.pooled_variants(results, records)


def test_learning_set_overrides_every_run_and_a_malformed_one_is_named(tmp_path, capsys):
    args, st = learning.parse_args(["--set", "sft.data=gsm8k", "--configs", "plain", "full"])
    assert st.extra == ("sft.data=gsm8k",)
    recipe = learning.recipe_path(learning.RECIPE)
    recipe_cfg = load_config(recipe, list(st.extra))
    st = learning.resolve(st, recipe_cfg)
    for run in learning.plan_runs(st, ["plain", "full"], tmp_path, recipe_cfg):
        cfg = load_config(recipe, run.overrides)
        assert cfg.sft.data == "gsm8k" and cfg.data.eval == "synthetic"  # the record's held-out
    assert load_config(recipe).sft.data == "synthetic"  # the recipe's own warm-up
    runs = learning.plan_runs(st, ["plain", "full"], tmp_path, recipe_cfg)
    expected = {r.run_dir: load_config(recipe, r.overrides).to_dict() for r in runs}
    assert (
        learning.set_keys_overruled(["sft.data=gsm8k"], recipe_cfg.to_dict(), runs, expected) == []
    )
    # a key a configuration's parts own is overruled in that configuration's runs: named
    budget = ["rewards.length_budget=192"]
    recipe_cfg = load_config(recipe, budget)
    runs = learning.plan_runs(st, ["plain", "full"], tmp_path, recipe_cfg)
    expected = {r.run_dir: load_config(recipe, r.overrides).to_dict() for r in runs}
    assert learning.set_keys_overruled(budget, recipe_cfg.to_dict(), runs, expected) == [
        "--set rewards.length_budget=192: configuration plain sets 256 (a key its parts own)"
    ]
    with pytest.raises(SystemExit):
        learning.parse_args(["--set", "sft.data"])
    assert "--set takes KEY=VALUE, got 'sft.data'" in capsys.readouterr().err


def test_soak_tells_a_rise_at_a_wider_batch_from_one_without():
    """RSS steps up when a wider batch first arrives (the allocator keeps its blocks); only a
    rise without a new width counts against the run."""
    rss = [1000.0, 1005.0, 1100.0, 1101.0, 1099.0, 1180.0, 1181.0]
    width = [128.0, 128.0, 192.0, 128.0, 192.0, 192.0, 160.0]
    steps_up = soak.rises(rss, width)
    assert steps_up == [
        {"step": 3, "mb": 95.0, "width": 192.0, "widest_yet": True},
        {"step": 6, "mb": 79.0, "width": 192.0, "widest_yet": False},
    ]


def test_a_stop_to_from_start_reaches_its_trainer_once_and_ends_the_script(tmp_path):
    """SIGTERM to the script is passed to the child (a trainer checkpoints on it), never
    left behind: until 2026-12-08 from_start.py died and its trainer ran on, orphaned."""
    ready, caught = tmp_path / "ready", tmp_path / "caught"
    child = (
        "import pathlib, signal, sys, time\n"
        f"def stop(*_): pathlib.Path({str(caught)!r}).write_text('x'); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "time.sleep(60)\n"
    )
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import from_start, learning\n"
        "with learning.stop_forwarded():\n"
        "    try:\n"
        f"        from_start._checked([sys.executable, '-c', {child!r}])\n"
        "    except from_start.Stopped as stop:\n"
        "        print('stopped by', stop)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=BENCH.parent
    )
    for _ in range(300):
        if ready.exists():
            break
        time.sleep(0.1)
    assert ready.exists(), "the child never started"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped by SIGTERM" in out
    assert caught.exists()  # the child got the stop (once) and handled it


def test_a_failing_child_of_from_start_ends_the_script_with_its_command():
    with pytest.raises(SystemExit, match=r"failed \(exit 4\).*SystemExit\(4\)"):
        from_start._checked([sys.executable, "-c", "raise SystemExit(4)"], quiet=True)
