"""DeepSynapse against TRL's GRPOTrainer: step time, throughput and peak memory at equal settings.

    python benchmarks/vs_trl.py                       # SmolLM2-135M-Instruct, 3 steps x 2 repeats
    python benchmarks/vs_trl.py --model tiny-random   # the tiny random model (overheads only)
    python benchmarks/vs_trl.py --quick               # smoke check: tiny model, 1 step, 32 tokens
    python benchmarks/vs_trl.py --profile             # where DeepSynapse's step spends its time
    python benchmarks/vs_trl.py --backend vllm --deepsynapse-python .venv-vllm/bin/python
                                                      # DeepSynapse sampling through vLLM

Both trainers run plain GRPO with the same settings: the same model object (loaded by
``deepsynapse.models.loading``), the same GSM8K training questions behind the same system
prompt (``deepsynapse.prompting.build_prompt``), G generations per prompt, prompts per step,
completion budget, temperature 1.0 without top-k or top-p, LoRA r=16 alpha=32 on every linear
layer, KL coefficient (reference = adapters off, in both), learning rate (constant, AdamW
betas 0.9/0.99), clipping 0.2/0.28, token-level loss (DAPO), group-normalised advantages,
the same reward functions with the same weights (DeepSynapse's ``correctness``,
``strict_format`` and ``soft_format``, which TRL calls unchanged), seed, steps, one
optimizer step per generated batch, no gradient checkpointing, bf16 compute where the CPU's
bf16 matmuls measure faster than fp32 (DeepSynapse: ``model.dtype=auto``; TRL follows its
pick: ``bf16=True, use_cpu=True``).

What stays different, by design: DeepSynapse stops a completion at ``</answer>`` (TRL at EOS
only), so compare completion tokens per second as well as steps per second; each draws the
same set of questions in its own seeded order.

DeepSynapse's child runs on the C allocator its command line picks (tcmalloc where installed,
``deepsynapse.allocator``), TRL's on what the environment gives it (glibc unless you preload
another: ``LD_PRELOAD=... python benchmarks/vs_trl.py --only trl``); each result names it.

Each run is a fresh child process (peak RSS is the child's own ``ru_maxrss``), alternating
TRL, DeepSynapse, TRL, DeepSynapse... The summary uses the warm steps (all but each run's
first, when there are several). Results go to ``benchmarks/results/vs_trl-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    RESULTS_DIR,
    ChildFailed,
    emit_result,
    fmt,
    machine_info,
    markdown_table,
    median,
    peak_rss_mb,
    run_child,
    save_json,
    write_gsm8k_jsonl,
)

REWARD_WEIGHTS = {"correctness": 1.0, "strict_format": 0.5, "soft_format": 0.5}
TRAINERS = ("trl", "deepsynapse")


@dataclass(frozen=True)
class Settings:
    """The shared settings of both trainers (one benchmark run)."""

    model: str = "smollm2-135m-instruct"
    steps: int = 3
    repeats: int = 2
    prompts: int = 4  # prompts per optimizer step
    generations: int = 4  # G
    max_new_tokens: int = 128
    beta: float = 0.04
    lr: float = 1e-5
    seed: int = 0
    temperature: float = 1.0
    lora_r: int = 16
    lora_alpha: float = 32.0
    threads: int = 0  # 0 = torch's default (all cores)
    dtype: str = "auto"  # auto = bf16 where it measures faster than fp32 here
    trl_weights: str = "same"  # TRL's base weights: 'same' dtype as DeepSynapse, or 'fp32'
    trl_gradient_checkpointing: bool = False
    backend: str = "ours"  # DeepSynapse's rollout.backend (vllm needs --deepsynapse-python)
    deepsynapse_set: tuple[str, ...] = ()  # DeepSynapse overrides on top (an A/B of a setting)


def trl_available() -> tuple[bool, str]:
    try:
        import trl  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as exc:  # ImportError, or an incompatible transformers
        return False, f"trl is not importable ({type(exc).__name__}: {exc})"
    return True, f"trl {trl.__version__}"


# ------------------------------------------------------------------ children


def _setup_threads(s: Settings) -> None:
    import torch

    if s.threads:
        torch.set_num_threads(s.threads)


def child_trl(s: Settings, data: str, work: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer on the shared model, prompts and rewards; per-step wall times."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from deepsynapse.data.gsm8k import load_gsm8k
    from deepsynapse.formats import BASE_SCHEMA
    from deepsynapse.models.loading import load_model, load_tokenizer, resolve_dtype
    from deepsynapse.prompting import build_prompt
    from deepsynapse.rewards.base import correctness, soft_format, strict_format

    _setup_threads(s)
    t0 = time.perf_counter()
    choice = resolve_dtype(s.dtype)
    bf16 = choice.dtype == torch.bfloat16
    tok = load_tokenizer(s.model)
    weights_dtype = choice.dtype if s.trl_weights == "same" else torch.float32
    model = load_model(s.model, weights_dtype, tok)
    problems, _ = load_gsm8k(data, "train")
    dataset = Dataset.from_dict(
        {
            "prompt": [build_prompt(tok, p.question, BASE_SCHEMA) for p in problems],
            "answer": [p.answer for p in problems],  # passed to the rewards as answer=[...]
        }
    )
    n = s.prompts * s.generations
    config = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=n,  # completions per step: P prompts x G
        gradient_accumulation_steps=1,
        num_generations=s.generations,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        top_p=1.0,
        top_k=0,
        beta=s.beta,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        reward_weights=[REWARD_WEIGHTS[f.name] for f in (correctness, strict_format, soft_format)],
        max_steps=s.steps,
        seed=s.seed,
        data_seed=s.seed,
        shuffle_dataset=False,
        bf16=bf16,
        use_cpu=True,
        gradient_checkpointing=s.trl_gradient_checkpointing,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )

    rows: list[dict[str, Any]] = []
    gen_seconds = [0.0]

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step (generation, rewards, loss, backward, step)."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            gen_seconds[0] = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            rows.append(
                {
                    "step": state.global_step,
                    "wall_s": time.perf_counter() - self.start,
                    "generation_s": gen_seconds[0],
                }
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            if rows and logs and "completions/mean_length" in logs:
                rows[-1]["completion_tokens"] = float(logs["completions/mean_length"]) * n
                rows[-1]["reward_mean"] = logs.get("reward")
                rows[-1]["frac_reward_zero_std"] = logs.get("frac_reward_zero_std")

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[correctness, strict_format, soft_format],
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[StepClock()],
    )
    generate = trainer._generate_single_turn  # timed to split generation from training

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            gen_seconds[0] += time.perf_counter() - start

    trainer._generate_single_turn = timed_generate
    setup = time.perf_counter() - t0
    trainer.train()
    return {
        "trainer": "trl",
        "setup_s": setup,
        "steps": rows,
        "peak_rss_mb": peak_rss_mb(),
        "dtype": str(choice.dtype),
        "weights_dtype": str(weights_dtype),
    }


def deepsynapse_overrides(s: Settings, data: str, out: Path) -> list[str]:
    """Plain GRPO: every DeepSynapse extra at its default, which is off."""
    weights = ", ".join(f"{k}: {v}" for k, v in REWARD_WEIGHTS.items())
    return [
        f"model.name={s.model}",
        f"model.dtype={s.dtype}",
        f"lora.r={s.lora_r}",
        f"lora.alpha={s.lora_alpha}",
        f"data.train={data}",
        f"rollout.num_generations={s.generations}",
        f"rollout.max_new_tokens={s.max_new_tokens}",
        f"rollout.temperature={s.temperature}",
        f"rollout.backend={s.backend}",
        f"grpo.prompts_per_step={s.prompts}",
        f"grpo.micro_batch_size={s.prompts * s.generations}",
        f"grpo.beta={s.beta}",
        f"optim.lr={s.lr}",
        "optim.betas=[0.9, 0.99]",
        f"train.steps={s.steps}",
        f"train.seed={s.seed}",
        f"train.threads={s.threads}",
        f"train.output_dir={out}",
        "train.save_every=0",
        "train.report=false",
        "train.log_samples_every=0",
        "sft.steps=0",
        "eval.limit=0",
        "rewards.weights={" + weights + "}",
        *s.deepsynapse_set,
    ]


def child_deepsynapse(s: Settings, data: str, work: Path, profile: bool = False) -> dict[str, Any]:
    """DeepSynapse's Trainer in plain GRPO mode, stepping ``train_step`` under our own clock."""
    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer

    _setup_threads(s)
    t0 = time.perf_counter()
    cfg = load_config(None, deepsynapse_overrides(s, data, work))
    trainer = Trainer(cfg, run_dir=work / "deepsynapse", progress=False)
    extras = {
        "controllers": [c.name for c in trainer.controllers],
        "hypernet": cfg.hypernet.enabled,
        "memory": cfg.memory.enabled,
        "allocator": cfg.rewards.allocator,
        "calibration": cfg.rewards.calibration,
    }
    adaptive = [c for c in extras["controllers"] if c != "allocator"]  # static: fixed weights
    if adaptive or cfg.rewards.allocator != "static" or cfg.hypernet.enabled or cfg.memory.enabled:
        raise RuntimeError(f"plain GRPO expected, but extras are on: {extras}")
    setup = time.perf_counter() - t0
    n = s.prompts * s.generations
    rows: list[dict[str, Any]] = []
    profiled = None
    for step in range(s.steps):
        start = time.perf_counter()
        if profile and step == s.steps - 1:
            metrics, profiled = _profiled_step(trainer, step)
        else:
            metrics = trainer.train_step(step)
        trainer.step = step + 1
        rows.append(
            {
                "step": step + 1,
                "wall_s": time.perf_counter() - start,
                "generation_s": metrics.get("timing/generate"),
                "completion_tokens": metrics["completion/length_mean"] * n,
                "reward_mean": metrics.get("reward/fused/mean"),
                "timing": {k: v for k, v in metrics.items() if k.startswith("timing/")},
            }
        )
    result = {
        "trainer": "deepsynapse",
        "setup_s": setup,
        "steps": rows,
        "peak_rss_mb": peak_rss_mb(),
        "dtype": str(trainer.dtype_choice.dtype),
        "dtype_reason": trainer.dtype_choice.reason,
        "plain_mode": extras,
        "backend": "vllm" if trainer.vllm is not None else "ours",
        "backend_note": trainer.rollout_note,
    }
    if profiled is not None:
        result["profile"] = profiled
    return result


def _profiled_step(trainer, step: int) -> tuple[dict[str, float], dict[str, Any]]:
    """One step under the torch profiler: the top operators by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        metrics = trainer.train_step(step)
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    return metrics, {
        "table": table,
        "top_ops": [
            {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top
        ],
    }


def child_main(spec: dict[str, Any]) -> None:
    from deepsynapse.allocator import active_allocator, reexec_with_allocator

    s = Settings(**spec["settings"])
    work = Path(spec["work"])
    if spec["trainer"] == "trl":
        result = child_trl(s, spec["data"], work)
    else:  # as `deepsynapse train` runs: on tcmalloc where the machine has it
        reexec_with_allocator()
        result = child_deepsynapse(s, spec["data"], work, profile=spec.get("profile", False))
    result["allocator"] = active_allocator()  # TRL: whatever the user's environment gives it
    emit_result(result)


# ------------------------------------------------------------------ parent


def pick_questions(s: Settings, work: Path) -> Path:
    """The GSM8K training questions of the whole run (prompts x steps), seeded."""
    from deepsynapse.data.gsm8k import load_gsm8k

    problems, _ = load_gsm8k("gsm8k", "train")
    chosen = random.Random(s.seed).sample(problems, s.prompts * s.steps)
    return write_gsm8k_jsonl(chosen, work / "train.jsonl")


def warm(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps after the first (compilation, caches, allocator warm-up), when there are any."""
    return rows[1:] if len(rows) > 1 else rows


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in TRAINERS:
        mine = [r for r in runs if r["trainer"] == name]
        if not mine:
            continue
        steps = [row for r in mine for row in warm(r["steps"])]
        step_s = median([row["wall_s"] for row in steps])
        tokens = [row.get("completion_tokens") for row in steps]
        tps = [t / row["wall_s"] for t, row in zip(tokens, steps, strict=True) if t is not None]
        gen = [
            t / row["generation_s"]
            for t, row in zip(tokens, steps, strict=True)
            if t is not None and row.get("generation_s")
        ]
        out[name] = {
            "runs": len(mine),
            "warm_steps": len(steps),
            "median_step_s": step_s,
            "steps_per_s": 1.0 / step_s if step_s else None,
            "median_completion_tokens": median([t for t in tokens if t is not None]),
            "completion_tokens_per_s": median(tps),
            "generation_tokens_per_s": median(gen),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "median_setup_s": median([r["setup_s"] for r in mine]),
        }
    ratios: dict[str, float | None] = {}
    if all(n in out for n in TRAINERS):
        ds, trl = out["deepsynapse"], out["trl"]

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a and b else None

        ratios = {
            "steps_per_s": ratio(ds["steps_per_s"], trl["steps_per_s"]),
            "completion_tokens_per_s": ratio(
                ds["completion_tokens_per_s"], trl["completion_tokens_per_s"]
            ),
            "peak_rss": ratio(ds["peak_rss_mb"], trl["peak_rss_mb"]),
        }
    out["ratio_deepsynapse_over_trl"] = ratios
    return out


def print_tables(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    rows = []
    for r in runs:
        for row in r["steps"]:
            tokens = row.get("completion_tokens")
            gen = row.get("generation_s")
            rows.append(
                [
                    r["trainer"],
                    r["repeat"],
                    row["step"],
                    fmt(row["wall_s"]),
                    fmt(tokens, 0),
                    fmt(tokens / row["wall_s"] if tokens is not None else None, 1),
                    fmt(gen),
                    fmt(tokens / gen if tokens is not None and gen else None, 1),
                    fmt(r["peak_rss_mb"], 0),
                ]
            )
    per_step = markdown_table(
        [
            "trainer",
            "repeat",
            "step",
            "wall s",
            "completion tokens",
            "tokens/s",
            "generation s",
            "gen tokens/s",
            "peak RSS MB",
        ],
        rows,
    )
    totals = markdown_table(
        [
            "trainer",
            "median step s",
            "steps/s",
            "completion tokens/s",
            "gen tokens/s",
            "peak RSS MB",
            "setup s",
        ],
        [
            [
                name,
                fmt(v["median_step_s"]),
                fmt(v["steps_per_s"], 4),
                fmt(v["completion_tokens_per_s"], 1),
                fmt(v["generation_tokens_per_s"], 1),
                fmt(v["peak_rss_mb"], 0),
                fmt(v["median_setup_s"], 1),
            ]
            for name, v in summary.items()
            if name in TRAINERS
        ],
    )
    ratios = summary["ratio_deepsynapse_over_trl"]
    ratio_line = (
        "DeepSynapse / TRL: "
        f"steps/s x{fmt(ratios.get('steps_per_s'))}, "
        f"completion tokens/s x{fmt(ratios.get('completion_tokens_per_s'))}, "
        f"peak RSS x{fmt(ratios.get('peak_rss'))} (lower is better)"
        if ratios
        else "DeepSynapse / TRL: n/a (only one trainer ran)"
    )
    text = f"{per_step}\n\n{totals}\n\n{ratio_line}"
    print(text, flush=True)
    return text


def print_profile(result: dict[str, Any]) -> None:
    print("\nDeepSynapse, where the time goes (timing/* of each step, seconds):")
    for row in result["steps"]:
        wall = row["wall_s"]
        phases = ", ".join(
            f"{k[len('timing/') :]} {v:.2f} ({100 * v / wall:.0f}%)"
            for k, v in sorted(row["timing"].items())
            if k != "timing/step"
        )
        print(f"  step {row['step']}: wall {wall:.2f}; {phases}")
    prof = result.get("profile")
    if prof:
        print("\nTop operators of the last step by own CPU time (torch.profiler):")
        print(prof["table"])


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Settings()
    ap.add_argument("--model", default=d.model, help="smollm2-135m-instruct or tiny-random")
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="runs of each trainer")
    ap.add_argument("--prompts", type=int, default=d.prompts, help="prompts per step")
    ap.add_argument("--generations", type=int, default=d.generations, help="G per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--beta", type=float, default=d.beta, help="KL coefficient")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = all)")
    ap.add_argument("--dtype", default=d.dtype, choices=["auto", "bf16", "fp32"])
    ap.add_argument(
        "--trl-weights",
        default=d.trl_weights,
        choices=["same", "fp32"],
        help="TRL's base weights: the same dtype as DeepSynapse (default) or fp32 + autocast",
    )
    ap.add_argument("--trl-gradient-checkpointing", action="store_true")
    ap.add_argument(
        "--backend",
        default=d.backend,
        choices=["ours", "vllm", "auto"],
        help="DeepSynapse's rollout.backend (TRL samples with model.generate either way)",
    )
    ap.add_argument(
        "--deepsynapse-python",
        help="interpreter of DeepSynapse's runs, e.g. .venv-vllm/bin/python for --backend vllm "
        "(vLLM pins its own transformers, so it lives in its own venv)",
    )
    ap.add_argument(
        "--deepsynapse-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a DeepSynapse config override on top of the shared settings (repeatable), "
        "e.g. train.trim_memory=false",
    )
    ap.add_argument("--quick", action="store_true", help="tiny-random, 1 step, 1 repeat, 32 tokens")
    ap.add_argument(
        "--profile", action="store_true", help="profile DeepSynapse's last step; TRL not run"
    )
    ap.add_argument("--only", choices=TRAINERS, help="run one trainer only")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/...)")
    ap.add_argument("--timeout", type=float, default=3000.0, help="seconds per child run")
    args = ap.parse_args(argv)
    s = Settings(
        model=args.model,
        steps=args.steps,
        repeats=args.repeats,
        prompts=args.prompts,
        generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        beta=args.beta,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        dtype=args.dtype,
        trl_weights=args.trl_weights,
        trl_gradient_checkpointing=args.trl_gradient_checkpointing,
        backend=args.backend,
        deepsynapse_set=tuple(args.deepsynapse_set),
    )
    if args.quick:
        s = Settings(
            **{**asdict(s), "model": "tiny-random", "steps": 1, "repeats": 1, "max_new_tokens": 32}
        )
    if args.profile:
        s = Settings(**{**asdict(s), "repeats": 1, "steps": max(s.steps, 2)})
    return args, s


def main(argv: list[str] | None = None) -> int:
    args, s = parse_args(argv)
    script = Path(__file__).resolve()
    ok, why = trl_available()
    trainers = [args.only] if args.only else list(TRAINERS)
    if args.profile:
        trainers = ["deepsynapse"]
    if "trl" in trainers and not ok:
        print(f"TRL skipped: {why}. Install it with: pip install --no-deps 'trl>=1.16'")
        trainers.remove("trl")
    print(f"settings: {json.dumps(asdict(s))}", flush=True)
    started = time.time()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        data = str(pick_questions(s, Path(tmp)))
        for repeat in range(s.repeats):
            for name in trainers:  # alternating: TRL, DS, TRL, DS...
                work = Path(tmp) / f"{name}-{repeat}"
                spec = {
                    "trainer": name,
                    "settings": asdict(s),
                    "data": data,
                    "work": str(work),
                    "profile": args.profile,
                }
                print(f"[{time.strftime('%H:%M:%S')}] {name} run {repeat + 1}", flush=True)
                try:
                    python = args.deepsynapse_python if name == "deepsynapse" else None
                    result = run_child(script, spec, timeout=args.timeout, python=python)
                except ChildFailed as exc:
                    print(f"{name} run {repeat + 1} failed: {exc}", file=sys.stderr)
                    return 1
                result["repeat"] = repeat + 1
                if result.get("backend_note"):
                    print(f"    {result['backend_note']}", flush=True)
                runs.append(result)
    summary = summarize(runs)
    table = print_tables(runs, summary)
    if args.profile:
        print_profile(runs[-1])
    suffix = "-quick" if args.quick else "-profile" if args.profile else ""
    suffix += "" if s.backend == "ours" else f"-{s.backend}"
    out = args.out or RESULTS_DIR / f"vs_trl-{s.model}{suffix}.json"
    save_json(
        out,
        {
            "benchmark": "vs_trl",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": time.time() - started,
            "settings": asdict(s),
            "trl": why,
            "machine": machine_info(),
            "runs": runs,
            "summary": summary,
            "table": table,
        },
    )
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        child_main(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
