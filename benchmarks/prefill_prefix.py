"""Our decoder with the prompts' common prefix prefilled once, against once per prompt.

    python benchmarks/prefill_prefix.py                  # SmolLM2-135M, auto dtype, 1 thread
    python benchmarks/prefill_prefix.py --repeats 3 --threads 2

Every prompt of a run begins with the same chat template and system prompt (SmolLM2: 112 of
its ~155 prompt tokens). Since the twenty-ninth session our decoder's prefill runs that prefix
once, then each prompt's rest (``rollout.hf._prefill``); before, every prompt ran all of it.
Two workloads, as the trainer runs them, each timed both ways in one process, alternating:

- **evaluation**: greedy, one completion per prompt, ``eval.batch_size`` (16) held-out
  problems a batch, up to 192 new tokens (the hour recipe's evaluation);
- **rollout draw**: 16 prompts x 4 samples at temperature 0.9, up to 128 new tokens (the hour
  recipe's four rounds decoded together).

"Once per prompt" is the same decoder with the common prefix's length forced to 0 (each prompt
still prefilled once for its G samples). Both give the same function up to float rounding:
the greedy batch's completions are compared, and the sampled draw's, where a near-tie can
fork one (tests in ``tests/rollout/test_rollout.py``). Writes
``benchmarks/results/prefill-prefix.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, fmt, machine_info, markdown_table, save_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR / "prefill-prefix")
    ap.add_argument(
        "--quick", action="store_true", help="16 new tokens a completion (the smoke test's run)"
    )
    args = ap.parse_args(argv)

    import torch

    from deepsynapse.data.synthetic import heldout_problems
    from deepsynapse.formats import get_schema, stop_strings
    from deepsynapse.models.loading import load_model, load_tokenizer, resolve_dtype
    from deepsynapse.models.policy import apply_lora
    from deepsynapse.prompting import build_prompt
    from deepsynapse.rollout import hf

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype("auto").dtype
    tok = load_tokenizer(args.model)
    model = apply_lora(load_model(args.model, dtype, tok), 16, 32.0, 0.0, ["all-linear"]).eval()
    schema = get_schema("base")
    problems = heldout_problems(64)
    prompts = [build_prompt(tok, p.question, schema) for p in problems]
    workloads = {
        "evaluation (16 x 1, greedy, 192)": dict(
            prompts=prompts[:16], num_generations=1, max_new_tokens=192, greedy=True
        ),
        "rollout draw (16 x 4, T 0.9, 128)": dict(
            prompts=prompts[16:32], num_generations=4, max_new_tokens=128, temperature=0.9
        ),
    }
    if args.quick:
        for work in workloads.values():
            work["max_new_tokens"] = 16
    shared = hf.shared_prefix_length

    def run(work: dict[str, Any], once: bool, seed: int):
        hf.shared_prefix_length = shared if once else (lambda ids, mask: 0)
        try:
            torch.manual_seed(seed)
            start = time.perf_counter()
            kwargs = {k: v for k, v in work.items() if k != "prompts"}
            out = hf.generate_groups(
                model, tok, work["prompts"], stop_strings=stop_strings(schema), **kwargs
            )
            return time.perf_counter() - start, out
        finally:
            hf.shared_prefix_length = shared

    ids = tok(prompts[:16], add_special_tokens=False).input_ids
    common = 0
    while all(len(x) > common and x[common] == ids[0][common] for x in ids):
        common += 1
    results: dict[str, Any] = {}
    for name, work in workloads.items():
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        run(work, True, 0)  # warm-up
        once, per_prompt, tokens, same = [], [], [], []
        for k in range(args.repeats):
            seconds, a = run(work, True, k + 1)
            once.append(seconds)
            seconds, b = run(work, False, k + 1)
            per_prompt.append(seconds)
            tokens.append(int(a.completion_mask.sum()))
            same += [x == y for x, y in zip(a.texts, b.texts, strict=True)]
        results[name] = {
            "once_s": statistics.median(once),
            "per_prompt_s": statistics.median(per_prompt),
            "once_steps_s": once,
            "per_prompt_steps_s": per_prompt,
            "completion_tokens": statistics.median(tokens),
            # greedy: the same tokens; sampled, a near-tie the float rounding of the other
            # cache layout tips can fork a completion (the same seeds, the same uniforms)
            "same_share": sum(same) / len(same),
        }
        r = results[name]
        print(f"  once {r['once_s']:.2f} s, per prompt {r['per_prompt_s']:.2f} s", flush=True)
    report = {
        "model": args.model,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": args.threads,
        "repeats": args.repeats,
        "common_prefix_tokens": common,
        "machine": machine_info(),
        "results": results,
    }
    rows = [
        [
            name,
            fmt(r["completion_tokens"], 0),
            fmt(r["once_s"], 2),
            fmt(r["per_prompt_s"], 2),
            f"x{r['per_prompt_s'] / r['once_s']:.2f}",
            f"{r['same_share']:.0%}",
        ]
        for name, r in results.items()
    ]
    text = "\n".join(
        [
            f"## Our decoder's prefill, the common prefix once ({report['machine']['cpu_class']}, "
            f"{report['dtype']}, {args.threads} thread(s))",
            "",
            f"Medians of {args.repeats} alternating runs after a warm-up; seconds. The prompts "
            f"share their first {common} tokens.",
            "",
            markdown_table(
                [
                    "workload",
                    "completion tokens",
                    "prefix once s",
                    "per prompt s",
                    "speed-up",
                    "same completions",
                ],
                rows,
            ),
            "",
        ]
    )
    save_report(args.results, report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
