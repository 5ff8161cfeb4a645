"""The SFT warm-up step against a bare transformers + PEFT step and the compute floor.

    python benchmarks/sft_step.py                       # SmolLM2 at the hour recipe, plain, 1 thread
    python benchmarks/sft_step.py --configs plain full-critique --threads 2
    python benchmarks/sft_step.py --quick               # tiny-random: a smoke check

The warm-up is up to 30% of an hour's run, so its step is worth its floor. Three ways to do
the same supervised step on the same examples (the warm-up's own, ``SFTWarmup.examples``):

- **ours**: ``rl.warmup.warmup_step`` on a ``Trainer`` built from the recipe with the
  configuration's overrides (``learning.py``'s), i.e. exactly what ``deepsynapse train`` runs:
  prompts left-padded and targets right-padded into one batch, log-probs of the target tokens
  only, clipping, AdamW; the prompts' common prefix (system prompt) run once
  (``model.share_prefix``), and again with it run per row, the steps alternating.
- **bare**: what a user's plain loop does: the same model and LoRA (PEFT, same rank and
  targets, same dtype), each example's prompt + target in one right-padded row, logits for
  every position, cross-entropy on the target tokens, clipping, AdamW.
- **floor**: the weights' matmuls alone at the machine's GEMM rate (measured here at a
  training-sized shape): forward 2 x (linear parameters) FLOPs a token plus the output head on
  target tokens, and as much again backward (input gradients; the frozen base needs no weight
  gradients, LoRA's are negligible). Attention scores and element-wise work are left out, so
  no real step reaches it.

Medians over ``--repeats`` steps after one untimed step; each configuration in a fresh child
process, on the C allocator ``deepsynapse train`` picks (tcmalloc where installed). Writes ``benchmarks/results/sft-step[-quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    emit_result,
    fmt,
    machine_info,
    markdown_table,
    matmul_gflops,
    peak_rss_mb,
    run_child,
    save_report,
)

# ------------------------------------------------------------------ child side


def _bare_step(model, optimizer, tok, prompts: list[str], targets: list[str], max_norm: float):
    """One supervised step as a plain transformers + PEFT loop writes it."""
    import torch
    import torch.nn.functional as F

    rows, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tok(prompt, add_special_tokens=False).input_ids
        t = tok(target, add_special_tokens=False).input_ids
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten())
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _linear_params(model) -> tuple[int, int]:
    """(parameters of the base's linear layers in the decoder, output head's), LoRA excluded."""
    import torch

    head = model.get_output_embeddings()
    body = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and "lora_" not in name:
            body += module.weight.numel()
    return body, head.weight.numel()


def child(spec: dict[str, Any]) -> None:
    from deepsynapse.allocator import active_allocator, reexec_with_allocator

    reexec_with_allocator()  # as `deepsynapse train` runs: on tcmalloc where the machine has it
    import torch

    from deepsynapse.config import load_config
    from deepsynapse.models.loading import load_model
    from deepsynapse.models.policy import apply_lora
    from deepsynapse.rl.trainer import Trainer
    from deepsynapse.rl.warmup import warmup_step

    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["recipe"], spec["overrides"])
    with tempfile.TemporaryDirectory(prefix="sft-step-") as tmp:
        trainer = Trainer(cfg, run_dir=tmp, progress=False)
        trainer.lock_groups(cfg.sft.trainable_groups)
        tok = trainer.tokenizer
        repeats = spec["repeats"]
        examples = [
            trainer.sft.examples(k, cfg.sft.batch_size, salt=99) for k in range(repeats + 1)
        ]
        ours, ours_loss, unshared = [], [], []
        for k in range(repeats + 1):  # alternating with the common prefix run per row
            start = time.perf_counter()
            ours_loss.append(warmup_step(trainer, k)[1])
            ours.append(time.perf_counter() - start)
            trainer.unwrapped.share_prefix = False
            start = time.perf_counter()
            warmup_step(trainer, k)
            unshared.append(time.perf_counter() - start)
            trainer.unwrapped.share_prefix = cfg.model.share_prefix
        dtype = trainer.dtype_choice.dtype
        del trainer

    model = load_model(cfg.model.name, dtype, tok)
    lora = cfg.lora
    model = apply_lora(model, lora.r, lora.alpha, lora.dropout, list(lora.target_modules))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.sft.lr)
    bare, bare_loss = [], []
    for prompts, targets in examples:
        start = time.perf_counter()
        bare_loss.append(
            _bare_step(model, optimizer, tok, prompts, targets, cfg.optim.max_grad_norm)
        )
        bare.append(time.perf_counter() - start)

    tokens, target_tokens, ours_cells, bare_cells = [], [], [], []
    for prompts, targets in examples[1:]:
        p = [len(tok(x, add_special_tokens=False).input_ids) for x in prompts]
        t = [len(tok(x, add_special_tokens=False).input_ids) for x in targets]
        tokens.append(sum(p) + sum(t))
        target_tokens.append(sum(t))
        ours_cells.append(len(p) * (max(p) + max(t)))  # left-padded prompts beside right-padded
        bare_cells.append(len(p) * max(a + b for a, b in zip(p, t, strict=True)))
    body, head = _linear_params(model)
    rows = int(statistics.median(tokens))
    gflops = matmul_gflops(dtype, rows, 576, 1536)  # SmolLM2's MLP shape at the step's rows
    flops = [4.0 * body * n + 4.0 * head * m for n, m in zip(tokens, target_tokens, strict=True)]
    emit_result(
        {
            "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "batch_size": cfg.sft.batch_size,
            "ours_s": statistics.median(ours[1:]),
            "share_prefix": cfg.model.share_prefix,
            "ours_unshared_s": statistics.median(unshared[1:]),
            "ours_unshared_steps_s": unshared,
            "bare_s": statistics.median(bare[1:]),
            "floor_s": statistics.median(f / (gflops * 1e9) for f in flops),
            "ours_steps_s": ours,
            "bare_steps_s": bare,
            "first_loss": {"ours": ours_loss[0], "bare": bare_loss[0]},  # same model, LoRA B = 0
            "tokens": statistics.median(tokens),
            "target_tokens": statistics.median(target_tokens),
            "padded_ours": statistics.median(ours_cells),
            "padded_bare": statistics.median(bare_cells),
            "linear_params": body,
            "head_params": head,
            "gemm_gflops": gflops,
            "peak_rss_mb": peak_rss_mb(),
            "allocator": active_allocator(),
        }
    )


# ------------------------------------------------------------------ parent side


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = []
    for config, r in report["results"].items():
        rows.append(
            [
                config,
                r["dtype"],
                f"{r['tokens']:.0f} ({r['target_tokens']:.0f})",
                f"{r['padded_ours'] / r['tokens']:.2f} / {r['padded_bare'] / r['tokens']:.2f}",
                fmt(r["ours_s"], 2),
                fmt(r.get("ours_unshared_s"), 2),
                fmt(r["bare_s"], 2),
                fmt(r["floor_s"], 2),
                f"x{r['ours_s'] / r['floor_s']:.2f}",
                f"x{r['bare_s'] / r['floor_s']:.2f}",
                f"x{r['bare_s'] / r['ours_s']:.2f}",
            ]
        )
    return "\n".join(
        [
            f"## SFT warm-up step at `{report['recipe']}` ({m.get('cpu_class')}, "
            f"{report['threads']} thread(s), "
            f"{next(iter(report['results'].values()), {}).get('allocator', 'glibc')})",
            "",
            f"Medians of {report['repeats']} steps after one untimed; seconds. *tokens*: "
            "prompt + target tokens of the step's examples (target tokens); *cells / token*: "
            "the padded batch's cells per real token, ours / bare (the common prefix counted "
            "per row); *prefix per row*: ours with `model.share_prefix=false`, the steps "
            "alternating with ours in one process; *floor*: the weights' matmuls at the GEMM "
            "rate measured for the step's rows.",
            "",
            markdown_table(
                [
                    "config",
                    "dtype",
                    "tokens (target)",
                    "cells / token",
                    "ours s",
                    "ours, prefix per row s",
                    "bare s",
                    "floor s",
                    "ours / floor",
                    "bare / floor",
                    "bare / ours",
                ],
                rows,
            ),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "_child":
        import json

        child(json.loads(sys.argv[2]))
        return 0
    from learning import QUICK, RECIPE, Learning, resolve, run_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["plain"])
    ap.add_argument("--config", default=RECIPE, help="the recipe (default the hour recipe)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny-random, 2 steps")
    ap.add_argument("--results", type=Path, help="results stem (default benchmarks/results/...)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override after the study's own (e.g. model.dtype=fp32); repeatable",
    )
    args = ap.parse_args(argv)
    st = Learning(recipe=args.config, configs=tuple(args.configs), backend="ours")
    if args.quick:
        st = replace(st, extra=QUICK.extra)
        args.repeats = 2
    from deepsynapse.config import load_config

    recipe_cfg = load_config(st.recipe, list(st.extra))
    st = resolve(st, recipe_cfg)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sft-step-") as tmp:
        for config in args.configs:
            overrides = run_overrides(st, config, 0, Path(tmp), recipe_cfg)
            overrides += [
                "train.time_budget=",
                "train.report=false",
                f"train.threads={args.threads}",
                *args.set,
            ]
            spec = {
                "recipe": st.recipe,
                "overrides": overrides,
                "threads": args.threads,
                "repeats": args.repeats,
            }
            print(f"[{time.strftime('%H:%M:%S')}] {config} ...", flush=True)
            results[config] = run_child(__file__, spec, timeout=3600)
            r = results[config]
            print(
                f"  ours {r['ours_s']:.2f} s, bare {r['bare_s']:.2f} s, floor {r['floor_s']:.2f} s",
                flush=True,
            )
    report = {
        "recipe": st.recipe,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": machine_info(),
        "results": results,
    }
    stem = args.results or RESULTS_DIR / ("sft-step-quick" if args.quick else "sft-step")
    text = markdown(report)
    save_report(stem, report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
