"""The reward side of one step, built from config in one place.

components (TRL convention) -> correctness (ground truth) -> calibration + fusion with the
knob weights -> learners that read the step (allocator, failure miner, verifier) -> the
episodic memory records the attempts, last, so memory-aware rewards scored against the past.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepsynapse.config import Config, ConfigError
from deepsynapse.control.knobs import Controller, Knobs
from deepsynapse.data.answers import answers_match
from deepsynapse.memory.episodic import EpisodicMemory
from deepsynapse.rewards.allocators import build_allocator
from deepsynapse.rewards.base import (
    BUILTIN_REWARDS,
    ComponentFailure,
    call_components,
    component_name,
)
from deepsynapse.rewards.contrastive import make_contrastive_reward
from deepsynapse.rewards.critique import critique_consistency_reward, make_calibration_reward
from deepsynapse.rewards.discovery import RewardDiscovery
from deepsynapse.rewards.fusion import RewardFusion
from deepsynapse.rewards.memory_rewards import MEMORY_REWARDS
from deepsynapse.rewards.specs import records_from_columns
from deepsynapse.rewards.structure import error_counts, make_length_penalty, structure_reward
from deepsynapse.rewards.verifier import Verifier, VerifierReward, verifier_texts
from deepsynapse.rl.grpo import group_has_signal

# Components that need a model, the distractor columns or the memory: built per run.
NEEDS_DISTRACTORS = {"contrastive"}


@dataclass
class ScoredBatch:
    scores: dict[str, list[float | None]]  # component -> N scores
    calibrated: dict[str, list[float | None]]
    correct: torch.Tensor  # [N] 0/1 ground truth
    reward: torch.Tensor  # [N] fused, what the advantages use
    failures: list[ComponentFailure]
    metrics: dict[str, float] = field(default_factory=dict)


class RewardEngine:
    """Components, fusion, allocator, discovery, verifier and episodic memory of one run."""

    def __init__(
        self, cfg: Config, extra: dict[str, Callable[..., Any]] | None = None, seed: int = 0
    ):
        self.cfg = cfg
        r = cfg.rewards
        names = [n for n in r.weights if n != "kl"]
        self.memory = EpisodicMemory(
            cfg.episodic.attempts_per_problem,
            cfg.episodic.max_problems,
            cfg.episodic.solutions_per_problem,
        )
        self.verifier: Verifier | None = None
        if "verifier" in names:
            self.verifier = Verifier(r.verifier_backbone, seed=seed)
        table = self._table(extra or {})
        for name in names:
            if name not in table:
                near = difflib.get_close_matches(name, table, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise ConfigError(
                    f"rewards.weights: unknown reward '{name}'{hint} (known: {', '.join(sorted(table))})"
                )
        if "kl" in r.weights and r.kl_mode != "reward":
            raise ConfigError("rewards.weights.kl is only used with rewards.kl_mode=reward")
        self.components = [table[name]() for name in names]
        self.fusion = RewardFusion(
            r.calibration, r.kl_mode, r.calibration_window, r.calibration_clip
        )
        options = dict(r.allocator_options)
        try:
            self.allocator = build_allocator(
                r.allocator, list(r.weights), dict(r.weights), **options
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"rewards.allocator_options: {exc}") from None
        self.discovery: RewardDiscovery | None = None
        if cfg.discovery.enabled:
            d = cfg.discovery
            self.discovery = RewardDiscovery(
                window=d.window,
                min_records=d.min_records,
                on_threshold=d.on_threshold,
                off_threshold=d.off_threshold,
                patience=d.patience,
                max_active=d.max_active,
                cluster=d.cluster,
                cluster_weight=d.cluster_weight,
                memory=self.memory,
            )

    def _table(self, extra: dict[str, Callable[..., Any]]) -> dict[str, Callable[[], Any]]:
        """Name -> builder. The one mapping from config names to components."""
        r = self.cfg.rewards
        table: dict[str, Callable[[], Any]] = {
            k: (lambda v=v: v) for k, v in BUILTIN_REWARDS.items()
        }
        table.update(
            {
                "structure": lambda: structure_reward,
                "length_penalty": lambda: make_length_penalty(r.length_penalty, r.length_budget),
                "calibration": lambda: make_calibration_reward(r.confident_wrong_penalty),
                "critique_consistency": lambda: critique_consistency_reward,
                "contrastive": lambda: make_contrastive_reward(r.contrastive_mode),
                "verifier": lambda: VerifierReward(self.verifier),
            }
        )
        for name, cls in MEMORY_REWARDS.items():
            table[name] = lambda cls=cls: cls(self.memory)
        table.update({k: (lambda v=v: v) for k, v in extra.items()})
        return table

    @property
    def needs_distractors(self) -> bool:
        names = {component_name(c) for c in self.components}
        return bool(names & NEEDS_DISTRACTORS) or self.discovery is not None

    @property
    def needs_scorer(self) -> bool:
        return any(component_name(c) == "contrastive" for c in self.components)

    def controllers(self) -> list[Controller]:
        """Learners that are controllers: checkpointed and observed like the others."""
        out: list[Controller] = [self.allocator]
        if self.discovery is not None:
            out.append(self.discovery)
        return out

    def active(self, knobs: Knobs) -> list[Any]:
        comps = list(self.components)
        if self.discovery is not None:
            comps += self.discovery.active_components()
        if knobs.active_rewards is not None:
            keep = set(knobs.active_rewards)
            comps = [
                c
                for c in comps
                if component_name(c) in keep or component_name(c).startswith("discovered_")
            ]
        return comps

    def evaluate(
        self,
        prompts: Sequence[str],
        texts: Sequence[str],
        columns: dict[str, Any],
        knobs: Knobs,
        seconds: dict[str, float] | None = None,
        signal_groups_of: int | None = None,
    ) -> tuple[dict[str, list[float | None]], list[ComponentFailure], list[float]]:
        """Every active component's scores, the failures, and ground-truth correctness
        (each component's wall time added to ``seconds`` when given).

        ``signal_groups_of=g`` (dynamic sampling, groups of ``g``): costly components score
        only the groups whose correctness varies, the ones the update can keep; the rest
        get None from them (their cheap components still score every row).
        """
        correct = [
            float(
                p.fields.get("answer") is not None
                and answers_match(p.fields["answer"], prob.answer)
            )
            for p, prob in zip(columns["parsed"], columns["problem"], strict=True)
        ]
        rows = None
        if signal_groups_of:
            g = signal_groups_of
            kept = group_has_signal(torch.tensor(correct), g).tolist()
            rows = [k * g + j for k, keep in enumerate(kept) if keep for j in range(g)]
        scores, failures = call_components(
            self.active(knobs),
            prompts,
            texts,
            columns,
            timeout=self.cfg.rewards.timeout_s or None,
            seconds=seconds,
            costly_rows=rows,
        )
        return scores, failures, correct

    def fuse(
        self,
        scores: dict[str, list[float | None]],
        correct: list[float],
        failures: list[ComponentFailure],
        texts: Sequence[str],
        columns: dict[str, Any],
        knobs: Knobs,
        group_size: int,
        step: int,
        kl: list[float] | None = None,
    ) -> ScoredBatch:
        """Calibrate and weigh the scores with the knob weights; the learners read the step."""
        parsed, problems = columns["parsed"], columns["problem"]
        result = self.fusion.fuse(scores, knobs.reward_weights, group_size, kl=kl)
        metrics = dict(self.fusion.metrics(result))
        for category, count in error_counts(parsed, columns["schema"]).items():
            metrics[f"format/errors/{category}"] = count / max(len(parsed), 1)
        # Learners read this step after it was scored.
        self.allocator.observe_batch(scores, correct, group_size, calibrated=result.calibrated)
        if self.discovery is not None:
            self.discovery.observe_rollouts(
                records_from_columns(list(texts), columns, step, self.memory)
            )
            metrics.update(self.discovery.metrics())
        if self.verifier is not None:
            questions = [p.question for p in problems]
            metrics.update(self.verifier.update(verifier_texts(questions, parsed), correct))
        self.memory.record(
            [p.id for p in problems],
            [p.fields.get("answer") for p in parsed],
            correct,
            step,
            rewards=result.total.tolist(),
            completions=list(texts),
        )
        metrics.update(self.memory.metrics())
        return ScoredBatch(
            scores,
            result.calibrated,
            torch.tensor(correct),
            result.total.float(),
            failures,
            metrics,
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "fusion": self.fusion.state_dict(),
            "memory": self.memory.state_dict(),
        }
        if self.verifier is not None:
            state["verifier"] = self.verifier.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fusion.load_state_dict(state["fusion"])
        self.memory.load_state_dict(state["memory"])
        if self.verifier is not None and "verifier" in state:
            self.verifier.load_state_dict(state["verifier"])
