"""The training report: one self-contained ``report.html`` with PNG plots, from a run folder.

It reads only the run's files, so it works during a run, after a crash, or on a copied
folder: ``metrics.jsonl``, ``events.jsonl``, ``samples.jsonl``, ``eval_before.json``,
``eval_after.json``, ``summary.json`` and ``config.yaml``, any of which may be missing.
Plots are drawn for whatever metrics exist: the known families get purpose-built panels
(reward components with curriculum phase bands, stacked reward weights, temperature and
KL coefficient, KL and entropy, accumulation, LoRA rank and scales, skill probes) and every
other metric prefix gets a panel of its own, so a new metric shows up without code here.

Images are embedded as base64 data URIs (the HTML opens anywhere, offline, as one file) and
also written to ``plots/``. Matplotlib is used through its object API with the Agg canvas:
no pyplot, no global backend switch, safe to call from inside a training process. Every
string that came from the run (completions, questions, event messages) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepsynapse.telemetry.run_logger import read_jsonl

__all__ = ["Plot", "load_series", "phase_segments", "write_report"]

Series = dict[str, tuple[list[float], list[float]]]  # metric -> (steps, values)
Phases = list[tuple[float, float, float]]  # (first step, last step, phase)

_FIGSIZE = (10.0, 3.4)
_DPI = 100
_MAX_LINES = 12  # series per panel; more are unreadable
_MAX_EVENTS = 400
_GRID = 9  # small panels per image of other metrics
_IGNORED = {"step", "time"}


@dataclass
class Plot:
    slug: str  # file name under plots/ (without .png)
    title: str
    caption: str
    png: bytes


# ------------------------------------------------------------------ data


def load_series(rows: Iterable[dict[str, Any]]) -> Series:
    """Every finite numeric metric as (steps, values), in step order."""
    out: Series = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in row.items():
            if key in _IGNORED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(float(step))
            ys.append(float(value))
    for xs, ys in out.values():
        if any(b < a for a, b in zip(xs, xs[1:], strict=False)):
            pairs = sorted(zip(xs, ys, strict=True))
            xs[:], ys[:] = [p[0] for p in pairs], [p[1] for p in pairs]
    return out


def phase_segments(series: Series, key: str = "curriculum/phase") -> Phases:
    """Runs of constant phase as ``(first_step, last_step, phase)``.

    >>> phase_segments({"curriculum/phase": ([1, 2, 3, 4], [0, 0, 1, 1])})
    [(1, 2, 0), (3, 4, 1)]
    """
    if key not in series:
        return []
    xs, ys = series[key]
    segments: Phases = []
    for x, y in zip(xs, ys, strict=True):
        if segments and segments[-1][2] == y:
            segments[-1] = (segments[-1][0], x, y)
        else:
            segments.append((x, x, y))
    return segments


def _load_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({exc.__class__.__name__}: {exc})")
        return None


# ------------------------------------------------------------------ drawing


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _phase_label(value: float) -> str:
    return f"phase {int(value)}" if float(value).is_integer() else f"phase {value:g}"


def _bands(ax, phases: Phases) -> None:
    """Shade each curriculum phase, so a change in a curve can be read against its phase."""
    if len(phases) < 2:
        return
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
    for i, (start, end, value) in enumerate(phases):
        ax.axvspan(start - 0.5, end + 0.5, color=colors[i % len(colors)], alpha=0.08, lw=0)
        ax.text(
            start - 0.5,
            1.0,
            f" {_phase_label(value)}",
            transform=ax.get_xaxis_transform(),
            va="top",
            ha="left",
            fontsize=8,
            color="#555555",
        )


def _lines(
    ax,
    series: Series,
    keys: list[str],
    *,
    label: Callable[[str], str] = lambda k: k,
    style: dict[str, dict[str, Any]] | None = None,
    drawstyle: str = "default",
) -> None:
    for key in keys[:_MAX_LINES]:
        xs, ys = series[key]
        kw = {"lw": 1.4, "drawstyle": drawstyle}
        if len(xs) < 30:
            kw["marker"] = "o"
            kw["ms"] = 3
        kw.update((style or {}).get(key, {}))
        ax.plot(xs, ys, label=label(key), **kw)


def _finish(fig, ax, title: str, ylabel: str = "", legend: bool = True, axes=()) -> bytes:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        handles, labels = [], []
        for a in (ax, *axes):
            h, lab = a.get_legend_handles_labels()
            handles += h
            labels += lab
        if handles:  # outside the axes, right of any twin axis and its labels
            fig.legend(handles, labels, fontsize=8, loc="outside right upper")
    return _png(fig)


def _twin(
    series: Series,
    phases: Phases,
    title: str,
    left: list[str],
    right: list[str],
    *,
    drawstyle: str = "default",
) -> bytes | None:
    """Two families with different scales on a left and a right axis."""
    left = [k for k in left if k in series]
    right = [k for k in right if k in series]
    if not left and not right:
        return None
    fig, ax = _figure()
    _bands(ax, phases)
    _lines(ax, series, left or right, drawstyle=drawstyle)
    if len(left or right) == 1:  # several series: the legend names them
        ax.set_ylabel((left or right)[0])
    axes = ()
    if left and right:
        ax2 = ax.twinx()
        ax2.set_prop_cycle(color=["#c44e52", "#8172b3", "#937860", "#da8bc3"])
        _lines(ax2, series, right, drawstyle=drawstyle, style={k: {"ls": "--"} for k in right})
        if len(right) == 1:
            ax2.set_ylabel(right[0])
        axes = (ax2,)
    return _finish(fig, ax, title, axes=axes)


def _family(series: Series, prefix: str, suffix: str = "") -> list[str]:
    """Keys ``prefix<name>suffix`` with a one-segment name, sorted."""
    out = []
    for key in series:
        if key.startswith(prefix) and key.endswith(suffix):
            middle = key[len(prefix) : len(key) - len(suffix)]
            if middle and "/" not in middle:
                out.append(key)
    return sorted(out)


def _plot_rewards(series: Series, phases: Phases, used: set[str]) -> list[Plot]:
    plots = []
    keys = _family(series, "rewards/", "/mean")
    fused = [k for k in ("reward/fused/mean",) if k in series]
    if keys or fused:
        fig, ax = _figure()
        _bands(ax, phases)
        for key in keys[:_MAX_LINES]:
            std = key[: -len("mean")] + "std"
            if std in series and series[std][0] == series[key][0]:
                xs, ys = series[key]
                sd = series[std][1]
                low = [y - s for y, s in zip(ys, sd, strict=True)]
                high = [y + s for y, s in zip(ys, sd, strict=True)]
                ax.fill_between(xs, low, high, alpha=0.08, lw=0)
                used.add(std)
        _lines(ax, series, keys, label=lambda k: k.split("/")[1])
        _lines(
            ax,
            series,
            fused,
            label=lambda k: "fused",
            style={k: {"color": "black", "lw": 2.2} for k in fused},
        )
        used.update(keys + fused)
        png = _finish(
            fig,
            ax,
            "Reward components (mean, band = +/- 1 std; shading = curriculum phase)",
            "reward",
        )
        plots.append(Plot("rewards", "Reward components", "Each component's mean reward per step; the black line is the fused reward the advantages were computed from.", png))  # fmt: skip
    calibrated = _family(series, "rewards/", "/calibrated_mean")
    if calibrated:
        fig, ax = _figure()
        _bands(ax, phases)
        _lines(ax, series, calibrated, label=lambda k: k.split("/")[1])
        used.update(calibrated)
        png = _finish(fig, ax, "Calibrated reward components (comparable scales)", "calibrated")
        plots.append(Plot("rewards_calibrated", "Calibrated reward components", "Each component after calibration, the scale on which the weights act.", png))  # fmt: skip
    return plots


def _plot_weights(series: Series, phases: Phases, used: set[str]) -> list[Plot]:
    keys = _family(series, "weights/")
    if not keys:
        return []
    steps = sorted({x for k in keys for x in series[k][0]})
    index = {x: i for i, x in enumerate(steps)}
    stacks = []
    for key in keys:
        col = [0.0] * len(steps)  # a component absent at a step carries no weight there
        for x, y in zip(*series[key], strict=True):
            col[index[x]] = y
        stacks.append(col)
    used.update(keys)
    fig, ax = _figure()
    _bands(ax, phases)
    names = [k.split("/", 1)[1] for k in keys]
    if all(v >= 0 for col in stacks for v in col):
        ax.stackplot(steps, stacks, labels=names, alpha=0.85)
        title = "Reward weight allocation (stacked)"
    else:
        for name, col in zip(names, stacks, strict=True):
            ax.plot(steps, col, label=name)
        title = "Reward weights (some negative: lines, not stacked)"
    png = _finish(fig, ax, title, "weight")
    return [Plot("weights", "Reward weight allocation", "The weight each reward component had at each step (from the allocator or the phase).", png)]  # fmt: skip


def _plot_probes(
    series: Series, phases: Phases, used: set[str], events: list[dict[str, Any]]
) -> list[Plot]:
    keys = _family(series, "probes/")
    if not keys:
        return []
    used.update(keys)
    fig, ax = _figure()
    _bands(ax, phases)
    style = {"probes/mean": {"color": "black", "lw": 2.2}}
    _lines(ax, series, keys, label=lambda k: k.split("/", 1)[1], style=style)
    for e in events:
        if e.get("kind") == "emergence" and isinstance(e.get("step"), (int, float)):
            ax.axvline(e["step"], color="#c44e52", ls=":", lw=1.2)
            skill = str((e.get("evidence") or {}).get("skill", ""))
            ax.text(e["step"], 0.02, f" {skill}", rotation=90, fontsize=7, color="#c44e52",
                    transform=ax.get_xaxis_transform(), va="bottom")  # fmt: skip
    ax.set_ylim(-0.03, 1.03)
    png = _finish(
        fig, ax, "Skill probes (accuracy per skill; dotted = emergence event)", "accuracy"
    )
    return [Plot("probes", "Emergent skill probes", "Per-skill accuracy on the fixed held-out probe suite.", png)]  # fmt: skip


def _plot_other(series: Series, phases: Phases, used: set[str]) -> list[Plot]:
    """Every remaining metric, one small panel per prefix, so any new metric is visible.

    Panels are laid out in a grid of three columns, up to ``_GRID`` panels per image, so a
    run with many small metric families does not produce a wall of full-width plots.
    """
    from matplotlib.figure import Figure

    groups: dict[str, list[str]] = {}
    for key in sorted(series):
        if key in used or len(series[key][0]) < 2:
            continue
        groups.setdefault(key.split("/", 1)[0], []).append(key)
    prefixes = list(groups)
    plots = []
    for number, start in enumerate(range(0, len(prefixes), _GRID), start=1):
        chunk = prefixes[start : start + _GRID]
        rows = math.ceil(len(chunk) / 3)
        fig = Figure(figsize=(_FIGSIZE[0], 2.3 * rows), dpi=_DPI, layout="constrained")
        for index, prefix in enumerate(chunk):
            ax = fig.add_subplot(rows, 3, index + 1)
            _bands(ax, phases)
            keys = groups[prefix]
            _lines(ax, series, keys, label=lambda k, p=prefix: k[len(p) + 1 :] or k)
            ax.set_title(f"{prefix}/*", fontsize=9, loc="left")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(fontsize=6, loc="best")
        names = ", ".join(chunk)
        plots.append(
            Plot(f"other_{number}", "Other metrics", f"Metrics under: {names}.", _png(fig))
        )
    return plots


def build_plots(series: Series, events: list[dict[str, Any]]) -> list[Plot]:
    """Every panel that the run's metrics allow, in reading order."""
    phases = phase_segments(series)
    used: set[str] = {"curriculum/phase"} if phases else set()
    plots = _plot_rewards(series, phases, used)
    plots += _plot_weights(series, phases, used)

    def twin(slug, title, caption, left, right, drawstyle="default"):
        png = _twin(series, phases, title, left, right, drawstyle=drawstyle)
        if png is not None:
            used.update(left + right)
            plots.append(Plot(slug, title, caption, png))

    acc = sorted(k for k in series if k.startswith("accuracy/")) + ["format/valid_rate"]
    twin("accuracy", "Accuracy and format validity", "Task accuracy (not reward) is what shows reward hacking.", acc, [])  # fmt: skip
    twin("temperature_beta", "Sampling temperature and KL coefficient", "Left: temperature (solid); right: KL coefficient beta (dashed).", ["knobs/temperature"], ["knobs/beta"])  # fmt: skip
    twin("kl_entropy", "KL to the reference and policy entropy", "Left: mean per-token KL (solid); right: mean entropy (dashed).", ["kl/mean"], ["entropy/mean"])  # fmt: skip
    counts = ["knobs/micro_batches", "knobs/accumulation_steps", "accumulation/steps"]
    accum = sorted(
        k for k in series if k.startswith(("accumulation/", "grad_noise/")) and k not in counts
    )
    twin("accumulation", "Gradient accumulation", "Left: micro-batches / accumulation steps per optimizer step (solid); right: the signals that set them (dashed).", counts, accum, "steps-post")  # fmt: skip
    ranks = ["lora/rank", "knobs/lora_rank", "lora/nested_rank"]
    scales = sorted(k for k in series if k.startswith(("lora/", "hypernet/")) and k not in ranks)
    twin("lora", "LoRA rank and scales", "Left: adapter rank (solid); right: LoRA module / hypernetwork scales (dashed).", ranks, scales, "steps-post")  # fmt: skip
    plots += _plot_probes(series, phases, used, events)
    timing = sorted(k for k in series if k.startswith("timing/"))
    twin("timing", "Time per step", "Seconds per phase of the step.", timing, [])
    plots += _plot_other(series, phases, used)
    return plots


# ------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1120px;color:#222;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.muted{color:#777}table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#1a7f37}.neg{color:#c62828}figure{margin:12px 0 24px}
figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:0.9em}
pre{background:#f7f7f7;padding:8px;white-space:pre-wrap;word-break:break-word;font-size:0.85em;
max-height:420px;overflow:auto}.sample{border:1px solid #e4e4e4;padding:8px 12px;margin:10px 0}
.ok{color:#1a7f37;font-weight:bold}.bad{color:#c62828;font-weight:bold}
.note{background:#fff8e1;border:1px solid #f0d080;padding:6px 10px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return _e(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Rows of already-escaped cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _td(text: str, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    return f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>"


def _summary_html(summary: dict[str, Any] | None, series: Series) -> str:
    parts = []
    if summary:
        steps = summary.get("steps")
        secs = summary.get("mean_step_seconds")
        parts.append(f"<p>{_num(steps)} GRPO steps; {_num(secs)} s per step on average.</p>")
        first, last = summary.get("first_steps") or {}, summary.get("last_steps") or {}
        if first or last:
            k = summary.get("window")
            rows = [
                [_td(_e(key)), _td(_num(first.get(key)), True), _td(_num(last.get(key)), True)]
                for key in sorted(set(first) | set(last))
            ]
            parts.append(_table(["metric", f"first {k} steps", f"last {k} steps"], rows))
    elif series:
        last = max(max(xs) for xs, _ in series.values())
        parts.append(f"<p>No summary.json yet (run in progress?); metrics up to step {last:g}.</p>")
    return "".join(parts)


def _eval_html(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    if not before and not after:
        return "<p class='muted'>No held-out evaluation in this run.</p>"
    from deepsynapse.eval.compare import compare_rows, flips

    rows = []
    for key, a, b in compare_rows(before or {}, after or {}):
        delta, cls = "", ""
        if a is not None and b is not None:
            delta = f"{b - a:+.4g}"
            cls = "pos" if b > a else "neg" if b < a else ""
        rows.append([_td(_e(key)), _td(_num(a), True), _td(_num(b), True), _td(delta, True, cls)])
    out = _table(["metric", "before", "after", "delta"], rows)
    if before and after:
        f = flips(before, after)
        if f["common"]:
            out += (
                f"<p>Per problem ({f['common']} shared): <span class='pos'>{f['fixed']} fixed"
                f"</span> (wrong &rarr; right), <span class='neg'>{f['broken']} broken</span>"
                " (right &rarr; wrong).</p>"
            )
    return out


def _events_html(events: list[dict[str, Any]]) -> str:
    if not events:
        return "<p class='muted'>No events.</p>"
    counts: dict[str, int] = {}
    for e in events:
        counts[str(e.get("kind"))] = counts.get(str(e.get("kind")), 0) + 1
    head = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(counts.items()))
    shown = events[-_MAX_EVENTS:]
    rows = []
    for e in shown:
        evidence = json.dumps(e.get("evidence"), ensure_ascii=False, default=str)
        if len(evidence) > 400:
            evidence = evidence[:400] + " ..."
        rows.append(
            [
                _td(_num(e.get("step")), True),
                _td(_e(e.get("kind", ""))),
                _td(_e(e.get("message", ""))),
                _td(f"<code>{_e(evidence)}</code>"),
            ]
        )
    more = "" if len(events) <= _MAX_EVENTS else f" (the last {_MAX_EVENTS} shown)"
    return f"<p>{len(events)} events{more}: {head}.</p>" + _table(
        ["step", "kind", "message", "evidence"], rows
    )


def _samples_html(samples: list[dict[str, Any]], limit: int) -> str:
    if not samples:
        return "<p class='muted'>No samples logged.</p>"
    shown = samples[-limit:]
    out = [f"<p>The last {len(shown)} of {len(samples)} logged completions.</p>"]
    for s in shown:
        ok = s.get("correct")
        verdict = "<span class='ok'>correct</span>" if ok else "<span class='bad'>wrong</span>"
        rewards = s.get("rewards") or {}
        reward_text = ", ".join(f"{_e(k)} {_num(v)}" for k, v in rewards.items())
        errors = s.get("format_errors") or []
        out.append(
            "<div class='sample'>"
            f"<div><b>step {_num(s.get('step'))}</b> &middot; {_e(s.get('problem_id', ''))}"
            f" &middot; gold {_e(s.get('gold', ''))} &middot; {verdict}"
            f" &middot; fused reward {_num(s.get('fused_reward'))}"
            f" &middot; advantage {_num(s.get('advantage'))}"
            f"{' &middot; truncated' if s.get('truncated') else ''}</div>"
            f"<div class='muted'>rewards: {reward_text or 'n/a'}"
            f"{' &middot; format errors: ' + _e(', '.join(map(str, errors))) if errors else ''}"
            "</div>"
            f"<details><summary>question</summary><pre>{_e(s.get('question', ''))}</pre></details>"
            f"<pre>{_e(s.get('completion', ''))}</pre>"
            "</div>"
        )
    return "".join(out)


def _render(
    title: str,
    notes: list[str],
    summary_html: str,
    plots: list[Plot],
    eval_html: str,
    events_html: str,
    samples_html: str,
    config_text: str | None,
) -> str:
    figures = []
    for p in plots:
        data = base64.b64encode(p.png).decode("ascii")
        figures.append(
            f"<figure id='{_e(p.slug)}'><img class='plot' alt='{_e(p.title)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{_e(p.caption)}</figcaption></figure>"
        )
    notes_html = "".join(f"<p class='note'>{_e(n)}</p>" for n in notes)
    config_html = (
        f"<details><summary>resolved config.yaml</summary><pre>{_e(config_text)}</pre></details>"
        if config_text
        else ""
    )
    plots_html = "".join(figures) or "<p class='muted'>No metrics to plot yet.</p>"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='muted'>DeepSynapse training report</p>{notes_html}"
        f"<h2>Summary</h2>{summary_html}{config_html}"
        f"<h2>Held-out evaluation, before and after</h2>{eval_html}"
        f"<h2>Training curves</h2>{plots_html}"
        f"<h2>Events</h2>{events_html}"
        f"<h2>Sample completions</h2>{samples_html}"
        "</body></html>"
    )


def write_report(run_dir: str | Path, *, max_samples: int = 12, title: str | None = None) -> Path:
    """Write ``run_dir/report.html`` (and ``run_dir/plots/*.png``); returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    notes: list[str] = []
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    events = read_jsonl(run_dir / "events.jsonl")
    samples = read_jsonl(run_dir / "samples.jsonl")
    before = _load_json(run_dir / "eval_before.json", notes)
    after = _load_json(run_dir / "eval_after.json", notes)
    summary = _load_json(run_dir / "summary.json", notes)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    if not metrics:
        notes.append("metrics.jsonl is missing or empty: no training curves.")

    series = load_series(metrics)
    plots = build_plots(series, events)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    for old in plot_dir.glob("*.png"):  # plots of metrics no longer present must not linger
        old.unlink()
    for p in plots:
        (plot_dir / f"{p.slug}.png").write_bytes(p.png)

    page = _render(
        title or f"Run {run_dir.resolve().name}",
        notes,
        _summary_html(summary if isinstance(summary, dict) else None, series),
        plots,
        _eval_html(
            before if isinstance(before, dict) else None,
            after if isinstance(after, dict) else None,
        ),
        _events_html(events),
        _samples_html(samples, max_samples),
        config_text,
    )
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
