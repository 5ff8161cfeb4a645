"""Data curriculum: sample difficulty buckets by UCB on mean absolute advantage (DUMP).

Problems fall into buckets by ``Problem.difficulty`` (synthetic: the number of arithmetic
steps; GSM8K: the number of solution steps). The mean absolute advantage of a bucket's recent
groups measures how much the policy can still learn from it (DUMP, Wang et al. 2025: a
bucket whose groups all score alike gives zero advantage, hence no gradient; the trainer
counts a group dynamic sampling drops, its correctness uniform, as zero too, since the update
never sees it: ``rl.collect.observe_data_curriculum``). Each bucket
gets the UCB score ``mean|A|_b + c * sqrt(ln(total) / n_b)`` over the groups observed
(``n_b`` per bucket, ``total`` overall); a bucket never observed is explored first (one slot
each), the other slots are drawn from ``softmax(score / tau)``.

Within a bucket, problems come in a seeded permutation per pass (no repeats within a pass).
A problem whose G samples were all solved or all failed is *rested*: not sampled for the next
``rest_steps`` steps (it carries no signal now). Only buckets inside ``knobs.difficulty`` (set
by the phase curriculum) are sampled; when none is, the nearest ones are, and an event says so.

Determinism: ``sample(step, n, rng_seed)`` depends only on its arguments and the state, and
the state changes only through ``sample`` and ``observe_groups``. Under DDP every rank calls
``sample`` with the same arguments and takes its share of the list, and every rank calls
``observe_groups`` with the groups of *all* ranks (gathered), so the state stays identical.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deepsynapse.control.knobs import Event, Knobs
from deepsynapse.data.problems import Problem

__all__ = ["DataCurriculum", "DataCurriculumConfig"]


@dataclass(frozen=True)
class DataCurriculumConfig:
    enabled: bool = field(
        default=False, metadata={"help": "sample difficulty buckets by UCB on mean |advantage|"}
    )
    exploration: float = field(default=1.0, metadata={"help": "UCB exploration coefficient c"})
    temperature: float = field(
        default=0.1, metadata={"help": "softmax temperature over the buckets' UCB scores"}
    )
    window: int = field(
        default=64, metadata={"help": "recent groups per bucket in its mean |advantage|"}
    )
    rest_steps: int = field(
        default=10, metadata={"help": "steps a problem rests after all-solved or all-failed"}
    )
    max_bucket: int = field(
        default=0, metadata={"help": "difficulties above this share one bucket (0 = no cap)"}
    )

    def __post_init__(self) -> None:
        if not self.exploration >= 0:
            raise ValueError(f"data_curriculum.exploration: got {self.exploration}, expected >= 0")
        if not self.temperature > 0:
            raise ValueError(f"data_curriculum.temperature: got {self.temperature}, expected > 0")
        if self.window < 1:
            raise ValueError(f"data_curriculum.window: got {self.window}, expected >= 1")
        for key in ("rest_steps", "max_bucket"):
            if getattr(self, key) < 0:
                raise ValueError(f"data_curriculum.{key}: got {getattr(self, key)}, expected >= 0")


class DataCurriculum:
    """UCB over difficulty buckets, seeded passes within a bucket, resting of solved problems."""

    name = "data_curriculum"
    writes: ClassVar[dict[str, str]] = {}  # reads knobs.difficulty, samples problems

    def __init__(self, problems: Sequence[Problem], config: DataCurriculumConfig, *, seed: int = 0):
        if not problems:
            raise ValueError("data_curriculum: no problems to sample from")
        self.cfg = config
        self.seed = seed
        self.problems = list(problems)
        self.index_of: dict[str, int] = {}
        for i, p in enumerate(self.problems):
            if p.id in self.index_of:
                raise ValueError(f"data_curriculum: duplicate problem id {p.id!r}")
            self.index_of[p.id] = i
        self.bucket_of = [self._bucket(p.difficulty) for p in self.problems]
        self.buckets: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            self.buckets.setdefault(b, []).append(i)
        self.buckets = dict(sorted(self.buckets.items()))
        self.cursor = {b: 0 for b in self.buckets}
        self.counts = {b: 0 for b in self.buckets}
        self.recent: dict[int, list[float]] = {b: [] for b in self.buckets}
        self.total = 0
        self.rested: dict[str, int] = {}  # problem id -> first step it may be sampled again
        self.difficulty: tuple[int, int] | None = None
        self.last_step = 0
        self.last_probs: dict[int, float] = {}
        self.focus: int | None = None
        self.fallback: list[int] | None = None  # the range last reported as empty
        self.pending: list[Event] = []
        self._perm_cache: dict[tuple[int, int], list[int]] = {}

    def _bucket(self, difficulty: int) -> int:
        cap = self.cfg.max_bucket
        return min(difficulty, cap) if cap else difficulty

    # ------------------------------------------------------------ scores

    def scores(self) -> dict[int, float]:
        """UCB score of every bucket (``inf`` when never observed)."""
        out = {}
        log_total = math.log(max(self.total, 1))
        for b in self.buckets:
            n = self.counts[b]
            if n == 0:
                out[b] = math.inf
                continue
            recent = self.recent[b]
            mean_abs = sum(recent) / len(recent) if recent else 0.0
            out[b] = mean_abs + self.cfg.exploration * math.sqrt(log_total / n)
        return out

    def probabilities(self, buckets: Sequence[int]) -> dict[int, float]:
        """Softmax of the UCB scores over the observed ``buckets`` (uniform if none is)."""
        scores = self.scores()
        seen = [b for b in buckets if math.isfinite(scores[b])]
        if not seen:
            return {b: 1.0 / len(buckets) for b in buckets} if buckets else {}
        top = max(scores[b] for b in seen)
        weights = {b: math.exp((scores[b] - top) / self.cfg.temperature) for b in seen}
        total = sum(weights.values())
        return {b: w / total for b, w in weights.items()}

    # ------------------------------------------------------------ sampling

    def _in_range(self) -> list[int]:
        if self.difficulty is None:
            self.fallback = None
            return list(self.buckets)
        lo, hi = self.difficulty
        inside = [b for b in self.buckets if lo <= b <= hi]
        if inside:
            self.fallback = None
            return inside

        def distance(b: int) -> int:
            return lo - b if b < lo else b - hi

        nearest = min(distance(b) for b in self.buckets)
        chosen = [b for b in self.buckets if distance(b) == nearest]
        if self.fallback == [lo, hi]:
            return chosen
        self.fallback = [lo, hi]
        self.pending.append(
            Event(
                "difficulty_fallback",
                f"no problems with difficulty in [{lo}, {hi}]; sampling buckets {chosen}",
                {"range": [lo, hi], "buckets": chosen, "available": list(self.buckets)},
            )
        )
        return chosen

    def _permutation(self, bucket: int, epoch: int) -> list[int]:
        key = (bucket, epoch)
        if key not in self._perm_cache:
            order = list(range(len(self.buckets[bucket])))
            random.Random(self.seed * 1_000_003 + bucket * 10_007 + epoch).shuffle(order)
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            self._perm_cache[key] = order
        return self._perm_cache[key]

    def is_rested(self, problem_id: str, step: int) -> bool:
        return self.rested.get(problem_id, -1) > step

    def _next(self, bucket: int, step: int, taken: set[int], ignore_rest: bool) -> int | None:
        """Next problem of ``bucket`` in its seeded pass that is not taken (nor rested)."""
        ids = self.buckets[bucket]
        for _ in range(2 * len(ids)):  # the rest of this pass and a whole next one: every id
            epoch, pos = divmod(self.cursor[bucket], len(ids))
            self.cursor[bucket] += 1
            idx = ids[self._permutation(bucket, epoch)[pos]]
            if idx in taken or (not ignore_rest and self.is_rested(self.problems[idx].id, step)):
                continue
            return idx
        return None

    def sample(self, step: int, n: int, rng_seed: int) -> list[Problem]:
        """``n`` problems for ``step``; the same (step, n, rng_seed, state) gives the same list."""
        rng = random.Random(rng_seed * 1_000_003 + step)
        self.last_step = step
        buckets = self._in_range()
        probs = self.probabilities(buckets)
        self.last_probs = dict(probs)
        order = [b for b in buckets if self.counts[b] == 0]  # unexplored: one slot each
        taken: set[int] = set()
        chosen: list[int] = []
        live = dict(probs)
        for ignore_rest in (False, True):  # rest is waived only when nothing else is left
            while len(chosen) < n:
                if order:
                    bucket = order.pop(0)
                elif live:
                    bucket = _draw(live, rng)
                else:
                    break
                idx = self._next(bucket, step, taken, ignore_rest)
                if idx is None:
                    live.pop(bucket, None)
                    continue
                taken.add(idx)
                chosen.append(idx)
            if len(chosen) == n:
                break
            live = {b: 1.0 for b in buckets}
        while len(chosen) < n:  # fewer problems in range than asked: repeat some
            chosen.append(chosen[len(chosen) % max(len(taken), 1)])
        return [self.problems[i] for i in chosen]

    # ------------------------------------------------------------ feedback

    def observe_groups(
        self,
        problem_ids: Sequence[str],
        mean_abs_advantages: Sequence[float],
        solve_rates: Sequence[float],
    ) -> None:
        """One entry per group of the last sampled step (all ranks' groups under DDP)."""
        step = self.last_step
        solved, failed = [], []
        for pid, adv, rate in zip(problem_ids, mean_abs_advantages, solve_rates, strict=True):
            if pid not in self.index_of:
                raise ValueError(f"data_curriculum: unknown problem id {pid!r}")
            b = self.bucket_of[self.index_of[pid]]
            self.counts[b] += 1
            self.total += 1
            recent = self.recent[b]
            recent.append(float(adv))
            del recent[: max(0, len(recent) - self.cfg.window)]
            if self.cfg.rest_steps and (rate >= 1.0 - 1e-9 or rate <= 1e-9):
                self.rested[pid] = step + self.cfg.rest_steps + 1
                (solved if rate > 0.5 else failed).append(pid)
        if solved or failed:
            self.pending.append(
                Event(
                    "problems_rested",
                    f"{len(solved)} all-solved and {len(failed)} all-failed problems rest "
                    f"until step {step + self.cfg.rest_steps + 1}",
                    {
                        "all_solved": solved[:20],
                        "all_failed": failed[:20],
                        "count": len(solved) + len(failed),
                        "until_step": step + self.cfg.rest_steps + 1,
                    },
                )
            )

    # ------------------------------------------------------------ controller seam

    def apply(self, knobs: Knobs) -> None:
        d = knobs.difficulty
        self.difficulty = None if d is None else (int(d[0]), int(d[1]))

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]:
        events, self.pending = self.pending, []
        self.rested = {k: v for k, v in self.rested.items() if v > step + 1}
        if self.last_probs:
            focus = max(self.last_probs, key=lambda b: (self.last_probs[b], -b))
            if focus != self.focus:
                scores = self.scores()
                events.append(
                    Event(
                        "data_focus",
                        f"difficulty bucket {focus} now most sampled "
                        f"(p={self.last_probs[focus]:.2f})",
                        {
                            "old": self.focus,
                            "new": focus,
                            "probabilities": {str(b): p for b, p in self.last_probs.items()},
                            "scores": {
                                str(b): (s if math.isfinite(s) else None) for b, s in scores.items()
                            },
                            "counts": {str(b): c for b, c in self.counts.items()},
                        },
                    )
                )
                self.focus = focus
        return events

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"data/rested": float(len(self.rested))}
        for b, p in self.last_probs.items():
            out[f"data/bucket_{b}/p"] = p
        for b, recent in self.recent.items():
            if recent:
                out[f"data/bucket_{b}/mean_abs_adv"] = sum(recent) / len(recent)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "buckets": {str(b): len(ids) for b, ids in self.buckets.items()},
            "cursor": {str(b): c for b, c in self.cursor.items()},
            "counts": {str(b): c for b, c in self.counts.items()},
            "recent": {str(b): list(r) for b, r in self.recent.items()},
            "total": self.total,
            "rested": dict(self.rested),
            "difficulty": None if self.difficulty is None else list(self.difficulty),
            "last_step": self.last_step,
            "last_probs": {str(b): p for b, p in self.last_probs.items()},
            "focus": self.focus,
            "fallback": self.fallback,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes = {str(b): len(ids) for b, ids in self.buckets.items()}
        if state["buckets"] != sizes:
            raise ValueError(
                f"data_curriculum state was made for buckets {state['buckets']}, "
                f"these problems give {sizes}"
            )
        self.cursor = {int(b): int(c) for b, c in state["cursor"].items()}
        self.counts = {int(b): int(c) for b, c in state["counts"].items()}
        self.recent = {int(b): [float(x) for x in r] for b, r in state["recent"].items()}
        self.total = int(state["total"])
        self.rested = {str(k): int(v) for k, v in state["rested"].items()}
        d = state["difficulty"]
        self.difficulty = None if d is None else (int(d[0]), int(d[1]))
        self.last_step = int(state["last_step"])
        self.last_probs = {int(b): float(p) for b, p in state["last_probs"].items()}
        self.focus = None if state["focus"] is None else int(state["focus"])
        self.fallback = None if state["fallback"] is None else [int(x) for x in state["fallback"]]
        self.pending = []


def _draw(probs: dict[int, float], rng: random.Random) -> int:
    """One key of ``probs`` drawn with its (unnormalised) weight."""
    total = sum(probs.values())
    x = rng.random() * total
    for key, weight in probs.items():
        x -= weight
        if x < 0:
            return key
    return next(reversed(probs))
