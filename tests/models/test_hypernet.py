"""Context embeddings and the LoRA hypernetwork on real PEFT and the tiny Llama."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from deepsynapse.checkpoint import load_tree, save_tree
from deepsynapse.models.context import ContextEncoder
from deepsynapse.models.dynamic_lora import (
    add_module_scales,
    count_parameters,
    grow_lora_rank,
    lora_layers,
    lora_state_dict,
)
from deepsynapse.models.hypernet import (
    ContextualScaler,
    LoRAHypernetwork,
    bake_saved_scales,
    baked_adapter,
    hypernet_scales,
    num_outputs_for,
)
from deepsynapse.models.loading import load_model, load_tokenizer
from deepsynapse.models.neural_memory import NeuralMemory, attach_memory, layer_at_depth
from deepsynapse.models.policy import apply_lora
from deepsynapse.rollout.hf import generate_groups

PROMPTS = ["Tom has 3 apples and buys 4 more. How many now?", "What is 6 times 7?"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


@pytest.fixture
def model(tok):
    return lora_policy(tok, torch.float32)


def lora_policy(tok, dtype: torch.dtype) -> PeftModel:
    torch.manual_seed(0)
    peft_model = apply_lora(load_model("tiny-random", dtype, tok), 4, 8, 0.0, ["all-linear"])
    peft_model.to(dtype)  # PEFT keeps adapters in fp32; float64 tests want them exact too
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at zero; give LoRA an effect to scale
        for _, layer in lora_layers(peft_model):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return peft_model


def encode(tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def scrambled(hypernet: LoRAHypernetwork, seed: int = 0) -> LoRAHypernetwork:
    """Move the zero-initialised output layer so multipliers differ per prompt."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hypernet.up.weight.copy_(torch.randn(hypernet.up.weight.shape, generator=g))
    return hypernet


def test_context_embedding_is_the_frozen_base_mean_and_cached(tok, model):
    ids, mask = encode(tok)
    assert (mask == 0).any()  # left padding present
    encoder = ContextEncoder(model, layer=0, cache_size=8)
    got = encoder.embed(ids, mask)
    assert got.shape == (2, 64) and encoder.misses == 2 and encoder.hits == 0
    for i, prompt in enumerate(PROMPTS):
        one = tok([prompt], return_tensors="pt")
        with torch.no_grad(), model.disable_adapter():
            states = model(**one, output_hidden_states=True).hidden_states[1]  # layer 0 output
        torch.testing.assert_close(got[i], states[0].mean(0), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            adapted = model(**one, output_hidden_states=True).hidden_states[1]
        assert not torch.allclose(got[i], adapted[0].mean(0), atol=1e-4)  # adapters were off
    again = encoder.embed(ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    assert encoder.hits == 4 and encoder.misses == 2
    assert torch.equal(again[::2], got)  # padding width and batch do not matter
    assert encoder.stats()["context/cache_hit_rate"] == pytest.approx(4 / 6)


def test_context_cache_is_lru_bounded(tok, model):
    encoder = ContextEncoder(model, layer=-1, cache_size=1)
    a, b = (encode(tok, [p]) for p in PROMPTS)
    encoder.embed(*a)
    encoder.embed(*b)  # evicts a
    encoder.embed(*a)
    assert (encoder.hits, encoder.misses, len(encoder.cache)) == (0, 3, 1)
    state = encoder.state_dict()
    other = ContextEncoder(model, layer=-1)
    other.load_state_dict(state)
    assert (other.hits, other.misses) == (0, 3)


@pytest.mark.parametrize("per", ["layer", "module"])
def test_hypernet_at_init_equals_plain_lora(tok, model, per):
    ids, mask = encode(tok)
    plain = logits(model, ids, mask)
    scaler = ContextualScaler(
        model,
        ContextEncoder(model),
        LoRAHypernetwork(64, num_outputs_for(model, per), bottleneck=16),
        per=per,
    )
    m = scaler.multipliers(ids, mask)
    assert torch.equal(m, torch.ones_like(m))
    with scaler.scales(m):
        assert torch.equal(logits(model, ids, mask), plain)


def test_gradients_reach_the_hypernet(tok, model):
    ids, mask = encode(tok)
    hypernet = LoRAHypernetwork(64, 2, bottleneck=16)
    scaler = ContextualScaler(model, ContextEncoder(model), hypernet)
    opt = torch.optim.AdamW(hypernet.parameters(), lr=1e-2)
    for step in range(2):
        with scaler.scales(scaler.multipliers(ids, mask)):
            loss = model(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean()
        loss.backward()
        assert hypernet.up.weight.grad.abs().sum() > 0
        if step == 1:  # once `up` has moved, the gradient reaches the first layer too
            assert hypernet.down.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    stats = hypernet.scale_stats()
    kinds = ("mean", "std", "min", "max", "saturated")
    assert set(stats) == {f"hypernet/scale_{k}" for k in kinds}
    assert set(hypernet.identity_stats()) == set(stats)  # what a run logs either way
    assert stats["hypernet/scale_std"] > 0


def test_each_row_gets_its_own_multipliers(tok, model):
    ids, mask = encode(tok)
    plain = logits(model, ids, mask)
    with model.disable_adapter():
        base = logits(model, ids, mask)
    m = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    with hypernet_scales(model, m):
        mixed = logits(model, ids, mask)
    torch.testing.assert_close(mixed[0], plain[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-6, rtol=0)
    with hypernet_scales(model, m):  # one row per prompt scales k contiguous copies of it
        grouped = logits(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    torch.testing.assert_close(grouped[::2], mixed, atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped[1::2], mixed, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot scale"), hypernet_scales(model, m):
        logits(model, ids[:1].repeat(3, 1), mask[:1].repeat(3, 1))


@pytest.mark.parametrize("nested", [False, True])
def test_decoding_swaps_peft_forward_for_the_same_function(tok, nested):
    """``fused``: plain LoRA layers compute base + row-scaled update in their own forward
    (module scales folded in), never calling PEFT's ``lora_B``; the result is the hooks'. A
    nested-rank truncation (a pre-hook on B) keeps a layer on the hooks; nothing merges."""
    from deepsynapse.models.dynamic_lora import merged_lora, module_scales, truncated_rank

    model = lora_policy(tok, torch.float64)
    add_module_scales(model)
    with torch.no_grad():
        module_scales(model).scales.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    ids, mask = encode(tok)
    m = torch.tensor([[1.7, 0.4], [0.2, 1.3]], dtype=torch.float64)
    layers = [layer for _, layer in lora_layers(model)]
    b_ids = {id(layer.lora_B["default"]) for layer in layers}
    calls: list[int] = []
    # a global hook: one on lora_B itself would make the layer not plain LoRA
    spy = torch.nn.modules.module.register_module_forward_hook(
        lambda module, *_: calls.append(1) if id(module) in b_ids else None
    )
    with truncated_rank(model, 2) if nested else torch.no_grad():
        with hypernet_scales(model, m):
            hooked = logits(model, ids, mask)
        hook_calls, calls[:] = len(calls), []
        with torch.no_grad(), hypernet_scales(model, m, fused=True):
            swapped = [layer for layer in layers if "forward" in vars(layer)]
            fused = logits(model, ids, mask)
            with merged_lora(model) as merged:
                assert not merged  # a swapped forward is not plain PEFT: no LoRA counted twice
    spy.remove()
    assert hook_calls == len(layers)
    assert len(swapped) == (0 if nested else len(layers)) and len(calls) == len(layers) - len(
        swapped
    )
    assert not any("forward" in vars(layer) for layer in layers)  # PEFT's forward is back
    torch.testing.assert_close(fused, hooked, atol=1e-10, rtol=0)
    assert not torch.allclose(fused, logits(model, ids, mask), atol=1e-4)  # the scales act


def test_prefix_shared_rollout_uses_the_prompt_rows(tok, model):
    """Prefill runs B rows, decoding B*G rows: both must see their prompt's multipliers."""
    ids, mask = encode(tok)
    kwargs = dict(num_generations=2, max_new_tokens=4, greedy=True, prefix_sharing=True)
    with model.disable_adapter():
        base = generate_groups(model, tok, PROMPTS, **kwargs)
    plain = generate_groups(model, tok, PROMPTS, **kwargs)
    with hypernet_scales(model, torch.tensor([[0.0, 0.0], [1.0, 1.0]])):
        mixed = generate_groups(model, tok, PROMPTS, **kwargs)
    assert mixed.texts[:2] == base.texts[:2] and mixed.texts[2:] == plain.texts[2:]
    assert base.texts != plain.texts  # the test can tell them apart


def test_baked_mean_adapter_loads_in_plain_peft(tok, model, tmp_path):
    ids, mask = encode(tok)
    (scales,) = add_module_scales(model)
    with torch.no_grad():
        scales.copy_(torch.linspace(0.5, 1.5, scales.numel()))
    scaler = ContextualScaler(
        model, ContextEncoder(model), scrambled(LoRAHypernetwork(64, 2, bottleneck=16))
    )
    per_prompt = scaler.multipliers(ids, mask).detach()
    assert not torch.allclose(per_prompt[0], per_prompt[1])
    mean = scaler.mean_multipliers(ids, mask)
    torch.testing.assert_close(mean, per_prompt.mean(0))
    with hypernet_scales(model, mean.expand(2, -1)):
        want = logits(model, ids, mask)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with baked_adapter(model, mean):
        model.save_pretrained(tmp_path)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # restored exactly
    loaded = PeftModel.from_pretrained(load_model("tiny-random", torch.float32, tok), tmp_path)
    torch.testing.assert_close(logits(loaded, ids, mask), want, atol=1e-6, rtol=0)


def test_export_from_a_checkpoint_bakes_saved_scales(tok, model, tmp_path):
    """What a checkpoint holds (raw adapter, scales, mean) becomes a plain PEFT adapter."""
    ids, mask = encode(tok)
    grow_lora_rank(model, 6)
    (scales,) = add_module_scales(model)
    with torch.no_grad():
        scales.copy_(torch.linspace(1.5, 0.5, scales.numel()))
    mean = torch.tensor([0.7, 1.3])
    with hypernet_scales(model, mean.expand(2, -1)):
        want = logits(model, ids, mask)
    model.save_pretrained(tmp_path / "adapter")  # raw weights, as checkpoints keep them
    save_tree({"lora": lora_state_dict(model), "mean": mean}, tmp_path, "adaptive")
    state = load_tree(tmp_path, "adaptive")
    loaded = PeftModel.from_pretrained(
        load_model("tiny-random", torch.float32, tok), tmp_path / "adapter"
    )
    assert not torch.allclose(logits(loaded, ids, mask), want, atol=1e-4)
    bake_saved_scales(loaded, state["lora"], state["mean"])
    torch.testing.assert_close(logits(loaded, ids, mask), want, atol=1e-6, rtol=0)
    assert not any("module_scales" in n for n, _ in loaded.named_parameters())


def test_hypernet_state_round_trip(tmp_path):
    hypernet = scrambled(LoRAHypernetwork(64, 7, bottleneck=16), seed=3)
    save_tree(hypernet.state_dict(), tmp_path, "hypernet")
    other = LoRAHypernetwork(64, 7, bottleneck=16)
    other.load_state_dict(load_tree(tmp_path, "hypernet"))
    x = torch.randn(3, 64)
    assert torch.equal(other(x), hypernet(x))
    # LayerNorm 2H + down H*b + b + up b*L + L
    assert count_parameters(hypernet) == 2 * 64 + 64 * 16 + 16 + 16 * 7 + 7


@pytest.mark.parametrize(
    ("greedy", "stop", "memory"),
    [(True, "interfaces", False), (False, "m", False), (False, "m", True)],
)
def test_finished_rows_leave_the_batch_and_the_rest_keep_their_multipliers(
    tok, greedy, stop, memory, monkeypatch
):
    """The decoder drops finished rows; the hypernetwork's scales follow the rows that go on
    (greedy: prompt 2's group stops after ~6 tokens, prompt 1's goes on under its own); an
    open neural memory, as full's GRPO has once its gate moves, reads each row alone.

    float64: a batch of another size may round a logit differently in its last bit, which in
    float32 can move a sample across the boundary between two near-equal tokens of a random
    model."""
    import deepsynapse.rollout.hf as hf

    model = lora_policy(tok, torch.float64)
    scaler = ContextualScaler(
        model, ContextEncoder(model), scrambled(LoRAHypernetwork(64, 2, bottleneck=16))
    )
    m = scaler.multipliers(*encode(tok))
    assert (m[0] - m[1]).abs().min() > 0.3  # prompts scaled apart: a mix-up changes tokens
    if memory:  # after the check: the read moves the context the multipliers come from
        torch.manual_seed(2)
        read = NeuralMemory(64, num_slots=8, num_heads=4).to(torch.float64)
        with torch.no_grad():
            read.gate.fill_(0.5)
        attach_memory(model, layer_at_depth(model, 0.5), read)
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    kwargs = dict(num_generations=4, max_new_tokens=24, greedy=greedy, stop_strings=[stop])
    try:
        torch.manual_seed(1)
        compacted = generate_groups(model, tok, PROMPTS, around=scaler.for_prompts, **kwargs)
        decoded_compacted, rows[:] = rows[1:], []
        monkeypatch.setattr(hf, "COMPACT_SHARE", 2.0)  # never: every row to the end
        torch.manual_seed(1)
        full = generate_groups(model, tok, PROMPTS, around=scaler.for_prompts, **kwargs)
        decoded_full = rows[1:]
    finally:
        hook.remove()
    assert compacted.texts == full.texts
    assert torch.equal(compacted.completion_ids, full.completion_ids)
    assert min(full.lengths.tolist()) < max(full.lengths.tolist()) // 2  # ends far apart
    assert decoded_full == [8] * len(decoded_full)
    assert decoded_compacted[-1] < 8 and sum(decoded_compacted) < sum(decoded_full)


def test_training_swap_is_the_hooks_function_with_the_same_gradients(tok):
    """``addmm``: rows' and module scales multiply the rank-wide product inside the layer's own
    forward; log-probs and gradients (A, B, module scales, multipliers) equal the hooks'."""
    from deepsynapse.models.dynamic_lora import module_scales

    model = lora_policy(tok, torch.float64)
    add_module_scales(model)
    with torch.no_grad():
        module_scales(model).scales.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    ids, mask = encode(tok)
    layers = [layer for _, layer in lora_layers(model)]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    found = {}
    for addmm in (False, True):
        model.zero_grad(set_to_none=True)
        m = torch.tensor([[1.7, 0.4], [0.2, 1.3]], dtype=torch.float64, requires_grad=True)
        with hypernet_scales(model, m, addmm=addmm):
            swapped = sum("forward" in vars(layer) for layer in layers)
            out = model(input_ids=ids, attention_mask=mask).logits
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        grads = {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}
        found[addmm] = (swapped, out.detach(), grads, m.grad.clone())
    (none, hooked, hook_grads, hook_m), (n, out, grads, m_grad) = found[False], found[True]
    assert none == 0 and n == len(layers)
    assert not any("forward" in vars(layer) for layer in layers)  # PEFT's forward is back
    torch.testing.assert_close(out, hooked, atol=1e-10, rtol=0)
    torch.testing.assert_close(m_grad, hook_m, atol=1e-9, rtol=1e-9)
    assert grads.keys() == hook_grads.keys() and any("module_scales" in k for k in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, hook_grads[name], atol=1e-9, rtol=1e-9, msg=name)
