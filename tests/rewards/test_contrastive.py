"""PolicyScorer against a naive computation, and the contrastive reward on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepsynapse.formats import format_completion
from deepsynapse.models.loading import load_model, load_tokenizer
from deepsynapse.models.policy import apply_lora
from deepsynapse.models.scoring import PolicyScorer
from deepsynapse.rewards.contrastive import (
    ContrastiveReward,
    answer_context,
    answer_continuation,
    make_contrastive_reward,
    multiple_choice_probe,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random")


@pytest.fixture
def model(tokenizer):
    return load_model("tiny-random", torch.float32, tokenizer)


def _naive(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-softmax over the full vocabulary, one unpadded sequence at a time."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"] if continuation else []
    if not cont:
        return 0.0
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
    return sum(float(logp[len(ctx) + k - 1, token]) for k, token in enumerate(cont))


CONTEXTS = [
    "Question: Natalia sold 48 clips in April and half as many in May. How many in all?\n"
    "<reasoning>\n48 / 2 = 24, 48 + 24 = 72\n</reasoning>\n<answer>\n",
    "Hi",
    "A much longer context that repeats itself. " * 6,
    "",
]
CONTINUATIONS = [
    ["72\n</answer>", "24\n</answer>", "7.2\n</answer>", ""],
    [" there"],
    [" x", " y z w", "!", " a b c d e f g"],
    ["start"],
]


def test_scorer_matches_naive_computation(model, tokenizer) -> None:
    scorer = PolicyScorer(model, tokenizer, max_contexts=2, chunk_tokens=3)  # several batches
    got = scorer.continuation_logprobs(CONTEXTS, CONTINUATIONS)
    for context, continuations, scores in zip(CONTEXTS, CONTINUATIONS, got, strict=True):
        expected = [_naive(model, tokenizer, context, c) for c in continuations]
        assert scores == pytest.approx(expected, abs=1e-4)
    assert got[0][3] == 0.0  # an empty continuation is certain
    assert all(p.grad is None for p in model.parameters())
    assert scorer.continuation_logprobs([], []) == []
    with pytest.raises(ValueError):
        scorer.continuation_logprobs(["a"], [])


def _naive_split(model, tokenizer, prefix: str, rest: str, continuation: str) -> float:
    """``_naive`` with the prefix and the rest tokenized apart, as ``prefixes=`` asks."""
    ids = tokenizer([prefix, rest, continuation], add_special_tokens=False)["input_ids"]
    ctx, cont = ids[0] + ids[1], ids[2]
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
    return sum(float(logp[len(ctx) + k - 1, token]) for k, token in enumerate(cont))


PROMPTS = ["System: answer in XML.\nQuestion: 6 x 7?\n", "System: answer in XML.\nQ: 9 - 4?\n"]
SHARED = [  # (prefix, rest): groups of completions sharing a prompt, one with an empty rest
    (PROMPTS[0], "<reasoning>\n6 * 7 = 42\n</reasoning>\n<answer>\n"),
    (PROMPTS[1], "<reasoning>\n9 - 4 = 5, so five\n</reasoning>\n<answer>\n"),
    (PROMPTS[0], "<reasoning>\nsix sevens make forty-two, surely\n</reasoning>\n<answer>\n"),
    (PROMPTS[1], ""),
    (PROMPTS[0], "<reasoning>\n42\n</reasoning>\n<answer>\n"),
]


@pytest.mark.parametrize("max_contexts", [16, 2])  # one batch; groups split over batches
def test_scorer_shares_prefixes_and_scores_as_if_each_context_ran_alone(
    model, tokenizer, max_contexts
) -> None:
    """``prefixes=``: each distinct prompt is prefilled once and its cache shared; every score
    equals the one-sequence computation on the prefix's tokens then the rest's."""
    scorer = PolicyScorer(model, tokenizer, max_contexts=max_contexts, chunk_tokens=5)
    contexts = [p + r for p, r in SHARED]
    candidates = [["42\n</answer>", "41\n</answer>", " 5", ""]] * len(SHARED)
    got = scorer.continuation_logprobs(contexts, candidates, prefixes=[p for p, _ in SHARED])
    for (prefix, rest), scores in zip(SHARED, got, strict=True):
        expected = [_naive_split(model, tokenizer, prefix, rest, c) for c in candidates[0][:3]]
        assert scores[:3] == pytest.approx(expected, abs=1e-4)
        assert scores[3] == 0.0
    # a row without a prefix in the same call runs whole, as without prefixes
    mixed = scorer.continuation_logprobs(
        [contexts[0], CONTEXTS[0]], [candidates[0], CONTINUATIONS[0]], prefixes=[PROMPTS[0], ""]
    )
    assert mixed[0] == pytest.approx(got[0], abs=1e-4)
    assert mixed[1] == pytest.approx(
        [_naive(model, tokenizer, CONTEXTS[0], c) for c in CONTINUATIONS[0]], abs=1e-4
    )
    with pytest.raises(ValueError, match="prefixes\\[0\\] does not begin contexts\\[0\\]"):
        scorer.continuation_logprobs(["abc"], [["d"]], prefixes=["x"])


def test_scorer_on_peft_model_uses_adapters_in_eval_mode(model, tokenizer) -> None:
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.5, target_modules=["all-linear"])
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # make the adapters matter
    peft_model.train()
    scorer = PolicyScorer(peft_model, tokenizer)
    got = scorer.continuation_logprobs(CONTEXTS[:2], CONTINUATIONS[:2])
    assert peft_model.training  # the caller's mode is restored
    peft_model.eval()
    for context, continuations, scores in zip(CONTEXTS, CONTINUATIONS, got, strict=False):
        expected = [_naive(peft_model, tokenizer, context, c) for c in continuations]
        assert scores == pytest.approx(expected, abs=1e-4)
    with peft_model.disable_adapter():
        base = scorer.continuation_logprobs(CONTEXTS[:1], CONTINUATIONS[:1])
    assert base[0][0] != pytest.approx(got[0][0], abs=1e-3)  # adapters were really on


REASONING = "Natalia sold 48 / 2 = 24 clips in May, and 48 + 24 = 72 in all."
PROMPT = "Question: Natalia sold 48 clips in April and half as many in May. How many in all?\n"
COMPLETION = format_completion({"reasoning": REASONING, "answer": "72"})
DISTRACTORS = ["73", "24", "720"]


def _call(component, scorer, completions, distractors):
    n = len(completions)
    return component(
        [PROMPT] * n,
        completions,
        answer=["72"] * n,
        scorer=scorer,
        distractors=distractors,
    )


def test_contrastive_range_and_none_handling(model, tokenizer) -> None:
    scorer = PolicyScorer(model, tokenizer)
    completions = [COMPLETION, COMPLETION, "no tags at all", COMPLETION]
    distractors = [DISTRACTORS, ["1", "2", "3"], DISTRACTORS, None]
    share = _call(make_contrastive_reward("share"), scorer, completions, distractors)
    margin = _call(make_contrastive_reward("margin"), scorer, completions, distractors)
    for scores in (share, margin):
        assert scores[2] is None  # no reasoning to condition on
        assert scores[3] is None  # no distractors for this completion
    assert 0.0 <= share[0] <= 1.0 and 0.0 <= share[1] <= 1.0
    assert -1.0 < margin[0] < 1.0
    # The exact formula, from the scorer's own log-probs.
    context = answer_context(PROMPT, REASONING)
    lps = scorer.continuation_logprobs(
        [context], [[answer_continuation(c) for c in ["72", *DISTRACTORS]]]
    )[0]
    softmax = [math.exp(lp) / sum(math.exp(x) for x in lps) for lp in lps]
    assert share[0] == pytest.approx(softmax[0], abs=1e-5)
    assert margin[0] == pytest.approx(math.tanh((lps[0] - max(lps[1:])) / 5.0), abs=1e-5)
    # Without a scorer, or without any distractors column, nothing is applicable.
    reward = ContrastiveReward()
    assert reward([PROMPT], [COMPLETION], answer=["72"]) == [None]
    assert reward([PROMPT], [COMPLETION], answer=["72"], scorer=scorer) == [None]
    assert reward.name == "contrastive"
    with pytest.raises(ValueError, match="valid: share, margin"):
        make_contrastive_reward("ratio")


def _boost(model, tokenizer, token_text: str, amount: float) -> None:
    """Raise the likelihood of one token everywhere: an output bias on the LM head."""
    (token,) = tokenizer(token_text, add_special_tokens=False)["input_ids"]
    head = model.get_output_embeddings()
    if head.bias is None:
        biased = nn.Linear(head.in_features, head.out_features, bias=True)
        biased.weight = head.weight
        nn.init.zeros_(biased.bias)
        model.set_output_embeddings(biased)
        head = biased
    with torch.no_grad():
        head.bias[token] += amount


def test_prefers_the_candidate_whose_likelihood_rises(model, tokenizer) -> None:
    scorer = PolicyScorer(model, tokenizer)
    share = make_contrastive_reward("share")
    margin = make_contrastive_reward("margin")
    context = answer_context(PROMPT, REASONING)
    wrong = ["13", "45", "96"]  # only the gold contains a "7"
    before = _call(share, scorer, [COMPLETION], [wrong])[0]
    _boost(model, tokenizer, "7", 8.0)
    after = _call(share, scorer, [COMPLETION], [wrong])[0]
    assert after > before and after > 0.95
    assert _call(margin, scorer, [COMPLETION], [wrong])[0] > 0.5
    assert multiple_choice_probe(scorer, [context], ["72"], [wrong]) == 1.0
    # A distractor raised further becomes the preferred candidate: the gold's share falls.
    _boost(model, tokenizer, "4", 20.0)
    assert _call(share, scorer, [COMPLETION], [wrong])[0] < 0.05
    assert _call(margin, scorer, [COMPLETION], [wrong])[0] < -0.5
    assert multiple_choice_probe(scorer, [context], ["72"], [wrong]) == 0.0
    # The scorer really reads the modified head: it still matches the naive computation.
    got = scorer.continuation_logprobs([context], [[answer_continuation("45")]])[0][0]
    assert got == pytest.approx(
        _naive(model, tokenizer, context, answer_continuation("45")), abs=1e-4
    )
