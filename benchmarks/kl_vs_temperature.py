"""The KL the trainer reads, against the sampling temperature, on a run's checkpoints.

    python benchmarks/kl_vs_temperature.py runs/learning-ranks/plain-seed3
    python benchmarks/kl_vs_temperature.py RUN --checkpoint step-40 --temperatures 1.0 0.6

The trainer's KL (metric ``kl/mean``) is the k3 estimate on sampled tokens with the policy's
and the reference's log-probs both at the sampling temperature. A controller that lowers the
temperature to bring that KL down (``control.kl_temperature.couple=true``) acts on its own
reading: this script measures by how much. The policy is the run's checkpoint (default its
newest), the reference its ``step-0`` (the start of GRPO, the trainer's reference). At each
temperature the policy samples ``--generations`` completions of the first ``--prompts``
held-out problems (every third, so all difficulties appear), same seed, and both log-probs
are taken as the trainer takes them. Reported per temperature: mean k3 a token, its 99th
percentile and maximum. First run (AMX class, one core): the KL rises about as 1/T
(plain, fifth study seed 3: 0.047 at T = 1.0, 0.082 at 0.6). Results:
``benchmarks/results/kl-vs-temperature.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, machine_info, save_json


def measure(run: Path, checkpoint: str | None, temperatures: list[float], prompts: int, g: int):
    from deepsynapse.data.synthetic import heldout_problems
    from deepsynapse.formats import get_schema, stop_strings
    from deepsynapse.models.trained import load_trained_policy
    from deepsynapse.prompting import build_prompt
    from deepsynapse.rollout.hf import generate_groups

    policy = load_trained_policy(run, checkpoint)
    reference = load_trained_policy(run, "step-0")
    schema = get_schema(policy.schema)
    tok = policy.tokenizer
    problems = heldout_problems(3 * prompts)[::3]
    texts = [build_prompt(tok, p.question, schema) for p in problems]
    rows = []
    for t in temperatures:
        torch.manual_seed(0)
        start = time.perf_counter()
        out = generate_groups(
            policy.model,
            tok,
            texts,
            num_generations=g,
            max_new_tokens=policy.config.rollout.max_new_tokens,
            temperature=t,
            stop_strings=stop_strings(schema),
            around=policy.around,
        )
        batch = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
        mask = out.completion_mask.bool()
        diff = (
            reference.completion_logprobs(*batch, temperature=t).float()
            - policy.completion_logprobs(*batch, temperature=t).float()
        )[mask]
        k3 = diff.exp() - diff - 1
        rows.append(
            {
                "temperature": t,
                "kl_mean": float(k3.mean()),
                "kl_p99": float(k3.quantile(0.99)),
                "kl_max": float(k3.max()),
                "tokens": int(mask.sum()),
                "seconds": time.perf_counter() - start,
            }
        )
        r = rows[-1]
        print(
            f"T={t:.2f}: KL {r['kl_mean']:.4f} a token (p99 {r['kl_p99']:.3f}, max "
            f"{r['kl_max']:.2f}) over {r['tokens']} tokens, {r['seconds']:.0f} s",
            flush=True,
        )
    return {"run": str(run), "checkpoint": policy.checkpoint.name, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a run folder with a step-0 checkpoint")
    ap.add_argument("--checkpoint", default=None, help="default: the newest complete one")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.9, 0.75, 0.6])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "kl-vs-temperature.json")
    args = ap.parse_args(argv)
    result = measure(args.run, args.checkpoint, args.temperatures, args.prompts, args.generations)
    result["machine"] = machine_info()
    save_json(args.out, result)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
