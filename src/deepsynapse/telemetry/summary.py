"""The end-of-run summary: rewards over the first and last steps, held-out before/after, phases.

Read from the run folder alone (metrics.jsonl, events.jsonl, eval_before.json,
eval_after_sft.json), so a summary can be rebuilt for any run, finished or stopped.

Held-out results are compared *paired*, on the same problems: the whole run (before ->
after), and split into what the SFT warm-up gave (before -> after warm-up) and what GRPO gave
(after warm-up -> after), each strict (format-valid and right) and lenient (the right number),
with a 95% interval on the change and the exact McNemar p-value (``eval.stats``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deepsynapse.eval.stats import paired_comparison, wilson_interval
from deepsynapse.telemetry.run_logger import read_jsonl

GAINS = (  # (name, from, to): the paired comparisons a summary reports
    ("run", "before", "after"),
    ("warmup", "before", "after_sft"),
    ("grpo", "after_sft", "after"),
)


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
    evals = {tag: _read_eval(run_dir, tag) for tag in ("before", "after_sft")}
    evals["after"] = after
    before = evals["before"]
    return {
        "run_dir": str(run_dir),
        "steps": steps,
        "window": k,
        "first_steps": first,
        "last_steps": last,
        "eval_before": _headline(before),
        "eval_after_sft": _headline(evals["after_sft"]),
        "eval_after": _headline(after),
        "gains": held_out_gains(evals),
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


def held_out_gains(evals: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Paired changes between the evaluations a run has (see ``GAINS``), strict and lenient.

    A pair is left out when either side is missing or they scored different problems (an
    evaluation from an older run folder): a paired claim needs the same problems.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, a, b in GAINS:
        ra, rb = (evals.get(a) or {}).get("records"), (evals.get(b) or {}).get("records")
        if not ra or not rb:
            continue
        try:
            out[name] = {
                "from": a,
                "to": b,
                "strict": paired_comparison(ra, rb, "correct"),
                "lenient": paired_comparison(ra, rb, "lenient_correct"),
            }
        except ValueError:
            continue
    return out


def _read_eval(run_dir: Path, tag: str) -> dict[str, Any] | None:
    path = run_dir / f"eval_{tag}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _headline(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """An evaluation result without its per-item records, with the accuracy's 95% interval."""
    if result is None:
        return None
    keys = ("n", "accuracy", "lenient_accuracy", "format_validity", "mean_length")
    out = {k: result.get(k) for k in (*keys, "truncation_rate")}
    if result.get("n"):
        n = int(result["n"])
        out["accuracy_ci"] = list(wilson_interval(round(result["accuracy"] * n), n))
    return out


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None
