"""Dynamic gradient accumulation (white paper 3.13): a bigger batch when gradients disagree.

What is accumulated: ``knobs.accumulation_steps`` = k rollout batches (each of
``grpo.prompts_per_step`` prompts x G completions) whose completions make one optimizer step.
Splitting a fixed batch into more micro-batches would change memory and speed but not the
gradient, so it cannot answer noise; accumulating more rollout batches halves the variance
of the step's gradient when k doubles. The loss stays correctly normalised for any k because
the trainer computes the per-token loss weights over the whole concatenated step
(``LOSS_AGGREGATIONS`` over every row); micro-batching (``knobs.micro_batches``) stays the
memory split underneath.

The noise signal: the trainer splits each step's backward into micro-batches (at least two),
recovers each micro-batch's own gradient (:class:`MicrobatchGradients`), and reports the
mean pairwise cosine of those gradients as ``grad/microbatch_cosine`` (near 1: pieces agree,
the batch is big enough; near 0: noise dominates). Under DDP each rank measures its own
pieces and the metric is averaged over ranks before the controllers see it, so every rank
takes the same decision. The simple gradient noise scale of the same pieces
(``grad/noise_scale``, in completions, higher = noisier; :meth:`MicrobatchGradients.noise_scale`)
works too (``signal=noise_scale``): the trainer reports both.

The controller keeps an EWMA of the signal and moves k by one within ``[min_steps,
max_steps]``: up when noisy (cosine EWMA below ``low``), down when consistent (above
``high``), nothing in between (hysteresis band), and at most once per ``cooldown`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from deepsynapse.control.knobs import Event, Knobs

if TYPE_CHECKING:
    import torch

__all__ = [
    "SIGNAL_METRICS",
    "AccumulationConfig",
    "AccumulationController",
    "MicrobatchGradients",
    "microbatch_gradient_cosine",
]

SIGNAL_METRICS = {"cosine": "grad/microbatch_cosine", "noise_scale": "grad/noise_scale"}


def microbatch_gradient_cosine(grads: Sequence[Sequence[torch.Tensor | None]]) -> float:
    """Mean pairwise cosine similarity of micro-batch gradients; NaN with fewer than 2.

    ``grads[k][j]`` is micro-batch k's gradient of parameter j (None = no gradient, as zero).
    Dot products are summed over parameters in float64, so the result is the cosine of the
    flattened gradient vectors. Pairs where either gradient is zero are left out.
    """
    import torch  # lazy: config code imports this module's dataclass

    k = len(grads)
    if k < 2:
        return float("nan")
    width = len(grads[0])
    if any(len(g) != width for g in grads):
        raise ValueError("microbatch_gradient_cosine: pieces have different parameter counts")
    gram = torch.zeros(k, k, dtype=torch.float64)
    for j in range(width):
        column = [g[j] for g in grads]
        ref = next((t for t in column if t is not None), None)
        if ref is None:
            continue
        flat = torch.stack(
            [
                (t if t is not None else torch.zeros_like(ref)).detach().reshape(-1).double().cpu()
                for t in column
            ]
        )
        gram += flat @ flat.T
    norms = gram.diagonal().sqrt()
    values = [
        float(gram[a, b] / (norms[a] * norms[b]))
        for a in range(k)
        for b in range(a + 1, k)
        if norms[a] > 0 and norms[b] > 0
    ]
    return sum(values) / len(values) if values else float("nan")


class MicrobatchGradients:
    """Recovers each micro-batch's own gradient from the accumulating ``.grad`` buffers.

    Call :meth:`capture` after every micro-batch's backward (before ``optimizer.step``):
    the piece is the difference from the previous capture. Keeps one snapshot plus one copy
    per micro-batch of the trainable gradients (small for LoRA). Under DDP, capture only the
    micro-batches run under ``no_sync`` (the synchronised one holds the all-rank average).
    Gives both signals the controller can read: :meth:`cosine` and :meth:`noise_scale`.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = list(params)
        self.pieces: list[list[torch.Tensor | None]] = []
        self._last: list[torch.Tensor | None] | None = None

    def capture(self) -> None:
        now = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        if self._last is None:
            piece = now
        else:
            piece = [
                n if s is None or n is None else n - s for n, s in zip(now, self._last, strict=True)
            ]
        self.pieces.append(piece)
        self._last = now

    def cosine(self) -> float:
        return microbatch_gradient_cosine(self.pieces)

    def noise_scale(self, rows_per_piece: float) -> float:
        """The simple gradient noise scale B = b tr(Sigma_b) / |G|^2, in completions.

        Each of the K pieces is one micro-batch's share of the step's gradient G (their
        sum), so K * piece is an estimate of G from b = ``rows_per_piece`` completions; the
        spread of those estimates gives tr(Sigma_b) (McCandlish et al. 2018, "An Empirical
        Model of Large-Batch Training"). NaN with fewer than 2 pieces or a zero gradient.
        """
        import torch

        k = len(self.pieces)
        if k < 2:
            return float("nan")
        flat = [
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).double().flatten()
                    for g, p in zip(piece, self.params, strict=True)
                ]
            )
            for piece in self.pieces
        ]
        estimates = torch.stack(flat) * k  # [K, P]
        total = estimates.mean(0)
        norm2 = float(total.pow(2).sum())
        if norm2 == 0.0:
            return float("nan")
        spread = float((estimates - total).pow(2).sum()) / (k - 1)
        return rows_per_piece * spread / norm2

    def reset(self) -> None:
        self.pieces, self._last = [], None


@dataclass(frozen=True)
class AccumulationConfig:
    enabled: bool = field(
        default=False, metadata={"help": "adapt the rollout batches per optimizer step"}
    )
    min_steps: int = field(default=1, metadata={"help": "fewest rollout batches per step"})
    max_steps: int = field(default=4, metadata={"help": "most rollout batches per step"})
    initial: int = field(default=1, metadata={"help": "rollout batches per step at the start"})
    signal: Literal["cosine", "noise_scale"] = field(
        default="cosine",
        metadata={
            "help": "grad/microbatch_cosine (low = noisy) or grad/noise_scale (high = noisy)"
        },
    )
    ewma: float = field(default=0.3, metadata={"help": "EWMA weight of the newest measurement"})
    low: float = field(
        default=0.1, metadata={"help": "cosine below (noise scale below): noisy (consistent)"}
    )
    high: float = field(
        default=0.3, metadata={"help": "cosine above (noise scale above): consistent (noisy)"}
    )
    cooldown: int = field(default=5, metadata={"help": "steps between two changes"})
    warmup: int = field(default=3, metadata={"help": "measurements before the first change"})

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.initial <= self.max_steps:
            raise ValueError(
                f"accumulation: got min_steps={self.min_steps}, initial={self.initial}, "
                f"max_steps={self.max_steps}; expected 1 <= min_steps <= initial <= max_steps"
            )
        if not 0 < self.ewma <= 1:
            raise ValueError(f"accumulation.ewma: got {self.ewma}, expected 0 < ewma <= 1")
        if not self.low < self.high:
            raise ValueError(
                f"accumulation: got low={self.low}, high={self.high}; expected low < high "
                "(the band between them is the hysteresis)"
            )
        for key in ("cooldown", "warmup"):
            if getattr(self, key) < 0:
                raise ValueError(f"accumulation.{key}: got {getattr(self, key)}, expected >= 0")


class AccumulationController:
    """EWMA of gradient agreement -> rollout batches accumulated per optimizer step."""

    name = "accumulation"
    writes: ClassVar[dict[str, str]] = {"accumulation_steps": "sets"}

    def __init__(self, config: AccumulationConfig):
        self.cfg = config
        self.metric = SIGNAL_METRICS[config.signal]
        self.steps = config.initial
        self.ewma: float | None = None
        self.observations = 0
        self.cooldown_left = 0

    def apply(self, knobs: Knobs) -> None:
        knobs.accumulation_steps = self.steps

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]:
        cfg = self.cfg
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return []
        value = float(value)
        self.ewma = value if self.ewma is None else cfg.ewma * value + (1 - cfg.ewma) * self.ewma
        self.observations += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return []
        if self.observations < cfg.warmup:
            return []
        noisy = self.ewma < cfg.low if cfg.signal == "cosine" else self.ewma > cfg.high
        consistent = self.ewma > cfg.high if cfg.signal == "cosine" else self.ewma < cfg.low
        old = self.steps
        if noisy and old < cfg.max_steps:
            self.steps, reason = old + 1, "noisy"
        elif consistent and old > cfg.min_steps:
            self.steps, reason = old - 1, "consistent"
        else:
            return []
        self.cooldown_left = cfg.cooldown
        threshold = cfg.low if (reason == "noisy") == (cfg.signal == "cosine") else cfg.high
        return [
            Event(
                "accumulation_changed",
                f"gradients {reason} ({self.metric} EWMA {self.ewma:.3f}): accumulation "
                f"{old} -> {self.steps} rollout batches per step",
                {
                    "old": old,
                    "new": self.steps,
                    "reason": reason,
                    "metric": self.metric,
                    "ewma": self.ewma,
                    "last": value,
                    "threshold": threshold,
                    "bounds": [cfg.min_steps, cfg.max_steps],
                    "observations": self.observations,
                },
            )
        ]

    def metrics(self) -> dict[str, float]:
        out = {"accumulation/steps": float(self.steps)}
        if self.ewma is not None:
            out["accumulation/signal_ewma"] = self.ewma
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "ewma": self.ewma,
            "observations": self.observations,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps = int(state["steps"])
        self.steps = min(max(steps, self.cfg.min_steps), self.cfg.max_steps)
        self.ewma = None if state["ewma"] is None else float(state["ewma"])
        self.observations = int(state["observations"])
        self.cooldown_left = int(state["cooldown_left"])
