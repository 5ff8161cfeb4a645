"""Two evaluation results side by side (base vs trained): every shared metric and its delta.

A headline accuracy can hide churn: a model that fixes ten problems and breaks nine moved
by one. So the table is followed by per-item flips, matched by problem id: ``fixed``
(wrong in A, right in B) and ``broken`` (right in A, wrong in B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deepsynapse.eval.stats import format_interval, paired_comparison

__all__ = ["compare_results", "compare_rows", "flips", "main_compare"]

# Shown first, in this order; any other numeric metric follows alphabetically.
_ORDER = (
    "n",
    "accuracy",
    "format_validity",
    "mean_length",
    "truncation_rate",
    "sample_accuracy",
    "pass_at_k",
    "confidence_rate",
    "mean_confidence",
    "ece",
    "brier",
    "distractor_items",
    "distractor_correct_rate",
    "distractor_wrong_share",
)
_SKIP = {"records", "seconds", "samples_per_item"}


def _flatten(result: dict[str, Any]) -> dict[str, float]:
    """Numeric metrics, with one level of nested dicts as ``key/sub`` (e.g. per-skill)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in _SKIP:
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{key}/{sub}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[key] = float(value)
    return out


def compare_rows(
    a: dict[str, Any], b: dict[str, Any]
) -> list[tuple[str, float | None, float | None]]:
    """``(metric, value in a, value in b)`` for every metric either result has."""
    fa, fb = _flatten(a), _flatten(b)
    keys = [k for k in _ORDER if k in fa or k in fb]
    keys += sorted((set(fa) | set(fb)) - set(keys))
    return [(k, fa.get(k), fb.get(k)) for k in keys]


def flips(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-item changes between two results, over the problem ids they share."""
    ra = {r["id"]: bool(r.get("correct")) for r in a.get("records") or [] if "id" in r}
    rb = {r["id"]: bool(r.get("correct")) for r in b.get("records") or [] if "id" in r}
    common = [i for i in ra if i in rb]
    fixed = [i for i in common if not ra[i] and rb[i]]
    broken = [i for i in common if ra[i] and not rb[i]]
    return {"common": len(common), "fixed": len(fixed), "broken": len(broken),
            "fixed_ids": fixed, "broken_ids": broken}  # fmt: skip


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    if key in ("n", "distractor_items") or key.endswith("/n"):
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"


def compare_results(
    a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("base", "trained")
) -> str:
    """A plain-text table: metric, a, b, delta (b - a); then the per-item flips."""
    rows = compare_rows(a, b)
    width = max([len("metric"), *(len(k) for k, _, _ in rows)])
    w = max(10, *(len(n) for n in names))
    lines = [f"{'metric':{width}s} {names[0]:>{w}s} {names[1]:>{w}s} {'delta':>10s}"]
    for key, va, vb in rows:
        delta = "" if va is None or vb is None else f"{vb - va:+.3f}"
        lines.append(f"{key:{width}s} {_fmt(va, key):>{w}s} {_fmt(vb, key):>{w}s} {delta:>10s}")
    ma, mb = a.get("mode"), b.get("mode")
    if ma and mb and ma != mb:
        lines.append(f"note: modes differ ({names[0]}: {ma}, {names[1]}: {mb})")
    f = flips(a, b)
    if f["common"]:
        lines.append(
            f"per item ({f['common']} shared): fixed {f['fixed']} (wrong -> right), "
            f"broken {f['broken']} (right -> wrong)"
        )
        lines += paired_lines(a, b)
    else:
        lines.append("per item: no shared problem ids (results without records?)")
    return "\n".join(lines)


def paired_lines(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The change in accuracy with its paired 95% interval, strict and lenient, when both
    results scored exactly the same problems (else a line saying why there is none)."""
    ra, rb = a.get("records") or [], b.get("records") or []
    lines = []
    for key, label in (("correct", "strict"), ("lenient_correct", "lenient")):
        if not all(key in r for r in [*ra, *rb]):
            continue
        try:
            c = paired_comparison(ra, rb, key)
        except ValueError:
            return ["paired interval: the two results scored different problems"]
        lines.append(
            f"paired change ({label}): {format_interval(c['delta'], c['delta_ci'])}, "
            f"McNemar p={c['p_value']:.2g}"
        )
    return lines


def main_compare(path_a: str | Path, path_b: str | Path) -> int:
    """``deepsynapse compare A.json B.json``: print the table; exit code 0."""
    a = json.loads(Path(path_a).read_text(encoding="utf-8"))
    b = json.loads(Path(path_b).read_text(encoding="utf-8"))
    print(compare_results(a, b, names=(Path(path_a).stem, Path(path_b).stem)))
    return 0
