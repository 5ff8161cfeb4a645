"""Rollouts: the fast decode loop against transformers' generate, sampling, merged LoRA."""

from __future__ import annotations

import pytest
import torch

from deepsynapse.models.dynamic_lora import (
    add_module_scales,
    lora_layers,
    merged_lora,
    module_scales,
    truncated_rank,
)
from deepsynapse.models.loading import load_model, load_tokenizer
from deepsynapse.models.policy import apply_lora
from deepsynapse.rollout.hf import generate_groups, sample_next

PROMPTS = ["Tom has 3 apples and buys", "a b", "what is the answer to this longer question"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def base(tok):
    torch.manual_seed(0)
    return load_model("tiny-random", torch.float32, tok).eval()


def lora_model(tok, seed: int = 0):
    torch.manual_seed(seed)
    model = apply_lora(load_model("tiny-random", torch.float32, tok), 4, 8.0, 0.0, ["all-linear"])
    with torch.no_grad():  # a LoRA update that changes the function
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.5)
    return model.eval()


def decode(model, tok, decoder, **kw):
    args = dict(num_generations=3, max_new_tokens=16, greedy=True, stop_strings=[])
    args.update(kw)
    return generate_groups(model, tok, PROMPTS, decoder=decoder, **args)


def assert_same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.truncated, b.truncated)
    assert a.texts == b.texts


@pytest.mark.parametrize("decoder", ["fast", "hf"])
def test_prompts_are_padded_so_the_prefill_has_few_widths(tok, base, decoder):
    padded = decode(base, tok, decoder)  # default: prefill widths a multiple of 64
    plain = decode(base, tok, decoder, pad_multiple=1)
    assert (padded.prompt_ids.shape[1] - 1) % 64 == 0
    assert plain.prompt_ids.shape[1] < padded.prompt_ids.shape[1]
    assert_same(padded, plain)  # masked columns change no token


@pytest.mark.parametrize("sharing", [True, False])
def test_fast_decoder_matches_generate_under_greedy(tok, base, sharing):
    assert_same(
        decode(base, tok, "fast", prefix_sharing=sharing),
        decode(base, tok, "hf", prefix_sharing=sharing),
    )


SYSTEM = " ".join(["You solve problems step by step and answer in the format asked."] * 10)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("g", [1, 3])
def test_common_prefix_is_prefilled_once_and_no_token_changes(tok, base, greedy, g):
    """Prompts that share a long prefix (a system prompt): our decoder runs it once ([1, L]),
    then each prompt's rest; greedy and seeded samples are those of a per-prompt prefill,
    which ``generate`` (the "hf" decoder, whose cache keeps the prompt's columns) also gives."""
    prompts = [f"{SYSTEM} {p}" for p in PROMPTS]
    sizes: list[tuple[int, int]] = []
    hook = base.model.register_forward_pre_hook(
        lambda _m, _a, kw: sizes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    args = dict(num_generations=g, max_new_tokens=12, greedy=greedy, stop_strings=[])
    try:
        outs = []
        for decoder, sharing in (("fast", True), ("fast", False), ("hf", True)):
            sizes.clear()
            torch.manual_seed(5)
            outs.append(
                generate_groups(base, tok, prompts, decoder=decoder, prefix_sharing=sharing, **args)
            )
            if decoder == "fast":
                prefill = [s for s in sizes if s[1] > 1]
                if sharing:  # the prefix once, then the 3 prompts' rests
                    assert [rows for rows, _ in prefill] == [1, 3], prefill
                    assert prefill[1][1] < outs[-1].prompt_ids.shape[1] - 1
                else:
                    assert [rows for rows, _ in prefill] == [3 * g], prefill
    finally:
        hook.remove()
    assert_same(outs[0], outs[1])
    if greedy:
        assert_same(outs[0], outs[2])


def test_the_prefill_computes_the_last_positions_logits_only(tok, base):
    rows: list[int] = []
    head = base.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[1]))
    try:
        decode(base, tok, "fast", num_generations=2, max_new_tokens=3)
    finally:
        hook.remove()
    assert rows == [1] * 4, rows  # the prefill, then one position for each of 3 tokens


def test_fast_decoder_stops_where_generate_stops(tok, base):
    reference = decode(base, tok, "hf")
    # a stop string that really occurs in the middle of one completion
    text = reference.texts[3]  # ' b Lastly Lastly ...': ends nowhere near its prompt
    stop = text[-9:-6]
    fast = decode(base, tok, "fast", stop_strings=[stop])
    slow = decode(base, tok, "hf", stop_strings=[stop])
    assert_same(fast, slow)
    assert any(t.endswith(stop) for t in fast.texts)
    assert int(fast.lengths.max()) < 16 or not bool(fast.truncated.all())


def test_unknown_decoder_is_refused(tok, base):
    with pytest.raises(ValueError, match="unknown decoder 'vllm'"):
        decode(base, tok, "vllm")


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(20000, -1)
    torch.manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, 1.0), minlength=5).float() / 20000
    assert torch.allclose(counts, probs, atol=0.015)
    assert counts[4] == 0
    # temperature 0.5 squares the probabilities (renormalised)
    sharp = probs**2 / (probs**2).sum()
    counts = torch.bincount(sample_next(logits, 0.5, 1.0), minlength=5).float() / 20000
    assert torch.allclose(counts, sharp, atol=0.015)
    # top_p 0.7 keeps the smallest prefix reaching 0.7: tokens 0 and 1, renormalised
    counts = torch.bincount(sample_next(logits, 1.0, 0.7), minlength=5).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.015)


def test_sampling_is_seeded():
    logits = torch.randn(8, 50)
    torch.manual_seed(3)
    a = sample_next(logits, 1.0, 1.0)
    torch.manual_seed(3)
    assert torch.equal(a, sample_next(logits, 1.0, 1.0))


def logits_of(model, tok):
    ids = tok(PROMPTS, return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_lora_gives_the_adapters_function_and_restores_the_base(tok):
    model = lora_model(tok)
    add_module_scales(model)
    with torch.no_grad():
        module_scales(model).scales.uniform_(0.5, 1.5)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = logits_of(model, tok)
    with model.disable_adapter():
        plain_base = logits_of(model, tok)
    assert not torch.allclose(unmerged, plain_base, atol=1e-3)  # the adapter matters
    with merged_lora(model) as merged:
        assert merged
        inside = logits_of(model, tok)
    assert torch.allclose(inside, unmerged, atol=1e-5)
    assert torch.equal(logits_of(model, tok), unmerged)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
        assert p.requires_grad == flags[n], n


def test_merged_lora_refuses_what_it_cannot_fold(tok, base):
    model = lora_model(tok)
    with truncated_rank(model, 2), merged_lora(model) as merged:
        assert not merged
    with merged_lora(base) as merged:  # no adapter at all
        assert not merged


def test_merged_and_unmerged_rollouts_agree_under_greedy(tok):
    model = lora_model(tok, seed=1)
    assert_same(
        decode(model, tok, "fast", merge_lora=True), decode(model, tok, "hf", merge_lora=False)
    )


@pytest.mark.parametrize("greedy", [True, False])
def test_finished_rows_leave_the_batch_and_no_token_changes(tok, greedy, monkeypatch):
    """Rows that stopped are dropped from the decoded batch (fewer rows a forward), and
    every completion, sampled or greedy, is the one the full batch decodes: the same random
    stream. float64: a batch of another size may round a logit differently in its last bit,
    which in float32 can move a sample between two near-equal tokens of a random model."""
    import deepsynapse.rollout.hf as hf

    torch.manual_seed(0)
    base = load_model("tiny-random", torch.float64, tok).eval()
    rows: list[int] = []
    hook = base.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    # stop strings met early by some rows (greedy: prompts 1 and 3 within 5 tokens; sampled:
    # the letter m), late or never by others
    stops = ["ager", "Shir", "m"]
    args = dict(num_generations=4, max_new_tokens=24, greedy=greedy, stop_strings=stops)
    try:
        torch.manual_seed(1)
        compacted = generate_groups(base, tok, PROMPTS, **args)
        decoded_compacted, rows[:] = rows[1:], []  # rows[0]: the shared prefill
        monkeypatch.setattr(hf, "COMPACT_SHARE", 2.0)  # never: every row decodes to the end
        torch.manual_seed(1)
        full = generate_groups(base, tok, PROMPTS, **args)
        decoded_full = rows[1:]
    finally:
        hook.remove()
    assert_same(compacted, full)
    lengths = full.lengths.tolist()
    assert min(lengths) < max(lengths) // 2  # rows really end at different times
    assert decoded_full == [len(PROMPTS) * 4] * len(decoded_full)
    assert len(decoded_compacted) == len(decoded_full)
    assert decoded_compacted[-1] < decoded_full[-1]
    assert sum(decoded_compacted) < 0.8 * sum(decoded_full)
