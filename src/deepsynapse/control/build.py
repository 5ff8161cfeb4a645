"""Build the training-dynamics controllers from the ``control`` config section.

One explicit table, ``BUILDERS``, maps each section name to the function that builds its
controller; nothing registers itself at import time. The table's order is the order in which
the controllers ``apply`` and ``observe`` each step, and it matters: the curriculum writes the
phase's settings first; the KL-temperature controller then schedules temperature and beta
inside them and picks up a phase change in its ``observe``, after the curriculum's; the data
curriculum reads the difficulty range the curriculum wrote.

Plain dicts (a YAML section) are read strictly: an unknown key fails and names the nearest
valid one; each dataclass checks its own ranges.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from deepsynapse.control.accumulation import AccumulationConfig, AccumulationController
from deepsynapse.control.curriculum import (
    CurriculumConfig,
    PhaseCurriculum,
    PhaseSpec,
    default_phases,
)
from deepsynapse.control.data_curriculum import DataCurriculum, DataCurriculumConfig
from deepsynapse.control.kl_temperature import KLTemperatureConfig, KLTemperatureController
from deepsynapse.control.knobs import Controller, Knobs
from deepsynapse.control.sft_mixing import SFTMixing, SFTMixingConfig
from deepsynapse.data.problems import Problem
from deepsynapse.strict import ConfigError, from_mapping

__all__ = ["BUILDERS", "BuildContext", "ControlConfig", "build_controllers", "from_dict"]

T = TypeVar("T")


@dataclass(frozen=True)
class ControlConfig:
    curriculum: CurriculumConfig = field(
        default_factory=CurriculumConfig, metadata={"help": "phase-controlled curriculum"}
    )
    kl_temperature: KLTemperatureConfig = field(
        default_factory=KLTemperatureConfig, metadata={"help": "KL-temperature co-regulation"}
    )
    accumulation: AccumulationConfig = field(
        default_factory=AccumulationConfig, metadata={"help": "dynamic gradient accumulation"}
    )
    sft_mixing: SFTMixingConfig = field(
        default_factory=SFTMixingConfig, metadata={"help": "decaying auxiliary SFT loss"}
    )
    data_curriculum: DataCurriculumConfig = field(
        default_factory=DataCurriculumConfig, metadata={"help": "UCB sampling of difficulty"}
    )


@dataclass
class BuildContext:
    """What controllers are built from besides their own section."""

    base: Knobs  # the knobs built from the config, before any controller
    total_steps: int  # train.steps
    problems: Sequence[Problem] = ()  # training problems (data curriculum)
    seed: int = 0  # train.seed
    kl_in_loss: bool = True  # False: rewards.kl_mode=reward, the KL is a reward objective
    built: dict[str, Controller] = field(default_factory=dict)


# ---------------------------------------------------------------- strict reading


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """``cls`` from a plain mapping, through the config's one strict reader."""
    if isinstance(data, cls):
        return data
    return from_mapping(cls, data, where)


# ---------------------------------------------------------------- builders


def _check_reward_names(phases: Sequence[PhaseSpec], known: Collection[str]) -> None:
    for phase in phases:
        for name in [*phase.reward_weights, *(phase.active_rewards or [])]:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise ConfigError(
                    f"control.curriculum.phases: phase '{phase.name}': reward '{name}' is not in "
                    f"rewards.weights{hint} (known: {', '.join(sorted(known))})"
                )


def _curriculum(cfg: CurriculumConfig, ctx: BuildContext) -> PhaseCurriculum:
    def derive(total_steps: int) -> list[PhaseSpec]:
        return default_phases(
            ctx.base.reward_weights,
            base_beta=ctx.base.beta,
            total_steps=total_steps,
            ranks=cfg.default_ranks or None,
        )

    phases = list(cfg.phases) or derive(ctx.total_steps)
    _check_reward_names(phases, ctx.base.reward_weights)
    return PhaseCurriculum(
        phases, ctx.base, total_steps=ctx.total_steps, derive=None if cfg.phases else derive
    )


def _kl_temperature(cfg: KLTemperatureConfig, ctx: BuildContext) -> KLTemperatureController:
    phases = ctx.built.get("curriculum")
    assert phases is None or isinstance(phases, PhaseCurriculum)
    return KLTemperatureController(
        cfg,
        base_beta=ctx.base.beta,
        base_temperature=ctx.base.temperature,
        total_steps=ctx.total_steps,
        phases=phases,
        kl_in_loss=ctx.kl_in_loss,
    )


def _accumulation(cfg: AccumulationConfig, ctx: BuildContext) -> AccumulationController:
    return AccumulationController(cfg)


def _sft_mixing(cfg: SFTMixingConfig, ctx: BuildContext) -> SFTMixing:
    return SFTMixing(cfg, total_steps=ctx.total_steps)


def _data_curriculum(cfg: DataCurriculumConfig, ctx: BuildContext) -> DataCurriculum:
    return DataCurriculum(ctx.problems, cfg, seed=ctx.seed)


BUILDERS: dict[str, Callable[[Any, BuildContext], Controller]] = {
    "curriculum": _curriculum,
    "kl_temperature": _kl_temperature,
    "accumulation": _accumulation,
    "sft_mixing": _sft_mixing,
    "data_curriculum": _data_curriculum,
}


def build_controllers(
    section: ControlConfig | Mapping[str, Any],
    *,
    base: Knobs,
    total_steps: int,
    problems: Sequence[Problem] = (),
    seed: int = 0,
    kl_in_loss: bool = True,
) -> list[Controller]:
    """The enabled controllers, in ``BUILDERS`` order (the order they must run in)."""
    cfg = from_dict(ControlConfig, section, "control")
    ctx = BuildContext(
        base=base.copy(),
        total_steps=total_steps,
        problems=problems,
        seed=seed,
        kl_in_loss=kl_in_loss,
    )
    for name, build in BUILDERS.items():
        sub = getattr(cfg, name)
        if sub.enabled:
            ctx.built[name] = build(sub, ctx)
    return list(ctx.built.values())
