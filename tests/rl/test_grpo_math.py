"""GRPO maths against values computed by hand."""

import dataclasses
import math

import pytest
import torch

from deepsynapse.rl.grpo import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    clipped_policy_loss,
    group_has_signal,
    grpo_token_loss,
    importance_ratio_sequence,
    kl_k3,
)


def test_grpo_advantages_by_hand():
    # group 1: [1, 0, 0, 1] mean .5, unbiased std = sqrt(1/3); group 2 constant -> zeros
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = ADVANTAGE_ESTIMATORS["grpo"](r, 4)
    s = math.sqrt(1 / 3)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]
    assert a.tolist() == pytest.approx(expected, rel=1e-4)


def test_dr_grpo_advantages_are_unscaled():
    r = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert ADVANTAGE_ESTIMATORS["dr_grpo"](r, 2).tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])


def test_batch_advantages_use_batch_std():
    r = torch.tensor([3.0, 1.0, 0.0, 0.0])
    std = r.std().item()  # unbiased over the 4 values
    assert ADVANTAGE_ESTIMATORS["batch"](r, 2).tolist() == pytest.approx(
        [1 / std, -1 / std, 0, 0], rel=1e-4
    )


def test_groups_must_divide():
    with pytest.raises(ValueError, match="groups of 3"):
        ADVANTAGE_ESTIMATORS["grpo"](torch.zeros(4), 3)


def test_group_signal():
    assert group_has_signal(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), 3).tolist() == [
        True,
        False,
    ]


def test_kl_k3_by_hand():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    d = math.log(0.25) - math.log(0.5)
    assert kl_k3(logp, ref).item() == pytest.approx(math.exp(d) - d - 1)
    assert kl_k3(ref, ref).item() == 0.0


def test_kl_k3_clamp_bounds_a_token_and_its_gradient():
    """One token the reference finds e^8 times likelier scores ~2972; clamped at 10 it
    scores 10 and gives no gradient, while tokens under the bound are untouched."""
    logp = torch.tensor([-9.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -0.9])
    raw = kl_k3(logp, ref)
    assert raw[0].item() == pytest.approx(math.exp(8) - 9)
    k = kl_k3(logp, ref, clamp=10.0)
    assert k[0].item() == 10.0 and k[1].item() == pytest.approx(raw[1].item())
    k.sum().backward()
    assert logp.grad[0].item() == 0.0 and logp.grad[1].item() != 0.0


def test_clip_higher_bounds():
    ratio = torch.tensor([[1.5, 0.5, 1.1]])
    # positive advantage: clipped above at 1 + eps_high = 1.28 ; below untouched (min picks 0.5)
    loss, clipped = clipped_policy_loss(ratio, torch.tensor([1.0]), 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([-1.28, -0.5, -1.1])
    assert clipped.tolist()[0] == [1.0, 0.0, 0.0]
    # negative advantage: clipped below at 1 - eps_low = 0.8
    loss, clipped = clipped_policy_loss(ratio, torch.tensor([-1.0]), 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([1.5, 0.8, 1.1])
    assert clipped.tolist()[0] == [0.0, 1.0, 0.0]


def test_token_loss_gradient_equals_minus_advantage_on_policy():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = grpo_token_loss(
        logp,
        logp.detach(),
        None,
        torch.tensor([2.0]),
        torch.ones(1, 2),
        epsilon_low=0.2,
        epsilon_high=0.2,
        beta=0.0,
    )
    out["loss"].sum().backward()
    assert logp.grad.tolist() == [[-2.0, -2.0]]  # d/dlogp of -ratio*A at ratio 1


def test_kl_term_added_with_beta():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-1.5]])
    out = grpo_token_loss(
        logp,
        logp,
        ref,
        torch.tensor([0.0]),
        torch.ones(1, 1),
        epsilon_low=0.2,
        epsilon_high=0.2,
        beta=0.1,
    )
    d = -0.5
    assert out["loss"].item() == pytest.approx(0.1 * (math.exp(d) - d - 1))


def test_sequence_ratio_is_length_normalised():
    logp = torch.tensor([[-1.0, -1.0, 0.0]])
    old = torch.tensor([[-1.2, -1.4, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    ratio = importance_ratio_sequence(logp, old, mask)
    assert ratio[0, 0].item() == pytest.approx(math.exp(0.3))
    assert ratio[0, 1].item() == pytest.approx(math.exp(0.3))


def test_loss_weights_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    tok = LOSS_AGGREGATIONS["token"](mask, 4, 4.0, 2)
    assert tok.tolist() == [[0.25, 0.25, 0.25, 0.0], [0.25, 0, 0, 0]]
    seq = LOSS_AGGREGATIONS["sequence"](mask, 4, 4.0, 2)
    assert seq[0, 0].item() == pytest.approx(1 / 6) and seq[1, 0].item() == pytest.approx(0.5)
    dr = LOSS_AGGREGATIONS["dr_grpo"](mask, 4, 4.0, 2)
    assert dr[0, 0].item() == pytest.approx(1 / 8) and dr[1, 0].item() == pytest.approx(1 / 8)


def test_weights_make_micro_batching_exact():
    torch.manual_seed(0)
    per_token = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    w = LOSS_AGGREGATIONS["sequence"](mask, 5, float(mask.sum()), 6)
    full = (per_token * w).sum()
    split = (per_token[:2] * w[:2]).sum() + (per_token[2:] * w[2:]).sum()
    assert split.item() == pytest.approx(full.item())
    per_seq = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    assert full.item() == pytest.approx(per_seq.item(), rel=1e-5)


def test_sequence_level_ratios_default_to_the_gspo_papers_clip_bounds():
    """GSPO's sequence ratio is a length-normalised mean, so it stays within ~1e-3 of 1: the
    token-level bounds (0.2 / 0.28) would never clip it. Unset epsilons follow the ratio."""
    from deepsynapse.config import load_config

    token = load_config(None, []).grpo
    assert (token.epsilon_low, token.epsilon_high) == (0.2, 0.28)
    seq = load_config(None, ["grpo.importance_sampling=sequence"]).grpo
    assert (seq.epsilon_low, seq.epsilon_high) == (3e-4, 4e-4)
    mine = load_config(None, ["grpo.importance_sampling=sequence", "grpo.epsilon_low=0.01"]).grpo
    assert (mine.epsilon_low, mine.epsilon_high) == (0.01, 4e-4)  # an explicit value is kept
    # a sequence whose mean log-ratio is 1e-3 (ratio ~1.001, positive advantage): the paper's
    # upper bound clips it, the token-level one does not
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = logp.detach() - 1e-3
    kwargs = dict(beta=0.0, importance_sampling="sequence")
    a, m = torch.tensor([1.0]), torch.ones(1, 2)
    clipped = grpo_token_loss(
        logp, old, None, a, m, epsilon_low=seq.epsilon_low, epsilon_high=seq.epsilon_high,
        **kwargs,
    )  # fmt: skip
    assert clipped["clipped"].tolist() == [[1.0, 1.0]]
    unclipped = grpo_token_loss(logp, old, None, a, m, epsilon_low=0.2, epsilon_high=0.28, **kwargs)
    assert unclipped["clipped"].tolist() == [[0.0, 0.0]]


def test_clip_help_says_one_iteration_never_clips():
    from deepsynapse.config import GRPOConfig

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(GRPOConfig)}
    for key in ("num_iterations", "epsilon_low", "epsilon_high"):
        assert "num_iterations=1" in helps[key] and "never" in helps[key], key
    # and it is true: on-policy (old = logp), every ratio is 1 and nothing is clipped
    logp = torch.randn(3, 5)
    for sampling in ("token", "sequence"):
        out = grpo_token_loss(
            logp, logp, None, torch.tensor([1.0, -1.0, 2.0]), torch.ones(3, 5),
            epsilon_low=3e-4, epsilon_high=4e-4, beta=0.0, importance_sampling=sampling,
        )  # fmt: skip
        assert torch.all(out["ratio"] == 1.0) and out["clipped"].sum() == 0
