"""Auto-discovered reward components (white paper 3.12): recurring failures become penalties.

A failure miner keeps a bounded window of recent rollouts (``specs.RolloutRecord``) and
measures how often each pattern of a *declarative library* occurs in it. A pattern is a
JSON spec (``rewards/specs.py``)::

    {"name": "distractor_chosen", "predicate": {"type": "distractor_chosen"}, "weight": -0.3}

validated against a fixed schema and interpreted by a fixed table of Python functions: no
spec, from a config, a file or a model, is ever executed as code. Beyond the named
patterns (``DEFAULT_LIBRARY``: missing or unclosed tags, non-numeric answer, a distractor
chosen, unit mismatch, repetition loops, answer copied from the question, overlong
reasoning, a mistake repeated from the episodic memory), wrong answers that no named
pattern explains are bucketed on a small feature vector (``FEATURE_BINS``: words, digit
ratio, tag errors, log relative error); a bucket holding at least ``on_threshold`` of the
window becomes a candidate ``feature_box`` term.

A term switches on when its pattern's frequency in the window is at or above
``on_threshold`` for ``patience`` consecutive observations, and retires when it falls below
``off_threshold``. Every decision is an :class:`Event` with its evidence (frequency, window
size, example record ids). An active term is a reward component in TRL's convention that
scores 1.0 where its predicate fires and 0.0 elsewhere; its (negative) weight goes into
``knobs.reward_weights`` through :meth:`RewardDiscovery.apply`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from deepsynapse.control.knobs import Event, Knobs
from deepsynapse.memory.episodic import EpisodicMemory
from deepsynapse.rewards.base import Scores
from deepsynapse.rewards.specs import (
    FEATURE_BINS,
    RolloutRecord,
    TermSpec,
    evaluate_predicate,
    record_features,
    records_from_columns,
    validate_spec,
)

__all__ = ["DEFAULT_LIBRARY", "DiscoveredTerm", "RewardDiscovery"]


def _bucket(features: Mapping[str, float]) -> tuple[int, ...]:
    key = []
    for name, edges in FEATURE_BINS.items():
        x = features[name]
        j = 0
        while j + 2 < len(edges) and x >= edges[j + 1]:
            j += 1
        key.append(j)
    return tuple(key)


# ------------------------------------------------------------------ the library

DEFAULT_LIBRARY: list[dict[str, Any]] = [
    {"name": "missing_answer_tag", "predicate": {"type": "format_error", "category": "missing:answer"}, "weight": -0.5},
    {"name": "missing_reasoning_tag", "predicate": {"type": "format_error", "category": "missing:reasoning"}, "weight": -0.3},
    {"name": "unclosed_tag", "predicate": {"type": "format_error", "category": "unclosed"}, "weight": -0.3},
    {"name": "non_numeric_answer", "predicate": {"type": "answer_not_numeric"}, "weight": -0.3},
    {"name": "distractor_chosen", "predicate": {"type": "distractor_chosen"}, "weight": -0.3},
    {"name": "unit_mismatch", "predicate": {"type": "unit_mismatch"}, "weight": -0.3},
    {"name": "repetition_loop", "predicate": {"type": "repetition"}, "weight": -0.3},
    {"name": "copied_from_question", "predicate": {"type": "copied_from_question"}, "weight": -0.3},
    {"name": "overlong_reasoning", "predicate": {"type": "overlong_reasoning"}, "weight": -0.2},
    {"name": "repeated_mistake", "predicate": {"type": "repeated_mistake"}, "weight": -0.3},
]  # fmt: skip


# ------------------------------------------------------------------ terms and the controller


class DiscoveredTerm:
    """A spec as a reward component: 1.0 where its predicate fires, else 0.0.

    The penalty comes from the (negative) fusion weight the controller writes into the
    knobs. Needs the same columns as :func:`records_from_columns`.
    """

    def __init__(self, spec: TermSpec, memory: EpisodicMemory | None = None) -> None:
        self.spec = spec
        self.name = f"discovered_{spec.name}"
        self.weight = spec.weight
        self.memory = memory

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Scores:
        step = int(columns.get("step", 1 << 62))  # without a step, all memory is "before"
        records = records_from_columns(completions, columns, step, self.memory)
        return [1.0 if evaluate_predicate(self.spec.predicate, r) else 0.0 for r in records]


class RewardDiscovery:
    """Failure miner + controller that switches discovered reward terms on and off.

    Trainer contract, once per step: ``apply(knobs)`` before scoring (writes active terms'
    weights, removes retired ones), score with ``active_components()`` as extra reward
    components, then ``observe_rollouts(records_from_columns(...))`` after scoring, then
    ``observe(step, metrics)`` which returns the events queued by ``observe_rollouts``.
    """

    name = "discovery"
    writes: ClassVar[dict[str, str]] = {"reward_weights": "adds"}

    def __init__(
        self,
        library: Sequence[Mapping[str, Any]] | None = None,
        *,
        window: int = 256,
        min_records: int = 32,
        on_threshold: float = 0.2,
        off_threshold: float = 0.05,
        patience: int = 3,
        max_active: int = 4,
        cluster: bool = True,
        cluster_weight: float = -0.2,
        max_clusters: int = 8,
        examples: int = 3,
        memory: EpisodicMemory | None = None,
    ) -> None:
        if not 0 <= off_threshold <= on_threshold <= 1:
            raise ValueError("need 0 <= off_threshold <= on_threshold <= 1")
        if patience < 1 or window < 1 or min_records < 1 or max_active < 0:
            raise ValueError("window, min_records and patience must be >= 1, max_active >= 0")
        specs = [validate_spec(dict(s)) for s in (DEFAULT_LIBRARY if library is None else library)]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"library repeats a term name: {names}")
        validate_spec(
            {
                "name": "cluster",
                "predicate": {"type": "answer_not_numeric"},
                "weight": cluster_weight,
            }
        )
        self.library = {s.name: s for s in specs}
        self.clusters: dict[str, TermSpec] = {}
        self.min_records, self.patience, self.max_active = min_records, patience, max_active
        self.on_threshold, self.off_threshold = on_threshold, off_threshold
        self.cluster, self.cluster_weight, self.max_clusters = cluster, cluster_weight, max_clusters
        self.examples = examples
        self.memory = memory
        self.streaks: dict[str, int] = {}
        self.active: list[str] = []  # spec names, in switch-on order
        self.retired: list[str] = []  # terms to remove from the knobs at the next apply
        self.frequencies: dict[str, float] = {}
        self._queue: list[Event] = []
        self._terms: dict[str, DiscoveredTerm] = {}
        # The window holds (sequence number, record). Each predicate is evaluated once per
        # record, when it enters: _fired[name] is the set of window entries it fired on.
        self.window: deque[tuple[int, RolloutRecord]] = deque(maxlen=window)
        self._seq = 0
        self._fired: dict[str, set[int]] = {name: set() for name in self.library}
        self._buckets: dict[int, tuple[int, ...]] = {}  # wrong records' feature buckets

    # -------------------------------------------------------------- mining

    def _spec(self, name: str) -> TermSpec:
        return self.library.get(name) or self.clusters[name]

    def _add(self, record: RolloutRecord) -> None:
        if len(self.window) == self.window.maxlen:
            old, _ = self.window[0]
            for seqs in self._fired.values():
                seqs.discard(old)
            self._buckets.pop(old, None)
        seq, self._seq = self._seq, self._seq + 1
        self.window.append((seq, record))
        for name, seqs in self._fired.items():
            if evaluate_predicate(self._spec(name).predicate, record):
                seqs.add(seq)
        if not record.correct:
            self._buckets[seq] = _bucket(record_features(record))

    def _track(self, name: str) -> None:
        """Start measuring a new spec over the records already in the window."""
        pred = self._spec(name).predicate
        self._fired[name] = {s for s, r in self.window if evaluate_predicate(pred, r)}

    def observe_rollouts(self, records: Sequence[RolloutRecord]) -> None:
        """Add a batch of records to the window and decide; events wait for :meth:`observe`."""
        for record in records:
            self._add(record)
        if len(self.window) < self.min_records:
            return
        step = max((r.step for r in records), default=0)
        if self.cluster:
            self._find_clusters(step)
        n = len(self.window)
        self.frequencies = {name: len(seqs) / n for name, seqs in self._fired.items()}
        for name in sorted(self._fired, key=lambda k: (-self.frequencies[k], k)):
            self._decide(step, name, n)
        for name in [c for c in self.clusters if c not in self.active]:
            if self.frequencies[name] < self.off_threshold:  # a candidate that faded: forget it
                del self.clusters[name], self._fired[name], self.frequencies[name]
                self.streaks.pop(name, None)

    def _evidence(self, name: str, n: int) -> dict[str, Any]:
        seqs = self._fired[name]
        return {
            "term": f"discovered_{name}",
            "spec": self._spec(name).to_dict(),
            "frequency": len(seqs) / n,
            "window": n,
            "examples": [r.id for s, r in self.window if s in seqs][: self.examples],
            "on_threshold": self.on_threshold,
            "off_threshold": self.off_threshold,
        }

    def _decide(self, step: int, name: str, n: int) -> None:
        freq = self.frequencies[name]
        if name in self.active:
            if freq < self.off_threshold:
                self.active.remove(name)
                self.retired.append(name)
                self.streaks[name] = 0
                self._queue.append(
                    Event(
                        "reward_retired",
                        f"retired discovered_{name}: frequency {freq:.2f} < {self.off_threshold}",
                        {"step": step, **self._evidence(name, n)},
                    )
                )
            return
        self.streaks[name] = self.streaks.get(name, 0) + 1 if freq >= self.on_threshold else 0
        if self.streaks[name] >= self.patience and len(self.active) < self.max_active:
            self.active.append(name)
            if name in self.retired:
                self.retired.remove(name)
            self._queue.append(
                Event(
                    "reward_discovered",
                    f"switched on discovered_{name}: frequency {freq:.2f} >= {self.on_threshold} "
                    f"for {self.streaks[name]} observations",
                    {"step": step, "streak": self.streaks[name], **self._evidence(name, n)},
                )
            )

    def _find_clusters(self, step: int) -> None:
        """Bucket wrong answers no named pattern explains; frequent buckets become candidates."""
        explained = set().union(*(self._fired[name] for name in self.library))
        buckets: dict[tuple[int, ...], int] = {}
        for seq, key in self._buckets.items():
            if seq not in explained:
                buckets[key] = buckets.get(key, 0) + 1
        n = len(self.window)
        for key, count in sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0])):
            name = "cluster_" + "_".join(
                f"{f[0]}{j}" for f, j in zip(FEATURE_BINS, key, strict=True)
            )
            if count / n < self.on_threshold or name in self.clusters:
                continue
            if len(self.clusters) >= self.max_clusters:
                break
            bounds = {
                f: [edges[j], edges[j + 1]]
                for (f, edges), j in zip(FEATURE_BINS.items(), key, strict=True)
            }
            self.clusters[name] = validate_spec(
                {
                    "name": name,
                    "predicate": {"type": "feature_box", "bounds": bounds},
                    "weight": self.cluster_weight,
                    "description": "wrong answers in one feature bucket, no named pattern",
                }
            )
            self._track(name)
            self._queue.append(
                Event(
                    "reward_candidate",
                    f"new failure cluster {name}: {count}/{n} unexplained wrong answers",
                    {"step": step, "bucket_share": count / n, **self._evidence(name, n)},
                )
            )

    # -------------------------------------------------------------- controller seam

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]:
        """The events decided by ``observe_rollouts`` since the last call."""
        events, self._queue = self._queue, []
        return events

    def apply(self, knobs: Knobs) -> None:
        """Active terms' weights into the knobs; retired terms' weights removed."""
        for name in self.retired:
            knobs.reward_weights.pop(f"discovered_{name}", None)
        self.retired = []
        for name in self.active:
            knobs.reward_weights[f"discovered_{name}"] = self._spec(name).weight

    def active_components(self) -> list[DiscoveredTerm]:
        """The active terms as reward components (stable objects, in switch-on order)."""
        out = []
        for name in self.active:
            spec = self._spec(name)
            term = self._terms.get(name)
            if term is None or term.spec != spec:
                term = self._terms[name] = DiscoveredTerm(spec, self.memory)
            out.append(term)
        return out

    def metrics(self) -> dict[str, float]:
        """``discovery/<pattern>/frequency`` per pattern and ``discovery/active`` (count)."""
        out = {f"discovery/{k}/frequency": v for k, v in self.frequencies.items()}
        out["discovery/active"] = float(len(self.active))
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: window, streaks, active and retired terms, cluster specs, queued events."""
        return {
            "window": [r.to_dict() for _, r in self.window],
            "streaks": dict(self.streaks),
            "active": list(self.active),
            "retired": list(self.retired),
            "clusters": [s.to_dict() for s in self.clusters.values()],
            "frequencies": dict(self.frequencies),
            "queue": [
                {"kind": e.kind, "message": e.message, "evidence": e.evidence} for e in self._queue
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (cluster specs are validated again, the
        predicates re-evaluated on the window)."""
        self.clusters = {s.name: s for s in (validate_spec(d) for d in state["clusters"])}
        unknown = [n for n in state["active"] if n not in self.library and n not in self.clusters]
        if unknown:
            raise ValueError(f"discovery state names terms not in the library: {unknown}")
        self.window.clear()
        self._buckets = {}
        self._fired = {name: set() for name in [*self.library, *self.clusters]}
        for d in state["window"]:
            self._add(RolloutRecord.from_dict(d))
        self.streaks = {k: int(v) for k, v in state["streaks"].items()}
        self.active = list(state["active"])
        self.retired = list(state["retired"])
        self.frequencies = dict(state["frequencies"])
        self._queue = [Event(e["kind"], e["message"], e["evidence"]) for e in state["queue"]]
        self._terms = {}
