"""The policy's log-prob forward: bf16 adapters on a bf16 base, against the fp32 reference."""

from __future__ import annotations

import contextlib

import torch

from deepsynapse.models.dynamic_lora import addmm_lora, lora_layers
from deepsynapse.models.loading import load_model, load_tokenizer
from deepsynapse.models.policy import PolicyModule, apply_lora, pad_to_multiple


def build(dtype: torch.dtype) -> PolicyModule:
    tok = load_tokenizer("tiny-random")
    torch.manual_seed(0)
    model = apply_lora(load_model("tiny-random", dtype, tok), 4, 8.0, 0.0, ["all-linear"])
    if dtype == torch.float64:  # PEFT keeps adapters in fp32; exact tests want them float64
        model.to(dtype)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.3)
    return PolicyModule(model, chunk_tokens=7)


def batch():
    torch.manual_seed(2)
    ids = torch.randint(5, 1000, (3, 20))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding
    cmask = torch.ones(3, 10, dtype=torch.long)
    cmask[1, 6:] = 0
    return ids, attn, cmask


def test_bf16_base_trains_fp32_adapters_through_bf16_compute():
    fp32, bf16 = build(torch.float32), build(torch.bfloat16)
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    with torch.no_grad():
        for p32, p16 in zip(fp32.parameters(), bf16.parameters(), strict=True):
            p32.copy_(p16.float())  # the same function, in two precisions
    ids, attn, cmask = batch()
    ref = fp32(ids, attn, cmask).logp
    out = bf16(ids, attn, cmask).logp
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.15), (out - ref).abs().max()
    assert not torch.equal(out, ref)  # computed in bf16, not silently in fp32
    out.sum().backward()
    grads = [p.grad for p in bf16.parameters() if p.requires_grad]
    assert all(
        g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads
    )
    assert any(g.abs().sum() > 0 for g in grads)
    # the context is left as found: PEFT casts inputs again outside the forward
    assert all(layer.cast_input_dtype_enabled for _, layer in lora_layers(bf16.peft_model))


def test_fp32_base_is_untouched():
    policy = build(torch.float32)
    ids, attn, cmask = batch()
    with policy.low_precision_adapters():
        assert not torch.is_autocast_enabled("cpu")
    assert torch.isfinite(policy(ids, attn, cmask).logp).all()


def test_padding_to_a_multiple_changes_widths_not_log_probs():
    policy = build(torch.float32)
    ids, attn, cmask = batch()  # 20 columns: the body sees 19
    widths: list[int] = []
    body = policy.causal_lm.get_decoder()
    hook = body.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    policy.pad_multiple = 1
    plain = policy(ids, attn, cmask).logp
    policy.pad_multiple = 16
    padded = policy(ids, attn, cmask).logp
    hook.remove()
    assert widths == [19, 32]
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


def test_pad_to_multiple_prepends_masked_columns():
    ids = torch.tensor([[7, 8, 9], [0, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    out_ids, out_mask = pad_to_multiple(ids, mask, 4, pad_id=3)
    assert out_ids.tolist() == [[3, 7, 8, 9], [3, 0, 5, 6]]
    assert out_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    out_ids, _ = pad_to_multiple(ids, mask, 4, offset=1)  # width - 1 a multiple: 5 columns
    assert out_ids.shape == (2, 5)
    assert pad_to_multiple(ids, mask, 3)[0] is ids  # already a multiple: no copy
    assert pad_to_multiple(ids, mask, 1)[0] is ids  # 1 = off


def test_a_frozen_reference_is_the_policy_then_through_updates_and_rank_growth():
    """``freeze_reference`` anchors the reference at the policy as it is; later updates and a
    grown LoRA rank leave the reference's log-probs where they were, and the live policy's
    parameters are back after the context (the same tensors, not copies)."""
    from deepsynapse.models.dynamic_lora import grow_lora_rank

    policy = build(torch.float32)
    ids, attn, cmask = batch()
    with torch.no_grad():
        base = None
        with policy.reference():  # nothing frozen: the base, adapters off
            base = policy(ids, attn, cmask).logp
        start = policy(ids, attn, cmask).logp
        assert not torch.allclose(base, start)
        policy.freeze_reference()
        with torch.no_grad():
            for _, layer in lora_layers(policy.peft_model):  # an "update"
                layer.lora_B["default"].weight.add_(0.2)
        grow_lora_rank(policy.peft_model, 8)
        live = {n: p.data_ptr() for n, p in policy.adapter_parameters().items()}
        moved = policy(ids, attn, cmask).logp
        with policy.reference():
            anchored = policy(ids, attn, cmask).logp
        assert not torch.allclose(moved, start)
        torch.testing.assert_close(anchored, start, rtol=1e-5, atol=1e-5)
        assert all(p.data_ptr() == live[n] for n, p in policy.adapter_parameters().items())
        torch.testing.assert_close(policy(ids, attn, cmask).logp, moved)


def _forward_backward(
    policy: PolicyModule, monkeypatch, fuse: bool
) -> tuple[torch.Tensor, dict, list]:
    """The policy's log-probs and trainable gradients, with or without ``addmm_lora``, and
    how many layers each forward swapped."""
    from deepsynapse.models import policy as policy_module

    swapped: list[int] = []

    @contextlib.contextmanager
    def counted(model):
        if not fuse:
            swapped.append(0)
            yield 0
            return
        with addmm_lora(model) as n:
            swapped.append(n)
            yield n

    monkeypatch.setattr(policy_module, "addmm_lora", counted)
    policy.zero_grad(set_to_none=True)
    ids, attn, cmask = batch()
    logp = policy(ids, attn, cmask).logp
    (logp * torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return logp.detach(), grads, swapped


def test_addmm_lora_is_peft_forward_with_the_same_gradients(monkeypatch):
    policy = build(torch.float64)
    ref, ref_grads, none = _forward_backward(policy, monkeypatch, fuse=False)
    out, grads, swapped = _forward_backward(policy, monkeypatch, fuse=True)
    assert none == [0] and swapped == [len(lora_layers(policy.peft_model))]
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-9, atol=1e-12), name
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert all("forward" not in vars(layer) for _, layer in lora_layers(policy.peft_model))


def test_addmm_lora_on_a_bf16_base_computes_in_bf16(monkeypatch):
    policy = build(torch.bfloat16)
    ref, ref_grads, _ = _forward_backward(policy, monkeypatch, fuse=False)
    out, grads, swapped = _forward_backward(policy, monkeypatch, fuse=True)
    assert swapped[0] > 0 and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.05), (out - ref).abs().max()
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), 0)
        assert cos > 0.99 or ref_grads[name].abs().max() < 1e-6, (name, cos)


def test_addmm_lora_moves_module_scales_onto_the_rank_wide_product(monkeypatch):
    from deepsynapse.models.dynamic_lora import add_module_scales

    policy = build(torch.float64)
    (scales,) = add_module_scales(policy.peft_model)
    with torch.no_grad():
        scales.copy_(torch.linspace(0.5, 1.5, scales.numel()))
    ref, ref_grads, _ = _forward_backward(policy, monkeypatch, fuse=False)
    out, grads, swapped = _forward_backward(policy, monkeypatch, fuse=True)
    assert swapped == [len(lora_layers(policy.peft_model))]
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    scale_grads = [g for n, g in grads.items() if "module_scales" in n]
    assert len(scale_grads) == 1 and scale_grads[0].abs().min() > 0  # every scale learns
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-9, atol=1e-12), name


def test_hypernet_rows_or_checkpointing_keep_pefts_forward(monkeypatch):
    from deepsynapse.models.hypernet import hypernet_scales

    policy = build(torch.float64)
    rows = torch.full((3, 2), 1.1, dtype=torch.float64, requires_grad=True)
    with hypernet_scales(policy.peft_model, rows):  # per-row hooks on lora_B, with gradients
        _, _, swapped = _forward_backward(policy, monkeypatch, fuse=True)
    assert swapped == [0] and rows.grad is not None and rows.grad.abs().sum() > 0

    policy = build(torch.float64)
    policy.causal_lm.gradient_checkpointing_enable({"use_reentrant": False})
    policy.train()
    ref, _, _ = _forward_backward(policy, monkeypatch, fuse=False)
    out, _, swapped = _forward_backward(policy, monkeypatch, fuse=True)
    assert swapped == []  # the replay in backward runs PEFT's forward: nothing swapped
    assert torch.equal(out, ref)


def test_a_tokenizer_is_read_once_and_each_caller_gets_its_own(tmp_path):
    """Tokenizers are cached per process (a read costs ~0.5 s) while their files stay the
    same; each caller's copy is its own, and an edited folder is read again."""
    import shutil

    from deepsynapse.models.loading import _read_tokenizer, smollm2_tokenizer_folder

    folder = tmp_path / "tok"
    shutil.copytree(smollm2_tokenizer_folder(), folder)
    _read_tokenizer.cache_clear()
    first, second = load_tokenizer(str(folder)), load_tokenizer(str(folder))
    assert _read_tokenizer.cache_info().misses == 1 and first is not second
    second.padding_side, second.pad_token = "right", "<|im_start|>"
    assert first.padding_side == "left" and first.pad_token != second.pad_token
    text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>"
    assert first(text).input_ids == second(text).input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert first.apply_chat_template(messages, tokenize=False) == second.apply_chat_template(
        messages, tokenize=False
    )
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")
    load_tokenizer(str(folder))
    assert _read_tokenizer.cache_info().misses == 2  # the edit was read
