"""Defect 3: every tensor the loss touches lives on the policy's device.

A CPU-only build has a second device that refuses to mix with the CPU exactly as CUDA does:
``meta`` (``Tensor on device cpu is not on the expected device meta!``). A real step's
batch is staged with ``GroupBatch.to`` as the trainer does before the update, and the GRPO
loss and the per-sequence KL then run with log-probs on that device. Unstaged, the same call
raises the device mismatch that crashed the first GPU update. (Fake CUDA tensors cannot be
moved to from CPU ones on a CPU-only build, so ``FakeTensorMode`` cannot test the move.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EXTRA_REWARDS

from deepsynapse.config import load_config
from deepsynapse.rl.collect import collect_groups
from deepsynapse.rl.grpo import ADVANTAGE_ESTIMATORS, grpo_token_loss, kl_k3
from deepsynapse.rl.trainer import Timer, Trainer

DEVICE = "meta"  # stands in for the policy's CUDA device


def _tensors(obj, path="batch"):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), f"{path}.{f.name}")


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory):
    """One real step's batch (KL as a reward, so ref_logp is filled too)."""
    from conftest import TINY

    cfg = load_config(
        None, TINY + ["sft.steps=0", "eval.limit=0", "rewards.kl_mode=reward", "grpo.beta=0.0"]
    )
    trainer = Trainer(
        cfg, run_dir=tmp_path_factory.mktemp("dev"), progress=False, reward_fns=EXTRA_REWARDS
    )
    knobs = trainer.knobs.copy()
    batch, _ = collect_groups(trainer, 0, knobs, Timer())
    batch.advantages = ADVANTAGE_ESTIMATORS[cfg.grpo.advantage](
        batch.reward, cfg.rollout.num_generations
    )
    assert batch.ref_logp is not None
    return batch


def test_staged_batch_lives_on_the_policy_device_and_the_loss_runs(real_batch):
    staged = real_batch.to(DEVICE)
    for path, t in _tensors(staged):
        assert t.device.type == DEVICE, f"{path} stayed on {t.device}"
    n, t = staged.rollout.completion_mask.shape
    logp = torch.randn(n, t, device=DEVICE, requires_grad=True)
    rows = [0, 1]  # the update indexes micro-batches with row lists
    mask = staged.rollout.completion_mask.float()
    terms = grpo_token_loss(
        logp[rows],
        logp[rows].detach(),
        staged.ref_logp[rows],
        staged.advantages[rows],
        (mask * (~staged.rollout.truncated).float().unsqueeze(1))[rows],
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=0.1,
    )
    assert terms["loss"].device.type == DEVICE
    # the per-sequence KL of kl_mode=reward, before its .tolist() (meta tensors hold no data)
    kl = kl_k3(logp.detach(), staged.ref_logp) * staged.rollout.completion_mask
    assert kl.device.type == DEVICE


def test_unstaged_cpu_advantages_are_caught(real_batch):
    """The guard can fail: CPU advantages with device log-probs is the crash of defect 3."""
    n, t = real_batch.rollout.completion_mask.shape
    logp = torch.randn(n, t, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="device"):
        grpo_token_loss(
            logp,
            logp.detach(),
            None,
            real_batch.advantages,
            torch.ones(n, t, device=DEVICE),
            epsilon_low=0.2,
            epsilon_high=0.28,
            beta=0.0,
        )
