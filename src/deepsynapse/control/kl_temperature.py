"""KL-temperature co-regulation (white paper 3.3): explore early, stay close to the reference late.

Temperature follows a cosine from ``high`` to ``low``: over the whole run (``schedule=run``,
range ``[t_max, t_min]``), within each curriculum phase (``schedule=phase``: the phase's own
range, over its ``max_steps`` or the rest of the run), or not at all (``constant``: the
configured temperature, or the phase's high one; floor ``t_min``). The last step of the horizon runs at
``low`` exactly.

The KL coefficient adapts toward a target KL with proportional control (Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences"):
``beta <- clip(beta * (1 + K_p * clip((KL - target) / target, -0.2, 0.2)), beta_min, beta_max)``.

The two are coupled through the schedule: the phase (or the run's progress) sets the
temperature's range and beta together, high temperature and low beta early, low and high late.
Beta alone answers the measured KL, by default. ``couple=true`` adds the white paper's direct
coupling, one actuator per step: when KL overshoots the target by more than ``tolerance``, the
temperature is first lowered below the schedule by ``temperature_step`` (never below the
floor), and only at the floor does beta rise; when KL undershoots, the temperature first
returns toward the schedule, and only then does beta fall. It is off by default because the
cut acts on the reading, not on the policy: the trainer's KL is computed on log-probs at the
sampling temperature, and it grows about as 1/T as T falls (plain, fifth study seed 3, its
last checkpoint against its start, 16 held-out prompts x 4 samples: 0.047 a token at T = 1.0,
0.052 at 0.9, 0.061 at 0.75, 0.082 at 0.6). A cut on overshoot raises the overshoot, the loop
ratchets the temperature to its floor (full-critique seed 3 held 0.6 from GRPO step 11 with
the KL at 5-25x its target), and beta's correction comes only after. Each decision is an event
with its evidence (kl, target, error, old and new value); the cosine schedule itself is
deterministic and shows in ``knobs/temperature``.

KL as a reward objective (``rewards.kl_mode=reward``, ``kl_in_loss=False``): the KL is then
already inside the fused reward, weighted by ``rewards.weights.kl``, and a non-zero beta in
the loss would count it a second time. The controller then keeps the loss's beta at exactly
0 (it writes ``knobs.beta = 0`` every step, over a curriculum phase's beta too, and
``beta_min`` does not apply), has no beta actuator (no ``beta_raised``/``beta_lowered``) and
acts through temperature only where ``couple=true``: the coupled cut below the schedule when
KL overshoots, back toward the schedule when it undershoots; else it runs the schedule. The KL's reward weight stays the allocator's to set
(``rewards.allocator``); the controller does not write it, so the two never fight over it.

Order: build after the :class:`~deepsynapse.control.curriculum.PhaseCurriculum`, whose
transition (in its ``observe``) this controller picks up in its own ``observe``: a new phase
resets the temperature cut, sets beta to the phase's ``beta`` and the target to its
``kl_target`` when the phase gives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from deepsynapse.control.curriculum import PhaseCurriculum
from deepsynapse.control.knobs import Event, Knobs

__all__ = ["KLTemperatureConfig", "KLTemperatureController", "cosine_decay"]


def cosine_decay(progress: float, high: float, low: float) -> float:
    """``high`` at progress 0, ``(high + low) / 2`` at 0.5, ``low`` at 1 (clamped to [0, 1])."""
    p = min(max(progress, 0.0), 1.0)
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class KLTemperatureConfig:
    enabled: bool = field(default=False, metadata={"help": "turn on KL-temperature co-regulation"})
    schedule: Literal["run", "phase", "constant"] = field(
        default="run",
        metadata={"help": "temperature cosine over the run, within each curriculum phase, or none"},
    )
    t_max: float = field(default=1.0, metadata={"help": "temperature at the start (run schedule)"})
    t_min: float = field(
        default=0.6, metadata={"help": "temperature at the end; floor of every cut"}
    )
    kl_target: float = field(
        default=0.02, metadata={"help": "target of the per-token KL (metric kl/mean)"}
    )
    adaptive_beta: bool = field(
        default=True, metadata={"help": "move beta toward the target KL (proportional control)"}
    )
    k_p: float = field(default=0.1, metadata={"help": "proportional gain of the beta update"})
    error_clip: float = field(
        default=0.2, metadata={"help": "clip of the relative KL error (Ziegler et al.: 0.2)"}
    )
    tolerance: float = field(
        default=0.1, metadata={"help": "relative KL error within which nothing changes"}
    )
    beta_min: float = field(
        default=1e-3,
        metadata={"help": "lower bound of beta (KL in the loss; with kl_mode=reward beta is 0)"},
    )
    beta_max: float = field(default=1.0, metadata={"help": "upper bound of beta"})
    couple: bool = field(
        default=False,
        metadata={
            "help": "act on temperature before beta (both directions); off: a cut raises the "
            "KL it reads, which is measured at the sampling temperature (module doc)"
        },
    )
    temperature_step: float = field(
        default=0.05, metadata={"help": "temperature change per coupled decision"}
    )
    kl_metric: str = field(default="kl/mean", metadata={"help": "metric read as the KL"})

    def __post_init__(self) -> None:
        if not 0 < self.t_min <= self.t_max:
            raise ValueError(
                f"kl_temperature: got t_max={self.t_max}, t_min={self.t_min}; "
                "expected t_max >= t_min > 0"
            )
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(
                f"kl_temperature: got beta_min={self.beta_min}, beta_max={self.beta_max}; "
                "expected beta_max >= beta_min > 0"
            )
        positive = {
            "kl_target": self.kl_target,
            "error_clip": self.error_clip,
            "temperature_step": self.temperature_step,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ValueError(f"kl_temperature.{key}: got {value}, expected > 0")
        for key, value in {"k_p": self.k_p, "tolerance": self.tolerance}.items():
            if not value >= 0:
                raise ValueError(f"kl_temperature.{key}: got {value}, expected >= 0")


class KLTemperatureController:
    """Cosine temperature schedule + adaptive beta, coupled through the measured KL."""

    name = "kl_temperature"
    # A schedule within the phase: replaces the phase's starting temperature and beta.
    writes: ClassVar[dict[str, str]] = {"temperature": "overrides", "beta": "overrides"}

    def __init__(
        self,
        config: KLTemperatureConfig,
        *,
        base_beta: float,
        base_temperature: float,
        total_steps: int,
        phases: PhaseCurriculum | None = None,
        kl_in_loss: bool = True,
    ):
        """``kl_in_loss``: False when the KL is a reward objective (``rewards.kl_mode=reward``,
        the trainer's ``engine.fusion.kl_in_loss``): beta then stays 0 (see the module doc)."""
        if config.schedule == "phase" and phases is None:
            raise ValueError("kl_temperature.schedule=phase needs the curriculum to be enabled")
        self.cfg = config
        self.kl_in_loss = bool(kl_in_loss)
        self.set_total_steps(total_steps)
        self.phases = phases
        self.base_temperature = float(base_temperature)
        self.next_step = 0
        self.beta = self._bound(base_beta)
        self.target = config.kl_target
        self.cut = 0.0  # how far below the schedule the temperature is held
        self.phase_index = -1
        self.last_temperature: float | None = None
        self.last_floor = config.t_min
        self.last_error: float | None = None
        self.warned_missing = False
        self._sync_phase()

    # ------------------------------------------------------------ schedule

    def _bound(self, beta: float) -> float:
        if not self.kl_in_loss:
            return 0.0  # the KL is in the reward: no beta in the loss, beta_min included
        return min(max(float(beta), self.cfg.beta_min), self.cfg.beta_max)

    def _schedule(self) -> tuple[float, float]:
        """(scheduled temperature, floor) for the step about to run."""
        cfg = self.cfg
        if cfg.schedule == "constant":
            pos = self.phases.position() if self.phases is not None else None
            high = pos.temperature[0] if pos and pos.temperature else self.base_temperature
            return high, min(cfg.t_min, high)
        if cfg.schedule == "phase":
            assert self.phases is not None
            pos = self.phases.position()
            high, low = pos.temperature or (cfg.t_max, cfg.t_min)
            horizon = pos.horizon
            progress = pos.step / (horizon - 1) if horizon and horizon > 1 else 0.0
            return cosine_decay(progress, high, low), low
        return self.temperature_at(self.next_step), cfg.t_min

    def temperature_at(self, step: int) -> float:
        """The run schedule's temperature at ``step`` (no cut): for plots and tests."""
        progress = step / (self.total_steps - 1) if self.total_steps > 1 else 0.0
        return cosine_decay(progress, self.cfg.t_max, self.cfg.t_min)

    # ------------------------------------------------------------ controller seam

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length, which the schedule's progress is a fraction of (a time budget
        plans it after the first GRPO steps; until then ``train.steps``)."""
        self.total_steps = max(1, int(total_steps))

    def apply(self, knobs: Knobs) -> None:
        scheduled, floor = self._schedule()
        self.cut = min(self.cut, max(0.0, scheduled - floor))
        temperature = max(floor, scheduled - self.cut)
        knobs.temperature = temperature
        self.last_temperature, self.last_floor = temperature, floor
        if not self.kl_in_loss:
            knobs.beta = 0.0  # over whatever wrote it before (a curriculum phase's beta)
        elif self.cfg.adaptive_beta:
            knobs.beta = self.beta

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]:
        self.next_step = step + 1
        events: list[Event] = []
        kl = metrics.get(self.cfg.kl_metric)
        if kl is None or not math.isfinite(kl):
            if not self.warned_missing:
                self.warned_missing = True
                events.append(
                    Event(
                        "kl_metric_missing",
                        f"{self.cfg.kl_metric} missing or not finite; KL control holds",
                        {"metric": self.cfg.kl_metric, "value": kl},
                    )
                )
        else:
            event = self._control(float(kl))
            if event is not None:
                events.append(event)
        event = self._sync_phase()
        if event is not None:
            events.append(event)
        return events

    def _control(self, kl: float) -> Event | None:
        cfg = self.cfg
        error = (kl - self.target) / self.target
        self.last_error = error
        evidence: dict[str, Any] = {"kl": kl, "target": self.target, "error": error}
        temperature = self.last_temperature
        if error > cfg.tolerance:
            room = 0.0 if temperature is None else temperature - self.last_floor
            if cfg.couple and room > 1e-9:
                delta = min(cfg.temperature_step, room)
                self.cut += delta
                return Event(
                    "temperature_lowered",
                    f"KL {kl:.4g} above target {self.target:.4g}: temperature "
                    f"{temperature:.3f} -> {temperature - delta:.3f} before touching beta",
                    {**evidence, "old": temperature, "new": temperature - delta, "cut": self.cut},
                )
            return self._move_beta(error, evidence, "beta_raised")
        if error < -cfg.tolerance:
            if cfg.couple and self.cut > 1e-12:
                delta = min(cfg.temperature_step, self.cut)
                self.cut -= delta
                old = temperature if temperature is not None else float("nan")
                return Event(
                    "temperature_raised",
                    f"KL {kl:.4g} below target {self.target:.4g}: temperature back toward "
                    f"the schedule ({old:.3f} -> {old + delta:.3f}) before lowering beta",
                    {**evidence, "old": old, "new": old + delta, "cut": self.cut},
                )
            return self._move_beta(error, evidence, "beta_lowered")
        return None

    def _move_beta(self, error: float, evidence: dict[str, Any], kind: str) -> Event | None:
        cfg = self.cfg
        if not cfg.adaptive_beta or not self.kl_in_loss:
            return None
        clipped = min(max(error, -cfg.error_clip), cfg.error_clip)
        old = self.beta
        self.beta = self._bound(old * (1.0 + cfg.k_p * clipped))
        if self.beta == old:
            return None  # at a bound: nothing changed, nothing to log
        return Event(
            kind,
            f"KL {evidence['kl']:.4g} vs target {self.target:.4g}: beta {old:.4g} -> "
            f"{self.beta:.4g}",
            {**evidence, "old": old, "new": self.beta, "bounds": [cfg.beta_min, cfg.beta_max]},
        )

    def _sync_phase(self) -> Event | None:
        """Pick up a new curriculum phase: reset the cut, take its beta and KL target."""
        if self.phases is None:
            return None
        pos = self.phases.position()
        if pos.index == self.phase_index:
            return None
        first = self.phase_index < 0
        old_beta, old_target = self.beta, self.target
        self.phase_index = pos.index
        self.cut = 0.0
        self.target = pos.kl_target if pos.kl_target is not None else self.cfg.kl_target
        if pos.beta is not None and self.cfg.adaptive_beta and self.kl_in_loss:
            self.beta = self._bound(pos.beta)
        if first:
            return None
        return Event(
            "kl_phase_reset",
            f"phase {pos.name}: beta {old_beta:.4g} -> {self.beta:.4g}, KL target "
            f"{old_target:.4g} -> {self.target:.4g}, temperature back on schedule",
            {
                "phase": pos.name,
                "old_beta": old_beta,
                "new_beta": self.beta,
                "old_target": old_target,
                "new_target": self.target,
            },
        )

    def metrics(self) -> dict[str, float]:
        out = {"kl/target": self.target, "kl/temperature_cut": self.cut}
        if self.last_error is not None:
            out["kl/error"] = self.last_error
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_step": self.next_step,
            "beta": self.beta,
            "target": self.target,
            "cut": self.cut,
            "phase_index": self.phase_index,
            "last_temperature": self.last_temperature,
            "last_floor": self.last_floor,
            "last_error": self.last_error,
            "warned_missing": self.warned_missing,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = int(state["next_step"])
        self.beta = float(state["beta"])
        self.target = float(state["target"])
        self.cut = float(state["cut"])
        self.phase_index = int(state["phase_index"])
        last = state["last_temperature"]
        self.last_temperature = None if last is None else float(last)
        self.last_floor = float(state["last_floor"])
        err = state["last_error"]
        self.last_error = None if err is None else float(err)
        self.warned_missing = bool(state["warned_missing"])
