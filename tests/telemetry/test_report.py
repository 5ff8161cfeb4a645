"""The training report: plots from whatever a run folder holds, rendered in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from deepsynapse.telemetry.report import load_series, phase_segments, write_report

CHROMIUM = Path("/usr/bin/chromium")
EVIL = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_run(run_dir: Path, steps: int = 30) -> Path:
    """A small but realistic run folder: what a 30-step run with every part on writes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 0, "time": 0.0, "sft/loss": 2.1, "sft/grad_norm": 3.0, "sft/step": 1}]
    for s in range(1, steps + 1):
        phase = 0 if s <= 10 else 1 if s <= 20 else 2
        t = s / steps
        row = {
            "step": s,
            "time": 1000.0 + s,
            "rewards/correctness/mean": 0.1 + 0.5 * t,
            "rewards/correctness/std": 0.2,
            "rewards/strict_format/mean": min(1.0, 0.2 + 1.2 * t),
            "rewards/strict_format/std": 0.1,
            "rewards/contrastive/mean": 0.3 + 0.1 * math.sin(s),
            "rewards/correctness/calibrated_mean": -0.5 + t,
            "rewards/strict_format/calibrated_mean": -0.2 + 0.8 * t,
            "reward/fused/mean": 0.2 + 0.6 * t,
            "accuracy/train": 0.1 + 0.5 * t,
            "format/valid_rate": min(1.0, 0.3 + t),
            "kl/mean": 0.001 * s,
            "entropy/mean": 1.2 - 0.02 * s,
            "knobs/temperature": 0.7 + 0.3 * math.cos(math.pi * t) / 2,
            "knobs/beta": 0.04 if phase < 2 else 0.08,
            "knobs/micro_batches": 1 + (s // 8),
            "accumulation/grad_noise": 0.5 + 0.2 * math.sin(s / 3),
            "weights/correctness": 0.2 + 0.5 * t,
            "weights/strict_format": 0.6 - 0.4 * t,
            "weights/contrastive": 0.2 - 0.1 * t,
            "curriculum/phase": phase,
            "lora/rank": 4 if phase == 0 else 8 if phase == 1 else 16,
            "hypernet/scale_mean": 1.0 + 0.1 * math.sin(s / 4),
            "timing/generate": 3.0,
            "timing/update": 2.0,
            "throughput/tokens_per_s": 120 + s,
            "memory/rss_mb": 900 + s,
        }
        if s % 5 == 0:
            row["probes/arithmetic"] = 0.25 if s < 20 else 0.75
            row["probes/format"] = min(1.0, 0.1 * s / 5)
            row["probes/mean"] = (row["probes/arithmetic"] + row["probes/format"]) / 2
        rows.append(row)
    _write_jsonl(run_dir / "metrics.jsonl", rows)
    _write_jsonl(
        run_dir / "events.jsonl",
        [
            {"step": 0, "kind": "start", "message": "2 prompts x 2", "evidence": {"dtype": "fp32"}},
            {"step": 11, "kind": "phase_change", "message": "phase 0 -> 1", "evidence": {}},
            {"step": 20, "kind": "emergence", "message": "arithmetic rose",
             "evidence": {"skill": "arithmetic"}},
            {"step": 21, "kind": "reward_error", "message": EVIL, "evidence": {"x": EVIL}},
        ],
    )  # fmt: skip
    _write_jsonl(
        run_dir / "samples.jsonl",
        [
            {
                "step": s,
                "problem_id": f"gsm8k-train-{s}",
                "question": "Tom has 3 <b>apples</b> & 2 pears. How many?",
                "gold": "5",
                "completion": f"<reasoning>\n3 + 2 = 5\n</reasoning>\n<answer>5</answer>{EVIL}",
                "rewards": {"correctness": 1.0, "strict_format": None},
                "fused_reward": 0.8,
                "advantage": 0.4,
                "correct": s != 20,
                "format_errors": ["text_outside"],
                "truncated": False,
            }
            for s in (10, 20, 30)
        ],
    )
    records = [{"id": f"p{i}", "correct": i % 3 == 0} for i in range(6)]
    before = {"n": 6, "mode": "greedy", "accuracy": 2 / 6, "format_validity": 0.5,
              "mean_length": 80.0, "truncation_rate": 0.1, "ece": None, "records": records}  # fmt: skip
    after = dict(before, accuracy=3 / 6, format_validity=0.9, ece=0.12,
                 records=[{"id": f"p{i}", "correct": i % 2 == 0} for i in range(6)])  # fmt: skip
    (run_dir / "eval_before.json").write_text(json.dumps(before))
    (run_dir / "eval_after.json").write_text(json.dumps(after))
    summary = {"run_dir": str(run_dir), "steps": steps, "window": 5, "mean_step_seconds": 5.0,
               "first_steps": {"accuracy/train": 0.12}, "last_steps": {"accuracy/train": 0.58}}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.yaml").write_text("model:\n  name: tiny-random\n")
    return run_dir


def _data_uri_pngs(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    ]


def test_series_and_phase_segments():
    rows = [{"step": 2, "a": 1.0, "b": "text"}, {"step": 1, "a": 0.5, "c": float("nan")}]
    series = load_series(rows)
    assert series == {"a": ([1.0, 2.0], [0.5, 1.0])}
    assert phase_segments({"curriculum/phase": ([1, 2, 3], [0, 1, 1])}) == [(1, 1, 0), (2, 3, 1)]


def test_report_has_every_panel_and_escapes(tmp_path):
    from PIL import Image

    run = make_run(tmp_path / "run")
    page = write_report(run).read_text(encoding="utf-8")
    plots = sorted(p.stem for p in (run / "plots").glob("*.png"))
    for slug in (
        "rewards", "rewards_calibrated", "weights", "accuracy", "temperature_beta",
        "kl_entropy", "accumulation", "lora", "probes", "timing",
        "other_1",
    ):  # fmt: skip
        assert slug in plots, slug
    assert "Metrics under: memory, throughput." in page  # leftovers, one small panel each
    pngs = _data_uri_pngs(page)
    assert len(pngs) == len(plots) == page.count("<img ")
    for data in pngs:
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.size[0] == 1000 and image.size[1] >= 230
        assert len(image.convert("L").getcolors(256)) > 10  # drawn, not blank
    # Untrusted text from the run is escaped everywhere, never live markup.
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page and "&lt;reasoning&gt;" in page
    assert "&lt;b&gt;apples&lt;/b&gt; &amp; 2 pears" in page
    # Before/after table with deltas and per-item flips.
    assert "+0.1667" in page and "2 fixed" in page and "1 broken" in page


def test_report_from_partial_run(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"step": 1, "kl/mean": 0.1}, {"step": 2, "kl/mean": 0.2}])
    (run / "eval_after.json").write_text("{torn")
    page = write_report(run).read_text(encoding="utf-8")
    assert [p.stem for p in (run / "plots").glob("*.png")] == ["kl_entropy"]
    assert "eval_after.json could not be read" in page and "No samples logged" in page
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No metrics to plot yet" in write_report(empty).read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


def _chromium(args: list[str], profile: Path) -> subprocess.Popen:
    """Start headless Chromium (stdout and stderr captured); the caller waits."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
    ]  # fmt: skip
    return subprocess.Popen(
        [str(CHROMIUM), *flags, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image, ImageStat

    run = make_run(tmp_path / "run")
    report = write_report(run)
    n_plots = len(list((run / "plots").glob("*.png")))
    # A copy that records, once loaded, how many images decoded (naturalWidth > 0).
    probe = run / "probe.html"
    marker = (
        "<script>window.addEventListener('load',()=>{const ok=[...document.images]"
        ".filter(i=>i.complete&&i.naturalWidth>0).length;"
        "document.body.setAttribute('data-images-ok',ok);"
        "document.body.setAttribute('data-images',document.images.length)});</script>"
    )
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", marker + "</body>"))
    shot = tmp_path / "shot.png"
    # Both browsers at once: the DOM dump of the probe copy, a screenshot of the report.
    dom = _chromium(
        ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "profile1"
    )
    snap = _chromium(
        [f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri()], tmp_path / "profile2"
    )
    dom_out, dom_err = dom.communicate(timeout=120)
    _, snap_err = snap.communicate(timeout=120)
    assert dom.returncode == 0, dom_err[-2000:]
    ok = re.search(r'data-images-ok="(\d+)"', dom_out)
    total = re.search(r'data-images="(\d+)"', dom_out)
    assert ok and total, dom_out[:500]
    assert int(ok.group(1)) == int(total.group(1)) == n_plots
    assert "pwned" not in dom_out.split("</title>")[0]  # the escaped script never ran

    assert snap.returncode == 0 and shot.is_file(), snap_err[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 3000)
    assert ImageStat.Stat(image).var[0] > 200  # text and plots, not a blank page


def test_module_doctests():
    import doctest

    from deepsynapse.telemetry import report

    assert doctest.testmod(report).failed == 0
