"""The gated neural memory on real PEFT and the tiny Llama: identity at start, learns, reloads."""

from __future__ import annotations

import pytest
import torch

from deepsynapse.checkpoint import load_tree, save_tree
from deepsynapse.models.dynamic_lora import count_parameters
from deepsynapse.models.loading import load_model, load_tokenizer
from deepsynapse.models.neural_memory import NeuralMemory, attach_memory, layer_at_depth
from deepsynapse.models.policy import apply_lora, position_ids_from_mask
from deepsynapse.rollout.hf import generate_groups

PROMPTS = ["Tom has 3 apples and buys 4 more. How many now?", "What is 6 times 7?"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    return apply_lora(load_model("tiny-random", torch.float32, tok), 4, 8, 0.0, ["all-linear"])


def run(model, tok) -> torch.Tensor:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_gate_zero_is_the_base_and_reference_skips_memory(tok, model):
    before = run(model, tok)
    torch.manual_seed(1)
    memory = NeuralMemory(64, num_slots=8, num_heads=4)
    handle = attach_memory(model, layer_at_depth(model, 0.5), memory)
    assert torch.equal(run(model, tok), before)
    with torch.no_grad():
        memory.gate.fill_(0.5)
    changed = run(model, tok)
    assert not torch.allclose(changed, before, atol=1e-4)
    with model.disable_adapter():  # reference policy: no LoRA, no memory
        reference = run(model, tok)
    handle.detach()
    with model.disable_adapter():
        assert torch.equal(reference, run(model, tok))
    assert torch.equal(run(model, tok), before)  # detached: back to the base
    assert not any("memory" in n for n, _ in model.named_parameters())


def test_gradients_reach_gate_then_slots(tok, model):
    memory = NeuralMemory(64, num_slots=8, num_heads=4)
    attach_memory(model, 1, memory)
    names = [n for n, p in model.named_parameters() if any(p is q for q in memory.parameters())]
    assert len(names) == len(list(memory.parameters())) and all("memory" in n for n in names)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)

    def backward() -> None:
        memory.zero_grad()
        model(**enc).logits.float().pow(2).mean().backward()

    backward()
    assert memory.gate.grad.abs() > 0
    assert torch.all(memory.keys.grad == 0)  # tanh(0) blocks everything behind the gate
    with torch.no_grad():
        memory.gate.fill_(0.1)
    backward()
    for p in (memory.keys, memory.values, memory.query.weight, memory.out.weight, memory.gate):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_state_dict_round_trip(tok, model, tmp_path):
    memory = NeuralMemory(64, num_slots=8, num_heads=4)
    with torch.no_grad():
        memory.gate.fill_(0.3)
    handle = attach_memory(model, 0, memory)
    want = run(model, tok)
    save_tree(memory.state_dict(), tmp_path, "memory")
    handle.detach()
    torch.manual_seed(5)
    other = NeuralMemory(64, num_slots=8, num_heads=4)
    other.load_state_dict(load_tree(tmp_path, "memory"))
    attach_memory(model, 0, other)
    assert torch.equal(run(model, tok), want)
    # LayerNorm 2H, query H*H, keys and values N*H each, out H*H, gate 1
    assert count_parameters(other) == 2 * 64 + 64 * 64 + 2 * 8 * 64 + 64 * 64 + 1


def test_generation_with_memory_uses_the_kv_cache_path(tok, model):
    memory = NeuralMemory(64, num_slots=8, num_heads=4)
    with torch.no_grad():
        memory.gate.fill_(2.0)
    handle = attach_memory(model, 1, memory)
    kwargs = dict(num_generations=2, max_new_tokens=5, greedy=True)
    shared = generate_groups(model, tok, PROMPTS, prefix_sharing=True, **kwargs)
    plain = generate_groups(model, tok, PROMPTS, prefix_sharing=False, **kwargs)
    assert shared.texts == plain.texts
    # token by token with the cache == one full forward: greedy picks are the argmax there
    ids = torch.cat([shared.prompt_ids, shared.completion_ids], 1)
    mask = torch.cat([shared.prompt_mask, shared.completion_mask], 1)
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
    p, t = shared.prompt_ids.shape[1], shared.completion_ids.shape[1]
    picks = out[:, p - 1 : p + t - 1].argmax(-1)
    sel = shared.completion_mask.bool()
    assert torch.equal(picks[sel], shared.completion_ids[sel])
    assert memory.stats()["memory/gate"] == pytest.approx(float(torch.tanh(torch.tensor(2.0))))
    handle.detach()
    assert generate_groups(model, tok, PROMPTS, **kwargs).texts != shared.texts
