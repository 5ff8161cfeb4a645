"""What the hypernetwork's per-prompt LoRA scales cost a decode, and what the swapped forward saves.

    python benchmarks/hypernet_decode.py                 # SmolLM2-135M, bf16 where native, 1 thread
    python benchmarks/hypernet_decode.py --prompts 16 --rank 32   # the hour recipe's draw
    python benchmarks/hypernet_decode.py --quick         # tiny-random, fp32: a smoke check

Plain GRPO folds LoRA into a copy of the weights for decoding (``merged_lora``). Per-row
multipliers cannot be folded, so a policy with the hypernetwork decodes through its LoRA
layers; ``hypernet_scales`` applies the multipliers either by hooks on PEFT's ``lora_B`` (the
training path, where gradients reach the hypernetwork) or, for decoding, by swapping each
plain LoRA layer's forward for four operations (``fused=True``). The same greedy rollout (``--prompts``
GSM8K prompts x ``--generations`` rows, chat template, LoRA of ``--rank`` on all linear layers
with a non-zero B, multipliers 1 +- 0.1) is timed three ways, best of ``--repeats``, pinned to
``--threads`` threads; a token's time is compared, since bf16 greedy rows part after a while. Writes
``benchmarks/results/hypernet-decode.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, machine_info, markdown_table, save_json  # noqa: E402


def measure(
    model_name: str,
    dtype_name: str,
    threads: int,
    repeats: int,
    tokens: int,
    prompts_n: int = 4,
    generations: int = 4,
    rank: int = 16,
) -> dict:
    import torch

    from deepsynapse.data.gsm8k import load_gsm8k
    from deepsynapse.formats import BASE_SCHEMA
    from deepsynapse.models.dynamic_lora import decoder_layers, lora_layers
    from deepsynapse.models.hypernet import hypernet_scales
    from deepsynapse.models.loading import load_model, load_tokenizer, resolve_dtype
    from deepsynapse.models.policy import apply_lora
    from deepsynapse.prompting import build_prompt
    from deepsynapse.rollout.hf import generate_groups

    torch.set_num_threads(threads)
    tok = load_tokenizer(model_name)
    dtype = resolve_dtype(dtype_name).dtype
    model = apply_lora(
        load_model(model_name, dtype, tok), rank, 2.0 * rank, 0.0, ["all-linear"]
    ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts B at zero: give LoRA an update to scale
        for _, layer in lora_layers(model):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.01)
    problems, _ = load_gsm8k("gsm8k", "test", limit=prompts_n)
    prompts = [build_prompt(tok, p.question, BASE_SCHEMA) for p in problems]
    multipliers = 1.0 + 0.1 * torch.randn(len(prompts), len(decoder_layers(model)), generator=g)
    ways = {
        "LoRA merged (plain GRPO)": contextlib.nullcontext,
        "per-row scales, hooks on lora_B": lambda: hypernet_scales(model, multipliers),
        "per-row scales, swapped forward": lambda: hypernet_scales(model, multipliers, fused=True),
    }
    generate_groups(model, tok, prompts, num_generations=generations, max_new_tokens=4, greedy=True)
    rows = []
    for name, context in ways.items():
        times, kept = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            with context():
                out = generate_groups(
                    model,
                    tok,
                    prompts,
                    num_generations=generations,
                    max_new_tokens=tokens,
                    greedy=True,
                )
            times.append(time.perf_counter() - start)
            kept = int(out.completion_mask.sum())
        rows.append({"decoding": name, "best_s": min(times), "tokens": kept})
    for row in rows:
        row["tok_s"] = row["tokens"] / row["best_s"]
        # time a token against merged's: in bf16 greedy rows part after a while, so the ways
        # decode slightly different token counts
        row["vs_merged"] = rows[0]["tok_s"] / row["tok_s"]
    return {"dtype": str(dtype), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=4, help="GSM8K prompts (distinct scales)")
    ap.add_argument("--generations", type=int, default=4, help="rows a prompt")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--quick", action="store_true", help="tiny-random, fp32, 1 repeat, 8 tokens")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "hypernet-decode.json")
    args = ap.parse_args()
    if args.quick:
        args.model, args.dtype, args.repeats, args.max_new_tokens = "tiny-random", "fp32", 1, 8
    result: dict[str, Any] = {
        "benchmark": "hypernet_decode",
        "model": args.model,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "prompts": args.prompts,
        "generations": args.generations,
        "rank": args.rank,
        "machine": machine_info(),
    }
    result.update(
        measure(
            args.model,
            args.dtype,
            args.threads,
            args.repeats,
            args.max_new_tokens,
            args.prompts,
            args.generations,
            args.rank,
        )
    )
    table = markdown_table(
        ["decoding", "best s", "tokens", "tok/s", "s a token vs merged"],
        [
            [r["decoding"], r["best_s"], str(r["tokens"]), r["tok_s"], f"x{r['vs_merged']:.2f}"]
            for r in result["rows"]
        ],
    )
    m = result["machine"]
    print(
        f"{args.model}, {result['dtype']}, {args.threads} thread(s), {m.get('cpu_class')}, "
        f"LoRA r={args.rank}, {args.prompts} prompts x {args.generations} rows"
    )
    print(table)
    print(f"saved {save_json(args.out, result)}")


if __name__ == "__main__":
    main()
