"""Phase-controlled curriculum (white paper 3.5 / 3.15) and component locking.

Training runs through phases; by default three: ``structure`` (structural compliance),
``reasoning`` (reasoning validation) and ``precision`` (precision refinement). Each phase
carries its own reward-weight priors and active components, KL coefficient or KL target,
temperature range, length budget, data difficulty range, LoRA rank and trainable parameter
groups. A phase ends when its exit criterion has held over a window of steps and its
``min_steps`` have passed, or when it reaches ``max_steps``; the transition is an event that
says which. The last phase never ends.

Hysteresis of an exit criterion ``metric >= threshold`` (mirrored for ``<=``): a step whose
metric meets the threshold adds one to a counter; a step in the dead band
``[threshold - margin, threshold)`` leaves the counter as it is; a step below
``threshold - margin`` resets it to zero. A missing or non-finite metric leaves it as it is.
So one noisy dip does not undo a window of good steps, and a metric that hovers just under the
threshold never completes the window.

Component locking: each trainable tensor belongs to a parameter group (``parameter_group``:
LoRA on attention, LoRA on the MLP, hypernetwork, memory, verifier); ``apply_locking`` sets
``requires_grad`` per group and never touches the frozen base model. The optimizer is built
once over every adapter parameter, before any locking: a locked parameter gets no gradient
(``grad is None``), so AdamW skips it entirely (no update, no weight decay, no change to its
moments) and it stays bit-identical; the parameters that stay trainable keep their AdamW state,
and a group unlocked later resumes with the moments it had when it was locked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from deepsynapse.control.knobs import Event, Knobs

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ADDED_GROUPS",
    "GROUP_ALIASES",
    "CurriculumConfig",
    "KNOWN_GROUPS",
    "ExitCriterion",
    "PhaseCurriculum",
    "PhasePosition",
    "PhaseSpec",
    "apply_locking",
    "default_phases",
    "locking_summary",
    "parameter_group",
    "trainable_mask",
]

# ---------------------------------------------------------------- parameter groups

LORA_GROUPS = ("lora_attn", "lora_mlp", "lora_other")
ADDED_GROUPS = (*LORA_GROUPS, "hypernet", "memory", "verifier")
GROUP_ALIASES: dict[str, tuple[str, ...]] = {"lora": LORA_GROUPS, "all": ADDED_GROUPS}
KNOWN_GROUPS = (*ADDED_GROUPS, *GROUP_ALIASES)

_ATTN = {
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value",
    "query_key_value", "c_attn", "self_attn", "attn", "attention", "out_proj", "wqkv",
}  # fmt: skip
_MLP = {
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "mlp", "feed_forward", "ffn",
    "fc1", "fc2", "c_fc", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h",
}  # fmt: skip


def parameter_group(name: str) -> str:
    """The locking group of a parameter name; ``"base"`` for anything that is not added.

    DeepSynapse's own modules are recognised by a path segment containing ``hypernet``,
    ``memory`` or ``verifier``; PEFT LoRA tensors by a ``lora_*`` segment, split by the module
    they adapt. Everything else (the base model, PEFT's ``base_layer``) is ``"base"`` and is
    never locked or unlocked.

    >>> parameter_group("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    'lora_attn'
    >>> parameter_group("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight")
    'lora_mlp'
    >>> parameter_group("base_model.model.model.layers.0.mlp.down_proj.base_layer.weight")
    'base'
    """
    parts = name.split(".")
    if "base_layer" in parts:
        return "base"
    for group in ("hypernet", "memory", "verifier"):
        if any(group in part for part in parts):
            return group
    if not any(part.startswith("lora_") for part in parts):
        return "base"
    module_path = set(parts)
    if module_path & _ATTN:
        return "lora_attn"
    if module_path & _MLP:
        return "lora_mlp"
    return "lora_other"


def expand_groups(groups: Iterable[str]) -> set[str]:
    """Resolve the aliases ``lora`` (every LoRA group) and ``all`` (every added group)."""
    out: set[str] = set()
    for g in groups:
        out.update(GROUP_ALIASES.get(g, (g,)))
    return out


def trainable_mask(
    param_names: Iterable[str],
    groups: Iterable[str],
    group_of: Callable[[str], str] = parameter_group,
) -> set[str]:
    """Names of the parameters that are trainable when ``groups`` are (base never is)."""
    wanted = expand_groups(groups)
    return {n for n in param_names if (g := group_of(n)) != "base" and g in wanted}


def apply_locking(
    module: nn.Module,
    trainable_groups: Iterable[str],
    *,
    group_of: Callable[[str], str] = parameter_group,
    lockable: Collection[str] | None = None,
) -> dict[str, bool]:
    """Set ``requires_grad`` of added parameters by group; return ``{name: now_trainable}``.

    Only parameters whose group is not ``"base"`` (and that are in ``lockable`` when given:
    pass the names the optimizer was built over) are touched, so the base model is never
    unfrozen. Under DDP, a parameter frozen after wrapping never reports a gradient: build the
    DDP wrapper with ``find_unused_parameters=True`` when phases lock groups.
    """
    named = list(module.named_parameters())
    wanted = trainable_mask((n for n, _ in named), trainable_groups, group_of)
    changes: dict[str, bool] = {}
    for name, param in named:
        if group_of(name) == "base" or (lockable is not None and name not in lockable):
            continue
        want = name in wanted
        if param.requires_grad != want:
            param.requires_grad_(want)
            changes[name] = want
    return changes


def locking_summary(
    changes: dict[str, bool], group_of: Callable[[str], str] = parameter_group
) -> dict[str, dict[str, int]]:
    """``{group: {"locked": n, "unlocked": m}}``: the evidence of a locking event."""
    out: dict[str, dict[str, int]] = {}
    for name, trainable in sorted(changes.items()):
        row = out.setdefault(group_of(name), {"locked": 0, "unlocked": 0})
        row["unlocked" if trainable else "locked"] += 1
    return out


# ---------------------------------------------------------------- phase specs


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class ExitCriterion:
    """Leave the phase when ``metric op threshold`` has held for ``window`` steps."""

    metric: str = field(metadata={"help": "metric name, e.g. format/valid_rate"})
    threshold: float = field(metadata={"help": "value the metric must reach"})
    op: Literal[">=", "<="] = field(default=">=", metadata={"help": ">= or <="})
    window: int = field(default=20, metadata={"help": "steps the criterion must hold"})
    margin: float = field(
        default=0.05,
        metadata={"help": "hysteresis: the count resets only beyond threshold -/+ margin"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"exit.metric: got {self.metric!r}, expected a metric name")
        if self.op not in (">=", "<="):
            raise ValueError(f"exit.op: got {self.op!r}, expected '>=' or '<='")
        if not _finite(self.threshold):
            raise ValueError(f"exit.threshold: got {self.threshold!r}, expected a number")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"exit.window: got {self.window!r}, expected an integer >= 1")
        if not _finite(self.margin) or self.margin < 0:
            raise ValueError(f"exit.margin: got {self.margin!r}, expected a number >= 0")

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def broken(self, value: float) -> bool:
        """Beyond the dead band: the held count resets."""
        if self.op == ">=":
            return value < self.threshold - self.margin
        return value > self.threshold + self.margin


@dataclass(frozen=True)
class PhaseSpec:
    """One curriculum phase. ``None`` means "the configured value" (see PhaseCurriculum)."""

    name: str = field(metadata={"help": "phase name, shown in logs"})
    reward_weights: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "fusion weights set in this phase (others keep rewards.weights)"},
    )
    active_rewards: list[str] | None = field(
        default=None, metadata={"help": "components scored in this phase (None = all)"}
    )
    beta: float | None = field(default=None, metadata={"help": "KL coefficient at phase start"})
    kl_target: float | None = field(
        default=None, metadata={"help": "target KL for the adaptive KL controller"}
    )
    temperature: list[float] | None = field(
        default=None, metadata={"help": "[high, low] sampling temperature over the phase"}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "completion budget"})
    length_budget: int | None = field(
        default=None, metadata={"help": "token budget of the length_penalty reward in this phase"}
    )
    difficulty: list[int] | None = field(
        default=None, metadata={"help": "[min, max] problem difficulty sampled"}
    )
    lora_rank: int | None = field(default=None, metadata={"help": "LoRA rank (dynamic LoRA)"})
    trainable_groups: list[str] | None = field(
        default=None,
        metadata={"help": f"parameter groups trained: {', '.join(KNOWN_GROUPS)}"},
    )
    min_steps: int = field(default=0, metadata={"help": "steps before the criterion may end it"})
    max_steps: int | None = field(
        default=None, metadata={"help": "steps after which the phase ends (None = no limit)"}
    )
    exit: ExitCriterion | None = field(
        default=None, metadata={"help": "measured criterion that ends the phase"}
    )

    def __post_init__(self) -> None:
        where = f"phase '{self.name}'"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"phase name: got {self.name!r}, expected a non-empty string")
        for k, v in self.reward_weights.items():
            if not _finite(v):
                raise ValueError(f"{where}: reward_weights.{k}: got {v!r}, expected a number")
        if self.beta is not None and (not _finite(self.beta) or self.beta < 0):
            raise ValueError(f"{where}: beta: got {self.beta!r}, expected a number >= 0")
        if self.kl_target is not None and (not _finite(self.kl_target) or self.kl_target <= 0):
            raise ValueError(f"{where}: kl_target: got {self.kl_target!r}, expected > 0")
        t = self.temperature
        if t is not None and not (len(t) == 2 and all(_finite(x) for x in t) and t[0] >= t[1] > 0):
            raise ValueError(
                f"{where}: temperature: got {t!r}, expected [high, low], high >= low > 0"
            )
        d = self.difficulty
        if d is not None and not (
            len(d) == 2 and all(isinstance(x, int) for x in d) and 0 <= d[0] <= d[1]
        ):
            raise ValueError(
                f"{where}: difficulty: got {d!r}, expected [min, max], 0 <= min <= max"
            )
        for key in ("max_new_tokens", "length_budget", "lora_rank"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}: {key}: got {value!r}, expected an integer >= 1")
        for g in self.trainable_groups or []:
            if g not in KNOWN_GROUPS:
                raise ValueError(
                    f"{where}: trainable_groups: unknown group {g!r} "
                    f"(known: {', '.join(KNOWN_GROUPS)})"
                )
        if not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"{where}: min_steps: got {self.min_steps!r}, expected >= 0")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < max(1, self.min_steps)
        ):
            raise ValueError(
                f"{where}: max_steps: got {self.max_steps!r}, expected None or an integer "
                f">= max(1, min_steps={self.min_steps})"
            )


@dataclass(frozen=True)
class PhasePosition:
    """Where the curriculum stands, for controllers that schedule within a phase."""

    index: int
    name: str
    step: int  # steps already run in this phase (0 at its first step)
    horizon: int | None  # nominal length: max_steps, else the rest of the run, else None
    temperature: tuple[float, float] | None  # (high, low)
    kl_target: float | None
    beta: float | None


_STRUCTURE_HINTS = ("format", "struct", "xml", "length")
_CORRECT_HINTS = ("correct", "accuracy")


def _family(name: str) -> str:
    low = name.lower()
    if any(h in low for h in _STRUCTURE_HINTS):
        return "structure"
    if any(h in low for h in _CORRECT_HINTS):
        return "correctness"
    return "other"


def default_phases(
    base_weights: dict[str, float],
    *,
    base_beta: float = 0.04,
    total_steps: int | None = None,
    ranks: Sequence[int] | None = None,
) -> list[PhaseSpec]:
    """The three default phases, with weights derived from ``base_weights``.

    Components are sorted into families by name (``*format*``/``*struct*``/... = structure,
    ``*correct*`` = correctness, other). Structure phase: structure x1.5, others x0.5, low KL,
    hot sampling, easy problems, adapters only. Reasoning: the configured weights, more
    difficulty, hypernetwork and memory join. Precision: correctness x1.5, structure x0.5,
    twice the KL, cool sampling, all problems, everything trainable. With ``total_steps`` the
    windows and step limits scale with the run (phase 1 at most 30%, phase 2 at most 40%).
    """
    factors = {
        "structure": {"structure": 1.5, "correctness": 0.5, "other": 0.5},
        "reasoning": {"structure": 1.0, "correctness": 1.0, "other": 1.0},
        "precision": {"structure": 0.5, "correctness": 1.5, "other": 1.0},
    }

    def weights(phase: str) -> dict[str, float]:
        return {k: float(v) * factors[phase][_family(k)] for k, v in base_weights.items()}

    if total_steps:
        window = max(1, min(20, total_steps // 10))
        min_steps = max(1, total_steps // 20)
        first: int | None = max(min_steps + window, round(0.3 * total_steps))
        second: int | None = max(min_steps + window, round(0.4 * total_steps))
    else:
        window, min_steps, first, second = 20, 0, None, None
    r = list(ranks) if ranks is not None else [None, None, None]
    if len(r) != 3:
        raise ValueError(f"ranks: got {ranks!r}, expected three ranks (one per phase)")
    return [
        PhaseSpec(
            name="structure",
            reward_weights=weights("structure"),
            beta=0.5 * base_beta,
            temperature=[1.0, 0.8],
            difficulty=[1, 3],
            lora_rank=r[0],
            trainable_groups=["lora"],
            min_steps=min_steps,
            max_steps=first,
            exit=ExitCriterion("format/valid_rate", 0.9, window=window, margin=0.05),
        ),
        PhaseSpec(
            name="reasoning",
            reward_weights=weights("reasoning"),
            beta=base_beta,
            temperature=[0.9, 0.7],
            difficulty=[1, 5],
            lora_rank=r[1],
            trainable_groups=["lora", "hypernet", "memory"],
            min_steps=min_steps,
            max_steps=second,
            exit=ExitCriterion("accuracy/train", 0.6, window=window, margin=0.05),
        ),
        PhaseSpec(
            name="precision",
            reward_weights=weights("precision"),
            beta=2.0 * base_beta,
            temperature=[0.7, 0.5],
            lora_rank=r[2],
            trainable_groups=["all"],
        ),
    ]


@dataclass(frozen=True)
class CurriculumConfig:
    enabled: bool = field(
        default=False, metadata={"help": "run training through curriculum phases"}
    )
    phases: list[PhaseSpec] = field(
        default_factory=list,
        metadata={
            "help": "phases in order; empty = the three default phases, derived from "
            "rewards.weights, grpo.beta and train.steps"
        },
    )
    default_ranks: list[int] = field(
        default_factory=list,
        metadata={"help": "LoRA rank of each default phase, e.g. [4, 8, 16] (empty = unchanged)"},
    )

    def __post_init__(self) -> None:
        if self.default_ranks and len(self.default_ranks) != 3:
            raise ValueError(
                f"curriculum.default_ranks: got {self.default_ranks}, expected three ranks"
            )
        asked = [p.lora_rank for p in self.phases]
        if self.default_ranks and self.phases and asked != list(self.default_ranks):
            # the ranks would be ignored: explicit phases carry their own
            raise ValueError(
                f"curriculum.default_ranks: {self.default_ranks} applies to the default phases, "
                f"but curriculum.phases is given with lora_rank {asked}; set the ranks in the "
                "phases or make the two agree"
            )


# ---------------------------------------------------------------- the controller


class PhaseCurriculum:
    """Walks through ``phases``; writes each phase's settings into the knobs.

    A field a phase leaves ``None`` takes the value of ``base`` (the knobs built from the
    config), so a phase never inherits what an earlier phase set; ``lora_rank`` is the
    exception (left as it is: ranks only grow). Reward weights are ``base`` weights updated
    with the phase's, and components outside ``active_rewards`` get weight 0.
    """

    name = "curriculum"
    writes: ClassVar[dict[str, str]] = {
        k: "sets"
        for k in (
            "phase",
            "phase_index",
            "phase_step",
            "reward_weights",
            "active_rewards",
            "beta",
            "temperature",
            "max_new_tokens",
            "length_budget",
            "difficulty",
            "trainable_groups",
            "lora_rank",
        )
    }

    def __init__(
        self,
        phases: Sequence[PhaseSpec],
        base: Knobs,
        *,
        total_steps: int | None = None,
        derive: Callable[[int], list[PhaseSpec]] | None = None,
    ):
        if not phases:
            raise ValueError("curriculum: expected at least one phase")
        names = [p.name for p in phases]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"curriculum: duplicate phase names {dupes}")
        self.phases = list(phases)
        self.base = base.copy()
        self.total_steps = total_steps
        # phases derived from the run's length (the defaults): re-derived when it changes
        self.derive = derive
        self.index = 0
        self.phase_step = 0  # steps already run in the current phase
        self.phase_start = 0  # global step at which the current phase began
        self.held = 0  # steps the exit criterion has held (with hysteresis)
        self.last_value: float | None = None
        self.warned_missing = False
        self.history: list[dict[str, Any]] = []

    @property
    def spec(self) -> PhaseSpec:
        return self.phases[self.index]

    def position(self) -> PhasePosition:
        spec = self.spec
        horizon = spec.max_steps
        if horizon is None and self.total_steps:
            horizon = max(1, self.total_steps - self.phase_start)
        t = spec.temperature
        return PhasePosition(
            index=self.index,
            name=spec.name,
            step=self.phase_step,
            horizon=horizon,
            temperature=(float(t[0]), float(t[1])) if t else None,
            kl_target=spec.kl_target,
            beta=spec.beta,
        )

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length (a time budget plans it after the first GRPO steps): the last
        phase's temperature ramp spans what is left of it, and phases derived from the run's
        length (the defaults) are derived again; phases the config spells out keep theirs."""
        self.total_steps = int(total_steps)
        if self.derive is not None:
            self.phases = self.derive(self.total_steps)

    def apply(self, knobs: Knobs) -> None:
        spec, base = self.spec, self.base
        knobs.phase = spec.name
        knobs.phase_index = self.index
        knobs.phase_step = self.phase_step
        weights = dict(base.reward_weights)
        weights.update(spec.reward_weights)
        if spec.active_rewards is not None:
            active = set(spec.active_rewards)
            weights = {k: (v if k in active else 0.0) for k, v in weights.items()}
        knobs.reward_weights = weights
        knobs.active_rewards = None if spec.active_rewards is None else list(spec.active_rewards)
        knobs.beta = base.beta if spec.beta is None else spec.beta
        knobs.temperature = base.temperature if spec.temperature is None else spec.temperature[0]
        knobs.max_new_tokens = spec.max_new_tokens or base.max_new_tokens
        knobs.length_budget = spec.length_budget or base.length_budget
        knobs.difficulty = base.difficulty if spec.difficulty is None else tuple(spec.difficulty)
        groups = spec.trainable_groups
        knobs.trainable_groups = list(base.trainable_groups if groups is None else groups)
        if spec.lora_rank is not None:
            knobs.lora_rank = spec.lora_rank

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]:
        events: list[Event] = []
        self.phase_step += 1
        spec = self.spec
        if self.index == len(self.phases) - 1:
            return events
        crit = spec.exit
        if crit is not None:
            value = metrics.get(crit.metric)
            if value is None or not _finite(value):
                if not self.warned_missing:
                    self.warned_missing = True
                    events.append(
                        Event(
                            "curriculum_metric_missing",
                            f"phase {spec.name}: exit metric {crit.metric} missing or not "
                            "finite; the criterion count is left as it is",
                            {"phase": spec.name, "metric": crit.metric, "value": value},
                        )
                    )
            else:
                self.last_value = float(value)
                before = self.held
                if crit.met(value):
                    self.held += 1
                elif crit.broken(value):
                    self.held = 0
                if before and not self.held:
                    events.append(
                        Event(
                            "curriculum_criterion_reset",
                            f"phase {spec.name}: {crit.metric}={value:.4g} left the band "
                            f"{crit.op} {crit.threshold} (margin {crit.margin}); count reset",
                            {
                                "phase": spec.name,
                                "metric": crit.metric,
                                "value": float(value),
                                "threshold": crit.threshold,
                                "margin": crit.margin,
                                "held_before": before,
                            },
                        )
                    )
        reason = None
        if crit is not None and self.held >= crit.window and self.phase_step >= spec.min_steps:
            reason = "criterion"
        elif spec.max_steps is not None and self.phase_step >= spec.max_steps:
            reason = "max_steps"
        if reason is not None:
            events.append(self._advance(step, reason))
        return events

    def _advance(self, step: int, reason: str) -> Event:
        old, crit = self.spec, self.spec.exit
        record = {
            "step": step,
            "from": old.name,
            "to": self.phases[self.index + 1].name,
            "from_index": self.index,
            "to_index": self.index + 1,
            "reason": reason,
            "phase_steps": self.phase_step,
            "metric": crit.metric if crit else None,
            "value": self.last_value if crit else None,
            "op": crit.op if crit else None,
            "threshold": crit.threshold if crit else None,
            "held": self.held,
            "window": crit.window if crit else None,
            "min_steps": old.min_steps,
            "max_steps": old.max_steps,
        }
        self.history.append(record)
        self.index += 1
        self.phase_step = 0
        self.phase_start = step + 1
        self.held = 0
        self.last_value = None
        self.warned_missing = False
        if reason == "criterion":
            why = (
                f"{record['metric']} {record['op']} {record['threshold']} held for "
                f"{record['held']} steps"
            )
        else:
            why = f"reached max_steps={old.max_steps}"
        return Event(
            "phase_transition",
            f"phase {record['from']} -> {record['to']} after {record['phase_steps']} steps ({why})",
            record,
        )

    def metrics(self) -> dict[str, float]:
        """State after ``observe``: the exit criterion's count and last value."""
        out = {"curriculum/criterion_held": float(self.held)}
        if self.last_value is not None:
            out["curriculum/criterion_value"] = self.last_value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "phase": self.spec.name,
            "phase_step": self.phase_step,
            "phase_start": self.phase_start,
            "held": self.held,
            "last_value": self.last_value,
            "warned_missing": self.warned_missing,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        index = int(state["index"])
        if not 0 <= index < len(self.phases) or self.phases[index].name != state["phase"]:
            raise ValueError(
                f"curriculum state is in phase {state['phase']!r} (#{index}), which this "
                f"config's phases {[p.name for p in self.phases]} do not have at that position"
            )
        self.index = index
        self.phase_step = int(state["phase_step"])
        self.phase_start = int(state["phase_start"])
        self.held = int(state["held"])
        self.last_value = None if state["last_value"] is None else float(state["last_value"])
        self.warned_missing = bool(state["warned_missing"])
        self.history = [dict(h) for h in state["history"]]
