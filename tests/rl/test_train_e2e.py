"""End-to-end runs of the real trainer on the tiny random model (seconds each)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import EXTRA_REWARDS
from safetensors.torch import load_file

from deepsynapse.config import ConfigError, load_config
from deepsynapse.rl.trainer import Trainer
from deepsynapse.telemetry.run_logger import read_jsonl

REQUIRED = [
    "rewards/correctness/mean",
    "rewards/correctness/std",
    "rewards/strict_format/mean",
    "rewards/soft_format/std",
    "reward/fused/mean",
    "reward/fused/std",
    "kl/mean",
    "entropy/mean",
    "clip/fraction",
    "completion/length_mean",
    "completion/truncated_rate",
    "batch/sequence_width",
    "timing/sample",
    "timing/generate",
    "timing/parse",
    "timing/reward",
    "timing/reward/correctness",
    "timing/fuse",
    "timing/select",
    "timing/advantage",
    "timing/reference",
    "timing/update",
    "timing/observe",
    "timing/step",
    "accuracy/train_kept",
    "throughput/tokens_per_s",
    "memory/peak_rss_mb",
    "loss/total",
]


def run(tmp_path, overrides, name="run", **train_kwargs):
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, run_dir=tmp_path / name, progress=False, reward_fns=EXTRA_REWARDS)
    summary = trainer.train(**train_kwargs)
    return trainer, summary


def adapter(run_dir, step):
    return load_file(
        str(run_dir / "checkpoints" / f"step-{step}" / "adapter" / "adapter_model.safetensors")
    )


def test_end_to_end_tiny_run(tmp_path, tiny_overrides):
    trainer, summary = run(
        tmp_path,
        tiny_overrides
        + ["grpo.beta=0.1", "grpo.num_iterations=2", "probes.every=2", "probes.per_skill=1"]
        + ["train.report=true"],
    )
    run_dir = tmp_path / "run"
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/fused/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in REQUIRED:
        assert key in rows[0], key
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert any(r.get("sft/loss") for r in read_jsonl(run_dir / "metrics.jsonl"))
    # LoRA B starts at zero: after SFT + GRPO the adapter must have moved.
    final = adapter(run_dir, 2)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in final.items())
    # The GRPO steps moved it further than SFT alone.
    after_sft = adapter(run_dir, 0) if (run_dir / "checkpoints/step-0").exists() else None
    if after_sft is not None:
        assert any(not torch.equal(final[k], after_sft[k]) for k in final)
    kinds = {e["kind"] for e in read_jsonl(run_dir / "events.jsonl")}
    assert {"start", "sft_done", "checkpoint"} <= kinds
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert samples and {"completion", "rewards", "fused_reward", "advantage"} <= set(samples[0])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert summary["eval_before"]["n"] == 2 and summary["eval_after"]["n"] == 2
    assert json.loads((run_dir / "eval_after.json").read_text())["records"]
    # Probes ran at step 2 next to a held-out slice; the report was written at the end.
    assert (
        "probes/mean" in rows[1]
        and "probes/arithmetic" in rows[1]
        and "accuracy/heldout" in rows[1]
    )
    assert "probes/mean" not in rows[0]
    assert (run_dir / "report.html").is_file()


def test_a_shared_evaluation_before_stands_in_only_in_its_dtype(tmp_path, tiny_overrides):
    """benchmarks/learning.py gives a study's new run an earlier run's evaluation of the
    untrained model (``shared_from``): the trainer uses it where it was decoded in this run's
    dtype and decoder, and evaluates again where not; another seed answers the same."""
    overrides = tiny_overrides + ["sft.steps=0", "train.steps=1", "eval.limit=3"]
    first, _ = run(tmp_path, overrides, name="first")
    made = json.loads((tmp_path / "first" / "eval_before.json").read_text())
    assert made["dtype"] == str(first.dtype_choice.dtype) == "torch.float32"
    for name, dtype in (("same", made["dtype"]), ("other", "torch.bfloat16")):
        folder = tmp_path / name
        folder.mkdir()
        shared = {**made, "shared_from": str(tmp_path / "first"), "dtype": dtype, "seconds": 99.0}
        (folder / "eval_before.json").write_text(json.dumps(shared))
        run(tmp_path, overrides + ["train.seed=7"], name=name)
        used = json.loads((folder / "eval_before.json").read_text())
        events = read_jsonl(folder / "events.jsonl")
        if name == "same":
            assert used == shared
            assert [e["evidence"]["source"] for e in events if e["kind"] == "eval_shared"] == [
                str(tmp_path / "first")
            ]
        else:  # evaluated again: its own, in its dtype, and what the shared one said
            assert "shared_from" not in used and used["dtype"] == made["dtype"]
            assert used["records"] == made["records"] and used["seconds"] != 99.0
            assert not any(e["kind"] == "eval_shared" for e in events)


def test_unknown_reward_is_refused_before_loading_anything(tmp_path):
    cfg = load_config(None, ["model.name=tiny-random", "rewards.weights={correctnes: 1.0}"])
    with pytest.raises(
        ConfigError, match="unknown reward 'correctnes'; did you mean 'correctness'"
    ):
        Trainer(cfg, run_dir=tmp_path / "x", progress=False)


def test_peft_loads_the_adapter(tmp_path, tiny_overrides):
    from peft import PeftModel

    trainer, _ = run(tmp_path, tiny_overrides + ["train.steps=1", "sft.steps=0", "eval.limit=0"])
    base = trainer.unwrapped.peft_model.get_base_model()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ours = trainer.unwrapped.peft_model(input_ids=ids).logits
        from deepsynapse.models.loading import build_tiny_random

        fresh = build_tiny_random(trainer.tokenizer)
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "run/checkpoints/step-1/adapter"))
        theirs = loaded(input_ids=ids).logits
    assert base is not None
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        ["grpo.loss_aggregation=sequence", "grpo.advantage=dr_grpo"],
        ["grpo.importance_sampling=sequence", "grpo.num_iterations=2", "grpo.mask_truncated=true"],
        ["grpo.dynamic_sampling=true", "grpo.loss_aggregation=dr_grpo", "grpo.beta=0"],
    ],
)
def test_variants_run(tmp_path, tiny_overrides, variant):
    _, summary = run(
        tmp_path, tiny_overrides + ["sft.steps=0", "eval.limit=0", "train.steps=1"] + variant
    )
    assert summary["steps"] == 1


def test_resume_is_exact(tmp_path, tiny_overrides):
    base = tiny_overrides + ["train.steps=4", "train.save_every=2", "eval.limit=0"]
    run(tmp_path, base, name="straight")
    _, first = run(tmp_path, base, name="split", stop_after=2)
    assert first["steps"] == 2
    run(tmp_path, base, name="split", resume=True)
    a, b = adapter(tmp_path / "straight", 4), adapter(tmp_path / "split", 4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [
        r["step"] for r in read_jsonl(tmp_path / "split/metrics.jsonl") if "reward/fused/mean" in r
    ]
    assert steps == [1, 2, 3, 4]  # every step logged exactly once


def resumed_rollouts(tmp_path, overrides, source: str, name: str) -> list:
    """Resume a copy of run ``source`` as ``name`` with ``overrides``; each rollout round's
    (problem ids, knobs, completion ids), as the trainer drew them."""
    shutil.copytree(tmp_path / source, tmp_path / name)
    trainer = Trainer(
        load_config(None, overrides),
        run_dir=tmp_path / name,
        progress=False,
        reward_fns=EXTRA_REWARDS,
    )
    rounds, rollout = [], trainer.rollout

    def recording(problems, knobs):
        batch = rollout(problems, knobs)
        ids = batch.rollout.completion_ids.tolist()
        rounds.append(([p.id for p in problems], knobs.copy(), ids))
        return batch

    trainer.rollout = recording
    trainer.train(resume=True)
    return rounds


def test_a_draw_seed_replays_grpo_from_a_checkpoint_with_other_draws_on_the_same_data(
    tmp_path, tiny_overrides
):
    """``train.draw_seed``: three runs resumed from one checkpoint after a GRPO step draw the
    same problems; with the draw seed unset or equal to ``train.seed`` they sample the same
    completions and end with the same adapter, with another draw seed they sample others and
    the adapters part (the replicate ``from_start.py`` measures trajectory noise with)."""
    base = tiny_overrides + ["train.steps=3", "eval.limit=0"]
    run(tmp_path, base, name="source", stop_after=1)
    seed = load_config(None, base).train.seed
    variants = {"unset": [], "equal": [f"train.draw_seed={seed}"], "other": ["train.draw_seed=99"]}
    seen = {
        name: [
            (ids, done) for ids, _, done in resumed_rollouts(tmp_path, base + extra, "source", name)
        ]
        for name, extra in variants.items()
    }
    assert seen["unset"][0][0] == seen["equal"][0][0] == seen["other"][0][0]  # same problems
    assert seen["equal"] == seen["unset"]
    assert seen["other"][0][1] != seen["unset"][0][1]  # other completions
    a, b, c = (adapter(tmp_path / name, 3) for name in variants)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_settings_changed_on_resume_act_and_are_said(tmp_path, tiny_overrides):
    """``--resume RUN rollout.temperature=...``: the resumed steps sample at the new value
    (the checkpoint's knobs once overrode it silently: a from-start variant at T = 1.2 ran
    exactly as its source at 0.9), and the change is said and logged; a plain resume changes
    nothing and says nothing."""
    base = tiny_overrides + ["train.steps=2", "eval.limit=0", "grpo.beta=0.05"]
    run(tmp_path, base, name="source", stop_after=1)
    variants = {"same": [], "changed": ["rollout.temperature=3.0", "grpo.beta=0.2"]}
    seen = {
        name: [
            (kn.temperature, kn.beta, done)
            for _, kn, done in resumed_rollouts(tmp_path, base + extra, "source", name)
        ]
        for name, extra in variants.items()
    }
    source = load_config(None, base)
    assert {(t, b) for t, b, _ in seen["same"]} == {(source.rollout.temperature, 0.05)}
    assert {(t, b) for t, b, _ in seen["changed"]} == {(3.0, 0.2)}
    assert seen["changed"][0][2] != seen["same"][0][2]  # sampled at the new temperature
    row = next(r for r in read_jsonl(tmp_path / "changed/metrics.jsonl") if r["step"] == 2)
    assert row["knobs/temperature"] == 3.0 and row["knobs/beta"] == 0.2
    said = [
        e for e in read_jsonl(tmp_path / "changed/events.jsonl") if e["kind"] == "settings_changed"
    ]
    assert len(said) == 1
    changed = said[0]["evidence"]["changed"]
    assert changed["rollout.temperature"] == [source.rollout.temperature, 3.0]
    assert changed["grpo.beta"] == [0.05, 0.2]
    assert not [
        e for e in read_jsonl(tmp_path / "same/events.jsonl") if e["kind"] == "settings_changed"
    ]


def test_after_warmup_evaluation_splits_the_gain(tmp_path, tiny_overrides):
    """Before, after the warm-up and after GRPO are scored on the same problems; the summary
    pairs them (whole run, warm-up, GRPO), strict and lenient, each with its interval."""
    _, summary = run(tmp_path, tiny_overrides)
    run_dir = tmp_path / "run"
    ids = [
        [r["id"] for r in json.loads((run_dir / f"eval_{tag}.json").read_text())["records"]]
        for tag in ("before", "after_sft", "after")
    ]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 2
    assert set(summary["gains"]) == {"run", "warmup", "grpo"}
    for gain in summary["gains"].values():
        for kind in ("strict", "lenient"):
            c = gain[kind]
            assert c["n"] == 2 and c["delta_ci"][0] <= c["delta"] <= c["delta_ci"][1]
    assert summary["eval_after_sft"]["n"] == 2 and len(summary["eval_before"]["accuracy_ci"]) == 2
    # where GRPO started stays on disk for a paired transfer evaluation (keep_checkpoints=2)
    assert (run_dir / "checkpoints" / "step-0").is_dir()


def test_time_budget_plans_fewer_steps_and_the_run_still_finishes(tmp_path, tiny_overrides):
    """A budget far below the configured work: the two measured warm-up and GRPO steps run
    (a stage is planned after its second step), the run ends as finished, evaluated after."""
    overrides = tiny_overrides + ["sft.steps=5", "train.steps=6", "train.time_budget=1s"]
    overrides += ["control.kl_temperature.enabled=true", "control.kl_temperature.schedule=run"]
    trainer, summary = run(tmp_path, overrides)
    run_dir = tmp_path / "run"
    assert (trainer.sft_step, trainer.step) == (2, 2)
    # the KL-temperature schedule spans the planned steps, not train.steps
    (kl,) = [c for c in trainer.controllers if c.name == "kl_temperature"]
    assert kl.total_steps == 2
    assert (run_dir / "summary.json").is_file() and summary["eval_after"]["n"] == 2
    plans = [e for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "budget_plan"]
    assert [sorted(set(e["evidence"]) & {"sft_steps", "grpo_steps"}) for e in plans] == [
        ["sft_steps"],
        ["grpo_steps"],
    ]
    # (a generous budget plans the configured steps: tests/rl/test_budget.py)


@pytest.mark.parametrize("dynamic", [False, True])
def test_an_update_from_groups_without_correctness_signal_is_measured_and_said(
    tmp_path, tiny_overrides, dynamic
):
    """The tiny random model answers nothing right, so every group's correctness is uniform,
    while its length reward varies: without dynamic sampling the whole update's advantage
    comes from groups with no signal (metric 1.0, said once); with it, no such group is
    trained on."""
    overrides = tiny_overrides + ["train.steps=2", f"grpo.dynamic_sampling={str(dynamic).lower()}"]
    trainer, _ = run(tmp_path, overrides)
    rows = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "accuracy/train" in m]
    assert [m["accuracy/train"] for m in rows] == [0.0, 0.0]
    said = [
        e
        for e in read_jsonl(tmp_path / "run" / "events.jsonl")
        if e["kind"] == "advantage_without_signal"
    ]
    if dynamic:
        assert [m["advantage/no_signal_share"] for m in rows] == [0.0, 0.0] and not said
    else:
        assert all(m["advantage/abs_mean"] > 0 for m in rows)
        assert [m["advantage/no_signal_share"] for m in rows] == [1.0, 1.0]
        assert len(said) == 1 and said[0]["evidence"]["share"] == 1.0


@pytest.mark.heavy
def test_time_budget_replans_at_the_measured_pace_and_fills_the_budget(tmp_path, tiny_overrides):
    """The budget's clock is driven here: the second GRPO step takes 10 s, the rest 2 s. The
    plan made at the second step (5 steps in 50 s) grows as the pace is measured, the run
    fills its budget (19 steps: 15 s + 17 x 2 s = 49 s) instead of stopping at 5 with 29 s
    unused, and the schedules sized to the run follow every plan."""
    overrides = tiny_overrides + ["train.steps=100", "train.time_budget=50s"]
    overrides += ["train.budget_counts_evaluations=false", "train.save_every=0"]
    overrides += ["control.kl_temperature.enabled=true", "control.kl_temperature.schedule=run"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False, reward_fns=EXTRA_REWARDS)
    now = [0.0]
    trainer.budget.clock, trainer.budget.started = (lambda: now[0]), 0.0
    step = trainer.train_step

    def timed_step(k: int) -> dict[str, float]:
        metrics = step(k)
        now[0] += (5.0, 10.0)[k] if k < 2 else 2.0  # the first step: not measured
        return metrics

    trainer.train_step = timed_step
    trainer.train()
    assert trainer.step == 19 and trainer.budget.elapsed() == pytest.approx(49.0)
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    plans = [e["evidence"] for e in events if e["kind"] == "budget_plan"]
    assert [p["grpo_steps"] for p in plans if "grpo_steps" in p] == [5]
    replans = [e["evidence"] for e in events if e["kind"] == "budget_replan"]
    assert [(r["step"], r["grpo_steps"]) for r in replans if "grpo_steps" in r] == [
        (5, 12),
        (9, 16),
        (13, 19),
    ]
    (kl,) = [c for c in trainer.controllers if c.name == "kl_temperature"]
    assert kl.total_steps == 19


def test_the_warm_up_is_planned_again_at_its_measured_pace(tmp_path, tiny_overrides, monkeypatch):
    """The budget's clock is driven: the second warm-up step takes 10 s, the rest 2 s. Planned
    once at the slow step (before), the warm-up stopped at 3 steps, 17 of the 30 s its 30% of
    100 s allows; planned again at the recent pace whenever the plan runs out, it grows
    (3 -> 5 -> 7 -> 8 -> 9) and fills its share (5 + 10 + 7 x 2 = 29 s); GRPO follows."""
    from deepsynapse.rl import warmup

    overrides = tiny_overrides + ["sft.steps=100", "train.steps=2", "train.time_budget=100s"]
    overrides += ["train.budget_counts_evaluations=false", "train.save_every=0"]
    overrides += ["train.budget_sft_share=0.3"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False, reward_fns=EXTRA_REWARDS)
    now = [0.0]
    trainer.budget.clock, trainer.budget.started = (lambda: now[0]), 0.0
    step = warmup.warmup_step

    def timed_step(trainer, k: int):
        out = step(trainer, k)
        now[0] += (5.0, 10.0)[k] if k < 2 else 2.0  # the first step: not measured
        return out

    monkeypatch.setattr(warmup, "warmup_step", timed_step)
    trainer.train()
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    plans = [e["evidence"].get("sft_steps") for e in events if e["kind"] == "budget_plan"]
    replans = [
        (e["evidence"]["sft_step"], e["evidence"]["sft_steps"])
        for e in events
        if e["kind"] == "budget_replan" and "sft_steps" in e["evidence"]
    ]
    assert plans == [3, None]  # the warm-up's plan, then GRPO's
    assert replans == [(3, 5), (5, 7), (7, 8), (8, 9)]
    assert trainer.sft_step == 9 and trainer.step == 2


@pytest.mark.parametrize("counts", [True, False])
def test_time_budget_leaves_evaluations_off_the_clock_when_asked(tmp_path, tiny_overrides, counts):
    """``train.budget_counts_evaluations=false``: the held-out evaluations and the probes do
    not spend the budget (equal training time for configurations that decode at different
    speeds); by default they do."""
    overrides = tiny_overrides + ["train.time_budget=1h", "probes.every=1", "probes.heldout=2"]
    overrides += ["probes.per_skill=1", "probes.max_new_tokens=8"]  # probes run, briefly
    overrides += [f"train.budget_counts_evaluations={str(counts).lower()}"]
    trainer, _ = run(tmp_path, overrides)
    run_dir = tmp_path / "run"
    evals = sum(
        json.loads((run_dir / f"eval_{tag}.json").read_text())["seconds"]
        for tag in ("before", "after_sft", "after")
    )
    budget = trainer.budget
    if counts:
        assert budget.uncounted == 0.0
    else:  # every evaluation (and each step's probes) paused the clock
        assert budget.uncounted > evals > 0
        assert any(
            "off the clock" in e["message"]
            for e in read_jsonl(run_dir / "events.jsonl")
            if e["kind"] == "budget_plan"
        )


def test_time_budget_rescales_the_default_curriculum_and_the_sft_decay(tmp_path, tiny_overrides):
    """Schedules given as shares of the run follow the budget's plan, not the train.steps cap:
    the default curriculum's phase lengths and CHORD's decay with ``decay_share``."""
    overrides = tiny_overrides + ["train.steps=100", "train.time_budget=1s"]
    overrides += ["control.curriculum.enabled=true", "control.sft_mixing.enabled=true"]
    overrides += ["control.sft_mixing.decay_share=0.5", "control.sft_mixing.schedule=linear"]
    overrides += ["control.sft_mixing.mu0=0.4", "control.sft_mixing.batch_size=2"]
    trainer, _ = run(tmp_path, overrides)
    assert trainer.step == 2  # planned after the second step: the cap of 100 never counts
    (curriculum,) = [c for c in trainer.controllers if c.name == "curriculum"]
    (mixing,) = [c for c in trainer.controllers if c.name == "sft_mixing"]
    # built for 100 steps: phases of at most 30 and 40 steps, a decay over 50
    assert [p.max_steps for p in curriculum.phases] == [2, 2, None]
    assert mixing.decay_steps == 1
    weights = [
        m["knobs/sft_weight"]
        for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")
        if "knobs/sft_weight" in m
    ]
    # the plan comes after step 2, which still decayed over 50 steps; from step 3 on, mu is 0
    assert weights == pytest.approx([0.4, 0.4 * 49 / 50])
    assert mixing.weight(2) == 0.0
