"""Lean layers (models/lean_layers.py): the same function, less kept for backward."""

from __future__ import annotations

import copy
import json

import torch

from deepsynapse.models.lean_layers import GATED_SILU_MLPS, GQA_ATTENTION
from deepsynapse.models.loading import load_model, load_tokenizer


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded rows, as every batch the trainer runs: the mask SDPA used to copy for."""
    ids = torch.randint(5, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :2] = 0
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _forward_backward(model) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[tuple]]:
    """Logits, parameter gradients and the shapes of the distinct tensors saved for backward."""
    ids, mask, positions = _padded_batch()
    saved: dict[tuple[int, int], tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[(storage.data_ptr(), storage.nbytes())] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logits[mask.bool()].logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, list(saved.values())


def _stock(model):
    """A copy of ``model`` with transformers' own attention and MLP forwards."""
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")  # repeat_kv under a mask
    for module in stock.modules():
        if type(module).__name__ in GATED_SILU_MLPS:
            del module.forward  # the class's: silu(gate) kept too
    return stock


def test_models_load_with_lean_layers_that_save_less_for_the_same_gradients():
    tokenizer = load_tokenizer("tiny-random")
    model = load_model("tiny-random", tokenizer=tokenizer)
    assert model.config._attn_implementation == GQA_ATTENTION

    logits, grads, saved = _forward_backward(model)
    ref_logits, ref_grads, ref_saved = _forward_backward(_stock(model))

    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)

    cfg = model.config
    heads, kv_heads, layers = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.num_hidden_layers,
    )
    assert heads > kv_heads  # the tiny model groups its heads, as SmolLM2 does

    def count(shapes: list[tuple], match) -> int:
        return sum(1 for s in shapes if match(s))

    # keys and values are saved grouped, not copied to every query head
    def by_heads(n):
        return lambda s: len(s) == 4 and s[1] == n

    assert count(saved, by_heads(heads)) == count(ref_saved, by_heads(heads)) - 2 * layers
    assert count(saved, by_heads(kv_heads)) == count(ref_saved, by_heads(kv_heads)) + 2 * layers

    # the MLP keeps gate(x) and up(x), not also silu(gate(x))
    def mlp_wide(s):
        return s[-1] == cfg.intermediate_size and len(s) == 3

    assert count(saved, mlp_wide) == count(ref_saved, mlp_wide) - layers


def test_silu_mul_gradients_match_autograd_in_float64():
    from deepsynapse.models.lean_layers import silu_mul

    gen = torch.Generator().manual_seed(0)
    gate = (4 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    up = torch.randn(5, 7, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(silu_mul, (gate, up))
    with torch.no_grad():  # no autograd: the plain product
        torch.testing.assert_close(silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


def test_grouped_attention_is_not_written_into_saved_configs(tmp_path):
    """A saved or exported model loads anywhere: the name is this process's registration."""
    tokenizer = load_tokenizer("tiny-random")
    load_model("tiny-random", tokenizer=tokenizer).save_pretrained(tmp_path)
    assert GQA_ATTENTION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_lean_layers_in_bf16_are_as_accurate_as_the_stock_ones():
    """On a bf16 base (AMX class) the gradients are as near float64's as transformers' are."""
    tokenizer = load_tokenizer("tiny-random")
    model = load_model("tiny-random", dtype=torch.bfloat16, tokenizer=tokenizer)
    logits, grads, _ = _forward_backward(model)
    ref_logits, ref_grads, _ = _forward_backward(_stock(model))
    _, exact, _ = _forward_backward(_stock(copy.deepcopy(model).double()))

    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)  # the forward is unchanged

    def error(g: dict[str, torch.Tensor]) -> float:
        return max(float((g[n].double() - exact[n]).abs().max() / exact[n].abs().max()) for n in g)

    assert error(grads) <= 1.1 * error(ref_grads)
