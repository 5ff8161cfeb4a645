"""Phase curriculum on synthetic metric streams, and component locking on the tiny real model."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

from deepsynapse.control import curriculum as curriculum_module
from deepsynapse.control.build import ControlConfig, build_controllers, from_dict
from deepsynapse.control.curriculum import (
    ExitCriterion,
    PhaseCurriculum,
    PhaseSpec,
    apply_locking,
    default_phases,
    locking_summary,
    parameter_group,
    trainable_mask,
)
from deepsynapse.control.knobs import Knobs

WEIGHTS = {"correctness": 1.0, "strict_format": 0.5, "soft_format": 0.5}


def base_knobs() -> Knobs:
    return Knobs(temperature=0.9, beta=0.04, reward_weights=dict(WEIGHTS), max_new_tokens=128)


def two_phases(window=3, margin=0.05, min_steps=0, max_steps=None, op=">=", threshold=0.9):
    first = PhaseSpec(
        name="structure",
        reward_weights={"strict_format": 2.0},
        active_rewards=["strict_format", "soft_format"],
        beta=0.01,
        temperature=[1.2, 0.8],
        max_new_tokens=64,
        difficulty=[1, 2],
        lora_rank=4,
        trainable_groups=["lora_attn"],
        min_steps=min_steps,
        max_steps=max_steps,
        exit=ExitCriterion("format/valid_rate", threshold, op=op, window=window, margin=margin),
    )
    second = PhaseSpec(name="reasoning", lora_rank=8)
    return [first, second]


def run(cur: PhaseCurriculum, values, start=0, key="format/valid_rate"):
    """Feed one metric value per step; return (step, event) pairs."""
    out = []
    for i, v in enumerate(values):
        metrics = {} if v is None else {key: v}
        out += [(start + i, e) for e in cur.observe(start + i, metrics)]
    return out


def transitions(events):
    return [(s, e.evidence["reason"]) for s, e in events if e.kind == "phase_transition"]


def test_transition_fires_when_the_criterion_held_over_the_window():
    cur = PhaseCurriculum(two_phases(window=3), base_knobs())
    events = run(cur, [0.5, 0.95, 0.95, 0.95, 0.95])
    assert transitions(events) == [(3, "criterion")]
    ev = next(e for _, e in events if e.kind == "phase_transition")
    assert ev.evidence["from"] == "structure" and ev.evidence["to"] == "reasoning"
    assert ev.evidence["held"] == 3 and ev.evidence["value"] == 0.95
    assert cur.index == 1 and cur.phase_step == 1  # step 4 already ran in phase 2


def test_min_steps_delays_and_max_steps_forces_a_transition():
    cur = PhaseCurriculum(two_phases(window=2, min_steps=5), base_knobs())
    assert transitions(run(cur, [0.95] * 6)) == [(4, "criterion")]
    cur = PhaseCurriculum(two_phases(window=2, max_steps=4), base_knobs())
    assert transitions(run(cur, [0.1] * 6)) == [(3, "max_steps")]


def test_hysteresis_dead_band_holds_and_a_real_drop_resets():
    # 0.87 is inside [0.85, 0.9): the count neither grows nor resets
    cur = PhaseCurriculum(two_phases(window=3, margin=0.05), base_knobs())
    assert transitions(run(cur, [0.95, 0.95, 0.87, 0.95])) == [(3, "criterion")]
    # 0.8 is below 0.85: the count resets, so three more good steps are needed
    cur = PhaseCurriculum(two_phases(window=3, margin=0.05), base_knobs())
    events = run(cur, [0.95, 0.95, 0.8, 0.95, 0.95, 0.95])
    assert transitions(events) == [(5, "criterion")]
    resets = [(s, e) for s, e in events if e.kind == "curriculum_criterion_reset"]
    assert [s for s, _ in resets] == [2] and resets[0][1].evidence["held_before"] == 2
    # a metric hovering just under the threshold never completes the window
    cur = PhaseCurriculum(two_phases(window=3, margin=0.05), base_knobs())
    assert transitions(run(cur, [0.89] * 50)) == []


def test_less_or_equal_criterion_mirrors_the_band():
    cur = PhaseCurriculum(two_phases(window=2, op="<=", threshold=0.2, margin=0.05), base_knobs())
    # 0.22 is in the band (0.2, 0.25]: holds; 0.3 resets
    events = run(cur, [0.1, 0.3, 0.1, 0.22, 0.15])
    assert transitions(events) == [(4, "criterion")]


def test_missing_metric_is_reported_once_and_changes_nothing():
    cur = PhaseCurriculum(two_phases(window=2), base_knobs())
    events = run(cur, [0.95, None, None, 0.95])
    kinds = [e.kind for _, e in events]
    assert kinds.count("curriculum_metric_missing") == 1
    assert transitions(events) == [(3, "criterion")]


def test_last_phase_never_ends():
    cur = PhaseCurriculum([PhaseSpec(name="only", max_steps=2)], base_knobs())
    assert run(cur, [1.0] * 10) == []
    assert cur.index == 0 and cur.phase_step == 10


def test_apply_writes_phase_settings_and_unset_fields_fall_back_to_the_config():
    cur = PhaseCurriculum(two_phases(window=1), base_knobs())
    k = base_knobs()
    cur.apply(k)
    assert (k.phase, k.phase_index, k.phase_step) == ("structure", 0, 0)
    # phase weights over the config's, and components outside active_rewards get 0
    assert k.reward_weights == {"correctness": 0.0, "strict_format": 2.0, "soft_format": 0.5}
    assert k.active_rewards == ["strict_format", "soft_format"]
    assert (k.beta, k.temperature, k.max_new_tokens) == (0.01, 1.2, 64)
    assert k.difficulty == (1, 2) and k.trainable_groups == ["lora_attn"] and k.lora_rank == 4
    run(cur, [0.95])
    cur.apply(k)  # the same knobs object carries phase 1's values in
    assert (k.phase, k.phase_index, k.phase_step) == ("reasoning", 1, 0)
    assert k.reward_weights == WEIGHTS and k.active_rewards is None
    assert (k.beta, k.temperature, k.max_new_tokens) == (0.04, 0.9, 128)
    assert k.difficulty is None and k.trainable_groups == ["all"] and k.lora_rank == 8


def test_position_gives_phase_horizon_for_schedules():
    phases = [PhaseSpec(name="a", max_steps=10, temperature=[1.0, 0.5]), PhaseSpec(name="b")]
    cur = PhaseCurriculum(phases, base_knobs(), total_steps=30)
    assert cur.position().horizon == 10 and cur.position().temperature == (1.0, 0.5)
    run(cur, [None] * 10)
    pos = cur.position()
    assert (pos.index, pos.name, pos.step, pos.horizon) == (1, "b", 0, 20)


def test_state_round_trip_continues_identically():
    stream = [0.5, 0.95, 0.8, 0.95, 0.95, 0.95, 0.7, 0.99, 0.99, 0.99, 0.99]
    phases = [*two_phases(window=2)[:1], PhaseSpec(name="middle", max_steps=3), two_phases()[1]]
    a = PhaseCurriculum(phases, base_knobs())
    run(a, stream[:5])
    b = PhaseCurriculum(phases, base_knobs())
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    ea, eb = run(a, stream[5:], start=5), run(b, stream[5:], start=5)
    assert [(s, e.kind, e.evidence) for s, e in ea] == [(s, e.kind, e.evidence) for s, e in eb]
    ka, kb = base_knobs(), base_knobs()
    a.apply(ka)
    b.apply(kb)
    assert vars(ka) == vars(kb) and a.state_dict() == b.state_dict()
    other = PhaseCurriculum([PhaseSpec(name="x"), PhaseSpec(name="y")], base_knobs())
    with pytest.raises(ValueError, match="reasoning"):
        other.load_state_dict(a.state_dict())


def test_default_phases_shift_emphasis_and_scale_with_the_run():
    phases = default_phases(WEIGHTS, base_beta=0.04, total_steps=100, ranks=[4, 8, 16])
    assert [p.name for p in phases] == ["structure", "reasoning", "precision"]
    s, r, p = phases
    assert s.reward_weights["strict_format"] > r.reward_weights["strict_format"]
    assert p.reward_weights["correctness"] > r.reward_weights["correctness"]
    assert s.beta < r.beta < p.beta and [x.lora_rank for x in phases] == [4, 8, 16]
    assert s.exit.metric == "format/valid_rate" and s.exit.window == 10
    assert s.max_steps == 30 and r.max_steps == 40 and p.max_steps is None and p.exit is None


def test_specs_from_plain_dicts_are_strict():
    spec = from_dict(
        PhaseSpec,
        {"name": "a", "temperature": [1, 0.5], "exit": {"metric": "m", "threshold": 1}},
    )
    assert spec.temperature == [1.0, 0.5] and spec.exit.window == 20
    with pytest.raises(ValueError, match="unknown key 'exit.windw'; did you mean 'exit.window'"):
        from_dict(PhaseSpec, {"name": "a", "exit": {"metric": "m", "threshold": 1, "windw": 3}})
    with pytest.raises(ValueError, match="temperature"):
        from_dict(PhaseSpec, {"name": "a", "temperature": [0.5, 1.0]})
    with pytest.raises(ValueError, match="unknown group 'lora_attention'"):
        from_dict(PhaseSpec, {"name": "a", "trainable_groups": ["lora_attention"]})
    with pytest.raises(ValueError, match="missing key"):
        from_dict(PhaseSpec, {"beta": 0.1})
    with pytest.raises(ValueError, match="expected an integer"):
        from_dict(PhaseSpec, {"name": "a", "min_steps": "many"})


def test_build_checks_phase_reward_names_and_duplicates():
    section = {
        "curriculum": {
            "enabled": True,
            "phases": [{"name": "a", "reward_weights": {"corectness": 1}}],
        }
    }
    with pytest.raises(ValueError, match="did you mean 'correctness'"):
        build_controllers(section, base=base_knobs(), total_steps=10)
    section = {"curriculum": {"enabled": True, "phases": [{"name": "a"}, {"name": "a"}]}}
    with pytest.raises(ValueError, match="duplicate"):
        build_controllers(section, base=base_knobs(), total_steps=10)
    assert build_controllers(ControlConfig(), base=base_knobs(), total_steps=10) == []


def test_module_doctests():
    assert doctest.testmod(curriculum_module).failed == 0


# ---------------------------------------------------------------- component locking


def test_parameter_groups_of_peft_and_added_modules():
    prefix = "base_model.model.model.layers.0"
    assert parameter_group(f"{prefix}.self_attn.k_proj.lora_B.default.weight") == "lora_attn"
    assert parameter_group(f"{prefix}.mlp.up_proj.lora_A.default.weight") == "lora_mlp"
    assert parameter_group(f"{prefix}.mlp.up_proj.base_layer.weight") == "base"
    assert parameter_group(f"{prefix}.input_layernorm.weight") == "base"
    assert parameter_group("hypernet.layers.0.lora_scale") == "hypernet"
    assert parameter_group("memory_module.slots") == "memory"
    assert parameter_group("verifier_head.weight") == "verifier"
    assert parameter_group("base_model.model.lm_head.lora_A.default.weight") == "lora_other"
    names = [
        f"{prefix}.self_attn.q_proj.lora_A.default.weight",
        f"{prefix}.mlp.up_proj.lora_A.default.weight",
        f"{prefix}.mlp.up_proj.base_layer.weight",
        "hypernet.w",
    ]
    assert trainable_mask(names, ["lora_mlp", "hypernet"]) == {names[1], names[3]}
    assert trainable_mask(names, ["lora"]) == {names[0], names[1]}
    assert trainable_mask(names, ["all"]) == {names[0], names[1], names[3]}


@pytest.fixture(scope="module")
def tiny_peft():
    from deepsynapse.models.loading import load_model, load_tokenizer
    from deepsynapse.models.policy import apply_lora

    tokenizer = load_tokenizer("tiny-random")
    torch.manual_seed(0)
    model = load_model("tiny-random", torch.float32, tokenizer)
    return apply_lora(model, 4, 8, 0.0, ["all-linear"])


def _loss(model) -> torch.Tensor:
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    return model(input_ids=ids, labels=ids).loss


def snapshot(model, group: str) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if parameter_group(n) == group
    }


def test_locked_groups_stay_bit_identical_and_optimizer_state_is_kept(tiny_peft):
    model = tiny_peft
    base_before = {n: p.requires_grad for n, p in model.named_parameters()}
    adapter = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # the optimizer is built once, over every adapter parameter, before any locking
    opt = torch.optim.AdamW([p for _, p in adapter], lr=1e-2, weight_decay=0.1)
    lockable = {n for n, _ in adapter}

    def step():
        opt.zero_grad(set_to_none=True)
        _loss(model).backward()
        opt.step()

    step()  # one step with everything trainable: every adapter tensor has AdamW state
    changes = apply_locking(model, ["lora_mlp"], lockable=lockable)
    assert changes and all(parameter_group(n) == "lora_attn" and not v for n, v in changes.items())
    assert locking_summary(changes) == {"lora_attn": {"locked": 16, "unlocked": 0}}
    attn_before, mlp_before = snapshot(model, "lora_attn"), snapshot(model, "lora_mlp")
    attn_state = {
        n: {k: v.clone() for k, v in opt.state[p].items()}
        for n, p in adapter
        if parameter_group(n) == "lora_attn"
    }
    for _ in range(2):
        step()
    attn_after, mlp_after = snapshot(model, "lora_attn"), snapshot(model, "lora_mlp")
    assert all(torch.equal(attn_before[n], attn_after[n]) for n in attn_before)  # bit-identical
    assert all(not torch.equal(mlp_before[n], mlp_after[n]) for n in mlp_before)
    for n, p in adapter:
        if parameter_group(n) == "lora_attn":  # locked: grad None, AdamW left its state alone
            assert p.grad is None
            assert all(torch.equal(opt.state[p][k], attn_state[n][k]) for k in attn_state[n])
        else:  # still trainable: its AdamW state carried on through all three steps
            assert float(opt.state[p]["step"]) == 3.0
    # unlocking brings the attention adapters back, with the moments they had
    changes = apply_locking(model, ["lora"], lockable=lockable)
    assert set(changes) == set(attn_before) and all(changes.values())
    step()
    assert all(
        not torch.equal(attn_before[n], p) for n, p in model.named_parameters() if n in attn_before
    )
    # the base model was never unfrozen, even by "all"
    apply_locking(model, ["all"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == base_before
