"""Dynamic LoRA on real PEFT and the tiny Llama: growth, optimizer carry-over, scales, reload."""

from __future__ import annotations

import random

import pytest
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from deepsynapse.checkpoint import load_tree, save_tree
from deepsynapse.models.dynamic_lora import (
    add_module_scales,
    bake_module_scales,
    count_lora_parameters,
    current_rank,
    grow_lora_rank,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    module_scales,
    sample_nested_rank,
    truncated_rank,
)
from deepsynapse.models.loading import load_model, load_tokenizer
from deepsynapse.models.policy import apply_lora

TEXTS = ["Tom has 3 apples and buys 4 more.", "How many?"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


def build(tok, r: int = 4, alpha: float = 8.0, seed: int = 0):
    torch.manual_seed(seed)
    return apply_lora(load_model("tiny-random", torch.float32, tok), r, alpha, 0.0, ["all-linear"])


def batch(tok):
    return tok(TEXTS, return_tensors="pt", padding=True)


def logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits


def nonzero_b(model, seed: int = 1) -> None:
    """PEFT starts B at zero; give it values so LoRA actually changes the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)


def loss_of(model, enc) -> torch.Tensor:
    ids = enc["input_ids"]
    out = model(**enc).logits[:, :-1]
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train(model, opt, enc, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = loss_of(model, enc)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_growth_leaves_logits_unchanged_and_keeps_scaling(tok):
    model, enc = build(tok), batch(tok)
    nonzero_b(model)
    before = logits(model, enc)
    scalings = [layer.scaling["default"] for _, layer in lora_layers(model)]
    info = grow_lora_rank(model, 8, seed=3)
    assert info["old_rank"] == 4 and info["new_rank"] == 8
    torch.testing.assert_close(logits(model, enc), before, atol=1e-6, rtol=0)
    for (_, layer), s in zip(lora_layers(model), scalings, strict=True):
        assert layer.r["default"] == 8 and layer.scaling["default"] == s
        assert layer.lora_A["default"].weight.shape[0] == 8
        assert torch.all(layer.lora_B["default"].weight[:, 4:] == 0)
        assert layer.lora_A["default"].weight[4:].abs().sum() > 0  # new directions are random
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (8, 16)  # alpha / r stays 2
    assert not config.rank_pattern and not config.alpha_pattern
    assert current_rank(model) == 8
    with pytest.raises(ValueError, match="shrink"):
        grow_lora_rank(model, 4)


def test_growth_carries_adamw_state_and_training_continues(tok):
    model, enc = build(tok), batch(tok)
    opt = adamw(model)
    train(model, opt, enc, 2)
    _, layer = lora_layers(model)[0]
    a_old, b_old = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    state_a = {k: v.clone() for k, v in opt.state[a_old].items()}
    before = logits(model, enc)
    n_params = sum(len(g["params"]) for g in opt.param_groups)

    grow_lora_rank(model, 8, opt)

    a_new, b_new = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == n_params
    assert any(p is a_new for p in params) and not any(p is a_old for p in params)
    assert any(p is b_new for p in params) and not any(p is b_old for p in params)
    assert all(p is not a_old and p is not b_old for p in opt.state)
    new_state = opt.state[a_new]
    assert torch.equal(new_state["step"], state_a["step"])
    assert torch.equal(new_state["exp_avg"][:4], state_a["exp_avg"])
    assert torch.equal(new_state["exp_avg_sq"][:4], state_a["exp_avg_sq"])
    assert torch.all(new_state["exp_avg"][4:] == 0) and torch.all(new_state["exp_avg_sq"][4:] == 0)
    assert opt.state[b_new]["exp_avg"].shape == b_new.shape
    torch.testing.assert_close(logits(model, enc), before, atol=1e-6, rtol=0)

    losses = train(model, opt, enc, 4)
    assert losses[-1] < losses[0]
    assert b_new.detach()[:, 4:].abs().sum() > 0  # the new directions learn


def test_growth_through_accelerate_optimizer(tok):
    from accelerate import Accelerator

    model, enc = build(tok), batch(tok)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, adamw(model))
    train(model, opt, enc, 1)
    grow_lora_rank(model, 6, opt)
    inner = opt.optimizer
    grown = {
        id(p) for _, layer in lora_layers(model) for p in layer.parameters() if p.requires_grad
    }
    assert grown <= {id(p) for g in inner.param_groups for p in g["params"]}
    assert train(model, opt, enc, 1)[0] > 0


def test_reload_after_growth_gives_identical_logits(tok, tmp_path):
    model, enc = build(tok), batch(tok)
    add_module_scales(model)
    opt = adamw(model)
    train(model, opt, enc, 2)
    grow_lora_rank(model, 8, opt)
    train(model, opt, enc, 2)
    want = logits(model, enc)
    model.save_pretrained(tmp_path / "adapter")
    save_tree(lora_state_dict(model), tmp_path, "lora")
    save_tree(opt.state_dict(), tmp_path, "optimizer")

    fresh = build(tok, seed=7)  # the run's start: rank 4, other random A
    add_module_scales(fresh)
    fresh_opt = adamw(fresh)
    load_lora_state_dict(fresh, load_tree(tmp_path, "lora"), fresh_opt)
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(fresh, weights)
    assert not result.unexpected_keys
    fresh_opt.load_state_dict(load_tree(tmp_path, "optimizer"))
    assert torch.equal(logits(fresh, enc), want)
    # and both continue identically (exact resume)
    train(model, opt, enc, 1)
    train(fresh, fresh_opt, enc, 1)
    assert torch.equal(logits(fresh, enc), logits(model, enc))


def test_peft_loads_grown_adapter_with_baked_scales(tok, tmp_path):
    model, enc = build(tok), batch(tok)
    nonzero_b(model)
    grow_lora_rank(model, 8)
    nonzero_b(model, seed=2)  # use the new directions too
    (scales,) = add_module_scales(model)
    with torch.no_grad():
        scales.copy_(torch.linspace(0.5, 1.5, scales.numel()))
    want = logits(model, enc)
    bake_module_scales(model)
    torch.testing.assert_close(logits(model, enc), want, atol=1e-6, rtol=0)
    assert torch.all(module_scales(model).scales == 1)
    model.save_pretrained(tmp_path)
    base = load_model("tiny-random", torch.float32, tok)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(logits(loaded, enc), want, atol=1e-6, rtol=0)


def test_module_scales_at_one_equal_plain_lora_and_learn(tok):
    model, enc = build(tok), batch(tok)
    nonzero_b(model)
    plain = logits(model, enc)
    (scales,) = add_module_scales(model)
    assert scales.shape == (len(lora_layers(model)),) and torch.all(scales == 1)
    assert torch.equal(logits(model, enc), plain)
    with torch.no_grad():
        scales.zero_()
    with model.disable_adapter():
        base = logits(model, enc)
    torch.testing.assert_close(logits(model, enc), base, atol=1e-6, rtol=0)
    with torch.no_grad():
        scales.fill_(1.0)
    loss_of(model, enc).backward()
    assert scales.grad is not None and scales.grad.abs().sum() > 0
    names = [n for n, p in model.named_parameters() if p is scales]
    assert names and "module_scales" in names[0]
    assert (
        count_lora_parameters(model)
        == 4
        * (
            sum(  # r * (in + out) per module, + scales
                layer.in_features + layer.out_features for _, layer in lora_layers(model)
            )
        )
        + scales.numel()
    )


def test_scales_survive_growth(tok):
    model, enc = build(tok), batch(tok)
    nonzero_b(model)
    (scales,) = add_module_scales(model)
    with torch.no_grad():
        scales.fill_(0.3)
    before = logits(model, enc)
    grow_lora_rank(model, 8)
    torch.testing.assert_close(logits(model, enc), before, atol=1e-6, rtol=0)


def test_truncated_rank_uses_a_prefix_of_the_components(tok):
    model, enc = build(tok, r=8, alpha=16), batch(tok)
    nonzero_b(model)
    full = logits(model, enc)
    with truncated_rank(model, 8):
        assert torch.equal(logits(model, enc), full)
    with truncated_rank(model, 3):
        truncated = logits(model, enc)
    assert torch.equal(logits(model, enc), full)  # hooks removed on exit
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight[:, 3:] = 0
    torch.testing.assert_close(truncated, logits(model, enc), atol=1e-6, rtol=0)


def test_sample_nested_rank_is_seeded_and_in_range():
    draws = [sample_nested_rank(8, random.Random(s), min_rank=2) for s in range(200)]
    assert min(draws) == 2 and max(draws) == 8
    assert draws == [sample_nested_rank(8, random.Random(s), min_rank=2) for s in range(200)]
    with pytest.raises(ValueError):
        sample_nested_rank(4, random.Random(0), min_rank=5)
