"""Soak test: does resident memory stay flat over a long run?

    python benchmarks/soak.py                                   # tiny model, 200 steps
    python benchmarks/soak.py --steps 60                        # a shorter look
    python benchmarks/soak.py --no-trim                         # same, without malloc_trim
    python benchmarks/soak.py --model smollm2-135m-instruct --steps 20   # the real model

Runs the real trainer in-process (``train.save_every=50`` by default, so checkpoint saves
are part of the soak) and reads the resident set size (``current_rss_mb``) after every
step. Reports RSS after the first step, at the middle and at the end, and the slope over
the second half in MB per 100 steps (the first half holds the warm-up: allocator pools,
tokenizer and kernel caches) of the RSS floor (the minimum of each 10 steps: RSS after a
step jumps between a few levels as glibc keeps or returns a freed logits buffer, which a
raw fit mistakes for growth), and a verdict against ``--bound`` MB per 100 steps. Exit code
1 when the slope is over the bound, so it can gate a nightly job.

On glibc it also splits RSS after each step into what the C heap holds live (``heap``:
tensors, caches, Python's large objects), its mmapped buffers, and the rest (``kept``: freed
memory the allocator keeps, plus code and Python's small-object arenas), so growth can be
told from allocator placement. Every rise of RSS past all earlier steps' is listed with the
update's padded width (``rises``): a rise at a new widest batch is bounded by the config's
longest sequence, while a rise without one (``rises_without_a_wider_batch_mb``) needs another
cause, a leak among them. It runs on the C
allocator the command line would pick (tcmalloc where installed;
``DEEPSYNAPSE_ALLOCATOR=glibc`` for glibc), named in the summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deepsynapse.allocator import active_allocator, reexec_with_allocator
from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer
from deepsynapse.telemetry.run_logger import current_rss_mb, malloc_usage_mb

ROOT = Path(__file__).resolve().parents[1]
# The tiny random model with built-in rewards; prompts of different lengths (GSM8K), so
# tensor shapes vary from step to step as in a real run.
TINY = [
    "model.name=tiny-random",
    "model.dtype=fp32",
    "lora.r=4",
    "lora.alpha=8",
    "data.train=gsm8k",
    "rollout.num_generations=2",
    "rollout.max_new_tokens=16",
    "grpo.prompts_per_step=2",
    "grpo.micro_batch_size=2",
    "optim.lr=1e-3",
    "sft.steps=1",
    "sft.batch_size=2",
    "eval.limit=0",
]
REAL = ["sft.steps=0", "eval.limit=0"]  # on top of configs/demo-cpu.yaml


class SoakTrainer(Trainer):
    """The trainer, with the resident memory read after every step (and an optional trim)."""

    def __init__(self, *args: Any, every: int = 10, **kw: Any):
        super().__init__(*args, **kw)
        self.rss: list[float] = []
        self.heap: list[float] = []  # live C-heap bytes (glibc), MB
        self.kept: list[float] = []  # RSS - live heap - mmapped buffers, MB
        self.width: list[float] = []  # the update's padded sequence width, tokens
        self.every = every
        self.started = time.perf_counter()

    def train_step(self, step: int) -> dict[str, float]:
        metrics = super().train_step(step)  # trims the C heap at its end (train.trim_memory)
        self.rss.append(current_rss_mb())
        self.width.append(metrics.get("batch/sequence_width", float("nan")))
        usage = malloc_usage_mb()  # None unless the process allocates with glibc
        if usage is not None:
            self.heap.append(usage["in_use"])
            self.kept.append(self.rss[-1] - usage["in_use"] - usage["mmapped"])
        if self.every and (step + 1) % self.every == 0:
            rate = (time.perf_counter() - self.started) / (step + 1)
            split = f"  heap {self.heap[-1]:7.1f}  kept {self.kept[-1]:6.1f}" if self.heap else ""
            print(
                f"step {step + 1:4d}  rss {self.rss[-1]:8.1f} MB{split}  ({rate:.2f} s/step)",
                flush=True,
            )
        return metrics


def slope_per_100(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index, in units per 100 steps."""
    n = len(values)
    if n < 2:
        return 0.0
    xs = range(n)
    mx, my = (n - 1) / 2, statistics.fmean(values)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True))
    var = sum((x - mx) ** 2 for x in xs)
    return 100.0 * cov / var


def floor_slope_per_100(values: list[float], window: int) -> float:
    """Slope of the per-window minimum, in units per 100 steps.

    RSS after a step jumps between a few levels (glibc hands a freed tens-of-MB logits
    buffer back to the OS on some steps and not on others); the floor is what a leak raises,
    and it does not jump, so its slope is the measure.
    """
    floors = [min(values[i : i + window]) for i in range(0, len(values) - window + 1, window)]
    if len(floors) < 2:
        return slope_per_100(values)
    return slope_per_100(floors) / window


def rises(rss: list[float], width: list[float], threshold_mb: float = 20.0) -> list[dict]:
    """Each step whose RSS tops every earlier step's by more than ``threshold_mb``, and
    whether its batch was the widest yet. Why: an allocator may keep the blocks of its
    largest batch, so RSS can step up when a wider batch first arrives, bounded by the widest
    the config allows; a rise without a new width needs another cause (a leak, or the
    allocator's own placement: the 45-step SmolLM2 soak rose 149 MB at one fixed width)."""
    out: list[dict] = []
    top_rss, top_width = float("-inf"), float("-inf")
    for step, (mb, w) in enumerate(zip(rss, width, strict=True), start=1):
        if step > 1 and mb > top_rss + threshold_mb:
            out.append(
                {
                    "step": step,
                    "mb": round(mb - top_rss, 1),
                    "width": w,
                    "widest_yet": w > top_width,
                }
            )
        top_rss, top_width = max(top_rss, mb), max(top_width, w)
    return out


def summarize(rss: list[float], bound: float, window: int = 10) -> dict[str, Any]:
    second_half = rss[len(rss) // 2 :]
    slope = floor_slope_per_100(second_half, min(window, max(1, len(second_half) // 3)))
    return {
        "steps": len(rss),
        "rss_first_mb": round(rss[0], 1),
        "rss_middle_mb": round(rss[len(rss) // 2], 1),
        "rss_last_mb": round(rss[-1], 1),
        "rss_peak_mb": round(max(rss), 1),
        "rss_floor_first_half_mb": round(min(rss[: len(rss) // 2] or rss), 1),
        "rss_floor_second_half_mb": round(min(second_half), 1),
        "second_half_slope_mb_per_100_steps": round(slope, 2),
        "second_half_raw_slope_mb_per_100_steps": round(slope_per_100(second_half), 2),
        "bound_mb_per_100_steps": bound,
        "verdict": "flat" if slope <= bound else "GROWING",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random", help="tiny-random or a real model alias")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--bound", type=float, default=5.0, help="largest acceptable MB per 100 steps")
    ap.add_argument(
        "--no-trim", action="store_true", help="train.trim_memory=false: no malloc_trim per step"
    )
    ap.add_argument("--every", type=int, default=10, help="print RSS every N steps")
    ap.add_argument("--run-dir", help="keep the run here (default: a temporary folder)")
    ap.add_argument("--output", help="write the summary and the per-step RSS as JSON here")
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = ap.parse_args()

    schedule = [f"train.steps={args.steps}", f"train.save_every={args.save_every}"]
    schedule += [f"train.trim_memory={str(not args.no_trim).lower()}"]
    if args.model == "tiny-random":
        cfg = load_config(None, TINY + schedule + args.overrides)
    else:
        recipe = ROOT / "configs" / "demo-cpu.yaml"
        overrides = REAL + [f"model.name={args.model}"] + schedule + args.overrides
        cfg = load_config(recipe, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "soak"
        trainer = SoakTrainer(cfg, run_dir=run_dir, progress=False, every=args.every)
        print(f"rss before training: {current_rss_mb():.1f} MB", flush=True)
        trainer.train()
        rss, heap, kept = trainer.rss, trainer.heap, trainer.kept
        seconds_per_step = (time.perf_counter() - trainer.started) / max(len(rss), 1)
    summary = {
        "model": args.model,
        "trim_memory": cfg.train.trim_memory,
        "allocator": active_allocator(),
        "seconds_per_step": round(seconds_per_step, 2),
        **summarize(rss, args.bound),
    }
    steps_up = rises(rss, trainer.width)
    summary["rises"] = steps_up
    summary["rises_without_a_wider_batch_mb"] = round(
        sum(r["mb"] for r in steps_up if not r["widest_yet"]), 1
    )
    if heap:
        half = heap[len(heap) // 2 :]
        summary["heap_first_mb"], summary["heap_last_mb"] = round(heap[0], 1), round(heap[-1], 1)
        summary["heap_second_half_slope_mb_per_100_steps"] = round(slope_per_100(half), 2)
        summary["kept_min_mb"], summary["kept_max_mb"] = round(min(kept), 1), round(max(kept), 1)
    print(json.dumps(summary, indent=1))
    if args.output:
        per_step = {"rss_mb": rss, "heap_mb": heap, "kept_mb": kept, "width": trainer.width}
        per_step = {k: [round(v, 2) for v in vs] for k, vs in per_step.items()}
        Path(args.output).write_text(json.dumps({**summary, **per_step}, indent=1))
    return 0 if summary["verdict"] == "flat" else 1


if __name__ == "__main__":
    reexec_with_allocator()  # as `deepsynapse train` runs (DEEPSYNAPSE_ALLOCATOR=glibc: glibc)
    sys.exit(main())
