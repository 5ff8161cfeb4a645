"""Cross-process helpers: every process of a run must take the same decisions.

The trainer's controllers and reward learners (fusion statistics, allocator, discovery,
verifier, episodic memory) read what every process saw, not one process's share; these
helpers gather and reduce it. With one process each is the identity, at no cost.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from deepsynapse.models.loading import DtypeChoice


def gather_all(accelerator, rows: list[Any]) -> list[Any]:
    """All processes' ``rows`` in rank order (this process's own with one process)."""
    if accelerator.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return gather_object(rows)


def gather_rows(accelerator, rows: list[Any]) -> tuple[list[Any], slice]:
    """All processes' ``rows`` in rank order, and the slice that holds this process's own."""
    if accelerator.num_processes == 1:
        return rows, slice(0, len(rows))
    from accelerate.utils import gather_object

    sizes = gather_object([len(rows)])
    start = sum(sizes[: accelerator.process_index])
    return gather_object(list(rows)), slice(start, start + len(rows))


def mean_metrics(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """The NaN-safe mean of each metric over processes, with the same keys everywhere."""
    if accelerator.num_processes == 1:
        return metrics
    from accelerate.utils import gather_object

    per_rank = gather_object([metrics])
    out = {}
    for key in sorted({k for m in per_rank for k in m}):
        values = [float(m[key]) for m in per_rank if key in m and math.isfinite(float(m[key]))]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def mean_scalar(accelerator, value: float) -> float:
    """The NaN-safe mean of a per-process scalar (NaN only if every process has NaN)."""
    if accelerator.num_processes == 1:
        return value
    finite = math.isfinite(value)
    t = torch.tensor([value if finite else 0.0, float(finite)], device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def reduce_scalar(accelerator, value: float, op: str = "sum") -> float:
    """``value`` reduced over processes (``sum``, ``max`` or ``min``) on the run's device."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], device=accelerator.device)
    if op == "min":
        return -float(accelerator.reduce(-t, reduction="max")[0])
    return float(accelerator.reduce(t, reduction=op)[0])


def fuse_over_ranks(
    accelerator,
    engine,
    scores: dict[str, list[float | None]],
    correct: list[float],
    failures: list[Any],
    texts: list[str],
    columns: dict[str, Any],
    knobs,
    num_generations: int,
    step: int,
    kl: list[float] | None,
) -> Any:
    """The reward ``engine`` fuses every process's completions together; this process keeps
    its own rows of the result.

    Fusion statistics, the allocator, discovery, the verifier and the episodic memory
    then learn from the same data on every process, so they stay identical.
    """
    g = num_generations
    if accelerator.num_processes == 1:
        return engine.fuse(scores, correct, failures, texts, columns, knobs, g, step, kl=kl)
    names = list(scores)
    per_row = [k for k, v in columns.items() if isinstance(v, list) and len(v) == len(texts)]
    local = [
        (
            [scores[k][i] for k in names],
            correct[i],
            texts[i],
            None if kl is None else kl[i],
            {k: columns[k][i] for k in per_row},
        )
        for i in range(len(texts))
    ]
    rows, mine = gather_rows(accelerator, local)
    every = dict(columns)
    every.update({k: [r[4][k] for r in rows] for k in per_row})
    scored = engine.fuse(
        {k: [r[0][j] for r in rows] for j, k in enumerate(names)},
        [r[1] for r in rows],
        failures,
        [r[2] for r in rows],
        every,
        knobs,
        g,
        step,
        kl=None if kl is None else [r[3] for r in rows],
    )
    scored.scores = {k: v[mine] for k, v in scored.scores.items()}
    scored.calibrated = {k: v[mine] for k, v in scored.calibrated.items()}
    scored.correct, scored.reward = scored.correct[mine], scored.reward[mine]
    return scored


def agree_on_dtype(accelerator, choice: DtypeChoice) -> DtypeChoice:
    """One dtype on every process: ``auto`` measures bf16's speed per process, and two
    processes whose measurements fall either side of fp32's would train apart. The first
    process's choice is taken by all."""
    if accelerator.num_processes == 1:
        return choice
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([choice], from_process=0)[0]
