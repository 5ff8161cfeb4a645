"""A part-effect test for every DeepSynapse part (README, "The DeepSynapse parts"), at trainer
level on tiny-random.

Switched off, a part leaves the step bit-identical to plain GRPO: the same sampled texts,
fused reward, advantages and gradients. Switched on, it changes what the loss sees (fused
reward, advantages, gradient, sampling temperature, trainable set, rank) in the direction
its documentation gives. A part that only logs fails here.

Where a direction needs known completions, a ``texts`` function given to :class:`Harness`
replaces the sampled completions with hand-written ones (tokenised, so the loss trains on
them as on sampled ones); the rest of the step (rewards, fusion, advantages, controllers,
update) is the real one. A part's effect
on the fused reward is measured against plain fusion of the same batch: the default
components with their configured weights (calibration none), which is what plain GRPO
computes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import EXTRA_REWARDS, TINY

from deepsynapse.config import load_config
from deepsynapse.data.synthetic import VARIANTS
from deepsynapse.prompting import build_prompt
from deepsynapse.rewards.fusion import rank_in_groups
from deepsynapse.rl.batch import GroupBatch
from deepsynapse.rl.evaluation import run_probes
from deepsynapse.rl.grpo import ADVANTAGE_ESTIMATORS
from deepsynapse.rl.trainer import Trainer
from deepsynapse.rl.warmup import run_warmup
from deepsynapse.rollout.hf import RolloutOutput, encode_prompts
from deepsynapse.telemetry.run_logger import read_jsonl

# train.trim_memory is memory hygiene, not a part: its mmap'd buffers cost page faults.
PLAIN = [*TINY, "sft.steps=0", "eval.limit=0", "train.save_every=0", "train.trim_memory=false"]
PLAIN_WEIGHTS = {
    "correctness": 1.0,
    "strict_format": 0.5,
    "soft_format": 0.5,
    "completion_length": 0.2,
}


def weights(**extra: float) -> str:
    """A ``rewards.weights`` override: the plain weights plus ``extra``."""
    table = {**PLAIN_WEIGHTS, **extra}
    return "rewards.weights={" + ", ".join(f"{k}: {v}" for k, v in table.items()) + "}"


assert weights() in TINY, "PLAIN_WEIGHTS must be conftest.TINY's rewards.weights"


# ------------------------------------------------------------------ observing a step


@dataclass
class Step:
    """What the loss of one step saw."""

    texts: list[str]
    problems: list[str]
    reward: torch.Tensor
    advantages: torch.Tensor
    scores: dict[str, list[float | None]]
    calibrated: dict[str, list[float | None]]
    correct: torch.Tensor
    grads: dict[str, torch.Tensor | None]  # every trainable parameter; None = no gradient
    metrics: dict[str, float]
    knobs: Any
    batch: GroupBatch
    rollout_knobs: list[Any] = field(default_factory=list)  # knobs each rollout round got


class Harness:
    """A Trainer whose steps are observed: gradients before clipping, rollout knobs."""

    def __init__(self, run_dir, overrides: list[str], texts=None):
        cfg = load_config(None, overrides)
        self.trainer = Trainer(cfg, run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS)
        self.steps: list[Step] = []
        self._grads: dict[str, torch.Tensor | None] = {}
        self._rounds: list[Any] = []
        t = self.trainer
        original_clip, original_rollout = t.clip_and_step, t.rollout

        def clip_and_step() -> float:
            self._grads = {
                n: None if p.grad is None else p.grad.detach().clone()
                for n, p in t.unwrapped.named_parameters()
                if p.requires_grad
            }
            return original_clip()

        def rollout(problems, knobs):
            self._rounds.append(knobs.copy())
            if texts is None:
                return original_rollout(problems, knobs)
            return scripted_batch(t, problems, texts(problems))

        t.clip_and_step = clip_and_step
        t.rollout = rollout

    def step(self) -> Step:
        t = self.trainer
        self._rounds = []
        metrics = t.train_step(t.step)
        t.step += 1
        b = t._last_batch
        s = Step(
            texts=list(b.rollout.texts),
            problems=[p.id for p in b.problems],
            reward=b.reward.detach().clone(),
            advantages=b.advantages.detach().clone(),
            scores={k: list(v) for k, v in b.scores.items()},
            calibrated={k: list(v) for k, v in b.calibrated.items()},
            correct=b.correct.clone(),
            grads=self._grads,
            metrics=metrics,
            knobs=t.knobs.copy(),
            batch=b,
            rollout_knobs=self._rounds,
        )
        self.steps.append(s)
        return s


def harness(tmp_path_factory, overrides: list[str], texts=None, name: str = "run") -> Harness:
    return Harness(tmp_path_factory.mktemp(name) / "run", overrides, texts)


def scripted_batch(trainer: Trainer, problems, texts: list[str]) -> GroupBatch:
    """A rollout of hand-written completions, tokenised as the loss reads sampled ones."""
    tok = trainer.tokenizer
    g = trainer.cfg.rollout.num_generations
    assert len(texts) == len(problems) * g
    prompts = [build_prompt(tok, p.question, trainer.schema) for p in problems]
    pid, pmask = encode_prompts(tok, prompts, trainer.accelerator.device)
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    out = RolloutOutput(
        pid.repeat_interleave(g, 0),
        pmask.repeat_interleave(g, 0),
        ids,
        mask,
        list(texts),
        torch.zeros(len(rows), dtype=torch.bool),
    )
    n = len(texts)
    return GroupBatch(list(problems), prompts, out, {}, torch.zeros(n), torch.zeros(n))


def plain_fused(step: Step, table: dict[str, float] = PLAIN_WEIGHTS) -> torch.Tensor:
    """The fused reward plain GRPO gives this batch: raw scores, the plain weights."""
    total = torch.zeros(len(step.texts))
    for name, w in table.items():
        total += w * torch.tensor([0.0 if v is None else v for v in step.scores[name]])
    return total


def hand_fused(values: dict[str, list[float | None]], table: dict[str, float]) -> torch.Tensor:
    n = len(next(iter(values.values())))
    total = torch.zeros(n)
    for name, column in values.items():
        total += table.get(name, 0.0) * torch.tensor([0.0 if v is None else v for v in column])
    return total


def advantages_of(reward: torch.Tensor, g: int) -> torch.Tensor:
    return ADVANTAGE_ESTIMATORS["grpo"](reward, g)


def lora_b(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainer.unwrapped.named_parameters() if ".lora_B." in n}


def nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.abs().sum() > 0)


def xml(answer: str, reasoning: str = "2 + 2 = 4", **extra: str) -> str:
    body = f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"
    for tag, value in extra.items():
        body += f"\n<{tag}>\n{value}\n</{tag}>"
    return body


def wrong(answer: str) -> str:
    return str(int(float(answer)) + 1000)


@torch.no_grad()
def completion_logp(
    trainer: Trainer, batch: GroupBatch, adaptive: bool = True, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probs of ``batch``'s completions under the current policy [N, T]."""
    r = batch.rollout
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    ctx = trainer.adaptive.for_rows(r.prompt_ids, r.prompt_mask) if adaptive else None
    policy = trainer.unwrapped
    if ctx is None:
        return policy(ids, attn, r.completion_mask, temperature).logp
    with ctx:
        return policy(ids, attn, r.completion_mask, temperature).logp


# ------------------------------------------------------------------ plain GRPO


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> list[Step]:
    """Plain GRPO (the default rewards, every part off): two steps."""
    h = harness(tmp_path_factory, PLAIN, name="baseline")
    return [h.step(), h.step()]


def assert_bit_identical(got: Step, want: Step) -> None:
    assert got.texts == want.texts
    assert got.problems == want.problems
    assert torch.equal(got.reward, want.reward)
    assert torch.equal(got.advantages, want.advantages)
    assert got.grads.keys() == want.grads.keys()
    for name, g in want.grads.items():
        h = got.grads[name]
        assert (g is None) == (h is None), name
        assert g is None or torch.equal(g, h), name


OFF_SWITCHES = [
    "hypernet.enabled=false",
    "memory.enabled=false",
    "control.curriculum.enabled=false",
    "discovery.enabled=false",
    "control.kl_temperature.enabled=false",
    "control.accumulation.enabled=false",
    "control.data_curriculum.enabled=false",
    "control.sft_mixing.enabled=false",
    "lora.module_scales=false",
    "lora.nested_rank=false",
    "rewards.allocator=static",
    "rewards.calibration=none",
    "rewards.kl_mode=loss",
]


@pytest.mark.parametrize("switch", OFF_SWITCHES)
def test_part_switched_off_is_plain_grpo(tmp_path_factory, baseline, switch):
    h = harness(tmp_path_factory, [*PLAIN, switch], name="off")
    got = h.step()
    assert_bit_identical(got, baseline[0])
    assert any(nonzero(g) for g in got.grads.values())  # the comparison is not of zeros


@pytest.mark.parametrize("iterations", [1, 2])
def test_plain_grpo_step_makes_what_it_rewards_more_likely(tmp_path_factory, iterations):
    """The step ascends its objective: completions with positive advantage gain log-probability
    against those with negative advantage, and sum(A * delta log p) > 0 (first order in the
    step). The hour runs' held-out accuracy did not move under GRPO; this rules out the sign."""

    def texts(problems):
        # per problem: 2 right, 2 wrong, with the same reasoning, so correctness decides
        return [xml(a) for p in problems for a in (p.answer, wrong(p.answer)) * 2]

    overrides = [
        *PLAIN,
        "rollout.num_generations=4",
        "grpo.micro_batch_size=4",
        f"grpo.num_iterations={iterations}",
        "optim.lr=1e-4",
        "optim.warmup_steps=0",
    ]
    h = harness(tmp_path_factory, overrides, texts, name="ascends")
    t = h.trainer
    before = {n: p.detach().clone() for n, p in t.unwrapped.named_parameters() if p.requires_grad}
    step = h.step()

    def seq_logp() -> torch.Tensor:
        logp = completion_logp(t, step.batch, temperature=t.cfg.rollout.temperature)
        return (logp * step.batch.rollout.completion_mask).sum(1)

    after = seq_logp()
    with torch.no_grad():
        for n, p in t.unwrapped.named_parameters():
            if n in before:
                p.copy_(before[n])
    delta = after - seq_logp()
    adv = step.advantages
    right, wrong_rows = step.correct.bool(), ~step.correct.bool()
    assert right.any() and wrong_rows.any()
    assert float((adv * delta).sum()) > 0
    assert float(delta[right].mean()) > float(delta[wrong_rows].mean())
    assert float(adv[right].mean()) > 0 > float(adv[wrong_rows].mean())


# ------------------------------------------------------------------ reward parts

SCRIPTED = [*PLAIN, "data.train=synthetic", "data.synthetic_size=8"]
G4 = ["rollout.num_generations=4", "grpo.micro_batch_size=8"]
LONG = " ".join(f"{i} + 1 = {i + 1}." for i in range(6))  # 75 tokens as xml()


@pytest.mark.parametrize("penalty", ["linear", "cosine", "truncation"])
def test_structure_guardian_grades_xml_and_length_penalty_cuts_long(tmp_path_factory, penalty):
    """structure pays more the closer to valid XML; length_penalty takes more from a
    completion over the budget than from one within it: linear and DLER truncation flip a
    group that completion_length alone ranks long-first (cosine is already near -1 at 80%
    of the budget, so it does not)."""

    def texts(problems):
        first, second = problems
        return [
            xml(first.answer),
            "Sure! " + xml(first.answer),  # text outside the fields
            f"<reasoning>\n{first.answer}",  # unclosed, no answer
            f"the answer is {first.answer}",  # no field at all
            *[xml(second.answer), xml(second.answer, reasoning=LONG)] * 2,
        ]

    overrides = [
        *SCRIPTED,
        *G4,
        weights(structure=1.0, length_penalty=1.0),
        f"rewards.length_penalty={penalty}",
        "rewards.length_budget=36",
    ]
    s = harness(tmp_path_factory, overrides, texts).step()
    st, lp = s.scores["structure"], s.scores["length_penalty"]
    assert st[0] == 1.0 > st[1] > st[2] > st[3] == 0.0  # graded
    assert lp[5] == lp[7] == -1.0 < lp[4] == lp[6] <= 0.0  # ~75 and ~30 tokens, budget 36
    # The fused reward is plain fusion plus exactly these two components.
    delta = s.reward - plain_fused(s)
    torch.testing.assert_close(delta, torch.tensor(st) + torch.tensor(lp))
    plain_adv = advantages_of(plain_fused(s), 4)
    assert plain_adv[5] > plain_adv[4]  # plain GRPO pays the long one (completion_length)
    if penalty != "cosine":
        assert lp[4] == 0.0 and s.advantages[4] > s.advantages[5]  # the penalty reverses it
    assert (s.advantages[:4].diff() < 0).all()  # valid > text outside > unclosed > none
    assert s.metrics["format/errors/text_outside"] > 0  # the named error counts are logged


def test_contrastive_reward_is_the_gold_share_against_three_distractors(tmp_path_factory):
    expected = []

    def texts(problems):  # runs before the update: the policy that scores the rewards
        from deepsynapse.rewards.contrastive import answer_context, answer_continuation

        p = problems[0]
        t = h.trainer
        lps = t.scorer.continuation_logprobs(
            [
                answer_context(
                    build_prompt(t.tokenizer, p.question, t.schema), f"so it is {p.answer}"
                )
            ],
            [[answer_continuation(x) for x in [p.answer, *p.columns["distractors"]]]],
        )[0]
        expected.append(math.exp(lps[0]) / sum(math.exp(x) for x in lps))
        return [
            t
            for p in problems
            for t in (xml(p.answer, reasoning=f"so it is {p.answer}"), xml(p.answer), "none")
            + (xml(wrong(p.answer)),)
        ]

    h = harness(tmp_path_factory, [*SCRIPTED, *G4, weights(contrastive=1.0)], texts)
    s = h.step()
    for p in s.batch.problems:  # triple anchoring: numeric, semantic, unit
        assert p.columns["distractor_kinds"] == ["numeric", "semantic", "unit"]
        assert len(set(p.columns["distractors"]) | {p.answer}) == 4
    c = s.scores["contrastive"]
    assert c[2] is None and c[6] is None  # no reasoning: nothing to score
    assert c[0] == pytest.approx(expected[0], rel=1e-4)  # gold's softmax share of four
    assert 0.0 < c[0] < 1.0 and len({round(x, 9) for x in c if x is not None}) > 2
    torch.testing.assert_close(
        s.reward - plain_fused(s), torch.tensor([0.0 if x is None else x for x in c])
    )
    assert not torch.equal(s.advantages, advantages_of(plain_fused(s), 4))


@pytest.mark.parametrize("dynamic_sampling", [True, False], ids=["dynamic", "every-group"])
def test_contrastive_scores_only_the_groups_dynamic_sampling_keeps(
    tmp_path_factory, monkeypatch, dynamic_sampling
):
    """The contrastive reward runs the policy over every completion it scores (full
    DeepSynapse, third study: 30 s of a 171 s step, while dynamic sampling kept 24% of the
    drawn groups). Group 0 is all right (no signal: dropped), group 1 half right: with
    dynamic sampling only group 1 is scored (group 0 gets None, and is dropped); without
    it, every completion is scored."""
    from deepsynapse.rewards.contrastive import ContrastiveReward

    seen: list[list[str]] = []
    original = ContrastiveReward.__call__

    def spy(self, prompts, completions, **columns):
        seen.append(list(completions))
        return original(self, prompts, completions, **columns)

    monkeypatch.setattr(ContrastiveReward, "__call__", spy)

    def texts(problems):
        a, b = problems
        right = [xml(a.answer, reasoning=f"it is {a.answer} ({k})") for k in range(4)]
        mixed = [xml(b.answer, "so"), xml(wrong(b.answer), "so"), xml(b.answer, "x"), "none"]
        return right + mixed

    overrides = [
        *SCRIPTED,
        *G4,
        weights(contrastive=1.0),
        f"grpo.dynamic_sampling={str(dynamic_sampling).lower()}",
        "grpo.max_resample_rounds=0",
    ]
    h = harness(tmp_path_factory, overrides, texts)
    s = h.step()
    assert len(seen) == 1
    if dynamic_sampling:
        assert seen[0] == s.texts and len(s.texts) == 4  # the kept group, and only it
    else:
        assert len(seen[0]) == 8 and seen[0] == s.texts
    c = s.scores["contrastive"]
    assert c[3 if dynamic_sampling else 7] is None  # "none": no reasoning to score
    assert all(x is not None for x in c[-4:-1])


CRITIQUE_KINDS = {
    # (answer right?, confidence, critique)
    "right_sure": (True, "0.9", "It is correct."),
    "wrong_sure": (False, "0.9", "It is correct."),
    "wrong_unsure": (False, "0.1", "A mistake."),
    "right_unsure": (True, "0.1", "A mistake."),
}
REASONING = {  # what the verifier can learn from (it never reads critique or confidence)
    True: "worked out and checked",
    False: "a quick guess",
}


def test_critique_validation_pays_honest_confidence_critique_and_verifier(tmp_path_factory):
    """Schema deepsynapse. The verifier judges only after 64 labelled examples: step 1 draws
    them as rollout rounds that dynamic sampling drops (each group all right or all wrong),
    and every drawn round is scored, so the verifier learns from each; step 2 has signal."""
    kinds = list(CRITIQUE_KINDS)
    rounds = []

    def texts(problems):
        rounds.append(len(rounds))
        out = []
        for i, p in enumerate(problems):
            if h.trainer.step == 0:  # one group all right, the other all wrong
                right = (i + len(rounds)) % 2 == 0
                claims = [("0.9", "It is correct."), ("0.1", "A mistake.")] * 2
                picked = [(right, conf, crit) for conf, crit in claims]
            else:
                picked = [CRITIQUE_KINDS[k] for k in kinds]
            for right, conf, critique in picked:
                answer = p.answer if right else wrong(p.answer)
                out.append(xml(answer, REASONING[right], critique=critique, confidence=conf))
        return out

    overrides = [
        *SCRIPTED,
        *G4,
        "rewards.schema=deepsynapse",
        weights(calibration=1.0, critique_consistency=1.0, verifier=1.0),
        "rewards.verifier_backbone=hashing",
        "grpo.dynamic_sampling=true",
        "grpo.max_resample_rounds=7",
    ]
    h = harness(tmp_path_factory, overrides, texts)
    first = h.step()
    assert len(first.rollout_knobs) == 8 and first.metrics["verifier/examples"] == 64
    assert all(v is None for v in first.scores["verifier"])  # an untrained judge: no say
    s = h.step()
    at = {k: i for i, k in enumerate(kinds)}  # row of each kind in the first group
    cal, crit, ver = s.scores["calibration"], s.scores["critique_consistency"], s.scores["verifier"]
    # Calibration (Brier, plus the confidently-wrong penalty): honest confidence pays.
    assert cal[at["wrong_unsure"]] > cal[at["right_unsure"]] > cal[at["wrong_sure"]]
    assert cal[at["right_sure"]] > cal[at["right_unsure"]]
    # Critique consistency: a verdict that matches the truth +1, one that does not -1.
    assert crit[at["right_sure"]] == crit[at["wrong_unsure"]] == 1.0
    assert crit[at["wrong_sure"]] == crit[at["right_unsure"]] == -1.0
    # Verifier: agreement of the claim with what it learnt from step 1's labels.
    assert all(x is not None for x in ver)
    assert ver[at["right_sure"]] > ver[at["wrong_sure"]]
    assert ver[at["wrong_unsure"]] > ver[at["right_unsure"]]
    parts = ("calibration", "critique_consistency", "verifier")
    torch.testing.assert_close(
        s.reward - plain_fused(s),
        hand_fused({k: s.scores[k] for k in parts}, dict.fromkeys(parts, 1.0)),
    )
    # Two wrong answers: plain GRPO scores them alike; now the honest one is ahead.
    plain = advantages_of(plain_fused(s), 4)
    gap = s.advantages[at["wrong_unsure"]] - s.advantages[at["wrong_sure"]]
    assert gap > 0 and gap > plain[at["wrong_unsure"]] - plain[at["wrong_sure"]]


def varied(problems):
    """Per group: right and short, wrong and long, right and long, garbage."""
    return [
        t
        for p in problems
        for t in (
            xml(p.answer),
            xml(wrong(p.answer), reasoning=LONG),
            xml(p.answer, reasoning="6 * 7 = 42 and 42 - 2 = 40"),
            "no idea " * 5,
        )
    ]


@pytest.mark.parametrize("calibration", ["rank", "running"])
def test_fusion_calibration_puts_components_on_one_scale(tmp_path_factory, calibration):
    h = harness(tmp_path_factory, [*SCRIPTED, *G4, f"rewards.calibration={calibration}"], varied)
    s = h.step()
    for name, raw in s.scores.items():
        cal = s.calibrated[name]
        if calibration == "rank":
            assert cal == rank_in_groups(raw, 4), name
        else:  # the first batch is calibrated against itself: z-scores
            x = torch.tensor(raw)
            want = (x - x.mean()) / (x.std(unbiased=False) + 1e-6)
            torch.testing.assert_close(torch.tensor(cal), want.clamp(-5, 5), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.reward, hand_fused(s.calibrated, PLAIN_WEIGHTS))
    assert not torch.allclose(s.reward, plain_fused(s))
    assert not torch.allclose(s.advantages, advantages_of(plain_fused(s), 4))


def test_kl_as_reward_objective_takes_kl_from_the_reward_and_beta_from_the_loss(
    tmp_path_factory, loss_betas
):
    h = harness(
        tmp_path_factory, [*SCRIPTED, *G4, "rewards.kl_mode=reward", weights(kl=1.0)], varied
    )
    (first, second), seen = per_step(h, 2, loss_betas)
    assert seen == [{0.0}, {0.0}]  # no KL term in the loss
    for s in (first, second):
        assert s.knobs.beta == 0.0 and s.metrics["knobs/beta"] == 0.0  # grpo.beta is 0.04
    assert first.scores.keys() == second.scores.keys()
    assert all(k == 0.0 for k in first.calibrated["kl"])  # step 1: policy == reference
    kl = torch.tensor(second.calibrated["kl"])
    assert (kl >= 0).all() and (kl > 0).any()  # after one update the policy has moved
    # Each completion pays its own KL: the more it moved from the reference, the less reward.
    torch.testing.assert_close(second.reward, plain_fused(second) - kl)


# ------------------------------------------------------------------ allocators

PHASE_WEIGHTS = "{strict_format: 0.77, completion_length: 0.9}"


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "rewards.allocator=static",
            "control.curriculum.enabled=true",
            f"control.curriculum.phases=[{{name: only, reward_weights: {PHASE_WEIGHTS}}}]",
        ],
        ["rewards.allocator=phase", f"rewards.allocator_options={{phases: [{PHASE_WEIGHTS}]}}"],
    ],
    ids=["static-with-curriculum-phase", "phase-allocator"],
)
def test_phase_weights_reach_the_fused_reward(tmp_path_factory, overrides):
    s = harness(tmp_path_factory, [*SCRIPTED, *G4, *overrides], varied).step()
    applied = {**PLAIN_WEIGHTS, "strict_format": 0.77, "completion_length": 0.9}
    assert {k: s.metrics[f"weights/{k}"] for k in PLAIN_WEIGHTS} == applied
    torch.testing.assert_close(s.reward, plain_fused(s, applied))
    assert not torch.allclose(s.reward, plain_fused(s))


@pytest.mark.parametrize("allocator,steps", [("mirror", 2), ("neural", 3)])
def test_adaptive_allocator_moves_weight_toward_objectives_that_agree_with_correctness(
    tmp_path_factory, allocator, steps
):
    """In ``varied`` groups correctness, strict and soft format agree with correctness and
    completion_length disagrees (the wrong answer is the longest)."""
    h = harness(tmp_path_factory, [*SCRIPTED, *G4, f"rewards.allocator={allocator}"], varied)
    run = [h.step() for _ in range(steps)]
    first, last = run[0], run[-1]
    assert {k: first.metrics[f"weights/{k}"] for k in PLAIN_WEIGHTS} == pytest.approx(PLAIN_WEIGHTS)
    moved = {k: last.metrics[f"weights/{k}"] for k in PLAIN_WEIGHTS}
    assert moved["completion_length"] < PLAIN_WEIGHTS["completion_length"]
    assert moved["correctness"] > PLAIN_WEIGHTS["correctness"]
    torch.testing.assert_close(last.reward, plain_fused(last, moved))
    assert not torch.allclose(last.reward, plain_fused(last))


# ------------------------------------------------------------------ discovery and memory


def test_discovered_term_penalises_the_recurring_failure(tmp_path_factory):
    def texts(problems):  # half of the completions never close with an answer
        return [
            t for p in problems for t in (xml(p.answer), f"<reasoning>\n{p.answer}\n</reasoning>")
        ]

    overrides = [
        *SCRIPTED,
        "discovery.enabled=true",
        "discovery.min_records=4",
        "discovery.patience=1",
        "discovery.on_threshold=0.3",
        "discovery.cluster=false",
    ]
    h = harness(tmp_path_factory, overrides, texts)
    first, second = h.step(), h.step()
    assert not any(k.startswith("discovered_") for k in first.scores)
    torch.testing.assert_close(first.reward, plain_fused(first))
    term = "discovered_missing_answer_tag"
    assert second.knobs.reward_weights[term] == -0.5
    assert second.scores[term] == [0.0, 1.0, 0.0, 1.0]
    found = {k: v for k, v in second.scores.items() if k.startswith("discovered_")}
    delta = second.reward - plain_fused(second)
    torch.testing.assert_close(delta, hand_fused(found, second.knobs.reward_weights))
    assert delta[1] <= -0.5 and delta[3] <= -0.5


def test_memory_rewards_penalise_a_repeated_mistake_and_pay_a_new_answer(tmp_path_factory):
    state = {"step": 0}

    def texts(problems):
        state["step"] += 1
        if state["step"] == 1:  # the same wrong answer twice per problem
            return [xml(wrong(p.answer)) for p in problems for _ in range(2)]
        return [
            t for p in problems for t in (xml(wrong(p.answer)), xml(str(int(wrong(p.answer)) + 1)))
        ]

    overrides = [
        *SCRIPTED,
        "data.synthetic_size=2",  # both problems every step: the memory has seen them
        weights(repeat_mistake=1.0, novelty=0.5),
    ]
    h = harness(tmp_path_factory, overrides, texts)
    first, second = h.step(), h.step()
    assert set(first.problems) == set(second.problems)
    assert first.scores["repeat_mistake"] == [0.0] * 4  # nothing remembered yet
    assert first.scores["novelty"] == [1.0] * 4
    assert second.scores["repeat_mistake"] == [-0.75, 0.0] * 2  # given twice before
    assert second.scores["novelty"] == [0.0, 1.0] * 2
    delta = second.reward - plain_fused(second)
    torch.testing.assert_close(delta, torch.tensor([-0.75, 0.5] * 2))
    assert (second.advantages[1::2] > second.advantages[0::2]).all()


# ------------------------------------------------------------------ controllers


@pytest.fixture
def generate_calls(monkeypatch) -> list[dict[str, Any]]:
    """The arguments every real rollout passed to the decode loop."""
    import deepsynapse.rl.collect as collect_module

    calls: list[dict[str, Any]] = []
    original = collect_module.generate_groups

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(collect_module, "generate_groups", recording)
    return calls


@pytest.fixture
def loss_betas(monkeypatch) -> list[float]:
    """The KL coefficient every GRPO loss term was computed with."""
    import deepsynapse.rl.update as update_module

    betas: list[float] = []
    original = update_module.grpo_token_loss

    def recording(*args, **kwargs):
        betas.append(kwargs["beta"])
        return original(*args, **kwargs)

    monkeypatch.setattr(update_module, "grpo_token_loss", recording)
    return betas


def per_step(h: Harness, n: int, betas: list[float]) -> tuple[list[Step], list[set[float]]]:
    """``n`` steps and the set of loss betas of each."""
    steps, seen = [], []
    for _ in range(n):
        betas.clear()
        steps.append(h.step())
        seen.append(set(betas))
    return steps, seen


WARM_PHASE = (
    "{name: warm, reward_weights: {strict_format: 0.9, completion_length: 0.5},"
    " active_rewards: [correctness, strict_format, completion_length],"
    " trainable_groups: [lora_mlp], temperature: [0.7, 0.5], beta: 0.01, max_new_tokens: 6,"
    " difficulty: [1, 2], min_steps: 1, exit: {metric: completion/length_mean, threshold: 0,"
    " window: 1}}"
)


def test_curriculum_phase_sets_weights_locking_temperature_budget_and_data(
    tmp_path_factory, baseline, generate_calls, loss_betas
):
    overrides = [
        *PLAIN,
        "control.curriculum.enabled=true",
        f"control.curriculum.phases=[{WARM_PHASE}, {{name: main}}]",
    ]
    h = harness(tmp_path_factory, overrides)
    (warm, main), betas = per_step(h, 2, loss_betas)
    assert betas == [{0.01}, {0.04}]  # the phase's KL coefficient reaches the loss
    base = baseline[0]
    # Phase 1: what is sampled (temperature, budget, problems) ...
    assert [c["temperature"] for c in generate_calls] == [0.7, 1.0]
    assert [c["max_new_tokens"] for c in generate_calls] == [6, 12]
    assert int(warm.batch.rollout.lengths.max()) <= 6 < int(base.batch.rollout.lengths.max())
    assert all(1 <= p.difficulty <= 2 for p in warm.batch.problems)
    # ... the rewards scored, the weights they are fused with, the loss's KL coefficient ...
    applied = {**PLAIN_WEIGHTS, "strict_format": 0.9, "soft_format": 0.0, "completion_length": 0.5}
    assert {k: warm.metrics[f"weights/{k}"] for k in PLAIN_WEIGHTS} == applied
    assert "soft_format" not in warm.scores  # not an active reward in this phase
    torch.testing.assert_close(warm.reward, hand_fused(warm.scores, applied))
    # ... and what is trained: attention LoRA is locked (no gradient), the MLP's trains.
    attn = [n for n in base.grads if "self_attn" in n]
    mlp = [n for n in base.grads if ".mlp." in n]
    assert attn and mlp and set(warm.grads) == set(mlp)
    assert all(nonzero(warm.grads[n]) for n in mlp if ".lora_B." in n)
    assert warm.metrics["trainable/tensors"] < base.metrics["trainable/tensors"]
    # Phase 2 (measured exit after one step) returns to the configured settings.
    assert main.knobs.phase == "main"
    assert {k: main.metrics[f"weights/{k}"] for k in PLAIN_WEIGHTS} == PLAIN_WEIGHTS
    assert main.scores.keys() == base.scores.keys()
    torch.testing.assert_close(main.reward, plain_fused(main))
    assert set(main.grads) == set(base.grads)
    assert all(nonzero(main.grads[n]) for n in attn if ".lora_B." in n)


def test_default_curriculum_phases_act_without_a_phase_list(tmp_path_factory):
    s = harness(
        tmp_path_factory, [*SCRIPTED, *G4, "control.curriculum.enabled=true"], varied
    ).step()
    # structure phase: format and length x1.5, correctness x0.5, half the KL coefficient
    applied = {
        "correctness": 0.5,
        "strict_format": 0.75,
        "soft_format": 0.75,
        "completion_length": 0.2 * 1.5,
    }
    assert s.knobs.phase == "structure" and s.knobs.beta == 0.02
    assert {k: s.metrics[f"weights/{k}"] for k in PLAIN_WEIGHTS} == pytest.approx(applied)
    torch.testing.assert_close(s.reward, plain_fused(s, s.knobs.reward_weights))
    assert not torch.allclose(s.reward, plain_fused(s))


def test_curriculum_phase_length_budget_reaches_the_length_penalty(tmp_path_factory):
    def texts(problems):
        return [xml(p.answer, reasoning=LONG) for p in problems for _ in range(2)]

    overrides = [
        *SCRIPTED,
        weights(length_penalty=1.0),
        "rewards.length_budget=36",  # LONG (~75 tokens) is twice over it: -1
        "control.curriculum.enabled=true",
        "control.curriculum.phases=[{name: roomy, length_budget: 100}]",
    ]
    s = harness(tmp_path_factory, overrides, texts).step()
    assert s.metrics["knobs/length_budget"] == 100
    assert s.scores["length_penalty"] == [0.0] * 4


def test_kl_temperature_lowers_beta_under_target_then_cools_sampling_over_it(
    tmp_path_factory, generate_calls, loss_betas
):
    """Constant schedule, coupled: only the measured KL moves the knobs. Step 1 has KL 0
    (policy == reference), under any target: beta falls. Step 2 has KL > 0, over a 1e-9
    target: the temperature is cut before beta is touched."""
    overrides = [
        *PLAIN,
        "control.kl_temperature.enabled=true",
        "control.kl_temperature.schedule=constant",
        "control.kl_temperature.kl_target=1e-9",
        "control.kl_temperature.couple=true",
    ]
    h = harness(tmp_path_factory, overrides)
    steps, seen = per_step(h, 3, loss_betas)
    temps = [c["temperature"] for c in generate_calls]
    betas = [s.knobs.beta for s in steps]
    assert seen == [{b} for b in betas]  # the loss is computed with the controller's beta
    assert steps[1].metrics["kl/mean"] > 1e-9
    assert temps[:2] == [1.0, 1.0] and betas[0] == 0.04
    assert betas[1] < 0.04  # KL under target: beta lowered
    assert temps[2] == pytest.approx(0.95)  # KL over target: cooler sampling first ...
    assert betas[2] == betas[1]  # ... beta unchanged
    assert steps[2].metrics["knobs/temperature"] == pytest.approx(0.95)


def test_kl_clamp_bounds_what_the_kl_term_adds_to_the_gradient(tmp_path_factory, baseline):
    """Step 2 (policy moved off the reference): the KL term acts (beta 0.04, the default
    clamp 10, not reached: gradients differ from beta 0), and a clamp below every token's
    KL takes it out of the gradient (the same gradients as beta 0) and out of ``kl/mean``."""
    free = harness(tmp_path_factory, [*PLAIN, "grpo.beta=0"], name="beta0")
    free_steps = [free.step(), free.step()]
    tight = harness(tmp_path_factory, [*PLAIN, "grpo.kl_clamp=1e-12"], name="tight")
    tight_steps = [tight.step(), tight.step()]
    assert baseline[1].metrics["kl/mean"] > 1e-6
    assert tight_steps[1].metrics["kl/mean"] <= 1e-12
    moved = [n for n, g in baseline[1].grads.items() if g is not None and nonzero(g)]

    def gap(a: Step, b: Step) -> float:
        return max(float((a.grads[n] - b.grads[n]).abs().max()) for n in moved)

    # the KL term moves the gradient; clamped, what is left is the gradient of the tokens
    # whose KL is under the bound (float32 rounds a tiny KL to ~0): 1% of the term's here
    assert gap(tight_steps[1], free_steps[1]) < 0.05 * gap(baseline[1], free_steps[1])


def test_kl_temperature_by_default_answers_kl_with_beta_and_keeps_the_temperature(
    tmp_path_factory, generate_calls, loss_betas
):
    """The default (``couple=false``): the KL over its target raises the loss's beta at
    once; sampling stays at the schedule's temperature (a cut would raise the KL read)."""
    overrides = [
        *PLAIN,
        "control.kl_temperature.enabled=true",
        "control.kl_temperature.schedule=constant",
        "control.kl_temperature.kl_target=1e-9",
    ]
    h = harness(tmp_path_factory, overrides)
    steps, seen = per_step(h, 3, loss_betas)
    betas = [s.knobs.beta for s in steps]
    assert seen == [{b} for b in betas]
    assert steps[1].metrics["kl/mean"] > 1e-9
    assert [c["temperature"] for c in generate_calls][:3] == [1.0, 1.0, 1.0]
    assert betas[1] < betas[0] == 0.04 and betas[2] > betas[1]  # under, then over target


def test_kl_temperature_run_schedule_cools_sampling_over_the_run(tmp_path_factory):
    overrides = [
        *SCRIPTED,
        "train.steps=3",
        "control.kl_temperature.enabled=true",
        "control.kl_temperature.kl_target=1.0",  # far above: no coupled cut
        "control.kl_temperature.t_max=1.2",
        "control.kl_temperature.t_min=0.6",
    ]
    h = harness(tmp_path_factory, overrides, varied_g2)
    steps = [h.step() for _ in range(3)]
    temps = [s.rollout_knobs[0].temperature for s in steps]
    assert temps == pytest.approx([1.2, 0.9, 0.6])  # cosine from t_max to t_min
    assert [s.metrics["knobs/temperature"] for s in steps] == pytest.approx(temps)


def test_kl_temperature_keeps_beta_zero_when_kl_is_a_reward(tmp_path_factory, loss_betas):
    """With the KL in the reward, a beta in the loss would count it twice."""
    overrides = [
        *SCRIPTED,
        "rewards.kl_mode=reward",
        weights(kl=1.0),
        "control.kl_temperature.enabled=true",
        "control.kl_temperature.couple=true",
    ]
    h = harness(tmp_path_factory, overrides, varied_g2)
    steps, seen = per_step(h, 2, loss_betas)
    assert [s.knobs.beta for s in steps] == [0.0, 0.0] and seen == [{0.0}, {0.0}]
    assert steps[1].rollout_knobs[0].temperature < 1.0  # it still acts, through temperature


def varied_g2(problems):
    return [t for p in problems for t in (xml(p.answer), xml(wrong(p.answer), reasoning="a guess"))]


@pytest.mark.parametrize(
    "direction,options,rounds",
    [
        ("noisy", ["low=0.99", "high=1.0"], [1, 2]),
        ("consistent", ["initial=2", "low=-1.0", "high=-0.99"], [2, 1]),
    ],
)
def test_accumulation_changes_the_rollout_batches_of_a_step(
    tmp_path_factory, direction, options, rounds
):
    overrides = [
        *SCRIPTED,
        "control.accumulation.enabled=true",
        "control.accumulation.max_steps=2",
        "control.accumulation.warmup=1",
        "control.accumulation.cooldown=1",
        *[f"control.accumulation.{o}" for o in options],
    ]
    h = harness(tmp_path_factory, overrides, varied_g2)
    steps = [h.step(), h.step()]
    assert [len(s.rollout_knobs) for s in steps] == rounds
    assert [len(s.texts) for s in steps] == [4 * r for r in rounds]  # all rounds in one step
    assert [s.metrics["knobs/accumulation_steps"] for s in steps] == rounds
    assert math.isfinite(steps[0].metrics["grad/microbatch_cosine"])


def by_difficulty(easy, hard):
    """Scripted completions of a group: ``easy(problem)`` at difficulty 1, else ``hard``."""

    def texts(problems):
        return [t for p in problems for t in (easy(p) if p.difficulty == 1 else hard(p))]

    return texts


def test_data_curriculum_samples_unexplored_buckets_and_rests_failed_problems(tmp_path_factory):
    """Synthetic problems of difficulty 1 and 3: one slot per unexplored bucket first; a
    problem whose group all failed rests; the bucket with signal is then likelier."""

    texts = by_difficulty(
        easy=lambda p: (xml(p.answer), xml(wrong(p.answer))),
        hard=lambda p: (xml(wrong(p.answer)),) * 2,
    )
    overrides = [*SCRIPTED, "data.synthetic_size=6", "control.data_curriculum.enabled=true"]
    h = harness(tmp_path_factory, overrides, texts)
    t = h.trainer
    plain_order = [t.train_problems[i].id for i in t.sampler.permutation(0)[:4]]
    first, second = h.step(), h.step()
    assert sorted(p.difficulty for p in first.batch.problems) == [1, 3]
    failed = next(p.id for p in first.batch.problems if p.difficulty == 3)
    assert failed not in second.problems  # rested after an all-failed group
    assert second.metrics["data/bucket_1/p"] > second.metrics["data/bucket_3/p"]
    assert first.problems + second.problems != plain_order


@pytest.mark.parametrize("dynamic_sampling", [True, False], ids=["dynamic", "every-group"])
def test_data_curriculum_scores_buckets_by_the_advantage_the_update_sees(
    tmp_path_factory, dynamic_sampling
):
    """Difficulty 1: one right and one wrong answer (correctness varies). Difficulty 3: both
    wrong, one in format and one not (only the format rewards vary). With dynamic sampling
    the difficulty-3 group is dropped, so its bucket scores zero and difficulty 1 is
    likelier; scoring it by its fused advantage (what the update would never see) made the
    two buckets equal. Without dynamic sampling the update trains on it, and it scores."""

    texts = by_difficulty(
        easy=lambda p: (xml(p.answer), xml(wrong(p.answer))),
        hard=lambda p: (xml(wrong(p.answer)), f"The answer is {wrong(p.answer)}."),
    )
    overrides = [
        *SCRIPTED,
        "data.synthetic_size=6",
        "control.data_curriculum.enabled=true",
        "control.data_curriculum.rest_steps=0",
        f"grpo.dynamic_sampling={str(dynamic_sampling).lower()}",
        "grpo.max_resample_rounds=0",
    ]
    h = harness(tmp_path_factory, overrides, texts)
    first = h.step()
    trained = sorted(p.difficulty for p in first.batch.problems)  # one group of each drawn
    assert trained == ([1] if dynamic_sampling else [1, 3])
    m = first.metrics
    assert m["data/bucket_1/mean_abs_adv"] > 0.5
    if dynamic_sampling:
        assert m["data/bucket_3/mean_abs_adv"] == 0.0
        second = h.step()
        assert second.metrics["data/bucket_1/p"] > second.metrics["data/bucket_3/p"]
    else:
        assert m["data/bucket_3/mean_abs_adv"] > 0.5


# ------------------------------------------------------------------ SFT


def test_sft_mixing_adds_the_decaying_sft_gradient_to_the_grpo_one(tmp_path_factory, baseline):
    """CHORD: L = (1 - mu) L_GRPO + mu L_SFT, checked on the gradient itself."""
    overrides = [
        *PLAIN,
        "control.sft_mixing.enabled=true",
        "control.sft_mixing.mu0=0.5",
        "control.sft_mixing.decay_steps=2",
        "control.sft_mixing.schedule=linear",
        "control.sft_mixing.batch_size=2",
    ]
    h = harness(tmp_path_factory, overrides)
    t = h.trainer
    t.sft.mixing_backward(0, 0.5)  # the SFT term alone, on the same examples the step will use
    sft = {n: p.grad.clone() for n, p in t.unwrapped.named_parameters() if p.requires_grad}
    t.optimizer.zero_grad(set_to_none=True)
    first, second = h.step(), h.step()
    base = baseline[0]
    assert first.knobs.sft_weight == 0.5 and second.knobs.sft_weight == 0.25
    assert first.metrics["sft/aux_loss"] > 0
    assert first.texts == base.texts and torch.equal(first.advantages, base.advantages)
    for name, g in base.grads.items():
        torch.testing.assert_close(first.grads[name], 0.5 * g + sft[name], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(first.grads[n], base.grads[n]) for n in base.grads)


def test_sft_warmup_lowers_the_gold_nll_before_rl_starts(tmp_path_factory, baseline):
    h = harness(tmp_path_factory, [*PLAIN, "sft.steps=2", "sft.lr=1e-2"])
    t = h.trainer
    prompts, targets = t.sft.examples(0, 2, salt=99)
    with torch.no_grad():
        before = float(t.sft.loss(prompts, targets))
    assert run_warmup(t) and t.sft_done
    with torch.no_grad():
        after = float(t.sft.loss(prompts, targets))
    assert after < before
    s = h.step()  # RL starts from the warmed-up policy
    assert any(nonzero(b) for b in lora_b(t).values())
    assert any(not torch.equal(s.grads[n], baseline[0].grads[n]) for n in s.grads)


def test_sft_mixing_hard_solved_imitates_verified_solutions_from_memory(tmp_path_factory):
    """ReLIFT source: once the memory holds a verified solution of a rarely solved problem,
    the SFT term trains on that completion instead of gold solutions."""

    def texts(problems):  # step 1: nothing solved; step 2: the first problem once in two
        first, second = problems
        solved = xml(first.answer) if h.trainer.step else xml(wrong(first.answer))
        return [solved, xml(wrong(first.answer)), *[xml(wrong(second.answer))] * 2]

    overrides = [
        *SCRIPTED,
        "control.sft_mixing.enabled=true",
        "control.sft_mixing.source=hard_solved",
        "control.sft_mixing.batch_size=2",
    ]
    h = harness(tmp_path_factory, overrides, texts)
    t = h.trainer
    targets: list[list[str]] = []
    original = t.sft.loss

    def recording(prompts, targets_, phi=False):
        targets.append(list(targets_))
        return original(prompts, targets_, phi)

    t.sft.loss = recording
    h.step()
    second = h.step()
    solved = xml(second.batch.problems[0].answer) + t.tokenizer.eos_token
    assert len(targets[0]) == 2 and solved not in targets[0]  # nothing verified: gold
    assert targets[1] == [solved]  # solved once in two attempts: hard, and verified


# ------------------------------------------------------------------ the adaptive policy

GROW = (
    "[{name: small, lora_rank: 4, min_steps: 1,"
    " exit: {metric: completion/length_mean, threshold: 0, window: 1}},"
    " {name: big, lora_rank: 8}]"
)


def test_lora_rank_grows_at_the_phase_change_with_the_function_unchanged(tmp_path_factory):
    overrides = [*SCRIPTED, "control.curriculum.enabled=true", f"control.curriculum.phases={GROW}"]
    h = harness(tmp_path_factory, overrides, varied_g2)
    t = h.trainer
    first = h.step()
    measured = {}
    original = t.adaptive.maybe_grow

    def measuring(rank, optimizer, seed):
        measured["before"] = completion_logp(t, first.batch)
        info = original(rank, optimizer, seed)
        measured["after"] = completion_logp(t, first.batch)
        measured["info"] = info
        return info

    t.adaptive.maybe_grow = measuring
    second = h.step()
    assert (measured["info"]["old_rank"], measured["info"]["new_rank"]) == (4, 8)
    torch.testing.assert_close(measured["after"], measured["before"], rtol=0, atol=1e-5)
    with t.unwrapped.reference():  # the trained LoRA does change the function it preserves
        reference = completion_logp(t, first.batch)
    assert (measured["before"] - reference).abs().max() > 1e-4
    shapes = {n: tuple(p.shape) for n, p in t.unwrapped.named_parameters() if "lora_" in n}
    assert all(s[0] == 8 for n, s in shapes.items() if ".lora_A." in n)
    assert all(s[1] == 8 for n, s in shapes.items() if ".lora_B." in n)
    assert first.metrics["lora/rank"] == 4 and second.metrics["lora/rank"] == 8
    # The new rank components are in the gradient of the step that grew them.
    new_b = [g[:, 4:] for n, g in second.grads.items() if ".lora_B." in n]
    assert any(nonzero(g) for g in new_b)


def test_nested_rank_trains_a_prefix_of_the_rank_components(tmp_path_factory):
    h = harness(tmp_path_factory, [*SCRIPTED, "lora.nested_rank=true", "train.seed=1"], varied_g2)
    s = h.step()
    k = int(s.metrics["lora/nested_rank"])
    assert 1 <= k < 4
    b = [g for n, g in s.grads.items() if ".lora_B." in n]
    assert all(not nonzero(g[:, k:]) for g in b)
    assert any(nonzero(g[:, :k]) for g in b)


def assert_starts_as_plain(step: Step, plain: Step) -> None:
    """At initialisation an adaptive part is the identity: the first step samples, scores
    and trains the LoRA weights exactly as plain GRPO (its own parameters aside)."""
    assert step.texts == plain.texts
    assert torch.equal(step.reward, plain.reward)
    assert torch.equal(step.advantages, plain.advantages)
    for name, g in plain.grads.items():
        assert torch.equal(step.grads[name], g), name


def test_module_scales_enter_the_forward_and_the_gradient(tmp_path_factory, baseline):
    h = harness(tmp_path_factory, [*PLAIN, "lora.module_scales=true"])
    t = h.trainer
    first, second = h.step(), h.step()
    assert_starts_as_plain(first, baseline[0])
    name = next(n for n in second.grads if "module_scales" in n)
    assert not nonzero(first.grads[name])  # LoRA B = 0 at the start: nothing to scale
    assert nonzero(second.grads[name])
    scales = dict(t.unwrapped.named_parameters())[name]
    assert not torch.equal(scales.detach(), torch.ones_like(scales))  # learnt
    before = completion_logp(t, second.batch)
    with torch.no_grad():
        scales.mul_(2.0)
    try:
        assert not torch.allclose(completion_logp(t, second.batch), before)
    finally:
        with torch.no_grad():
            scales.div_(2.0)


def test_hypernetwork_scales_lora_per_prompt(tmp_path_factory, baseline):
    h = harness(tmp_path_factory, [*PLAIN, "hypernet.enabled=true", "hypernet.bottleneck=8"])
    t = h.trainer
    first, second = h.step(), h.step()
    assert_starts_as_plain(first, baseline[0])  # every multiplier is exactly 1 at init
    up = next(n for n in second.grads if "hypernet" in n and n.endswith("up.weight"))
    assert not nonzero(first.grads[up])  # LoRA B is 0 at the start: nothing to scale
    assert nonzero(second.grads[up])
    r = second.batch.rollout
    g = t.cfg.rollout.num_generations
    mult = t.adaptive.scaler.multipliers(r.prompt_ids[::g], r.prompt_mask[::g])
    assert mult.shape[0] == 2 and not torch.allclose(mult[0], mult[1])  # per prompt
    assert not torch.allclose(mult, torch.ones_like(mult))
    assert not torch.allclose(
        completion_logp(t, second.batch), completion_logp(t, second.batch, adaptive=False)
    )


def hypernet_up(t: Trainer) -> torch.Tensor:
    return t.adaptive.scaler.hypernet.up.weight.detach().clone()


@pytest.mark.parametrize("groups", [None, "[all]"])
def test_warm_up_leaves_the_hypernetwork_at_identity_for_grpo(tmp_path_factory, groups):
    """Trained by the warm-up, the hypernetwork's tanh saturated (every multiplier 2.0, no
    gradient, in both hour runs of full); by default the warm-up trains LoRA only, and GRPO
    then moves the hypernetwork from identity."""
    warm = ["hypernet.enabled=true", "hypernet.bottleneck=8", "sft.steps=3", "sft.lr=1e-2"]
    if groups:
        warm.append(f"sft.trainable_groups={groups}")
    h = harness(tmp_path_factory, [*PLAIN, *warm])
    t = h.trainer
    lora_before = {n: p.detach().clone() for n, p in lora_b(t).items()}
    assert run_warmup(t)
    assert any(not torch.equal(lora_b(t)[n], lora_before[n]) for n in lora_before)
    up = hypernet_up(t)
    if groups:  # the old behaviour, on request: the warm-up trains the hypernetwork too
        assert nonzero(up)
        return
    assert not nonzero(up)  # zero-initialised, untouched: every multiplier is exactly 1
    assert scaling_hooks(t) == 0  # so rollouts decode with LoRA merged (the fast path)
    h.step()  # GRPO unlocks every group (no curriculum) and trains it
    assert not torch.equal(hypernet_up(t), up)
    assert scaling_hooks(t) == len(lora_b(t))  # per-prompt scales from now on


def test_a_locked_identity_hypernetwork_and_a_closed_memory_cost_the_warm_up_nothing(
    tmp_path_factory, monkeypatch
):
    """Locked by the warm-up (LoRA only), a hypernetwork at identity multiplies by 1 and a
    memory at gate 0 adds 0: the warm-up's loss and LoRA gradients are those of the full
    computation, without its per-prompt context forwards or the memory's read."""
    from deepsynapse.models.neural_memory import NeuralMemory

    reads = []
    original_read = NeuralMemory.read
    monkeypatch.setattr(
        NeuralMemory, "read", lambda self, h: reads.append(1) or original_read(self, h)
    )
    overrides = [*PLAIN, "hypernet.enabled=true", "hypernet.bottleneck=8", "sft.steps=2"]
    overrides += ["memory.enabled=true", "memory.slots=4", "memory.heads=2"]
    t = harness(tmp_path_factory, overrides).trainer
    t.lock_groups(t.cfg.sft.trainable_groups)  # as the warm-up does
    encoder = t.adaptive.scaler.encoder
    with torch.no_grad():  # LoRA B away from 0, so a multiplier would show in the gradient
        for b in lora_b(t).values():
            b.normal_(0, 0.05)

    def loss_and_grads():
        t.optimizer.zero_grad()
        prompts, targets = t.sft.examples(0, 2, salt=99)
        loss = t.sft.loss(prompts, targets)
        loss.backward()
        return loss.detach(), {n: b.grad.clone() for n, b in lora_b(t).items()}

    loss, grads = loss_and_grads()
    assert encoder.misses == 0 and not reads  # nothing computed for the locked parts
    locked = [*t.adaptive.scaler.hypernet.parameters(), *t.adaptive.memory.parameters()]
    for q in locked:  # the full computation: the parts in the graph, multiplying by 1 / adding 0
        q.requires_grad_(True)
    full_loss, full_grads = loss_and_grads()
    assert encoder.misses > 0 and reads
    torch.testing.assert_close(loss, full_loss)
    for n in grads:
        torch.testing.assert_close(grads[n], full_grads[n])


def test_a_saturated_hypernetwork_is_reported_once(tmp_path_factory, capsys):
    h = harness(tmp_path_factory, [*PLAIN, "hypernet.enabled=true", "hypernet.bottleneck=8"])
    t = h.trainer
    with torch.no_grad():
        t.adaptive.scaler.hypernet.up.bias.fill_(10.0)  # tanh(10): every multiplier at 2.0
    first, second = h.step(), h.step()
    assert first.metrics["hypernet/scale_saturated"] == 1.0
    assert first.metrics["hypernet/scale_mean"] == pytest.approx(2.0)
    events = [
        e for e in read_jsonl(t.run_dir / "events.jsonl") if e["kind"] == "hypernet_saturated"
    ]
    assert len(events) == 1 and events[0]["evidence"]["share"] == 1.0  # said once, not each step
    assert "hypernetwork's multipliers are saturated" in capsys.readouterr().out
    assert second.metrics["hypernet/scale_saturated"] == 1.0  # no gradient brings it back


def scaling_hooks(t: Trainer) -> int:
    """Forward hooks on LoRA B modules while the trainer's rollout context is open."""
    ids, mask = encode_prompts(t.tokenizer, ["What is 2 + 2?", "Name a prime."], "cpu")
    with t.adaptive.for_prompts(ids, mask):
        return sum(
            len(m._forward_hooks)
            for n, m in t.unwrapped.named_modules()
            if n.endswith("lora_B.default")
        )


def test_neural_memory_reads_into_the_forward_and_learns(tmp_path_factory, baseline):
    overrides = [*PLAIN, "memory.enabled=true", "memory.slots=4", "memory.heads=2"]
    h = harness(tmp_path_factory, overrides)
    t = h.trainer
    first, second = h.step(), h.step()
    assert_starts_as_plain(first, baseline[0])  # gate 0: the read adds nothing yet
    gate = next(n for n in first.grads if n.endswith("memory.gate"))
    keys = next(n for n in first.grads if n.endswith("memory.keys"))
    assert nonzero(first.grads[gate]) and not nonzero(first.grads[keys])  # gate 0: gate only
    assert nonzero(second.grads[keys])  # once the gate moved, the slots learn
    memory = t.adaptive.memory
    assert float(memory.gate) != 0.0
    with_memory = completion_logp(t, second.batch)
    saved = memory.gate.detach().clone()
    with torch.no_grad():
        memory.gate.zero_()
    try:
        assert not torch.allclose(completion_logp(t, second.batch), with_memory)
    finally:
        with torch.no_grad():
            memory.gate.copy_(saved)


# ------------------------------------------------------------------ observation only


def test_skill_probes_run_and_leave_the_steps_bit_identical(tmp_path_factory, baseline):
    overrides = [
        *PLAIN,
        "probes.every=1",
        "probes.per_skill=1",
        "probes.max_new_tokens=8",
        "probes.heldout=1",
    ]
    h = harness(tmp_path_factory, overrides)
    first = h.step()
    probes = run_probes(h.trainer)  # what run_steps does after a step when probes are due
    second = h.step()
    assert any(k.startswith("probes/") for k in probes) and "accuracy/heldout" in probes
    assert_bit_identical(first, baseline[0])
    assert_bit_identical(second, baseline[1])


def test_telemetry_logs_every_part_of_the_step(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("telemetry") / "run"
    h = Harness(run_dir, [*SCRIPTED, "train.steps=1", "train.report=true"], varied_g2)
    h.trainer.train()
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/fused/mean" in r]
    assert len(rows) == 1
    for key in ("reward/fused/mean", "advantage/abs_mean", "grad_norm", "knobs/temperature"):
        assert key in rows[0], key
    assert all(f"weights/{k}" in rows[0] for k in PLAIN_WEIGHTS)
    assert read_jsonl(run_dir / "samples.jsonl") and read_jsonl(run_dir / "events.jsonl")
    assert (run_dir / "report.html").stat().st_size > 0


def test_synthetic_variants_reach_the_warm_up_and_the_grpo_batch(tmp_path_factory):
    """``data.synthetic_variants`` changes what the loss trains on, both the warm-up's gold
    solutions and GRPO's prompts; off, both draw the plain stream (every earlier study's)."""
    synthetic = [*PLAIN, "data.train=synthetic", "sft.data=synthetic"]
    seen = {}
    for share in (0.0, 1.0):
        h = harness(tmp_path_factory, [*synthetic, f"data.synthetic_variants={share}"])
        t = h.trainer
        prompts, targets = t.sft.examples(0, 8, salt=99)
        batch = h.step().batch
        seen[share] = {
            "warm-up": [p.columns.get("variant") for p in t.sft.pool()],
            "grpo": [p.columns.get("variant") for p in batch.problems],
            "prompts": batch.prompts,
            "targets": targets,
        }
        for p, prompt in zip(batch.problems, batch.prompts, strict=True):
            assert p.question in prompt  # the loss's prompts are these problems'
    off, on = seen[0.0], seen[1.0]
    assert set(off["warm-up"]) == set(off["grpo"]) == {None}
    assert None not in on["warm-up"] and None not in on["grpo"]
    assert set(on["warm-up"]) == set(VARIANTS)
    assert on["prompts"] != off["prompts"] and on["targets"] != off["targets"]
    # a varied solution's own steps are what the warm-up teaches
    assert any(re.search(r"(more|fewer) .* than|At first|Before that", t) for t in on["targets"])
