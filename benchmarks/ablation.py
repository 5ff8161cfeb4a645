"""Learning per unit of compute: plain GRPO, full DeepSynapse, and full minus each part.

    python benchmarks/ablation.py                     # SmolLM2-135M, both datasets, 3 seeds
    python benchmarks/ablation.py --quick             # smoke check: tiny model, 1 seed, 1 step
    python benchmarks/ablation.py --ablate part       # full minus each part (~3 h, resumable)
    python benchmarks/ablation.py --steps 30 --max-minutes 0   # a longer study (hours)

Every configuration trains from the same starting point for the same number of GRPO steps,
on the synthetic set and on GSM8K, over several seeds, then is scored on held-out problems
of its dataset (greedy): accuracy, format validity, and calibration (ECE and Brier of the
stated ``<confidence>``, only where completions carry one). Compute is reported beside it:
the seconds the GRPO steps took (``timing/step`` summed), since some parts (accumulation,
SFT mixing, contrastive scoring) spend more per step.

The starting point: SmolLM2-135M-Instruct never writes the XML format on its own, so every
GRPO group would score zero. A short SFT warm-up on GSM8K's worked solutions (``sft.*``) is
run once per schema, exported as a merged model, and every run starts from that folder; it
is also evaluated once per (schema, dataset, seed): the "warm-up only" rows, and the
``eval_before.json`` each run folder starts with (the runs' added modules are the identity
at initialisation, so that evaluation is theirs too).

Configurations: ``plain`` (GRPO with correctness and the two format rewards, static weights),
``full`` (every part on), and ``full-<x>`` with ``x`` removed. ``--ablate`` says what ``x``
ranges over: ``family`` (the default: the five families of ``FAMILIES``, 7 configurations,
42 runs, which fit the hour on 2 cores) or ``part`` (each of the 17 parts alone, 19
configurations, 114 runs: about three hours, done in hourly slices since finished runs are
reused). A part whose parent is removed goes with it (``full-curriculum`` also drops the LoRA
rank growth it drives). ``plain`` and ``full`` are the same runs in both studies.

Each run is a child process with its own run folder under ``--out-dir``. The whole study
stops scheduling new runs after ``--max-minutes`` (runs are ordered seed by seed, so a cut
leaves every configuration with the same number of seeds) and says so in its table. Results:
``benchmarks/results/ablation[-quick].json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    RESULTS_DIR,
    ChildFailed,
    emit_result,
    machine_info,
    markdown_table,
    mean_std,
    peak_rss_mb,
    run_child,
    save_json,
)

BASE_REWARDS = {"correctness": 1.0, "strict_format": 0.3, "soft_format": 0.2}


@dataclass(frozen=True)
class Part:
    """One DeepSynapse part: the overrides that switch it on, and rewards it adds."""

    name: str
    help: str
    overrides: tuple[str, ...] = ()
    rewards: dict[str, float] = field(default_factory=dict)
    schema: str | None = None  # the XML schema it needs
    requires: str | None = None  # a part it cannot run without
    answer_tokens: int = 0  # what it adds to an answer: token budgets grow by this much


# The critique and confidence fields' share of a worked solution, tokenised (SmolLM2): +64,
# +64 and +65 tokens at difficulty 1, 2 and 3. Without it 28% of the critique schema's answers
# exceeded full's 128-token rollouts and were cut off (full seed 0 of the second study).
CRITIQUE_TOKENS = 64


def parts_for(max_new_tokens: int) -> list[Part]:
    """Every part of full DeepSynapse; step schedules are shares of the run (the trainer
    scales them to ``train.steps``, or to the steps a time budget plans)."""
    return [
        Part("curriculum", "3 phases (3.5/3.15)", ("control.curriculum.enabled=true",)),
        Part(
            "dynamic_lora",
            "LoRA rank 16 -> 24 -> 32 at phase changes (3.1), from plain's rank",
            ("control.curriculum.default_ranks=[16, 24, 32]", "lora.r=16", "lora.alpha=32"),
            requires="curriculum",
        ),
        Part("kl_temperature", "KL-temperature co-regulation (3.3)", _kl()),
        Part(
            "accumulation",
            "dynamic gradient accumulation (3.13)",
            (
                "control.accumulation.enabled=true",
                "control.accumulation.max_steps=2",
                "control.accumulation.warmup=1",
                "control.accumulation.cooldown=1",
            ),
        ),
        Part(
            "sft_mixing",
            "decaying auxiliary SFT loss (CHORD)",
            (
                "control.sft_mixing.enabled=true",
                "control.sft_mixing.mu0=0.2",
                "control.sft_mixing.decay_share=1.0",
                "control.sft_mixing.batch_size=2",
            ),
        ),
        Part("data_curriculum", "UCB over difficulty", ("control.data_curriculum.enabled=true",)),
        Part(
            "allocator",
            "neural weight allocator (3.11); off = static weights",
            ("rewards.allocator=neural", "rewards.allocator_options={seed: 0}"),
        ),
        Part(
            "calibration", "running z-score of components (3.6)", ("rewards.calibration=running",)
        ),
        Part(
            "discovery",
            "auto-discovered reward terms (3.12)",
            ("discovery.enabled=true", "discovery.min_records=16"),
        ),
        Part(
            "hypernet", "context hypernetwork over LoRA scales (3.10)", ("hypernet.enabled=true",)
        ),
        Part("memory", "gated neural memory (3.9)", ("memory.enabled=true",)),
        Part(
            "module_scales", "learnable per-module LoRA scales (3.18)", ("lora.module_scales=true",)
        ),
        Part(
            "guardian",
            "graded structure reward and length penalty (3.7)",
            (f"rewards.length_budget={max_new_tokens}",),
            rewards={"structure": 0.3, "length_penalty": 0.1},
        ),
        Part("contrastive", "distractor-contrastive reward (3.2)", rewards={"contrastive": 0.3}),
        Part("verifier", "learned verifier reward (3.4)", rewards={"verifier": 0.3}),
        Part(
            "critique",
            "critique + confidence calibration rewards (3.4)",
            (
                f"rollout.max_new_tokens={max_new_tokens + CRITIQUE_TOKENS}",
                f"rewards.length_budget={max_new_tokens + CRITIQUE_TOKENS}",  # after guardian's
            ),
            rewards={"calibration": 0.3, "critique_consistency": 0.2},
            schema="deepsynapse",
            answer_tokens=CRITIQUE_TOKENS,
        ),
        Part(
            "episodic",
            "memory-aware rewards: repeated mistakes, novelty (3.9/3.17)",
            rewards={"repeat_mistake": 0.2, "novelty": 0.1},
        ),
    ]


# What the default study removes together: parts that serve one purpose. Removing a family
# answers "what does this layer of DeepSynapse add"; ``--ablate part`` splits them.
FAMILIES: dict[str, tuple[str, ...]] = {
    "schedule": ("curriculum", "dynamic_lora", "kl_temperature"),
    "optimisation": ("accumulation", "sft_mixing", "data_curriculum"),
    "reward_weighting": ("allocator", "calibration", "discovery"),
    "adaptive_policy": ("hypernet", "memory", "module_scales"),
    "reward_terms": ("guardian", "contrastive", "verifier", "critique", "episodic"),
}
ABLATE = ("family", "part")


def removable(parts: list[Part], ablate: str = "family") -> dict[str, tuple[str, ...]]:
    """What each ``full-<name>`` configuration removes: a family, or one part."""
    if ablate == "part":
        return {p.name: (p.name,) for p in parts}
    if ablate != "family":
        raise ValueError(f"--ablate must be one of {ABLATE}, got {ablate!r}")
    names = {p.name for p in parts}
    grouped = [n for members in FAMILIES.values() for n in members]
    if sorted(grouped) != sorted(names):  # a new part must be given a family
        raise ValueError(f"FAMILIES and parts_for disagree: {sorted(grouped)} vs {sorted(names)}")
    return dict(FAMILIES)


def _kl() -> tuple[str, ...]:
    return ("control.kl_temperature.enabled=true", "control.kl_temperature.kl_target=0.02")


@dataclass(frozen=True)
class Study:
    """Settings shared by every run of the study."""

    model: str = "smollm2-135m-instruct"
    datasets: tuple[str, ...] = ("synthetic", "gsm8k")
    seeds: int = 3
    steps: int = 3
    prompts: int = 2
    generations: int = 4
    max_new_tokens: int = 64
    lr: float = 5e-5
    beta: float = 0.04
    sft_steps: int = 20
    sft_batch_size: int = 8
    eval_limit: int = 12
    eval_max_new_tokens: int = 96
    verifier_backbone: str = "auto"
    jobs: int = 2
    ablate: str = "family"  # what full-<x> removes: a family of parts, or one part
    configs: tuple[str, ...] = ()  # empty = plain, full and full-<x> for every x


def config_names(parts: list[Part], ablate: str = "family") -> list[str]:
    return ["plain", "full", *(f"full-{name}" for name in removable(parts, ablate))]


def active_parts(config: str, parts: list[Part]) -> list[Part]:
    """The parts a configuration switches on (dependants leave with their parent).

    ``full-<x>`` accepts a part or a family name whatever the study's ``--ablate``, so
    ``--configs`` can mix them; ``full-<x>-<y>`` removes both (names use underscores), so
    an ablation can start from a configuration that is itself full minus a part:
    ``full-critique-schedule`` is full-critique without the schedule family.
    """
    if config == "plain":
        return []
    if config == "full":
        return list(parts)
    valid = ["plain", "full", *(f"full-{n}" for n in [*FAMILIES, *(p.name for p in parts)])]
    if not config.startswith("full-"):
        raise ValueError(f"unknown configuration {config!r}; valid: {valid}")
    removed: set[str] = set()
    for name in config[len("full-") :].split("-"):
        members = FAMILIES.get(name) or ((name,) if name in {p.name for p in parts} else None)
        if members is None:
            raise ValueError(f"unknown part or family {name!r} in {config!r}; valid: {valid}")
        removed.update(members)
    kept = [p for p in parts if p.name not in removed]
    names = {p.name for p in kept}
    return [p for p in kept if p.requires is None or p.requires in names]


def schema_of(active: Iterable[Part]) -> str:
    return "deepsynapse" if any(p.schema == "deepsynapse" for p in active) else "base"


def common_overrides(st: Study, model: str, dataset: str, seed: int, threads: int) -> list[str]:
    return [
        f"model.name={model}",
        "model.dtype=auto",
        "lora.r=16",
        "lora.alpha=32",
        f"data.train={dataset}",
        f"data.eval={dataset}",
        f"rollout.num_generations={st.generations}",
        f"rollout.max_new_tokens={st.max_new_tokens}",
        f"grpo.prompts_per_step={st.prompts}",
        f"grpo.micro_batch_size={st.prompts * st.generations}",
        f"grpo.beta={st.beta}",
        f"optim.lr={st.lr}",
        f"train.steps={st.steps}",
        f"train.seed={seed}",
        f"train.threads={threads}",
        "train.save_every=0",
        "train.keep_checkpoints=1",
        "train.report=false",
        "train.log_samples_every=0",
        "sft.steps=0",
        f"eval.limit={st.eval_limit}",
        f"eval.max_new_tokens={st.eval_max_new_tokens}",
        f"rewards.verifier_backbone={st.verifier_backbone}",
    ]


def run_overrides(
    st: Study, config: str, model: str, dataset: str, seed: int, threads: int
) -> list[str]:
    """The full override list of one configuration (later overrides win)."""
    parts = parts_for(st.max_new_tokens)
    return common_overrides(st, model, dataset, seed, threads) + part_overrides(config, parts)


def part_overrides(config: str, parts: list[Part]) -> list[str]:
    """What a configuration sets: its parts' switches, its reward weights and its schema.

    Shared with ``learning.py``, which puts these on top of a recipe instead of the
    study's common settings.
    """
    active = active_parts(config, parts)
    weights = dict(BASE_REWARDS)
    out: list[str] = []
    for p in active:
        weights.update(p.rewards)
        out.extend(p.overrides)
    out.append("rewards.weights={" + ", ".join(f"{k}: {v}" for k, v in weights.items()) + "}")
    out.append(f"rewards.schema={schema_of(active)}")
    return out


# ------------------------------------------------------------------ children


def child_warmup(spec: dict[str, Any]) -> dict[str, Any]:
    """SFT warm-up only (no GRPO step), exported as a merged model folder."""
    from deepsynapse.config import load_config
    from deepsynapse.export import export_run
    from deepsynapse.rl.trainer import Trainer

    st = Study(**_study_fields(spec["study"]))
    run_dir, export = Path(spec["run_dir"]), Path(spec["export"])
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = common_overrides(st, st.model, "gsm8k", 0, spec["threads"]) + [
        "train.steps=0",
        "eval.limit=0",
        f"sft.steps={st.sft_steps}",
        f"sft.batch_size={st.sft_batch_size}",
        f"rewards.schema={spec['schema']}",
    ]
    start = time.perf_counter()
    Trainer(load_config(None, overrides), run_dir=run_dir, progress=False).train()
    shutil.rmtree(export, ignore_errors=True)
    export_run(run_dir, "merged", export)
    return {"export": str(export), "seconds": time.perf_counter() - start}


def child_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """Held-out evaluation of the starting model, exactly as the trainer's eval runs it."""
    import torch

    from deepsynapse.config import load_config
    from deepsynapse.eval.harness import evaluate
    from deepsynapse.formats import get_schema
    from deepsynapse.models.loading import load_model, load_tokenizer, resolve_dtype
    from deepsynapse.rl.trainer import build_problems

    cfg = load_config(None, spec["overrides"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tok = load_tokenizer(cfg.model.name)
    model = load_model(cfg.model.name, resolve_dtype(cfg.model.dtype).dtype, tok).eval()
    problems, _ = build_problems(cfg.data.eval, "test", cfg)
    result = evaluate(
        model,
        tok,
        problems[: cfg.eval.limit],
        get_schema(cfg.rewards.schema),
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        progress=False,
    )
    path = Path(spec["path"])
    save_json(path, result)
    return {"path": str(path), **headline(result)}


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration: train, then read what its run folder says."""
    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer
    from deepsynapse.telemetry.run_logger import read_jsonl

    run_dir = Path(spec["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if spec.get("eval_before"):
        # The same starting model was evaluated once already: the trainer skips its own.
        shutil.copyfile(spec["eval_before"], run_dir / "eval_before.json")
    start = time.perf_counter()
    cfg = load_config(None, spec["overrides"])
    Trainer(cfg, run_dir=run_dir, progress=False).train()
    wall = time.perf_counter() - start
    after = json.loads((run_dir / "eval_after.json").read_text())
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "timing/step" in r]
    kinds: dict[str, int] = {}
    for e in read_jsonl(run_dir / "events.jsonl"):
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    if not spec.get("keep_checkpoints"):  # ~30 MB a run for SmolLM2; the logs stay
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    result = {
        **headline(after),
        "train_s": sum(float(r["timing/step"]) for r in rows),
        "steps": len(rows),
        "train_accuracy_last": rows[-1].get("accuracy/train") if rows else None,
        "wall_s": wall,
        "events": kinds,
        "peak_rss_mb": peak_rss_mb(),
    }
    save_json(run_dir / RESULT_FILE, {"spec": _identity(spec), "result": result})
    return result


RESULT_FILE = "ablation_result.json"


def _identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: everything in the spec but where logs go."""
    return {k: v for k, v in spec.items() if k not in ("kind", "keep_checkpoints")}


def stored_result(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The result a finished run with exactly this spec left in its folder, if any.

    Why: a study cut by ``--max-minutes`` goes on where it stopped when run again (the
    seeds it did not reach), instead of redoing the runs it finished.
    """
    path = Path(spec["run_dir"]) / RESULT_FILE
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("spec") != _identity(spec):
        return None
    return stored.get("result")


def headline(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "format_validity", "confidence_rate", "ece", "brier", "mean_length")
    return {k: result.get(k) for k in keys}


def _study_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "warmup": child_warmup,
    "baseline": child_baseline,
    "run": child_run,
}


# ------------------------------------------------------------------ parent


@dataclass
class Task:
    kind: str
    key: dict[str, Any]
    spec: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False


def run_tasks(
    tasks: list[Task], jobs: int, deadline: float | None, label: str, reuse: bool = False
) -> None:
    """Run tasks in child processes, ``jobs`` at a time, none started after ``deadline``.

    ``reuse``: a run whose folder holds the result of the same spec is not run again.
    """
    script = Path(__file__).resolve()
    queue = list(tasks)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                task = queue.pop(0)
                prior = stored_result(task.spec) if reuse and task.kind == "run" else None
                if prior is not None:
                    task.result = prior
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {label} {_key_text(task.key)}: "
                        "reused (finished earlier)",
                        flush=True,
                    )
                    continue
                if deadline is not None and time.time() > deadline:
                    task.skipped = True
                    continue
            began = time.perf_counter()
            try:
                task.result = run_child(script, {"kind": task.kind, **task.spec})
            except ChildFailed as exc:
                task.error = str(exc)
            took = time.perf_counter() - began
            status = "failed" if task.error else "done"
            with lock:
                print(
                    f"[{time.strftime('%H:%M:%S')}] {label} {_key_text(task.key)}: {status} "
                    f"in {took:.0f} s",
                    flush=True,
                )
                if task.error:
                    print(task.error, file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _key_text(key: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in key.items())


def warmup_tasks(st: Study, schemas: list[str], root: Path, threads: int) -> dict[str, Task]:
    """One SFT warm-up per schema, cached by its settings (reused by later studies)."""
    tasks = {}
    for schema in schemas:
        ident = json.dumps(
            [st.model, schema, st.sft_steps, st.sft_batch_size, st.max_new_tokens, st.lr],
        )
        digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
        folder = root / "warmup" / f"{schema}-sft{st.sft_steps}-{digest}"
        spec = {
            "study": asdict(st),
            "schema": schema,
            "threads": threads,
            "run_dir": str(folder / "run"),
            "export": str(folder / "model"),
        }
        tasks[schema] = Task("warmup", {"schema": schema}, spec)
    return tasks


def summarize(runs: list[Task], baselines: list[Task], configs: list[str]) -> dict[str, Any]:
    """Mean and spread over seeds, per dataset and configuration."""
    metrics = ("accuracy", "format_validity", "ece", "brier", "train_s")
    table: dict[str, dict[str, Any]] = {}
    for dataset in sorted({t.key["dataset"] for t in runs + baselines}):
        rows: dict[str, Any] = {}
        for t_list, names in ((baselines, None), (runs, configs)):
            groups: dict[str, list[dict[str, Any]]] = {}
            for t in t_list:
                if t.key["dataset"] != dataset or t.result is None:
                    continue
                name = t.key.get("config") or f"warm-up only ({t.key['schema']} schema)"
                groups.setdefault(name, []).append(t.result)
            order = names or sorted(groups)
            for name in order:
                results = groups.get(name, [])
                row: dict[str, Any] = {"seeds": len(results)}
                for m in metrics:
                    row[m] = mean_std([r.get(m) for r in results])
                failed = [
                    t
                    for t in t_list
                    if t.key["dataset"] == dataset and t.key.get("config") == name and t.error
                ]
                row["failed"] = len(failed)
                rows[name] = row
        table[dataset] = rows
    return table


def markdown(summary: dict[str, Any], st: Study, note: str) -> str:
    out = []
    for dataset, rows in summary.items():
        body = []
        for name, r in rows.items():

            def ms(key: str, digits: int = 3, r: dict[str, Any] = r) -> str:
                mean, std = r[key]
                return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

            body.append(
                [
                    name,
                    str(r["seeds"]) + (f" ({r['failed']} failed)" if r["failed"] else ""),
                    ms("accuracy"),
                    ms("format_validity"),
                    ms("ece"),
                    ms("brier"),
                    ms("train_s", 1),
                ]
            )
        out.append(
            f"### {dataset}: held-out greedy, {st.eval_limit} problems, after {st.steps} GRPO steps\n\n"
            + markdown_table(
                ["configuration", "seeds", "accuracy", "format valid", "ECE", "Brier", "GRPO s"],
                body,
            )
        )
    if note:
        out.append(note)
    return "\n\n".join(out)


def plot(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Accuracy and format validity per configuration (mean, error bar = std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary)
    height = max(3.0, 0.32 * max(len(r) for r in summary.values()) + 1.2)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), height), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = summary[dataset]
        names = list(rows)[::-1]
        ys = range(len(names))
        for offset, key, label in (
            (-0.18, "accuracy", "accuracy"),
            (0.18, "format_validity", "format valid"),
        ):
            means = [rows[n][key][0] or 0.0 for n in names]
            stds = [rows[n][key][1] or 0.0 for n in names]
            ax.barh([y + offset for y in ys], means, height=0.34, xerr=stds, label=label)
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title(dataset)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Study]:
    d = Study()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--datasets", default=",".join(d.datasets), help="synthetic,gsm8k")
    ap.add_argument("--seeds", type=int, default=d.seeds)
    ap.add_argument("--steps", type=int, default=d.steps, help="GRPO steps of every run")
    ap.add_argument("--prompts", type=int, default=d.prompts, help="prompts per step")
    ap.add_argument("--generations", type=int, default=d.generations)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--sft-steps", type=int, default=d.sft_steps, help="shared warm-up (0 = none)")
    ap.add_argument("--eval-limit", type=int, default=d.eval_limit, help="held-out problems")
    ap.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens)
    ap.add_argument("--verifier-backbone", default=d.verifier_backbone)
    ap.add_argument(
        "--ablate",
        choices=ABLATE,
        default=d.ablate,
        help="full-<x> removes a family of parts (default, ~1 h) or each part alone (~3 h)",
    )
    ap.add_argument("--configs", default="", help="comma list (default: all); e.g. plain,full")
    ap.add_argument("--jobs", type=int, default=d.jobs, help="runs at once (threads split)")
    ap.add_argument(
        "--max-minutes", type=float, default=55.0, help="start no run after this (0 = no limit)"
    )
    ap.add_argument("--out-dir", type=Path, default=Path("runs/ablation"), help="run folders")
    ap.add_argument("--results", type=Path, help="results stem (default benchmarks/results/...)")
    ap.add_argument(
        "--keep-checkpoints", action="store_true", help="keep each run's final checkpoint"
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="rerun every run (default: runs finished with the same settings are reused)",
    )
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny-random, 1 seed, 1 step, plain and full, synthetic only",
    )
    args = ap.parse_args(argv)
    st = Study(
        model=args.model,
        datasets=tuple(x for x in args.datasets.split(",") if x),
        seeds=args.seeds,
        steps=args.steps,
        prompts=args.prompts,
        generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr,
        sft_steps=args.sft_steps,
        eval_limit=args.eval_limit,
        eval_max_new_tokens=args.eval_max_new_tokens,
        verifier_backbone=args.verifier_backbone,
        jobs=args.jobs,
        ablate=args.ablate,
        configs=tuple(x for x in args.configs.split(",") if x),
    )
    if args.quick:
        st = Study(
            model="tiny-random",
            datasets=("synthetic",),
            seeds=1,
            steps=1,
            prompts=2,
            generations=2,
            max_new_tokens=12,
            sft_steps=1,
            sft_batch_size=2,
            eval_limit=2,
            eval_max_new_tokens=8,
            verifier_backbone="hashing",
            jobs=1,
            configs=st.configs or ("plain", "full"),
        )
    return args, st


def main(argv: list[str] | None = None) -> int:
    args, st = parse_args(argv)
    parts = parts_for(st.max_new_tokens)
    configs = list(st.configs) or config_names(parts, st.ablate)
    for c in configs:
        active_parts(c, parts)  # fail early on a typo
    if args.list:
        for c in configs:
            on = [p.name for p in active_parts(c, parts)]
            print(f"{c:24s} {', '.join(on) or '(GRPO only)'}")
        return 0
    started = time.time()
    deadline = started + 60 * args.max_minutes if args.max_minutes else None
    root = args.out_dir.resolve()
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, st.jobs))
    print(
        f"ablation: {len(configs)} configurations x {len(st.datasets)} datasets x {st.seeds} "
        f"seeds = {len(configs) * len(st.datasets) * st.seeds} runs of {st.steps} steps; "
        f"{st.jobs} at a time, {threads} thread(s) each",
        flush=True,
    )

    schemas = sorted({schema_of(active_parts(c, parts)) for c in configs})
    models = {s: st.model for s in schemas}
    if st.sft_steps > 0:
        warm = warmup_tasks(st, schemas, root, threads)
        todo = [t for t in warm.values() if not (Path(t.spec["export"]) / "config.json").is_file()]
        run_tasks(todo, st.jobs, None, "warm-up")
        for schema, t in warm.items():
            if t.error:
                print(f"warm-up for schema {schema} failed; stopping", file=sys.stderr)
                return 1
            models[schema] = t.spec["export"]

    baselines = []
    for seed in range(st.seeds):
        for dataset in st.datasets:
            for schema in schemas:
                overrides = common_overrides(st, models[schema], dataset, seed, threads)
                overrides.append(f"rewards.schema={schema}")
                path = root / "baseline" / f"{dataset}-{schema}-seed{seed}.json"
                key = {"dataset": dataset, "schema": schema, "seed": seed}
                baselines.append(Task("baseline", key, {"overrides": overrides, "path": str(path)}))
    run_tasks(baselines, st.jobs, deadline, "warm-up only")
    before = {
        (t.key["dataset"], t.key["schema"], t.key["seed"]): t.result["path"]
        for t in baselines
        if t.result
    }

    runs = []
    for seed in range(st.seeds):  # seed by seed: a time cut leaves every config equal seeds
        for dataset in st.datasets:
            for config in configs:
                schema = schema_of(active_parts(config, parts))
                overrides = run_overrides(st, config, models[schema], dataset, seed, threads)
                key = {"config": config, "dataset": dataset, "seed": seed}
                spec = {
                    "overrides": overrides,
                    "run_dir": str(root / "runs" / f"{config}-{dataset}-seed{seed}"),
                    "eval_before": before.get((dataset, schema, seed)),
                    "keep_checkpoints": args.keep_checkpoints,
                }
                runs.append(Task("run", key, spec))
    run_tasks(runs, st.jobs, deadline, "run", reuse=not args.fresh)

    skipped = sum(t.skipped for t in runs + baselines)
    failed = sum(t.error is not None for t in runs)
    note = ""
    if skipped:
        note = (
            f"**Partial:** the {args.max_minutes:g}-minute budget ran out; {skipped} runs were "
            "not started (the seeds column says how many each row has)."
        )
    summary = summarize(runs, baselines, configs)
    text = markdown(summary, st, note)
    print("\n" + text, flush=True)
    default_stem = {"family": "ablation", "part": "ablation-parts"}[st.ablate]
    if args.quick:
        default_stem = "ablation-quick"
    stem = args.results or RESULTS_DIR / default_stem
    title = (
        f"{st.model}: {st.steps} GRPO steps of {st.prompts}x{st.generations}, "
        f"{st.seeds} seed(s); mean ± std over seeds"
    )
    png = plot(summary, stem.with_suffix(".png"), title)
    stem.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    save_json(
        stem.with_suffix(".json"),
        {
            "benchmark": "ablation",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": time.time() - started,
            "study": asdict(st),
            "configurations": {c: [p.name for p in active_parts(c, parts)] for c in configs},
            "parts": {p.name: p.help for p in parts},
            "machine": machine_info(),
            "summary": summary,
            "runs": [asdict(t) for t in runs],
            "baselines": [asdict(t) for t in baselines],
            "skipped": skipped,
            "failed": failed,
        },
    )
    print(f"\nsaved {stem.with_suffix('.json')}, {stem.with_suffix('.md')}, {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        spec = json.loads(sys.argv[2])
        emit_result(CHILDREN[spec["kind"]](spec))
    else:
        sys.exit(main())
