"""Reward fusion: calibrations checked against hand-computed values, KL modes, state."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from deepsynapse.rewards.fusion import RewardFusion, RunningStats, rank_in_groups, sequence_kl


def test_none_calibration_is_the_plain_weighted_sum_with_none_as_zero():
    f = RewardFusion("none")
    r = f.fuse({"a": [1.0, 0.0, None, 2.0], "b": [0.5, 0.5, 1.0, None]}, {"a": 2.0, "b": -1.0}, 2)
    assert r.total.tolist() == [1.5, -0.5, -1.0, 4.0]
    assert r.calibrated["a"] == [1.0, 0.0, None, 2.0]


def test_component_without_weight_is_calibrated_but_not_fused():
    r = RewardFusion("none").fuse({"a": [1.0, 2.0], "extra": [5.0, 6.0]}, {"a": 1.0}, 2)
    assert r.total.tolist() == [1.0, 2.0] and r.calibrated["extra"] == [5.0, 6.0]


def test_rank_calibration_maps_group_ranks_to_minus_one_one():
    f = RewardFusion("rank")
    r = f.fuse({"a": [3.0, 1.0, 2.0, 7.0, 7.0, None]}, {"a": 1.0}, 3)
    assert r.calibrated["a"] == [1.0, -1.0, 0.0, 0.0, 0.0, None]
    assert r.total.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    assert rank_in_groups([None, 4.0], 2) == [None, 0.0]  # a lone value is the middle
    assert rank_in_groups([1.0, 2.0, 2.0, 3.0], 4) == [-1.0, 0.0, 0.0, 1.0]


def test_rank_calibration_is_scale_free():
    f = RewardFusion("rank")
    a = f.fuse({"x": [0.1, 0.2, 0.3, 0.4]}, {"x": 1.0}, 4).total
    b = f.fuse({"x": [10.0, 200.0, 3000.0, 40000.0]}, {"x": 1.0}, 4).total
    assert torch.equal(a, b)


def test_running_calibration_z_scores_against_stats_including_the_batch():
    f = RewardFusion("running")
    first = [0.0, 1.0, 1.0, 2.0]
    r = f.fuse({"a": first}, {"a": 1.0}, 2)
    mu, sd = statistics.fmean(first), statistics.pstdev(first)
    assert r.calibrated["a"] == pytest.approx([(v - mu) / (sd + 1e-6) for v in first])
    second = [4.0, None, 6.0, 8.0]
    r = f.fuse({"a": second}, {"a": 1.0}, 2)
    seen = first + [4.0, 6.0, 8.0]  # None never enters the statistics
    mu, sd = statistics.fmean(seen), statistics.pstdev(seen)
    expect = [(v - mu) / (sd + 1e-6) for v in (4.0, 6.0, 8.0)]
    got = r.calibrated["a"]
    assert got[1] is None and [got[0], got[2], got[3]] == pytest.approx(expect)
    assert r.total[1] == 0.0


def test_running_z_scores_are_clipped():
    f = RewardFusion("running", clip=3.0)
    f.fuse({"a": [1.0] * 999 + [0.0]}, {"a": 1.0}, 1)
    r = f.fuse({"a": [0.0, 1.0]}, {"a": 1.0}, 2)
    assert r.calibrated["a"][0] == -3.0 and 0 < r.calibrated["a"][1] < 0.1


def test_running_stats_forget_beyond_window():
    s = RunningStats(window=100)
    for _ in range(50):
        s.update([0.0] * 10)
    for _ in range(50):
        s.update([10.0] * 10)
    assert s.count == 100
    assert s.mean > 9.9  # the old regime has faded out
    exact = RunningStats(window=10**9)
    exact.update([1.0, 2.0])
    exact.update([3.0, 4.0, 5.0])
    assert exact.mean == pytest.approx(3.0) and exact.std == pytest.approx(math.sqrt(2.0))


def test_kl_mode_reward_subtracts_weighted_kl_and_loss_mode_ignores_it():
    scores = {"a": [1.0, 1.0]}
    kl = [0.5, 2.0]
    in_reward = RewardFusion("none", kl_mode="reward")
    r = in_reward.fuse(scores, {"a": 1.0, "kl": 0.1}, 2, kl=kl)
    assert r.total.tolist() == pytest.approx([0.95, 0.8])
    assert r.calibrated["kl"] == [0.5, 2.0]
    assert not in_reward.kl_in_loss
    in_loss = RewardFusion("none", kl_mode="loss")
    r = in_loss.fuse(scores, {"a": 1.0, "kl": 0.1}, 2, kl=kl)
    assert r.total.tolist() == [1.0, 1.0] and "kl" not in r.calibrated and in_loss.kl_in_loss


def test_sequence_kl_is_mean_k3_over_unmasked_tokens():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.3, 0.4]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.1], [0.2, 0.3, 0.4]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    d = math.log(0.25 / 0.5)
    k3 = math.exp(d) - d - 1
    assert sequence_kl(logp, ref, mask) == pytest.approx([k3 / 2, 0.0], abs=1e-6)


def test_state_round_trip_continues_identically():
    a = RewardFusion("running", window=8)
    a.fuse({"x": [1.0, 2.0, 3.0, 5.0]}, {"x": 1.0}, 2)
    b = RewardFusion("running", window=8)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    nxt = {"x": [0.0, 9.0, 4.0, None]}
    assert torch.equal(a.fuse(nxt, {"x": 1.0}, 2).total, b.fuse(nxt, {"x": 1.0}, 2).total)
    assert a.state_dict() == b.state_dict()


def test_update_stats_then_fuse_without_update_matches_fuse():
    """The multi-process recipe: stats from gathered scores, fusion of the local ones."""
    everything = {"x": [1.0, 2.0, 3.0, 7.0]}
    local = {"x": [3.0, 7.0]}
    a = RewardFusion("running")
    a.update_stats(everything)
    b = RewardFusion("running")
    full = b.fuse(everything, {"x": 1.0}, 2)
    assert a.fuse(local, {"x": 1.0}, 2, update=False).total.tolist() == full.total[2:].tolist()


def test_update_false_leaves_statistics_alone():
    f = RewardFusion("running")
    f.fuse({"x": [1.0, 3.0]}, {"x": 1.0}, 2)
    before = f.state_dict()
    f.fuse({"x": [100.0, 300.0]}, {"x": 1.0}, 2, update=False)
    assert f.state_dict() == before


def test_metrics_and_errors():
    f = RewardFusion("running")
    r = f.fuse({"x": [1.0, 3.0], "y": [None, None]}, {"x": 1.0}, 2)
    m = f.metrics(r)
    assert m["rewards/x/calibrated_mean"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(m["rewards/y/calibrated_mean"])
    assert m["rewards/x/running_mean"] == 2.0 and m["rewards/x/running_std"] == 1.0
    with pytest.raises(ValueError, match="groups of 3"):
        f.fuse({"x": [1.0, 2.0]}, {}, 3)
    with pytest.raises(ValueError, match="disagree"):
        f.fuse({"x": [1.0, 2.0], "y": [1.0]}, {}, 1)
    with pytest.raises(ValueError, match="calibration"):
        RewardFusion("zscore")
    with pytest.raises(ValueError, match="kl_mode"):
        RewardFusion("none", kl_mode="both")
