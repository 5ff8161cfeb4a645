"""Selective recomputation (3.14): what computing once and reusing saves, measured.

    python benchmarks/caching.py                          # SmolLM2-135M, bf16 where the CPU has it
    python benchmarks/caching.py --model tiny-random      # seconds, for a smoke check

Three reuses, each timed against recomputing:
1. the prompt's KV cache shared by the G samples of its group (rollout);
2. reference and old-policy log-probs computed once per batch and reused by every inner
   iteration (``grpo.num_iterations`` > 1) instead of recomputed per iteration;
3. the hypernetwork's context embedding of a prompt cached across steps and iterations.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepsynapse.config import load_config
from deepsynapse.data.gsm8k import load_gsm8k
from deepsynapse.formats import BASE_SCHEMA, stop_strings
from deepsynapse.models.context import ContextEncoder
from deepsynapse.models.loading import load_tokenizer, resolve_dtype
from deepsynapse.prompting import build_prompt
from deepsynapse.rl.trainer import build_policy
from deepsynapse.rollout.hf import generate_groups


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=2, help="inner GRPO iterations (mu)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = load_config(None, [f"model.name={args.model}"])
    tok = load_tokenizer(args.model)
    dtype = resolve_dtype("auto")
    policy = build_policy(cfg, tok, dtype.dtype)
    model = policy.peft_model.eval()
    problems, _ = load_gsm8k("gsm8k", "test", limit=args.prompts)
    prompts = [build_prompt(tok, p.question, BASE_SCHEMA) for p in problems]
    kw = dict(
        num_generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        stop_strings=stop_strings(BASE_SCHEMA),
    )
    print(
        f"model {args.model}, {dtype.dtype}, {args.prompts} prompts x {args.generations} samples, "
        f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} threads"
    )

    # 1. prompt KV shared by the group
    shared = timed(
        lambda: generate_groups(model, tok, prompts, prefix_sharing=True, **kw), args.repeats
    )
    naive = timed(
        lambda: generate_groups(model, tok, prompts, prefix_sharing=False, **kw), args.repeats
    )
    print(
        f"1. rollout   naive {naive:6.2f} s  shared prefix {shared:6.2f} s  saves {naive - shared:5.2f} s ({naive / shared:.2f}x)"
    )

    # 2. reference and old log-probs: once per batch vs once per inner iteration
    out = generate_groups(model, tok, prompts, **kw)
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    attn = torch.cat([out.prompt_mask, out.completion_mask], 1)

    def logprob_pass() -> None:
        with torch.no_grad():
            policy(ids, attn, out.completion_mask)
            with policy.reference():
                policy(ids, attn, out.completion_mask)

    one = timed(logprob_pass, args.repeats)
    reuse = one  # computed once, reused by every iteration
    recompute = one * args.iterations
    print(
        f"2. ref+old   recomputed per iteration {recompute:6.2f} s  reused {reuse:6.2f} s  "
        f"saves {recompute - reuse:5.2f} s per step (mu={args.iterations})"
    )

    # 3. context embeddings: cache hit vs miss
    enc = ContextEncoder(model, layer=-1)
    encoded = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    pid, pmask = encoded["input_ids"], encoded["attention_mask"]
    miss = timed(lambda: (enc.cache.clear(), enc.embed(pid, pmask)), args.repeats)
    enc.embed(pid, pmask)
    hit = timed(lambda: enc.embed(pid, pmask), args.repeats)
    uses = 2 + args.iterations  # rollout, old log-probs, each training iteration
    print(
        f"3. context   miss {miss * 1000:7.1f} ms  hit {hit * 1000:7.2f} ms  per batch; "
        f"{uses} uses per step save {(miss - hit) * (uses - 1) * 1000:7.1f} ms per step"
    )


if __name__ == "__main__":
    main()
