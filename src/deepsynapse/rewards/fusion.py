"""Reward fusion (white paper 3.6): bring each component to a comparable scale, then weigh.

Components live on very different scales (a 0/1 correctness, a graded format share, a
log-likelihood margin, a per-sequence KL), so a fixed weight means different things for
each and drifts as training moves their distributions. Fusion first *calibrates* each
component, then sums ``weight * calibrated``. Calibrations, picked from ``CALIBRATIONS``:

- ``none``: raw scores.
- ``running``: z-score against a running mean and standard deviation per component
  (Welford/Chan merging, with the count capped at ``window`` so that old batches fade out
  like an exponential moving average). Stats are updated with the batch *before* it is
  scored, so the first batch is calibrated against itself. z is clipped to ``[-clip, clip]``:
  a rare event against a near-constant history (one failure among thousands of passes)
  would otherwise yield a z of -60 and swamp every other objective.
- ``rank``: rank within the group (G contiguous completions of one prompt) mapped to
  [-1, 1]; ties share their average rank; a group with one scored value gives 0.

None scores (component not applicable) stay None in ``calibrated`` and contribute 0 to
the total, and never enter the running statistics.

KL is the fifth objective. ``kl_mode="loss"`` keeps it in the loss (GRPO: ``beta * KL``
per token) and fusion ignores any KL given. ``kl_mode="reward"`` subtracts a per-sequence
KL (see :func:`sequence_kl`), calibrated like any component, with the weight of the
objective named ``"kl"``: total = sum_c w_c * cal(c) - w_kl * cal(kl).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepsynapse.rl.grpo import kl_k3

__all__ = [
    "CALIBRATIONS",
    "KL_MODES",
    "FusionResult",
    "RewardFusion",
    "RunningStats",
    "rank_in_groups",
    "sequence_kl",
]

CALIBRATIONS = ("none", "running", "rank")
KL_MODES = ("loss", "reward")
KL_NAME = "kl"
EPS = 1e-6

Scores = list[float | None]


@dataclass
class FusionResult:
    """What :meth:`RewardFusion.fuse` returns."""

    total: torch.Tensor  # [N] fused reward
    calibrated: dict[str, Scores]  # component -> N calibrated scores (None where n/a)


class RunningStats:
    """Mean and variance over a stream of batches; forgets beyond ``window`` samples.

    Merging uses Chan et al.'s parallel update (exact, numerically stable); capping the
    count at ``window`` turns it into an exponential moving average once warm.
    """

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations

    def update(self, values: Sequence[float]) -> None:
        """Merge one batch of values (None already removed)."""
        n = len(values)
        if n == 0:
            return
        b_mean = sum(values) / n
        b_m2 = sum((v - b_mean) ** 2 for v in values)
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total
        if self.count > self.window:  # keep the variance estimate, shrink its weight
            self.m2 *= self.window / self.count
            self.count = float(self.window)

    @property
    def std(self) -> float:
        """Population standard deviation of what is remembered (0 before two samples)."""
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 0.0

    def state_dict(self) -> dict[str, float]:
        """JSON-able running statistics."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict` output."""
        self.count, self.mean, self.m2 = (float(state[k]) for k in ("count", "mean", "m2"))


def rank_in_groups(values: Scores, group_size: int) -> Scores:
    """Rank of each value within its group mapped to [-1, 1] (ties averaged; None kept).

    >>> rank_in_groups([0.0, 1.0, 1.0, None, 5.0, 5.0], 3)
    [-1.0, 0.5, 0.5, None, 0.0, 0.0]
    """
    if len(values) % group_size:
        raise ValueError(f"{len(values)} scores do not split into groups of {group_size}")
    out: Scores = [None] * len(values)
    for start in range(0, len(values), group_size):
        idx = [i for i in range(start, start + group_size) if values[i] is not None]
        if len(idx) == 1:
            out[idx[0]] = 0.0
        if len(idx) < 2:
            continue
        ordered = sorted(idx, key=lambda i: values[i])
        pos = 0
        while pos < len(ordered):  # walk runs of ties, give each its average rank
            end = pos
            while end + 1 < len(ordered) and values[ordered[end + 1]] == values[ordered[pos]]:
                end += 1
            rank = (pos + end) / 2
            for i in ordered[pos : end + 1]:
                out[i] = 2.0 * rank / (len(idx) - 1) - 1.0
            pos = end + 1
    return out


def sequence_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, clamp: float = 0.0
) -> list[float]:
    """Per-completion KL to the reference: mean over its tokens of the k3 estimate.

    [N, T] log-probs of the sampled tokens under the policy and the reference, [N, T] mask
    -> N floats. The mean (not the sum) keeps long completions from dominating, matching
    the token-level KL term of the loss, and ``clamp`` bounds each token as there.
    """
    mask = mask.float()
    per_token = kl_k3(logp.float(), ref_logp.float(), clamp) * mask
    return (per_token.sum(1) / mask.sum(1).clamp(min=1.0)).tolist()


class RewardFusion:
    """Calibrate every component, then sum ``weight * calibrated`` (see module docstring)."""

    def __init__(
        self,
        calibration: str = "none",
        kl_mode: str = "loss",
        window: int = 4096,
        clip: float = 5.0,
    ):
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        if kl_mode not in KL_MODES:
            raise ValueError(f"kl_mode must be one of {KL_MODES}, got {kl_mode!r}")
        self.calibration = calibration
        self.kl_mode = kl_mode
        self.window = window
        self.clip = float(clip)
        self.stats: dict[str, RunningStats] = {}

    @property
    def kl_in_loss(self) -> bool:
        """Whether the loss should keep its ``beta * KL`` term (False: KL is in the reward)."""
        return self.kl_mode == "loss"

    def update_stats(self, scores: dict[str, Scores]) -> None:
        """Merge scores into the running statistics without fusing anything.

        For several processes: update every process with the *gathered* scores, then call
        :meth:`fuse` with ``update=False`` on the local ones, so all ranks share one scale.
        """
        for name, values in scores.items():
            stats = self.stats.setdefault(name, RunningStats(self.window))
            stats.update([v for v in values if v is not None])

    def calibrate(self, name: str, values: Scores, group_size: int, update: bool = True) -> Scores:
        """One component's scores on the common scale (None kept)."""
        if self.calibration == "rank":
            return rank_in_groups(values, group_size)
        if self.calibration == "none":
            return list(values)
        if update:
            self.update_stats({name: values})
        stats = self.stats.setdefault(name, RunningStats(self.window))
        mean, scale, c = stats.mean, stats.std + EPS, self.clip
        return [None if v is None else max(-c, min(c, (v - mean) / scale)) for v in values]

    def fuse(
        self,
        scores: dict[str, Scores],
        weights: dict[str, float],
        group_size: int,
        kl: Sequence[float] | None = None,
        update: bool = True,
    ) -> FusionResult:
        """Fused reward [N] and the calibrated scores of every component.

        Components absent from ``weights`` get weight 0 (still calibrated and reported).
        ``kl`` (per-completion KL, :func:`sequence_kl`) is used only when
        ``kl_mode == "reward"``, weighted by ``weights["kl"]``. ``update=False`` scores
        without moving the running statistics (e.g. for evaluation).
        """
        lengths = {len(v) for v in scores.values()}
        if kl is not None:
            lengths.add(len(kl))
        if len(lengths) > 1:
            raise ValueError(f"components disagree on the number of completions: {lengths}")
        n = lengths.pop() if lengths else 0
        if group_size < 1 or n % group_size:
            raise ValueError(f"{n} completions do not split into groups of {group_size}")
        total = torch.zeros(n, dtype=torch.float32)
        calibrated: dict[str, Scores] = {}
        for name, values in scores.items():
            cal = self.calibrate(name, values, group_size, update)
            calibrated[name] = cal
            weight = float(weights.get(name, 0.0))
            if weight:
                total += weight * torch.tensor([0.0 if v is None else v for v in cal])
        if self.kl_mode == "reward" and kl is not None:
            cal = self.calibrate(KL_NAME, [float(v) for v in kl], group_size, update)
            calibrated[KL_NAME] = cal
            total -= float(weights.get(KL_NAME, 0.0)) * torch.tensor(cal, dtype=torch.float32)
        return FusionResult(total, calibrated)

    def metrics(self, result: FusionResult) -> dict[str, float]:
        """``rewards/<name>/calibrated_mean`` (NaN when all None) and, with running
        calibration, ``rewards/<name>/running_mean`` and ``/running_std``."""
        out: dict[str, float] = {}
        for name, values in result.calibrated.items():
            vals = [v for v in values if v is not None]
            out[f"rewards/{name}/calibrated_mean"] = sum(vals) / len(vals) if vals else math.nan
        for name, stats in self.stats.items():
            out[f"rewards/{name}/running_mean"] = stats.mean
            out[f"rewards/{name}/running_std"] = stats.std
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: calibration, KL mode and the running statistics per component."""
        return {
            "calibration": self.calibration,
            "kl_mode": self.kl_mode,
            "stats": {k: s.state_dict() for k, s in self.stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore running statistics (the configured calibration and KL mode stay)."""
        self.stats = {}
        for name, s in state.get("stats", {}).items():
            self.stats[name] = RunningStats(self.window)
            self.stats[name].load_state_dict(s)
