"""The end-of-run summary: rewards over the first and last steps, held-out before/after, phases.

Read from the run folder alone (metrics.jsonl, events.jsonl, eval_before.json), so a summary
can be rebuilt for any run, finished or stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deepsynapse.telemetry.run_logger import read_jsonl


def run_summary(run_dir: Path, steps: int, after: dict[str, Any] | None) -> dict[str, Any]:
    """Each reward's mean over the first and last steps, and held-out before/after."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/fused/mean" in r]
    k = max(1, min(5, len(rows) // 2)) if rows else 0
    keys = sorted(
        {
            key
            for r in rows
            for key in r
            if key.endswith("/mean") and key.startswith(("rewards/", "reward/"))
        }
        | {"accuracy/train", "format/valid_rate"}
    )
    first = {key: _mean([r.get(key) for r in rows[:k]]) for key in keys}
    last = {key: _mean([r.get(key) for r in rows[-k:]]) for key in keys}
    before_path = run_dir / "eval_before.json"
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    return {
        "run_dir": str(run_dir),
        "steps": steps,
        "window": k,
        "first_steps": first,
        "last_steps": last,
        "eval_before": _headline(before),
        "eval_after": _headline(after),
        "mean_step_seconds": _mean([r.get("timing/step") for r in rows]),
        "phases": phases_passed(run_dir),
    }


def phases_passed(run_dir: Path) -> list[dict[str, Any]]:
    """Curriculum phases in the order they ran, with the step each began and why."""
    events = read_jsonl(run_dir / "events.jsonl")
    changes = [e for e in events if e.get("kind") == "phase_transition"]
    if not changes:
        return []
    first = changes[0]["evidence"]
    out = [{"phase": first.get("from"), "from_step": 1, "why": "start"}]
    for e in changes:
        ev = e["evidence"]
        # events carry the 0-based index of the step that decided; metrics count from 1
        out.append({"phase": ev.get("to"), "from_step": e["step"] + 2, "why": ev.get("reason")})
    return out


def _headline(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """An evaluation result without its per-item records."""
    if result is None:
        return None
    return {
        k: result[k] for k in ("n", "accuracy", "format_validity", "mean_length", "truncation_rate")
    }


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None
