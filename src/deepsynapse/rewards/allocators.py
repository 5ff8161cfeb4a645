"""Reward-weight allocators (white paper 3.11): controllers that set ``knobs.reward_weights``.

Each allocator owns the weights of the objectives it is given (``components``) and leaves
every other key of ``knobs.reward_weights`` alone (discovered terms, for instance). Pick
one by name with :func:`build_allocator`:

- ``static``: the configured weights, forever.
- ``phase``: one weight table per curriculum phase, switched on ``curriculum/phase``.
- ``neural``: a small MLP maps each objective's training state (running mean, trend,
  variance, correlation with correctness) to a softmax over objectives; it is trained
  online by REINFORCE, by default on how well the fused reward of each batch agrees with
  correctness within groups (counterfactually, on the batch itself), or with ``target=``
  on a metric's change one step after the weights were applied (see
  :class:`NeuralAllocator`).
- ``mirror``: exponentiated-gradient (mirror descent on the simplex) toward objectives
  whose within-group scores agree with correctness.

How allocator weights compose with a curriculum. The allocator runs after the curriculum
(a controller earlier in the same step), which writes each phase's reward weights into the
knobs. What the allocator finds there is the *prior*, and for each objective ``c`` it owns,
``static``, ``neural`` and ``mirror`` write::

    knobs.reward_weights[c] = prior[c] * weights[c] / base[c]

so the allocator's weights act as multiplicative factors on the phase's emphasis: ``static``
(weights == base) leaves the phase weights exactly as they are, an adaptive allocator
that doubles an objective's weight doubles it in every phase, and a phase that zeroes an
objective keeps it at zero. Without a curriculum the prior is the configured (base)
weights. An objective whose base weight is 0 has no scale to be relative to: its factor is
1 and the prior passes through unchanged (a zero-weight objective stays off unless a phase
turns it on, and then the phase's weight is used as given). The trainer carries the knobs
from one step to the next, so without a curriculum the value found is the one the
allocator wrote itself the step before; a value equal to what it last wrote is read as
carried over and the prior it used then is kept, so the factors never compound.

``phase`` is the exception: its tables are absolute weights and it overwrites whatever the
knobs hold for the objectives it owns (the engine gives it every configured objective), so
with both curriculum phase ``reward_weights`` and the ``phase`` allocator, the allocator's
tables win. Use one or the other.

The adaptive two keep their weights on a scaled simplex: each weight >= ``floor`` and
their sum equal to ``total`` (default: the sum of the base weights), so the reward's scale
does not drift while its mix does. Each logs a ``reward_weights`` event, with the evidence
behind it, whenever its (mean) weights have moved by more than ``event_threshold`` since
the last event. Weights applied are logged every step by the trainer (``weights/*``).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from deepsynapse.control.knobs import Event, Knobs

__all__ = [
    "ALLOCATORS",
    "AdaptiveCore",
    "MirrorDescentAllocator",
    "NeuralAllocator",
    "ObjectiveTracker",
    "PhaseAllocator",
    "StaticAllocator",
    "WeightAllocator",
    "build_allocator",
    "simplex_weights",
]

FEATURES = ("running_mean", "trend", "variance", "correctness_corr")


# ------------------------------------------------------------------ shared pieces


def simplex_weights(probs: Sequence[float], total: float, floor: float) -> list[float]:
    """Map a probability vector to weights ``floor + (total - n*floor) * p``.

    Each weight is >= floor and they sum to total exactly (up to rounding).

    >>> simplex_weights([0.5, 0.5, 0.0], total=2.5, floor=0.25)
    [1.125, 1.125, 0.25]
    """
    free = total - floor * len(probs)
    return [floor + free * float(p) for p in probs]


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side has no variance (or < 2 points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 1e-12 or syy <= 1e-12:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def _slope(ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against 0..n-1 (per step)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sxx


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


class ObjectiveTracker:
    """Per-objective training state over a window: the features the allocators read.

    From step metrics: ``rewards/<name>/mean`` and the target (``accuracy/train``). From
    :meth:`observe_batch` (optional): per-completion scores and correctness, centred within
    groups when ``group_size`` is given, pooled over the last ``pair_window`` completions.
    Features per objective (``FEATURES``):

    - running_mean: EMA of the step means (``ema`` per step);
    - trend: least-squares slope of the step means over the window, times the window
      (the change across it);
    - variance: variance of the step means over the window;
    - correctness_corr: Pearson correlation between the objective's scores and
      correctness, per completion within groups if batches were given, else between the
      step means and the target across the window; 0 when either is constant.
    """

    def __init__(
        self,
        components: Sequence[str],
        window: int = 20,
        pair_window: int = 512,
        ema: float = 0.1,
        target: str = "accuracy/train",
    ) -> None:
        self.components = list(components)
        self.window, self.pair_window, self.ema, self.target = window, pair_window, ema, target
        self.means: dict[str, deque[float]] = {c: deque(maxlen=window) for c in components}
        self.paired_target: dict[str, deque[float]] = {c: deque(maxlen=window) for c in components}
        self.running: dict[str, float | None] = {c: None for c in components}
        self.pairs: dict[str, deque[tuple[float, float]]] = {
            c: deque(maxlen=pair_window) for c in components
        }

    def observe(self, metrics: Mapping[str, float]) -> None:
        """Add one step's metrics (NaN or missing values are skipped)."""
        target = metrics.get(self.target)
        for c in self.components:
            m = metrics.get(f"rewards/{c}/mean")
            if not _finite(m):
                continue
            m = float(m)
            self.means[c].append(m)
            self.paired_target[c].append(float(target) if _finite(target) else math.nan)
            prev = self.running[c]
            self.running[c] = m if prev is None else (1 - self.ema) * prev + self.ema * m

    def observe_batch(
        self,
        scores: Mapping[str, Sequence[float | None]],
        correct: Sequence[float],
        group_size: int | None = None,
    ) -> None:
        """Add per-completion (score, correct) pairs, centred within each group if given."""
        correct = [float(c) for c in correct]
        n = len(correct)
        g = group_size or n or 1
        for c in self.components:
            values = scores.get(c)
            if values is None or len(values) != n:
                continue
            for start in range(0, n, g):
                idx = [i for i in range(start, min(start + g, n)) if values[i] is not None]
                if not idx:
                    continue
                ms = sum(float(values[i]) for i in idx) / len(idx)
                mc = sum(correct[i] for i in idx) / len(idx)
                for i in idx:
                    self.pairs[c].append((float(values[i]) - ms, correct[i] - mc))

    def features(self, name: str) -> list[float]:
        """The ``FEATURES`` of one objective, each clipped to [-10, 10]."""
        means = list(self.means[name])
        n = len(means)
        mean = sum(means) / n if n else 0.0
        var = sum((m - mean) ** 2 for m in means) / n if n else 0.0
        pairs = self.pairs[name]
        if len(pairs) >= 8:
            xy = torch.tensor(list(pairs), dtype=torch.float64)
            xy = xy - xy.mean(0)
            sxx, syy = float(xy[:, 0].square().sum()), float(xy[:, 1].square().sum())
            corr = float(xy.prod(1).sum()) / math.sqrt(sxx * syy) if min(sxx, syy) > 1e-12 else 0.0
        else:
            both = [
                (m, t) for m, t in zip(means, self.paired_target[name], strict=True) if _finite(t)
            ]
            corr = _pearson([b[0] for b in both], [b[1] for b in both])
        running = self.running[name] or 0.0
        raw = [running, _slope(means) * max(n - 1, 1), var, corr]
        return [max(-10.0, min(10.0, x)) for x in raw]

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (JSON-able; the neural allocator adds tensors)."""
        return {
            "means": {c: list(v) for c, v in self.means.items()},
            "paired_target": {
                c: [None if math.isnan(t) else t for t in v] for c, v in self.paired_target.items()
            },
            "running": dict(self.running),
            "pairs": {c: [list(p) for p in v] for c, v in self.pairs.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; continues exactly where it left off."""
        for c in self.components:
            self.means[c] = deque(state["means"].get(c, []), maxlen=self.window)
            self.paired_target[c] = deque(
                [math.nan if t is None else t for t in state["paired_target"].get(c, [])],
                maxlen=self.window,
            )
            self.running[c] = state["running"].get(c)
            self.pairs[c] = deque(
                [tuple(p) for p in state["pairs"].get(c, [])], maxlen=self.pair_window
            )


class WeightAllocator:
    """What every allocator shares: its weights, ``apply``, and move-triggered events.

    Subclasses implement ``_decide(step, metrics) -> evidence | None`` which updates
    ``self.weights`` (and ``self.shown``, the weights events compare, when those differ
    from what is applied, e.g. the neural policy's mean vs its exploration sample).
    """

    name = "allocator"
    kind = "base"
    writes: ClassVar[dict[str, str]] = {"reward_weights": "scales"}

    def __init__(
        self,
        components: Sequence[str],
        base_weights: Mapping[str, float],
        *,
        event_threshold: float = 0.05,
    ) -> None:
        if not components:
            raise ValueError(f"{self.kind} allocator: no components to weigh")
        missing = [c for c in components if c not in base_weights]
        if missing:
            raise ValueError(f"{self.kind} allocator: no base weight for {missing}")
        self.components = list(components)
        self.base = {c: float(base_weights[c]) for c in components}
        self.event_threshold = float(event_threshold)
        self.weights = dict(self.base)
        self.shown = dict(self.base)
        self._logged = dict(self.base)
        self._prior = dict(self.base)  # the prior found in the knobs at the last apply
        self._written: dict[str, float] = {}  # what the last apply wrote

    def factor(self, c: str, weight: float | None = None) -> float:
        """The factor ``weight / base`` applied to the prior of ``c`` (1 when base is 0)."""
        weight = self.weights[c] if weight is None else weight
        return 1.0 if self.base[c] == 0 else weight / self.base[c]

    def compose(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """The weights ``apply`` writes: ``prior * weight / base`` per objective (the prior
        of the last :meth:`apply`, the base weights before any)."""
        weights = self.weights if weights is None else weights
        return {c: self._prior[c] * self.factor(c, weights[c]) for c in self.components}

    def apply(self, knobs: Knobs) -> None:
        """Scale the prior found in the knobs by this allocator's factors (other keys untouched).

        The prior of an objective is what the knobs hold for it (the curriculum's phase
        weight, or the base weight), except a value equal to what this allocator wrote at
        its last apply: that one was carried over from the previous step, and the prior
        used then is kept (the factors do not compound). A missing key reads as the base.
        """
        held = knobs.reward_weights
        for c in self.components:
            current = held.get(c)
            if current is None:
                self._prior[c] = self.base[c]
            elif not (c in self._written and float(current) == self._written[c]):
                self._prior[c] = float(current)
        out = self.compose()
        held.update(out)
        self._written = dict(out)

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]:
        """Update the weights from this step's metrics; an event if they moved enough."""
        evidence = self._decide(step, metrics)
        moved = max(abs(self.shown[c] - self._logged[c]) for c in self.components)
        if evidence is None or moved <= self.event_threshold:
            return []
        old, self._logged = self._logged, dict(self.shown)
        change = ", ".join(
            f"{c} {old[c]:.3f}->{self.shown[c]:.3f}"
            for c in self.components
            if abs(self.shown[c] - old[c]) > 1e-4
        )
        evidence = {"allocator": self.kind, "old": old, "new": dict(self.shown), **evidence}
        return [Event("reward_weights", f"{self.kind} allocator moved weights: {change}", evidence)]

    def observe_batch(
        self,
        scores: Mapping[str, Sequence[float | None]],
        correct: Sequence[float],
        group_size: int | None = None,
        calibrated: Mapping[str, Sequence[float | None]] | None = None,
    ) -> None:
        """Per-completion data after scoring (unused by this allocator).

        ``scores`` are the raw component scores, ``calibrated`` (optional) the calibrated
        ones fusion weighed, ``correct`` 0/1 per completion, in groups of ``group_size``.
        """

    def _decide(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (JSON-able; the neural allocator adds tensors)."""
        return {
            "weights": dict(self.weights),
            "shown": dict(self.shown),
            "logged": dict(self._logged),
            "prior": dict(self._prior),
            "written": dict(self._written),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; continues exactly where it left off."""
        self.weights = {c: float(state["weights"][c]) for c in self.components}
        self.shown = {c: float(state["shown"][c]) for c in self.components}
        self._logged = {c: float(state["logged"][c]) for c in self.components}
        prior = state.get("prior", {})  # checkpoints from before the composition rule
        self._prior = {c: float(prior.get(c, self.base[c])) for c in self.components}
        self._written = {c: float(v) for c, v in state.get("written", {}).items()}


# ------------------------------------------------------------------ static and phase


class StaticAllocator(WeightAllocator):
    """The base weights, unchanged: the ablation baseline.

    Its factors are all 1, so it writes the prior unchanged: a curriculum's phase weights
    as the phase sets them, the base weights without a curriculum.
    """

    kind = "static"


class PhaseAllocator(WeightAllocator):
    """One weight table per curriculum phase.

    ``phases`` is a list (index = phase number, from 0) or a mapping phase -> weights; a
    phase with no table uses the nearest lower one, an objective missing from a table keeps
    its base weight. The phase comes from the ``curriculum/phase`` metric (so weights follow
    one step after the curriculum's switch) or from :meth:`set_phase`. Weights are used as
    given (no simplex): a phase may switch an objective off.

    Absolute, not a factor: :meth:`apply` overwrites what the knobs hold for the objectives
    it owns, curriculum phase weights included (this allocator is the alternative to them).
    """

    kind = "phase"
    writes: ClassVar[dict[str, str]] = {"reward_weights": "overrides"}

    def __init__(
        self,
        components: Sequence[str],
        base_weights: Mapping[str, float],
        *,
        phases: Sequence[Mapping[str, float]] | Mapping[Any, Mapping[str, float]],
        metric: str = "curriculum/phase",
        event_threshold: float = 0.0,
    ) -> None:
        super().__init__(components, base_weights, event_threshold=event_threshold)
        items = phases.items() if isinstance(phases, Mapping) else enumerate(phases)
        self.tables: dict[int, dict[str, float]] = {}
        for key, table in items:
            unknown = sorted(set(table) - set(self.components))
            if unknown:
                raise ValueError(f"phase allocator: phase {key} names unknown objectives {unknown}")
            self.tables[int(key)] = {c: float(w) for c, w in table.items()}
        if not self.tables:
            raise ValueError("phase allocator: no phase tables given")
        self.metric = metric
        self.phase: int | None = None
        self.set_phase(min(self.tables))

    def set_phase(self, phase: int) -> None:
        """Switch to a phase's table now (the curriculum may call this directly)."""
        self.phase = int(phase)
        keys = [k for k in self.tables if k <= self.phase] or [min(self.tables)]
        table = self.tables[max(keys)]
        self.weights = {c: table.get(c, self.base[c]) for c in self.components}
        self.shown = dict(self.weights)

    def _decide(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        value = metrics.get(self.metric)
        if not _finite(value) or int(value) == self.phase:
            return None
        old = self.phase
        self.set_phase(int(value))
        return {"step": step, "phase": self.phase, "previous_phase": old}

    def apply(self, knobs: Knobs) -> None:
        """Write this phase's table as it is (absolute weights, no prior)."""
        knobs.reward_weights.update(self.weights)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (JSON-able; the neural allocator adds tensors)."""
        return {**super().state_dict(), "phase": self.phase}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; continues exactly where it left off."""
        super().load_state_dict(state)
        self.phase = state["phase"]


# ------------------------------------------------------------------ adaptive: mirror descent


class AdaptiveCore:
    """What the adaptive allocators share, composed in rather than inherited.

    The scaled simplex: weights ``floor + (total - n*floor) * p``; the prior p0 whose
    weights are the base weights (exactly, when each base weight is >= floor and ``total``
    is their sum); and the :class:`ObjectiveTracker` that turns metrics into features.
    """

    def __init__(
        self,
        kind: str,
        base: Mapping[str, float],
        floor: float,
        total: float | None,
        window: int,
        pair_window: int,
        target: str,
    ) -> None:
        self.components = list(base)
        if any(w < 0 for w in base.values()):
            raise ValueError(f"{kind} allocator: base weights must be >= 0, got {dict(base)}")
        self.total = float(sum(base.values()) if total is None else total)
        self.floor = float(floor)
        if self.floor < 0 or self.floor * len(self.components) >= self.total:
            raise ValueError(
                f"{kind} allocator: floor {floor} x {len(self.components)} objectives "
                f"must stay below the total {self.total}"
            )
        free = [max(base[c] - self.floor, 1e-6) for c in self.components]
        self.prior = [f / sum(free) for f in free]
        self.target = target
        self.tracker = ObjectiveTracker(
            self.components, window=window, pair_window=pair_window, target=target
        )

    def weights(self, probs: Sequence[float]) -> dict[str, float]:
        """Weights for a (not necessarily normalised) probability vector over objectives."""
        total = sum(probs)
        values = simplex_weights([p / total for p in probs], self.total, self.floor)
        return dict(zip(self.components, values, strict=True))

    def features(self) -> dict[str, list[float]]:
        """``FEATURES`` per objective, from what the tracker has seen."""
        return {c: self.tracker.features(c) for c in self.components}


class MirrorDescentAllocator(WeightAllocator):
    """Exponentiated gradient on the simplex toward objectives that agree with correctness.

    The "dynamic reward weighting" idea (Learning to Optimize Multi-Objective Alignment
    Through Dynamic Reward Weighting, seeds/004): weights move during training toward the
    objectives whose optimisation serves the target. The gradient-based variant measures
    how objective gradients align; we use a cheap proxy. In GRPO an objective pushes the
    policy along sum_y A_i(y) grad log pi(y), so its alignment with correctness's push is,
    up to the geometry of grad log pi, the within-group covariance of its scores with
    correctness. Usefulness ``g_i`` is therefore that within-group correlation (from
    :meth:`observe_batch`; across-step correlation of means if no batches arrive).

    Update, one step of entropic mirror descent on ``eta * <g, p> - reg * KL(p || prior)``:

        p <- normalise( p^(1-reg) * prior^reg * exp(eta * g) )

    The ``reg`` pull toward the configured weights makes the fixed point
    ``p ∝ prior * exp(eta * g / reg)`` instead of the corner of the simplex. Design choice:
    an objective that stalls (saturated or constant, so no within-group variance) has
    ``g = 0`` and *loses* weight to the objectives still carrying useful signal, down to
    the floor if they stay useful; correctness itself, when it varies, has ``g = 1``.
    """

    kind = "mirror"

    def __init__(
        self,
        components: Sequence[str],
        base_weights: Mapping[str, float],
        *,
        eta: float = 0.2,
        reg: float = 0.1,
        floor: float = 0.02,
        total: float | None = None,
        window: int = 20,
        pair_window: int = 512,
        target: str = "accuracy/train",
        event_threshold: float = 0.05,
    ) -> None:
        super().__init__(components, base_weights, event_threshold=event_threshold)
        if not 0.0 <= reg <= 1.0:
            raise ValueError(f"mirror allocator: reg must be in [0, 1], got {reg}")
        self.core = AdaptiveCore(self.kind, self.base, floor, total, window, pair_window, target)
        self.eta, self.reg = float(eta), float(reg)
        self.probs = list(self.core.prior)
        self.weights = self.core.weights(self.probs)
        self.shown, self._logged = dict(self.weights), dict(self.weights)

    def observe_batch(
        self,
        scores: Mapping[str, Sequence[float | None]],
        correct: Sequence[float],
        group_size: int | None = None,
        calibrated: Mapping[str, Sequence[float | None]] | None = None,
    ) -> None:
        """Per-completion scores and correctness after scoring: the within-group usefulness."""
        self.core.tracker.observe_batch(scores, correct, group_size)

    def _decide(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        self.core.tracker.observe(metrics)
        features = self.core.features()
        g = [features[c][3] for c in self.components]
        logits = [
            (1 - self.reg) * math.log(p) + self.reg * math.log(q) + self.eta * gi
            for p, q, gi in zip(self.probs, self.core.prior, g, strict=True)
        ]
        top = max(logits)
        raw = [math.exp(x - top) for x in logits]
        self.probs = [max(r / sum(raw), 1e-12) for r in raw]
        self.weights = self.core.weights(self.probs)
        self.shown = dict(self.weights)
        return {"step": step, "usefulness": dict(zip(self.components, g, strict=True))}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: weights, simplex point, tracker windows."""
        return {
            **super().state_dict(),
            "probs": list(self.probs),
            "tracker": self.core.tracker.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; continues exactly where it left off."""
        super().load_state_dict(state)
        self.probs = [float(p) for p in state["probs"]]
        self.core.tracker.load_state_dict(state["tracker"])


# ------------------------------------------------------------------ adaptive: neural


class _ScoreNet(torch.nn.Module):
    """Shared per-objective MLP: features [K, F] -> logit offsets [K]."""

    def __init__(self, n_features: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(n_features, hidden)
        self.out = torch.nn.Linear(hidden, 1)
        with torch.no_grad():  # seeded init, independent of the global RNG
            self.hidden.weight.normal_(0.0, 1.0 / math.sqrt(n_features), generator=generator)
            self.hidden.bias.zero_()
            self.out.weight.zero_()  # start exactly at the prior weights
            self.out.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[K, F] features -> [K] logit offsets."""
        return self.out(torch.tanh(self.hidden(features))).squeeze(-1)


class NeuralAllocator(WeightAllocator):
    """A small network sets the weights from each objective's state; REINFORCE trains it.

    Policy: for objective i with features f_i (``ObjectiveTracker``: running mean, trend,
    variance, correlation with correctness), logits ``z_i ~ N(log prior_i + MLP(f_i),
    std^2)`` and weights ``floor + (total - n*floor) * softmax(z)``. One MLP is shared by
    all objectives, so it learns what a useful objective *looks like* rather than which
    name to prefer. Deterministic given ``seed`` (its own generator for init and sampling).
    Events compare the policy's *mean* weights.

    The return must be something the action can move. Weights decided at ``observe(t)``
    are applied at step t+1: they fuse step t+1's rewards, hence its advantages and its
    update. ``accuracy/train`` at step t+1 is measured on rollouts drawn *before* that
    update, so crediting the weights with its change (as this allocator once did) credits
    an action with an outcome it cannot have caused: the policy then random-walks on its
    exploration noise. Two returns are offered:

    - ``target=None`` (default): **alignment, same batch.** The reward engine hands
      :meth:`observe_batch` the scores of exactly the batch the applied weights fused.
      The return of weights w is the mean, over groups whose correctness varies, of the
      within-group correlation between the fused reward ``sum_c v_c x_c`` (``v`` the
      weights :meth:`apply` wrote, i.e. prior x factor; ``x_c`` the calibrated scores
      when the engine passes them, else each objective's within-group deviations divided
      by their pooled standard deviation in that batch) and correctness. A GRPO step moves
      the policy along ``sum_y A(y) grad log pi(y)``, so to first order its effect on
      accuracy is the within-group covariance of the advantages with correctness: this is
      the part of the update the weights decide, measured on the batch they decided it
      for. The rollouts do not depend on the weights, so the return of *any* w can be
      computed on that batch: exploration is counterfactual (``samples`` draws around the
      mean, each scored on the batch, baseline = the mean weights' own score), and the
      weights applied to training are the policy's mean, never a noisy sample.
      Consequence: objectives whose scores agree with correctness within groups gain
      weight (correctness itself, if weighed, agrees perfectly), down to the floor for
      the others; groups where correctness does not vary carry no evidence and do not
      count. Use ``target`` when what matters is a downstream metric instead.
    - ``target="<metric>"``: **a metric, one step later.** Explored weights (mean + noise)
      are applied; the weights applied at step s are credited with ``m(s + delay) -
      m(s + delay - 1)``, ``delay`` = 1 by default: ``m(s + 1)`` is the first value
      measured after the update those weights made. Baseline and scale are running
      averages of the return; an action whose metrics are missing is dropped.

    No signal, no move: a step whose batches have no group where correctness varies
    (alignment), or no group where correctness or any weighed score varies (target; without
    batches: the metric did not change), says nothing about the weights. The allocator
    then neither learns nor explores and holds its mean weights, applied = shown, so a run
    whose rewards are all zero keeps the prior weights. The loss is ``-A * log pi(z | f)``,
    Adam on the MLP, and no optimizer step is taken without a non-zero advantage.
    """

    kind = "neural"

    def __init__(
        self,
        components: Sequence[str],
        base_weights: Mapping[str, float],
        *,
        hidden: int = 16,
        lr: float = 0.02,
        exploration_std: float = 0.3,
        samples: int = 8,
        baseline_decay: float = 0.9,
        seed: int = 0,
        floor: float = 0.02,
        total: float | None = None,
        window: int = 20,
        pair_window: int = 512,
        target: str | None = None,
        delay: int = 1,
        event_threshold: float = 0.05,
    ) -> None:
        super().__init__(components, base_weights, event_threshold=event_threshold)
        if int(samples) < 1:
            raise ValueError(f"neural allocator: samples must be >= 1, got {samples}")
        if int(delay) < 1:
            raise ValueError(f"neural allocator: delay must be >= 1, got {delay}")
        self.target = target
        self.signal = "alignment" if target is None else "target"
        tracked = "accuracy/train" if target is None else target
        self.core = AdaptiveCore(self.kind, self.base, floor, total, window, pair_window, tracked)
        self.weights = self.core.weights(self.core.prior)
        self.shown, self._logged = dict(self.weights), dict(self.weights)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.net = _ScoreNet(len(FEATURES), hidden, self.generator)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.std = float(exploration_std)
        self.samples = int(samples)
        self.delay = int(delay)
        self.decay = float(baseline_decay)
        self.log_prior = torch.tensor([math.log(p) for p in self.core.prior])
        self.baseline = 0.0
        self.scale = 0.0
        self.updates = 0
        # alignment: the features the applied (mean) weights were decided from
        self.pending: torch.Tensor | None = None
        # target: explored actions awaiting their delayed return (step applied, features, z)
        self.queue: list[dict[str, Any]] = []
        self.last_target: float | None = None
        self.last_target_step: int | None = None
        # this step's batches: groups whose correctness varies, as (x per objective, y)
        # deviations from the group means; whether anything varied; how many batches
        self._groups: list[tuple[dict[str, list[float]], list[float]]] = []
        self._varied = False
        self._batches = 0

    def observe_batch(
        self,
        scores: Mapping[str, Sequence[float | None]],
        correct: Sequence[float],
        group_size: int | None = None,
        calibrated: Mapping[str, Sequence[float | None]] | None = None,
    ) -> None:
        """The batch the applied weights fused: features, and the groups the return uses."""
        self.core.tracker.observe_batch(scores, correct, group_size)
        ys = [float(c) for c in correct]
        n = len(ys)
        g = group_size or n or 1
        source = scores if calibrated is None else calibrated
        columns = {
            c: list(source[c])
            for c in self.components
            if source.get(c) is not None and len(source[c]) == n
        }
        self._batches += 1
        groups: list[tuple[dict[str, list[float]], list[float]]] = []
        for start in range(0, n, g):
            idx = range(start, min(start + g, n))
            my = sum(ys[i] for i in idx) / len(idx)
            yc = [ys[i] - my for i in idx]
            xs: dict[str, list[float]] = {}
            for c, values in columns.items():
                vals = [float(values[i]) if _finite(values[i]) else None for i in idx]
                if calibrated is not None:  # fusion counts None as 0
                    vals = [0.0 if v is None else v for v in vals]
                known = [v for v in vals if v is not None]
                m = sum(known) / len(known) if known else 0.0
                xs[c] = [0.0 if v is None else v - m for v in vals]
                self._varied |= any(abs(x) > 1e-12 for x in xs[c])
            groups.append((xs, yc))
        if calibrated is None:  # raw scores: each objective per unit of its within-group spread
            for c in columns:
                ss = sum(x * x for xs, _ in groups for x in xs[c])
                count = sum(1 for i in range(n) if _finite(columns[c][i]))
                s = math.sqrt(ss / count) if count else 0.0
                for xs, _ in groups:
                    xs[c] = [x / s if s > 1e-12 else 0.0 for x in xs[c]]
        for xs, yc in groups:
            if sum(y * y for y in yc) > 1e-12:
                self._groups.append((xs, yc))
                self._varied = True

    def alignment(self, weights: Mapping[str, float]) -> float | None:
        """This step's return for allocator weights ``weights`` (None: no group has signal).

        The mean over groups with varying correctness of corr(fused reward, correctness),
        the fused reward weighing each objective by ``prior * weight / base``.
        """
        values = self._alignments([weights])
        return None if values is None else float(values[0])

    def _alignments(self, candidates: Sequence[Mapping[str, float]]) -> torch.Tensor | None:
        """:meth:`alignment` of several weight vectors at once ([K], float64)."""
        if not self._groups:
            return None
        size = max(len(yc) for _, yc in self._groups)

        def pad(values: Sequence[float]) -> list[float]:  # short groups: zeros add nothing
            return [*values, *[0.0] * (size - len(values))]

        x = torch.tensor(
            [[pad(xs.get(c, ())) for c in self.components] for xs, _ in self._groups],
            dtype=torch.float64,
        )
        y = torch.tensor([pad(yc) for _, yc in self._groups], dtype=torch.float64)
        sign = torch.tensor([-1.0 if c == "kl" else 1.0 for c in self.components])  # fusion
        applied = [self.compose(w) for w in candidates]  # subtracts the KL
        v = torch.tensor([[a[c] for c in self.components] for a in applied], dtype=torch.float64)
        r = torch.einsum("kc,mcg->kmg", v * sign.double(), x)
        sxx, syy = (r * r).sum(-1), (y * y).sum(-1)
        corr = (r * y).sum(-1) / (sxx * syy).clamp_min(1e-300).sqrt()
        return torch.where(sxx > 1e-12, corr, torch.zeros_like(corr)).mean(-1)

    def _policy_mean(self, features: torch.Tensor) -> torch.Tensor:
        return self.log_prior + self.net(features)

    def _decide(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        self.core.tracker.observe(metrics)
        evidence: dict[str, Any] = {"step": step, "signal": self.signal}
        if self.signal == "alignment":
            signal = bool(self._groups)
            if signal and self.pending is not None:
                evidence.update(self._learn_alignment(self.pending))
        else:
            signal = self._credit_target(step, metrics, evidence)
        self._groups, self._varied, self._batches = [], False, 0
        if not signal:  # nothing says which weights are better: hold them, do not explore
            self.pending = None
            self.weights = dict(self.shown)
            evidence["held"] = True
            return evidence
        table = self.core.features()
        features = torch.tensor([table[c] for c in self.components], dtype=torch.float32)
        with torch.no_grad():
            mean = self._policy_mean(features)
        self.shown = self.core.weights(torch.softmax(mean, 0).tolist())
        if self.signal == "alignment":  # exploration is counterfactual: apply the mean
            self.pending = features
            self.weights = dict(self.shown)
        else:  # the metric only sees weights that were applied: apply a sample
            with torch.no_grad():
                noise = torch.randn(mean.shape, generator=self.generator)
                sample = mean + self.std * noise
            self.queue.append({"step": step + 1, "features": features, "sample": sample})
            self.weights = self.core.weights(torch.softmax(sample, 0).tolist())
        evidence["features"] = {
            c: dict(zip(FEATURES, table[c], strict=True)) for c in self.components
        }
        return evidence

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def _learn_alignment(self, features: torch.Tensor) -> dict[str, Any]:
        """REINFORCE on this batch: ``samples`` draws around the mean weights, each scored."""
        mean = self._policy_mean(features)
        with torch.no_grad():
            noise = torch.randn((self.samples, *mean.shape), generator=self.generator)
            draws = mean.detach() + self.std * noise
            logits = [mean.detach(), *draws]
            values = self._alignments(
                [self.core.weights(torch.softmax(z, 0).tolist()) for z in logits]
            )
        assert values is not None
        gains = (values[1:] - values[0]).float()
        dev = float(gains.abs().mean())
        first = self.updates == 0
        self.scale = dev if first else self.decay * self.scale + (1 - self.decay) * dev
        self.updates += 1
        out = {"return": float(values[0]), "gain_mean": float(gains.mean())}
        if self.scale <= 1e-12:
            return out
        logp = torch.distributions.Normal(mean, self.std).log_prob(draws).sum(-1)
        self._step(-(gains / self.scale * logp).mean())
        return out

    def _credit_target(self, step: int, metrics: Mapping[str, float], evidence: dict) -> bool:
        """Credit the actions whose delayed return is measured now; whether there is signal."""
        value = metrics.get(self.core.target)
        value = float(value) if _finite(value) else None
        prev = self.last_target if self.last_target_step == step - 1 else None
        due = [a for a in self.queue if a["step"] + self.delay <= step]
        self.queue = [a for a in self.queue if a["step"] + self.delay > step]
        for action in due:
            if action["step"] + self.delay == step and value is not None and prev is not None:
                evidence.update(self._learn_target(action, value - prev))
        if self._batches:
            signal = self._varied
        else:
            signal = value is not None and self.last_target not in (None, value)
        if value is not None:
            self.last_target, self.last_target_step = value, step
        return signal

    def _learn_target(self, action: Mapping[str, Any], ret: float) -> dict[str, Any]:
        """One REINFORCE step for an applied action whose (delayed) return is ``ret``."""
        first = self.updates == 0
        self.baseline = ret if first else self.decay * self.baseline + (1 - self.decay) * ret
        dev = abs(ret - self.baseline)
        self.scale = dev if first else self.decay * self.scale + (1 - self.decay) * dev
        advantage = (ret - self.baseline) / (self.scale + 1e-8)
        self.updates += 1
        out = {
            "return": ret,
            "baseline": self.baseline,
            "advantage": advantage,
            "credited": action["step"],
        }
        if advantage == 0.0:
            return out
        mean = self._policy_mean(action["features"])
        dist = torch.distributions.Normal(mean, self.std)
        self._step(-advantage * dist.log_prob(action["sample"]).sum())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Weights, tracker windows, the network, Adam and RNG state (tensors included)."""
        return {
            **super().state_dict(),
            "tracker": self.core.tracker.state_dict(),
            "net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # Adam updates in place
            "generator": self.generator.get_state(),
            "baseline": self.baseline,
            "scale": self.scale,
            "updates": self.updates,
            "pending": None if self.pending is None else self.pending.clone(),
            "queue": [
                {
                    "step": a["step"],
                    "features": a["features"].clone(),
                    "sample": a["sample"].clone(),
                }
                for a in self.queue
            ],
            "last_target": self.last_target,
            "last_target_step": self.last_target_step,
            "groups": [{"scores": dict(xs), "correct": list(yc)} for xs, yc in self._groups],
            "varied": self._varied,
            "batches": self._batches,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; continues exactly where it left off."""
        super().load_state_dict(state)
        self.core.tracker.load_state_dict(state["tracker"])
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline, self.scale = float(state["baseline"]), float(state["scale"])
        self.updates = int(state["updates"])
        pending = state.get("pending")  # older checkpoints held a {features, sample} dict
        self.pending = pending.clone() if isinstance(pending, torch.Tensor) else None
        self.queue = [
            {
                "step": int(a["step"]),
                "features": a["features"].clone(),
                "sample": a["sample"].clone(),
            }
            for a in state.get("queue", [])
        ]
        self.last_target = state.get("last_target")
        step = state.get("last_target_step")
        self.last_target_step = None if step is None else int(step)
        self._groups = [
            (
                {c: [float(x) for x in v] for c, v in g["scores"].items()},
                [float(y) for y in g["correct"]],
            )
            for g in state.get("groups", [])
        ]
        self._varied = bool(state.get("varied", False))
        self._batches = int(state.get("batches", 0))


# ------------------------------------------------------------------ factory


ALLOCATORS: dict[str, type[WeightAllocator]] = {
    "static": StaticAllocator,
    "phase": PhaseAllocator,
    "neural": NeuralAllocator,
    "mirror": MirrorDescentAllocator,
}


def _accepted_options(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY:
                    names.add(p.name)
    return names


def build_allocator(
    name: str, components: Sequence[str], base_weights: Mapping[str, float], **options: Any
) -> WeightAllocator:
    """The allocator called ``name`` (a key of ``ALLOCATORS``), with its options checked.

    >>> a = build_allocator("mirror", ["correctness", "format"], {"correctness": 1, "format": 1})
    >>> sorted(a.weights.items())
    [('correctness', 1.0), ('format', 1.0)]
    """
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; valid: {', '.join(ALLOCATORS)}")
    cls = ALLOCATORS[name]
    accepted = _accepted_options(cls)
    for key in options:
        if key not in accepted:
            near = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(
                f"allocator {name!r} has no option {key!r}{hint} (options: {', '.join(sorted(accepted))})"
            )
    return cls(components, base_weights, **options)
