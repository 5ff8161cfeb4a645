"""Knobs with owners: each knob is read by the loop and has a writer; two writers need a rule."""

from __future__ import annotations

import dataclasses

import pytest

from deepsynapse.control.accumulation import AccumulationController
from deepsynapse.control.curriculum import PhaseCurriculum
from deepsynapse.control.data_curriculum import DataCurriculum
from deepsynapse.control.kl_temperature import KLTemperatureController
from deepsynapse.control.knobs import KnobOwnershipError, Knobs, check_knob_owners
from deepsynapse.control.sft_mixing import SFTMixing
from deepsynapse.eval.probes import EmergenceDetector
from deepsynapse.rewards.allocators import ALLOCATORS
from deepsynapse.rewards.discovery import RewardDiscovery
from deepsynapse.rl.trainer import KNOB_READS

CONTROLLER_CLASSES = [
    PhaseCurriculum,
    KLTemperatureController,
    AccumulationController,
    DataCurriculum,
    SFTMixing,
    RewardDiscovery,
    EmergenceDetector,
    *ALLOCATORS.values(),
]
# What the trainer builds the knobs from (config), before any controller writes.
FROM_CONFIG = {
    "temperature",
    "beta",
    "reward_weights",
    "max_new_tokens",
    "micro_batches",
    "lora_rank",
}


def test_every_knob_is_read_and_has_a_writer():
    fields = {f.name for f in dataclasses.fields(Knobs)}
    assert fields == set(KNOB_READS), f"unread knobs: {fields - set(KNOB_READS)}"
    written = set(FROM_CONFIG)
    for cls in CONTROLLER_CLASSES:
        assert isinstance(cls.writes, dict), cls.__name__
        written |= set(cls.writes)
    assert fields <= written, f"knobs nothing writes: {fields - written}"


class _Writer:
    def __init__(self, name, writes):
        self.name, self.writes = name, writes


def test_two_writers_need_a_rule():
    ok = check_knob_owners(
        [
            _Writer("curriculum", {"reward_weights": "sets"}),
            _Writer("alloc", {"reward_weights": "scales"}),
        ],
        {"reward_weights"},
    )
    assert ok == {"reward_weights": ["curriculum", "alloc"]}
    with pytest.raises(KnobOwnershipError, match="without a rule"):
        check_knob_owners(
            [_Writer("a", {"beta": "sets"}), _Writer("b", {"beta": "sets"})], {"beta"}
        )


def test_a_knob_written_and_never_read_fails():
    with pytest.raises(KnobOwnershipError, match="read by nothing"):
        check_knob_owners([_Writer("lr", {"temperature": "sets"})], reads=set())


def test_unknown_knob_and_undeclared_controller_fail():
    with pytest.raises(KnobOwnershipError, match="unknown knob 'lr_scale'"):
        check_knob_owners([_Writer("lr", {"lr_scale": "sets"})], KNOB_READS)
    with pytest.raises(KnobOwnershipError, match="does not declare"):
        check_knob_owners([object()], KNOB_READS)


def test_the_full_set_of_controllers_builds(tmp_path):
    """Curriculum, KL-temperature, accumulation, data curriculum, CHORD, allocator, discovery
    and probes all on: the trainer's build-time check passes and names each knob's writers."""
    from conftest import EXTRA_REWARDS, TINY

    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer

    cfg = load_config(
        None,
        TINY
        + [
            "control.curriculum.enabled=true",
            "control.kl_temperature.enabled=true",
            "control.accumulation.enabled=true",
            "control.data_curriculum.enabled=true",
            "control.sft_mixing.enabled=true",
            "rewards.allocator=mirror",
            "discovery.enabled=true",
            "probes.every=2",
        ],
    )
    trainer = Trainer(cfg, run_dir=tmp_path / "k", progress=False, reward_fns=EXTRA_REWARDS)
    owners = trainer.knob_owners
    assert owners["reward_weights"][0] == "curriculum" and len(owners["reward_weights"]) == 3
    assert owners["temperature"] == ["curriculum", "kl_temperature"]
