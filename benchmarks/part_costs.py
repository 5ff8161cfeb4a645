"""What each part of DeepSynapse costs at the hour recipe: warm-up step, GRPO step, evaluation.

    python benchmarks/part_costs.py                             # plain, full, full minus each costly part
    python benchmarks/part_costs.py --configs plain full full-hypernet
    python benchmarks/part_costs.py --quick                     # smoke check: tiny model, ~1 min

At equal wall-clock a part pays for itself in steps: a configuration whose steps cost four
times as much gets a quarter of them (first study, seed 0: full DeepSynapse made 27 warm-up
and 12 GRPO steps in its hour, plain GRPO 120 and 71). This script says which part costs
what before an hour is spent finding out. Each configuration is a short run of the recipe
with the parts switched exactly as ``learning.py`` switches them (its overrides): a few
warm-up steps, a few GRPO steps, one held-out evaluation at the end, no time budget, no
probes, dynamic sampling off (one rollout round per accumulation step, so rounds compare).
Reported: the median of each step kind but the first (one-time costs), the GRPO step's
phases (generation, reward with its costliest component, reference, update), rollout rounds
per step, completion tokens per second of generation, and the evaluation's seconds per
problem. Runs go one at a time; the machine must be otherwise idle. Results:
``benchmarks/results/part-costs[-quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, child_env, fmt, machine_info, markdown_table, save_report
from learning import QUICK, RECIPE, REPO, Learning, resolve, run_overrides

DEFAULT_CONFIGS = (
    "plain",
    "full",
    "full-hypernet",
    "full-memory",
    "full-contrastive",
    "full-accumulation",
    "full-sft_mixing",
    "full-critique",
)
PHASES = ("generate", "reward", "reference", "update")


def short_run_overrides(sft_steps: int, grpo_steps: int, eval_limit: int) -> list[str]:
    """On top of a study run's overrides: a short, unbudgeted run without probes."""
    return [
        "train.time_budget=",
        f"sft.steps={sft_steps}",
        f"train.steps={grpo_steps}",
        f"eval.limit={eval_limit}",
        "probes.every=0",
        "grpo.dynamic_sampling=false",
        "train.save_every=0",
        "train.report=false",
    ]


def _median_after_first(values: list[float]) -> float | None:
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


def read_costs(run_dir: Path) -> dict[str, Any]:
    """The per-step costs of a finished short run, from its metrics and final evaluation."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [r["timing/sft_step"] for r in rows if "timing/sft_step" in r]
    grpo = [r for r in rows if "timing/step" in r]
    out: dict[str, Any] = {
        "sft_step_s": _median_after_first(sft),
        "grpo_step_s": _median_after_first([r["timing/step"] for r in grpo]),
    }
    for phase in PHASES:
        out[f"{phase}_s"] = _median_after_first([r.get(f"timing/{phase}", 0.0) for r in grpo])
    rewards = {
        k[len("timing/reward/") :]: _median_after_first([r.get(k, 0.0) for r in grpo])
        for k in (grpo[-1] if grpo else {})
        if k.startswith("timing/reward/")
    }
    top = max(rewards.items(), key=lambda kv: kv[1] or 0.0, default=(None, None))
    out["costliest_reward"], out["costliest_reward_s"] = top
    out["rounds"] = _median_after_first([r.get("groups/drawn", 0.0) for r in grpo])
    out["completion_tok_per_s"] = _median_after_first(
        [r.get("throughput/completion_tokens_per_s", 0.0) for r in grpo]
    )
    after = json.loads((run_dir / "eval_after.json").read_text())
    out["eval_s_per_problem"] = after["seconds"] / max(after["n"], 1)
    out["eval_mean_length"] = after.get("mean_length")
    return out


def measure(config: str, st: Learning, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from deepsynapse.config import load_config

    recipe_cfg = load_config(st.recipe, list(st.extra))
    overrides = run_overrides(st, config, 0, work, recipe_cfg)
    overrides += short_run_overrides(args.sft_steps, args.grpo_steps, args.eval_limit)
    overrides += [f"train.run_name={config}"]
    cmd = [sys.executable, "-m", "deepsynapse.cli", "train", "--quiet", "--config", st.recipe]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd + overrides, cwd=REPO, env=child_env(), capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"{config}: deepsynapse train exited {proc.returncode}:\n{tail}")
    costs = read_costs(work / config)
    costs["wall_s"] = wall
    return costs


def markdown(report: dict[str, Any]) -> str:
    rows = []
    base = report["results"].get("plain", {}).get("grpo_step_s")
    for config, c in report["results"].items():
        ratio = None if not base or c.get("grpo_step_s") is None else c["grpo_step_s"] / base
        reward = (
            f"{fmt(c['reward_s'], 1)} ({c['costliest_reward']} {fmt(c['costliest_reward_s'], 1)})"
            if c.get("costliest_reward")
            else fmt(c.get("reward_s"), 1)
        )
        rows.append(
            [
                config,
                fmt(c["sft_step_s"], 1),
                fmt(c["grpo_step_s"], 1),
                "n/a" if ratio is None else f"x{ratio:.2f}",
                fmt(c["rounds"] / report["prompts_per_step"], 1) if c.get("rounds") else "n/a",
                fmt(c["generate_s"], 1),
                reward,
                fmt(c["reference_s"], 1),
                fmt(c["update_s"], 1),
                fmt(c["completion_tok_per_s"], 0),
                fmt(c["eval_s_per_problem"], 2),
            ]
        )
    m = report["machine"]
    return "\n".join(
        [
            f"## Part costs at `{report['recipe']}` ({m.get('gpu') or m.get('cpu_class')}, "
            f"{m.get('cores')} cores)",
            "",
            f"{report['sft_steps']} warm-up and {report['grpo_steps']} GRPO steps a configuration, "
            "medians of all but the first; seconds. *rounds*: rollout rounds per GRPO step "
            "(dynamic accumulation doubles them); *gen tok/s*: completion tokens per second of "
            f"generation; *eval s/problem*: the final evaluation of {report['eval_limit']} "
            "held-out problems, greedy.",
            "",
            markdown_table(
                [
                    "config",
                    "SFT step",
                    "GRPO step",
                    "vs plain",
                    "rounds",
                    "generate",
                    "reward (costliest)",
                    "reference",
                    "update",
                    "gen tok/s",
                    "eval s/problem",
                ],
                rows,
            ),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--config", default=RECIPE, help="the recipe (default the hour recipe)")
    ap.add_argument("--sft-steps", type=int, default=4)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--eval-limit", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="tiny-random, plain and full")
    ap.add_argument("--results", type=Path, help="results stem (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    st = Learning(recipe=args.config, configs=tuple(args.configs), backend="ours")
    if args.quick:
        st = replace(st, extra=QUICK.extra)  # learning.py's tiny model and small settings
        args.configs = ["plain", "full"] if args.configs == list(DEFAULT_CONFIGS) else args.configs
        args.sft_steps, args.grpo_steps, args.eval_limit = 2, 2, 2
    from deepsynapse.config import load_config

    recipe_cfg = load_config(st.recipe, list(st.extra))
    st = resolve(st, recipe_cfg)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="part-costs-") as tmp:
        for config in args.configs:
            print(f"[{time.strftime('%H:%M:%S')}] {config} ...", flush=True)
            results[config] = measure(config, st, args, Path(tmp))
            c = results[config]
            print(
                f"    SFT step {fmt(c['sft_step_s'], 1)} s, GRPO step {fmt(c['grpo_step_s'], 1)} s,"
                f" eval {fmt(c['eval_s_per_problem'], 2)} s/problem",
                flush=True,
            )
    report = {
        "recipe": st.recipe,
        "sft_steps": args.sft_steps,
        "grpo_steps": args.grpo_steps,
        "eval_limit": args.eval_limit,
        "prompts_per_step": recipe_cfg.grpo.prompts_per_step,
        "results": results,
        "machine": machine_info(),
    }
    stem = args.results or RESULTS_DIR / ("part-costs-quick" if args.quick else "part-costs")
    text = markdown(report)
    save_report(stem, report, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
