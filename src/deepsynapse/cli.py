"""The ``deepsynapse`` command: train, eval, export, generate, chat.

Bad input (config keys, data rows, model names, checkpoints) ends with a one-line error that
names what was wrong and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/demo-cpu.yaml"  # shown in --help; config.default_config_path finds it
DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_HELP = (
    f"base model: alias, folder, .gguf or hub id (default {DEFAULT_MODEL}); a run or "
    "checkpoint given here or as --adapter uses the base its config.yaml names"
)
ADAPTER_HELP = (
    "a run folder or checkpoint (loaded as trained: module scales, hypernetwork per prompt, "
    "neural memory), or a plain PEFT adapter folder for --model"
)
SCHEMA_HELP = "XML schema of the prompt and parser (default: the run's, else base)"
DTYPE_HELP = "base model dtype (auto: a run's model.dtype, else bf16 where it measures faster)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepsynapse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="GRPO training from a YAML recipe plus key=value overrides"
    )
    train.add_argument("overrides", nargs="*", help="config overrides such as grpo.beta=0.02")
    train.add_argument("--config", "-c", help=f"YAML recipe (default: {DEFAULT_CONFIG})")
    train.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its newest complete checkpoint (RUN_DIR, or train.run_name)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    ev = sub.add_parser("eval", help="accuracy and format validity on held-out GSM8K")
    ev.add_argument("--model", default=None, help=MODEL_HELP)
    ev.add_argument("--adapter", help=ADAPTER_HELP)
    ev.add_argument(
        "--data",
        default="gsm8k",
        help="gsm8k, svamp (packaged outside set), a .jsonl file, a hub id or synthetic",
    )
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=int, default=0, help="first N problems (0 = all)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--schema", choices=["base", "deepsynapse"], help=SCHEMA_HELP)
    ev.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help=DTYPE_HELP)
    ev.add_argument("--checkpoint", help="step-N of a run (default: the newest complete one)")
    ev.add_argument("--output", "-o", help="write the JSON result (with every completion) here")
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument(
        "--mode",
        default="greedy",
        choices=["greedy", "majority", "best_of_n"],
        help="greedy: one completion; majority: vote of k samples; best_of_n: a judge picks 1 of k",
    )
    ev.add_argument("--k", type=int, default=8, help="samples per problem (majority, best_of_n)")
    ev.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (k > 1)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "ours", "vllm"],
        help="who decodes: auto = vLLM where it is installed and can serve the model (no "
        "hypernetwork or memory), else our decoder; the result's 'backend' says which ran",
    )
    ev.add_argument(
        "--verifier", help="run folder or checkpoint whose learned verifier judges best_of_n"
    )

    rep = sub.add_parser("report", help="write RUN_DIR/report.html with its PNG plots")
    rep.add_argument("run_dir")

    cmp_ = sub.add_parser("compare", help="table of two eval result files (base vs trained)")
    cmp_.add_argument("a")
    cmp_.add_argument("b")

    pr = sub.add_parser("probe", help="the emergent-skill probe suite on a model or checkpoint")
    pr.add_argument("--model", default=None, help=MODEL_HELP)
    pr.add_argument("--adapter", help=ADAPTER_HELP)
    pr.add_argument("--checkpoint", help="step-N of a run (default: the newest complete one)")
    pr.add_argument("--seed", type=int, default=1234)
    pr.add_argument("--per-skill", type=int, default=8)
    pr.add_argument("--schema", choices=["base", "deepsynapse"], help=SCHEMA_HELP)
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--max-new-tokens", type=int, default=200)
    pr.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help=DTYPE_HELP)
    pr.add_argument("--output", "-o")
    add_export_parser(sub)
    add_generate_parser(sub)
    add_chat_parser(sub)
    return parser


def add_export_parser(sub) -> None:
    ex = sub.add_parser(
        "export", help="a run as a PEFT adapter, a merged transformers folder or a GGUF file"
    )
    ex.add_argument("run_dir", metavar="RUN_DIR", help="run folder (holds config.yaml)")
    ex.add_argument(
        "--format", "-f", default="merged", choices=["peft", "merged", "gguf"], dest="fmt"
    )
    ex.add_argument(
        "--out", "-o", help="output folder, empty or absent (default RUN_DIR/export-FORMAT)"
    )
    ex.add_argument("--checkpoint", help="step-N (default: the newest complete checkpoint)")
    ex.add_argument(
        "--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="merged weights dtype"
    )
    ex.add_argument(
        "--gguf-type", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="GGUF tensors"
    )
    ex.add_argument(
        "--eval-limit",
        type=int,
        help="runs with the hypernetwork: eval prompts its mean scales are taken over, and "
        "on which baked and per-input accuracy are compared (default: the run's eval.limit)",
    )


def _add_model_arguments(p) -> None:
    p.add_argument(
        "model",
        metavar="MODEL_OR_RUN",
        help="run folder, checkpoint, exported folder or .gguf, alias, model folder or hub id",
    )
    p.add_argument("--checkpoint", help="step-N of a run (default: the newest)")
    p.add_argument(
        "--schema",
        choices=["base", "deepsynapse"],
        help="XML schema (default: the run's, else base)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])


def add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="answer one question; print the parsed XML fields")
    _add_model_arguments(gen)
    gen.add_argument("question", help="the math word problem")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")


def add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="interactive loop: one question per line, exit to quit")
    _add_model_arguments(chat)


def cmd_train(args: argparse.Namespace) -> int:
    from deepsynapse.config import default_config_path, load_config
    from deepsynapse.rl.setup import end_processes
    from deepsynapse.rl.trainer import Trainer, find_run_dir

    run_dir = None
    if args.resume is not None:
        if args.resume:
            run_dir = find_run_dir(args.resume)
            cfg = load_config(args.config or run_dir / "config.yaml", args.overrides)
        else:
            cfg = load_config(args.config or default_config_path(), args.overrides)
            if not cfg.train.run_name:
                raise SystemExit(_fail("--resume without RUN_DIR needs train.run_name=NAME"))
    else:
        cfg = load_config(args.config or default_config_path(), args.overrides)
    trainer = Trainer(cfg, run_dir=run_dir, progress=not args.quiet)
    freeze_long_lived_objects()
    summary = trainer.train(resume=args.resume is not None)
    if trainer.accelerator.is_main_process:
        print(format_summary(summary))
    end_processes()
    return 0


def freeze_long_lived_objects() -> None:
    """Move what the process holds before training (modules, the trainer) out of the
    collector's sight. Why: every checkpoint runs a full collection (rl/state.py) and
    Python runs its own now and then; each walked the ~370,000 objects that imports
    leave, ~0.25 s each time (AVX512-BF16 EPYC). Only here, in a process that trains once
    and exits: in a notebook, a frozen cycle (an old trainer) would never be freed."""
    import gc

    gc.collect()
    gc.freeze()


def format_summary(summary: dict) -> str:
    lines = [
        f"run: {summary['run_dir']}  ({summary['steps']} GRPO steps, {summary.get('mean_step_seconds') or 0:.1f} s/step)"
    ]
    k = summary["window"]
    lines.append(f"{'metric':32s} {'first ' + str(k):>10s} {'last ' + str(k):>10s}")
    for key, first in summary["first_steps"].items():
        last = summary["last_steps"].get(key)
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{key:32s} {fmt(first):>10s} {fmt(last):>10s}")
    lines += format_held_out(summary)
    if summary.get("phases"):
        passed = " -> ".join(
            f"{p['phase']} (step {p['from_step']}, {p['why']})" for p in summary["phases"]
        )
        lines.append(f"curriculum: {passed}")
    return "\n".join(lines)


def format_held_out(summary: dict) -> list[str]:
    """Held-out accuracy at each evaluation, and each paired gain with its 95% interval."""
    from deepsynapse.eval.stats import format_interval

    stages = [
        (name, summary.get(f"eval_{tag}"))
        for name, tag in (("before", "before"), ("after warm-up", "after_sft"), ("after", "after"))
    ]
    stages = [(name, r) for name, r in stages if r]
    if not stages:
        return []
    lines = [f"held-out ({stages[-1][1]['n']} problems)" + "".join(f"{n:>16s}" for n, _ in stages)]
    for key in ("accuracy", "lenient_accuracy", "format_validity", "mean_length"):
        cells = ["n/a" if r.get(key) is None else f"{r[key]:.3f}" for _, r in stages]
        lines.append(f"  {key:28s}" + "".join(f"{c:>16s}" for c in cells))
    labels = {"run": "whole run", "warmup": "SFT warm-up", "grpo": "GRPO"}
    for name, gain in (summary.get("gains") or {}).items():
        for kind in ("strict", "lenient"):
            c = gain[kind]
            lines.append(
                f"  {labels.get(name, name) + ' gave (' + kind + ')':28s} "
                f"{format_interval(c['delta'], c['delta_ci'])}  "
                f"({c['fixed']} fixed, {c['broken']} broken, McNemar p={c['p_value']:.2g})"
            )
    return lines


def _load_for_eval(args: argparse.Namespace):
    """The model eval and probe run: a run or checkpoint as it trained, else base (+ adapter).

    A run folder, ``checkpoints/step-N`` or its ``adapter`` folder (as ``--adapter`` or as
    ``--model``) goes through the one loader of trained policies
    (``deepsynapse.models.trained``), never as its raw PEFT adapter: module scales, the
    hypernetwork's per-prompt scales and the neural memory are part of the trained function.
    Returns the API's ``Loaded`` (model, tokenizer, schema, around, pad_multiple).
    """
    import torch

    from deepsynapse.api import Loaded, open_model
    from deepsynapse.models import trained as trained_module
    from deepsynapse.models.loading import load_model, load_tokenizer, resolve_dtype

    for source, as_adapter in ((args.adapter, True), (args.model, False)):
        located = trained_module.locate_run(source) if source else None
        if located is None:
            continue
        run_dir, named = located
        device = "cuda" if torch.cuda.is_available() else "cpu"
        trained = trained_module.load_trained_policy(
            run_dir, args.checkpoint or named, device=device, dtype=args.dtype
        )
        base = trained.config.model.name
        if as_adapter and args.model and args.model != base:
            print(
                f"deepsynapse: note: {run_dir} was trained on '{base}' (its config.yaml); "
                f"evaluating it on that base, not on --model {args.model}",
                file=sys.stderr,
            )
        args.model = base
        return Loaded.of_trained(trained)
    args.model = args.model or DEFAULT_MODEL
    if args.adapter is None:
        return open_model(args.model, dtype=args.dtype)
    from peft import PeftModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, resolve_dtype(args.dtype, device).dtype, tokenizer)
    model = PeftModel.from_pretrained(model, str(resolve_adapter(args.adapter))).to(device)
    model.eval()
    return Loaded(model, tokenizer, None)


def _eval_engine(backend: str, loaded, seed: int):
    """vLLM's engine holding the loaded model's weights (LoRA folded in), or None for our
    decoder: with ``auto`` silently where vLLM is missing or cannot serve the model, with
    ``vllm`` saying why on stderr."""
    if backend == "ours":
        return None
    from deepsynapse.config import RolloutConfig
    from deepsynapse.rollout.vllm import build_vllm_rollout

    defaults = RolloutConfig()
    engine, note = build_vllm_rollout(
        loaded.model,
        loaded.tokenizer,
        asked=backend,
        world_size=1,
        kv_cache_gb=defaults.vllm_kv_cache_gb,
        max_model_len=defaults.vllm_max_model_len,
        seed=seed,
    )
    if engine is not None or backend == "vllm":
        print(f"deepsynapse: {note}", file=sys.stderr)
    return engine


def _judge(args: argparse.Namespace, schema):
    """best_of_n's judge: a run's learned verifier, else the completions' own confidence."""
    from functools import partial

    from deepsynapse.eval.harness import confidence_select

    if not args.verifier:
        return partial(confidence_select, schema=schema)
    from deepsynapse.checkpoint import latest_checkpoint, load_tree
    from deepsynapse.rewards.verifier import Verifier, make_verifier_select

    folder = Path(args.verifier)
    ckpt = (
        folder
        if (folder / "trainer_state.json").is_file()
        else latest_checkpoint(folder / "checkpoints")
    )
    if ckpt is None:
        raise FileNotFoundError(f"{folder}: no checkpoint with a verifier")
    state = load_tree(ckpt, "trainer_state")
    if "verifier" not in state.get("rewards", {}):
        raise FileNotFoundError(f"{ckpt}: this run trained no verifier (rewards.weights.verifier)")
    config = state["config"]["rewards"]
    verifier = Verifier(config.get("verifier_backbone", "auto"))
    verifier.load_state_dict(state["rewards"]["verifier"])
    return make_verifier_select(verifier, schema)


def cmd_eval(args: argparse.Namespace) -> int:
    from deepsynapse.config import Config
    from deepsynapse.eval.harness import evaluate
    from deepsynapse.formats import get_schema
    from deepsynapse.rl.trainer import build_problems

    loaded = _load_for_eval(args)
    schema = get_schema(args.schema or loaded.schema or "base")
    problems, _ = build_problems(args.data, args.split, Config())
    if args.limit:
        problems = problems[: args.limit]
    engine = _eval_engine(args.backend, loaded, args.seed)
    try:
        result = evaluate(
            loaded.model,
            loaded.tokenizer,
            problems,
            schema,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=not args.quiet,
            mode=args.mode,
            k=args.k,
            temperature=args.temperature,
            seed=args.seed,
            select=_judge(args, schema) if args.mode == "best_of_n" else None,
            around=loaded.around if engine is None else None,
            pad_multiple=loaded.pad_multiple,
            sampler=None if engine is None else engine.generate,
        )
    finally:
        if engine is not None:
            engine.close()
    result["model"], result["adapter"], result["data"] = args.model, args.adapter, args.data
    result["checkpoint"] = loaded.checkpoint
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k != "records"}
    print(json.dumps(brief, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from deepsynapse.telemetry.report import write_report

    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"{args.run_dir}: no such run folder")
    print(write_report(args.run_dir))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from deepsynapse.eval.compare import main_compare

    return main_compare(args.a, args.b)


def cmd_probe(args: argparse.Namespace) -> int:
    import inspect

    from deepsynapse.eval.probes import build_probe_suite, run_probes
    from deepsynapse.formats import get_schema

    loaded = _load_for_eval(args)
    items = build_probe_suite(args.seed, args.per_skill)
    extra = {"pad_multiple": loaded.pad_multiple}
    if loaded.around is not None:
        if "around" in inspect.signature(run_probes).parameters:
            extra["around"] = loaded.around  # the hypernetwork's per-prompt scales
        elif _has_hypernet(loaded.model):
            print(
                "deepsynapse: warning: this run's hypernetwork scales LoRA per prompt, and "
                "run_probes takes no around= hook yet: probes run it at multiplier 1",
                file=sys.stderr,
            )
    result = run_probes(
        loaded.model,
        loaded.tokenizer,
        items,
        get_schema(args.schema or loaded.schema or "base"),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=True,
        **extra,
    )
    result["model"], result["adapter"] = args.model, args.adapter
    result["checkpoint"] = loaded.checkpoint
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))
    return 0


def _has_hypernet(model) -> bool:
    from deepsynapse.models.trained import trained_policy_of

    trained = trained_policy_of(model)
    return trained is not None and trained.adaptive.scaler is not None


def resolve_adapter(path: str) -> Path:
    """An adapter folder, a checkpoint folder, or a run folder (its newest checkpoint)."""
    from deepsynapse.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    ckpt = latest_checkpoint(p / "checkpoints")
    if ckpt is not None:
        return ckpt / "adapter"
    raise FileNotFoundError(f"{p}: no PEFT adapter here (adapter_config.json), nor a checkpoint")


def cmd_export(args: argparse.Namespace) -> int:
    from deepsynapse.export import export_run

    path = export_run(
        args.run_dir,
        args.fmt,
        args.out,
        args.checkpoint,
        gguf_dtype=args.gguf_type,
        dtype=args.dtype,
        eval_limit=args.eval_limit,
    )
    folder = path if path.is_dir() else path.parent
    bake = folder / "hypernet_bake.json"
    if bake.is_file():
        r = json.loads(bake.read_text())
        print(
            f"hypernetwork baked at its mean scales over {r['problems']} eval problems: "
            f"accuracy {r['per_input']['accuracy']:.3f} per input -> "
            f"{r['baked_mean']['accuracy']:.3f} baked ({r['accuracy_difference']:+.3f}); "
            f"format validity {r['per_input']['format_validity']:.3f} -> "
            f"{r['baked_mean']['format_validity']:.3f}"
        )
    print(f"exported {args.fmt} to {path} (model card: {folder / 'README.md'})")
    return 0


def _check_generation_args(args: argparse.Namespace) -> None:
    from deepsynapse.config import ConfigError

    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens: got {args.max_new_tokens}, expected > 0")
    if args.temperature < 0:
        raise ConfigError(f"--temperature: got {args.temperature}, expected >= 0")


def cmd_generate(args: argparse.Namespace) -> int:
    from deepsynapse.api import open_model
    from deepsynapse.interactive import complete, render

    _check_generation_args(args)
    loaded = open_model(args.model, checkpoint=args.checkpoint, dtype=args.dtype)
    result = complete(
        loaded.model,
        loaded.tokenizer,
        args.question,
        args.schema or loaded.schema or "base",
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        around=loaded.around,
        pad_multiple=loaded.pad_multiple,
    )
    print(json.dumps(result.to_dict(), indent=1) if args.json else render(result))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from deepsynapse.api import open_model
    from deepsynapse.interactive import chat

    _check_generation_args(args)
    loaded = open_model(args.model, checkpoint=args.checkpoint, dtype=args.dtype)
    chat(
        loaded.model,
        loaded.tokenizer,
        args.schema or loaded.schema or "base",
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        around=loaded.around,
        pad_multiple=loaded.pad_multiple,
    )
    return 0


def _fail(message: str) -> int:
    print(f"deepsynapse: error: {message}", file=sys.stderr)
    return 2


def quiet_libraries() -> None:
    """Library chatter that says nothing to a user of this command."""
    import warnings

    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from deepsynapse.checkpoint import CheckpointError
    from deepsynapse.config import ConfigError
    from deepsynapse.data.problems import DataError
    from deepsynapse.models.loading import ModelLoadError
    from deepsynapse.rl.trainer import TrainingDiverged

    try:
        return {
            "train": cmd_train,
            "eval": cmd_eval,
            "export": cmd_export,
            "generate": cmd_generate,
            "chat": cmd_chat,
            "report": cmd_report,
            "compare": cmd_compare,
            "probe": cmd_probe,
        }[args.command](args)
    except (
        ConfigError,
        DataError,
        ModelLoadError,
        CheckpointError,
        TrainingDiverged,
        FileNotFoundError,
    ) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")


def entry() -> int:
    """The command line (console script, ``python -m deepsynapse.cli``): first onto the fast
    C allocator (``deepsynapse.allocator``: re-executes once with tcmalloc preloaded where the
    machine has it), then ``main``. Library callers of ``main`` keep their process."""
    from deepsynapse.allocator import AllocatorError, reexec_with_allocator

    try:
        reexec_with_allocator()
    except AllocatorError as exc:
        return _fail(str(exc))
    return main()


if __name__ == "__main__":
    sys.exit(entry())
