"""Prefix sharing in rollouts: each prompt prefilled once for its G samples, vs naive repetition.

    python benchmarks/rollout_prefix_sharing.py                       # SmolLM2-135M, bf16 if the CPU has it
    python benchmarks/rollout_prefix_sharing.py --model tiny-random --repeats 2

Checks first that both paths give the same tokens (greedy, fp32), then times sampling in
the run dtype, alternating the two paths, and prints the median times and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepsynapse.data.gsm8k import load_gsm8k
from deepsynapse.formats import BASE_SCHEMA, stop_strings
from deepsynapse.models.loading import load_model, load_tokenizer, resolve_dtype
from deepsynapse.prompting import build_prompt
from deepsynapse.rollout.hf import generate_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    problems, _ = load_gsm8k("gsm8k", "test", limit=args.prompts)
    prompts = [build_prompt(tok, p.question, BASE_SCHEMA) for p in problems]
    kw = dict(
        num_generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        stop_strings=stop_strings(BASE_SCHEMA),
    )

    fp32 = load_model(args.model, torch.float32, tok).eval()
    shared = generate_groups(fp32, tok, prompts, greedy=True, prefix_sharing=True, **kw)
    naive = generate_groups(fp32, tok, prompts, greedy=True, prefix_sharing=False, **kw)
    same = shared.texts == naive.texts
    print(
        f"greedy fp32 outputs identical: {same} ({sum(a == b for a, b in zip(shared.texts, naive.texts, strict=True))}/{len(naive.texts)})"
    )
    del fp32

    choice = resolve_dtype(args.dtype)
    model = load_model(args.model, choice.dtype, tok).eval()
    prompt_tokens = int(tok(prompts, return_tensors="pt", padding=True)["attention_mask"].sum())
    print(
        f"model {args.model}, dtype {choice.dtype} ({choice.reason}), {args.prompts} prompts x {args.generations} samples, "
        f"{args.max_new_tokens} new tokens, {prompt_tokens} prompt tokens in all, {torch.get_num_threads()} threads"
    )
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[int]] = {True: [], False: []}
    for r in range(args.repeats):
        for sharing in (True, False) if r % 2 == 0 else (False, True):
            torch.manual_seed(r)
            start = time.perf_counter()
            out = generate_groups(model, tok, prompts, prefix_sharing=sharing, **kw)
            times[sharing].append(time.perf_counter() - start)
            tokens[sharing].append(int(out.lengths.sum()))
    for sharing in (False, True):
        med = statistics.median(times[sharing])
        tps = statistics.median(t / s for t, s in zip(tokens[sharing], times[sharing], strict=True))
        print(
            f"{'shared prefix' if sharing else 'naive repeat ':14s} median {med:6.2f} s  ({tps:6.1f} completion tok/s)  runs {[round(t, 2) for t in times[sharing]]}"
        )
    print(
        f"speed-up (naive / shared, median wall time): {statistics.median(times[False]) / statistics.median(times[True]):.2f}x"
    )


if __name__ == "__main__":
    main()
