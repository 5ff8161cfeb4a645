"""Cross-process helpers: every process of a run must take the same decisions.

The trainer's controllers and reward learners (fusion statistics, allocator, discovery,
verifier, episodic memory) read what every process saw, not one process's share; these
helpers gather and reduce it. With one process each is the identity, at no cost.
"""

from __future__ import annotations

import math
from typing import Any

import torch


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
