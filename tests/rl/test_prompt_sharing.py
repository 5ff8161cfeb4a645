"""Prompt sharing (``grpo.share_prompt``): each prompt of a group run once, its KV cache
shared by the G completions, gives the unshared forward's log-probs, entropies and
gradients up to float rounding (tiny-random, fp32)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import EXTRA_REWARDS, TINY

from deepsynapse.config import load_config
from deepsynapse.models import policy as policy_module
from deepsynapse.models.dynamic_lora import add_module_scales, lora_layers, module_scales
from deepsynapse.models.hypernet import hypernet_scales
from deepsynapse.models.loading import load_model, load_tokenizer
from deepsynapse.models.neural_memory import NeuralMemory, attach_memory
from deepsynapse.models.policy import PolicyModule, apply_lora, shared_prefix_length
from deepsynapse.rl.grpo import grpo_token_loss
from deepsynapse.rl.trainer import Trainer
from deepsynapse.rl.warmup import warmup_step

G = 3
PROMPT_LENGTHS = [9, 4, 12]  # real tokens per group (left padding below the widest)
COMPLETION_LENGTHS = [[7, 3, 10], [1, 10, 5], [10, 10, 2]]  # per row, right padding after


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


def build(tok, pad_multiple: int = 64, **parts) -> PolicyModule:
    torch.manual_seed(0)
    model = apply_lora(load_model("tiny-random", torch.float32, tok), 4, 8.0, 0.0, ["all-linear"])
    torch.manual_seed(1)
    with torch.no_grad():  # PEFT starts lora_B at zero: give the adapters an effect
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.3)
    if parts.get("module_scales"):
        add_module_scales(model)
        with torch.no_grad():
            module_scales(model).scales.uniform_(0.5, 1.5)
    if parts.get("memory"):
        memory = NeuralMemory(model.get_base_model().config.hidden_size, 8, 4)
        with torch.no_grad():
            memory.gate.fill_(0.5)
        attach_memory(model, 1, memory)
    return PolicyModule(model, chunk_tokens=7, pad_multiple=pad_multiple)


def batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, P + T] ids and mask (groups of G rows sharing a left-padded prompt), [N, T] mask."""
    torch.manual_seed(2)
    p, t = max(PROMPT_LENGTHS), 10
    ids, attn, cmask = [], [], []
    for plen, clens in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, strict=True):
        prompt = torch.full((p,), pad_id)
        prompt[p - plen :] = torch.randint(5, 1000, (plen,))
        pmask = (torch.arange(p) >= p - plen).long()
        for clen in clens:
            comp = torch.full((t,), pad_id)
            comp[:clen] = torch.randint(5, 1000, (clen,))
            c = (torch.arange(t) < clen).long()
            ids.append(torch.cat([prompt, comp]))
            attn.append(torch.cat([pmask, c]))
            cmask.append(c)
    return torch.stack(ids), torch.stack(attn), torch.stack(cmask)


def loss_of(out, cmask: torch.Tensor) -> torch.Tensor:
    advantages = torch.linspace(-1.0, 1.0, cmask.shape[0])
    terms = grpo_token_loss(
        out.logp,
        out.logp.detach(),
        out.logp.detach() - 0.1,
        advantages,
        cmask.float(),
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=0.04,
    )
    return (terms["loss"] * cmask).sum() / cmask.sum()


@contextlib.contextmanager
def decoder_batches(policy: PolicyModule):
    """The batch size of every decoder forward inside (B for a shared prompt pass)."""
    sizes: list[int] = []
    hook = policy.causal_lm.model.register_forward_pre_hook(
        lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        yield sizes
    finally:
        hook.remove()


def trainable_grads(policy: PolicyModule) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    worst = 0.0
    for name in a:
        scale = max(float(a[name].abs().max()), 1e-8)
        worst = max(worst, float((a[name] - b[name]).abs().max()) / scale)
    assert worst < 1e-5, worst
    return worst


@pytest.mark.parametrize("pad_multiple", [1, 64])
def test_logprobs_and_entropies_match_unshared(tok, pad_multiple):
    policy = build(tok, pad_multiple)
    ids, attn, cmask = batch(tok.pad_token_id)
    n = ids.shape[0]
    with torch.no_grad(), decoder_batches(policy) as sizes:
        plain = policy(ids, attn, cmask, 0.7, True)
        shared = policy(ids, attn, cmask, 0.7, True, group_size=G)
    assert sizes == [n, n // G, n]  # unshared; then the prompts once, the completions
    assert (plain.logp != 0).sum() == cmask.sum()
    assert torch.allclose(shared.logp, plain.logp, atol=1e-5, rtol=0), (
        (shared.logp - plain.logp).abs().max()
    )
    # entropies are ~10.8 nats on tiny-random: 1e-5 absolute is a few fp32 ulps there
    assert torch.allclose(shared.entropy, plain.entropy, atol=1e-5, rtol=1e-6), (
        (shared.entropy - plain.entropy).abs().max()
    )


@pytest.mark.parametrize("parts", [{}, {"module_scales": True, "memory": True}])
def test_lora_gradients_match_unshared(tok, parts):
    policy = build(tok, **parts)
    policy.train()
    ids, attn, cmask = batch(tok.pad_token_id)
    grads = []
    for group_size in (1, G):
        policy.zero_grad()
        with decoder_batches(policy) as sizes:
            loss_of(policy(ids, attn, cmask, 1.0, group_size=group_size), cmask).backward()
        assert len(sizes) == (1 if group_size == 1 else 2)
        grads.append(trainable_grads(policy))
    assert any("lora_B" in n for n in grads[0])
    if parts:
        assert any("module_scales" in n for n in grads[0])
        assert any("memory" in n for n in grads[0])
    assert_grads_close(grads[0], grads[1])


def test_hypernet_rows_one_per_group(tok):
    """The shared forward's prompt pass has one row per group: the per-row LoRA scales are
    given per group and repeated to the G rows of the completion pass."""
    policy = build(tok)
    ids, attn, cmask = batch(tok.pad_token_id)
    layers = len(policy.causal_lm.model.layers)
    base = torch.linspace(0.5, 1.5, len(PROMPT_LENGTHS) * layers).view(-1, layers)
    grads = []
    for group_size in (1, G):
        multipliers = base.clone().requires_grad_(True)
        rows = multipliers if group_size > 1 else multipliers.repeat_interleave(G, 0)
        policy.zero_grad()
        with hypernet_scales(policy.peft_model, rows):
            out = policy(ids, attn, cmask, 1.0, group_size=group_size)
            loss_of(out, cmask).backward()
        grads.append({"multipliers": multipliers.grad.clone(), **trainable_grads(policy)})
    assert_grads_close(grads[0], grads[1])


def test_reference_matches_unshared(tok):
    policy = build(tok)
    ids, attn, cmask = batch(tok.pad_token_id)
    with torch.no_grad(), policy.reference():
        plain = policy(ids, attn, cmask, 1.0).logp
        shared = policy(ids, attn, cmask, 1.0, group_size=G).logp
        adapted_off = policy(ids, attn, cmask, 1.0, group_size=G).logp
    with torch.no_grad():
        adapted = policy(ids, attn, cmask, 1.0, group_size=G).logp
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    assert torch.equal(adapted_off, shared)
    assert not torch.allclose(adapted, shared, atol=1e-3)  # the adapters were really off


def test_gradient_checkpointing_falls_back_with_gradients(tok):
    policy = build(tok)
    policy.causal_lm.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    policy.train()
    ids, attn, cmask = batch(tok.pad_token_id)
    grads = []
    for group_size in (1, G):
        policy.zero_grad()
        with decoder_batches(policy) as sizes:
            loss_of(policy(ids, attn, cmask, 1.0, group_size=group_size), cmask).backward()
        assert sizes == [ids.shape[0]]  # unshared: the cache would be dropped
        grads.append(trainable_grads(policy))
    assert_grads_close(grads[0], grads[1])
    with torch.no_grad(), decoder_batches(policy) as sizes:  # no backward to replay: shared
        plain = policy(ids, attn, cmask).logp
        shared = policy(ids, attn, cmask, group_size=G).logp
    assert sizes == [ids.shape[0], ids.shape[0] // G, ids.shape[0]]
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)


def test_rows_of_a_group_must_share_their_prompt(tok):
    policy = build(tok)
    ids, attn, cmask = batch(tok.pad_token_id)
    ids[1, -cmask.shape[1] - 1] += 1  # one row's last prompt token differs from its group's
    with torch.no_grad(), pytest.raises(ValueError, match="share one prompt"):
        policy(ids, attn, cmask, group_size=G)


def _two_steps(tmp_path, share: bool):
    overrides = [
        *TINY,
        "sft.steps=0",
        "eval.limit=0",
        "train.save_every=0",
        "grpo.beta=0.04",
        "grpo.num_iterations=2",  # the old log-probs' pass too
        f"grpo.share_prompt={str(share).lower()}",
        "model.share_prefix=false",  # the groups' sharing alone (the prefix's: below)
    ]
    trainer = Trainer(
        load_config(None, overrides),
        run_dir=tmp_path / f"share-{share}",
        progress=False,
        reward_fns=EXTRA_REWARDS,
    )
    metrics = []
    for step in range(2):
        metrics.append(trainer.train_step(step))
        trainer.step = step + 1
    params = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    return metrics, params, trainer._last_batch.rollout.texts


def test_trainer_steps_match_with_and_without_sharing(tmp_path, monkeypatch):
    shared_passes: list[bool] = []
    original = PolicyModule._shared_states

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        shared_passes.append(out is not None)
        return out

    monkeypatch.setattr(PolicyModule, "_shared_states", spy)
    shared, shared_params, shared_texts = _two_steps(tmp_path, True)
    # 2 steps x 2 micro-batches x (reference + old log-probs + 2 iterations' policy passes)
    assert shared_passes == [True] * 16
    plain, plain_params, plain_texts = _two_steps(tmp_path, False)
    assert shared_passes[16:] == [False] * 16  # share_prompt=false: every row unshared
    assert shared_texts == plain_texts  # the same samples: the updates agree
    for s, p in zip(shared, plain, strict=True):
        for key in ("loss/total", "grad_norm", "kl/mean", "entropy/mean"):
            assert s[key] == pytest.approx(p[key], rel=1e-4, abs=1e-7), key
    worst = max(float((shared_params[n] - plain_params[n]).abs().max()) for n in plain_params)
    # lr 1e-3: a step moves a parameter by ~1e-3; Adam's normalisation turns the gradients'
    # float-rounding differences (~1e-7 relative) into ~1e-6 on the tiniest gradients
    assert worst < 1e-5, worst


# ------------------------------------------------------------------ the prompts' common prefix

PREFIX = 40  # shared real tokens in front of every prompt: run as 32 (SHARED_PREFIX_MULTIPLE)


def prefixed_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch``'s rows with one 40-token prefix in front of every prompt (a system prompt)."""
    ids, attn, cmask = batch(pad_id)
    torch.manual_seed(3)
    prefix = torch.randint(5, 1000, (PREFIX,))
    p = max(PROMPT_LENGTHS)
    t = cmask.shape[1]
    rows = []
    for row, mask in zip(ids, attn, strict=True):
        real = row[:p][mask[:p].bool()]
        prompt = torch.full((PREFIX + p,), pad_id)
        prompt[PREFIX + p - PREFIX - len(real) :] = torch.cat([prefix, real])
        rows.append(torch.cat([prompt, row[p:]]))
    pmask = torch.stack([(torch.arange(PREFIX + p) >= p - int(m[:p].sum())).long() for m in attn])
    return torch.stack(rows), torch.cat([pmask, attn[:, p:]], 1), cmask[:, :t]


def test_shared_prefix_length():
    ids = torch.tensor([[0, 0, 7, 8, 9, 1], [7, 8, 9, 2, 3, 4]])
    mask = (ids != 0).long()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy_module, "MIN_SHARED_PREFIX", 2)
        mp.setattr(policy_module, "SHARED_PREFIX_MULTIPLE", 1)
        assert shared_prefix_length(ids, mask) == 3
        assert shared_prefix_length(ids[:1], mask[:1]) == 0  # one row: nothing to share
        same = ids[1:].expand(2, -1)
        assert shared_prefix_length(same, mask[1:].expand(2, -1)) == 5  # a token of its own
        ragged = mask.clone()
        ragged[1, 3] = 0  # padding inside a row: not a left-padded batch
        assert shared_prefix_length(ids, ragged) == 0
        mp.setattr(policy_module, "SHARED_PREFIX_MULTIPLE", 2)
        assert shared_prefix_length(ids, mask) == 2  # rounded down to the multiple
        mp.setattr(policy_module, "MIN_SHARED_PREFIX", 4)
        assert shared_prefix_length(ids, mask) == 0  # under the minimum


@pytest.mark.parametrize("group_size", [1, G])
def test_common_prefix_runs_once(tok, group_size):
    """The prefix once ([1, 32]), then each prompt's rest (one row per prompt), then the
    completions: the log-probs and entropies of one full pass per row."""
    policy = build(tok)
    ids, attn, cmask = prefixed_batch(tok.pad_token_id)
    n = ids.shape[0]
    with torch.no_grad():
        policy.share_prefix = False
        plain = policy(ids, attn, cmask, 0.7, True)
        policy.share_prefix = True
        with decoder_batches(policy) as sizes:
            shared = policy(ids, attn, cmask, 0.7, True, group_size=group_size)
    assert sizes == ([1, n] if group_size == 1 else [1, n // G, n])
    assert (plain.logp != 0).sum() == cmask.sum()
    assert torch.allclose(shared.logp, plain.logp, atol=1e-5, rtol=0), (
        (shared.logp - plain.logp).abs().max()
    )
    assert torch.allclose(shared.entropy, plain.entropy, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("group_size", [1, G])
@pytest.mark.parametrize("parts", [{}, {"module_scales": True, "memory": True}])
def test_common_prefix_gradients_match_unshared(tok, group_size, parts):
    policy = build(tok, **parts)
    policy.train()
    ids, attn, cmask = prefixed_batch(tok.pad_token_id)
    grads = []
    for share in (False, True):
        policy.share_prefix = share
        policy.zero_grad()
        with decoder_batches(policy) as sizes:
            out = policy(ids, attn, cmask, 1.0, group_size=1 if not share else group_size)
            loss_of(out, cmask).backward()
        assert sizes[0] == (1 if share else ids.shape[0])
        grads.append(trainable_grads(policy))
    if parts:
        assert any("module_scales" in n for n in grads[0])
        assert any("memory" in n for n in grads[0])
    assert_grads_close(grads[0], grads[1])


def test_no_common_prefix_under_per_row_scales(tok):
    """The hypernetwork's per-prompt LoRA scales make the prefix's states differ by row: the
    prefix is not shared (each prompt still runs once for its group)."""
    policy = build(tok)
    ids, attn, cmask = prefixed_batch(tok.pad_token_id)
    n, layers = ids.shape[0], len(policy.causal_lm.model.layers)
    multipliers = torch.linspace(0.5, 1.5, n // G * layers).view(-1, layers)
    with torch.no_grad(), hypernet_scales(policy.peft_model, multipliers):
        with decoder_batches(policy) as sizes:
            shared = policy(ids, attn, cmask, group_size=G).logp
        policy.share_prefix = False
        plain = policy(ids, attn, cmask, group_size=G).logp
    assert sizes == [n // G, n]
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    with torch.no_grad(), decoder_batches(policy) as sizes:
        policy.share_prefix = True
        policy(ids, attn, cmask, group_size=G)
    assert sizes == [1, n // G, n]  # the scales gone: the prefix shared again


def _warmup_and_steps(tmp_path, share_prefix: bool):
    overrides = [
        *TINY,
        "sft.steps=2",
        "sft.batch_size=4",
        "grpo.micro_batch_size=4",  # two groups of 2: two prompts a micro-batch
        "eval.limit=0",
        "train.save_every=0",
        "grpo.beta=0.04",
        f"model.share_prefix={str(share_prefix).lower()}",
    ]
    trainer = Trainer(
        load_config(None, overrides),
        run_dir=tmp_path / f"prefix-{share_prefix}",
        progress=False,
        reward_fns=EXTRA_REWARDS,
    )
    with decoder_batches(trainer.unwrapped) as sizes:
        losses = [warmup_step(trainer, k)[1] for k in range(2)]
        metrics = [trainer.train_step(0)]
    params = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    return sizes, losses, metrics, params, trainer._last_batch.rollout.texts


def test_trainer_warmup_and_update_share_the_prefix(tmp_path):
    """Trainer-level: with ``model.share_prefix`` the warm-up's and the update's forwards run
    the system prompt once ([1, L] passes) and train exactly as without it."""
    sizes, losses, metrics, params, texts = _warmup_and_steps(tmp_path, True)
    plain_sizes, plain_losses, plain_metrics, plain_params, plain_texts = _warmup_and_steps(
        tmp_path, False
    )
    # warm-up: [1, 4] twice (prefix, rests); then the rollouts; the update's reference and
    # policy passes: [1, 2, 4] each (prefix, the 2 prompts' rests, the 4 completions)
    assert sizes[:4] == [1, 4, 1, 4] and sizes[-6:] == [1, 2, 4] * 2, sizes
    # without: one pass a warm-up step; the update's prompts once a group ([2, 4]) each
    assert plain_sizes[:2] == [4, 4] and plain_sizes[-4:] == [2, 4] * 2, plain_sizes
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert texts == plain_texts
    for key in ("loss/total", "grad_norm", "kl/mean"):
        assert metrics[0][key] == pytest.approx(plain_metrics[0][key], rel=1e-4, abs=1e-7), key
    worst = max(float((params[n] - plain_params[n]).abs().max()) for n in plain_params)
    assert worst < 1e-5, worst
