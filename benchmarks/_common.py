"""Shared helpers of the benchmark scripts: child processes, the machine, tables, results.

Each measured run happens in a fresh child process (``python SCRIPT _child SPEC``) so that
its peak resident memory (``ru_maxrss``) is its own and one run's caches or leaks never
flatter or burden the next. A child prints one line ``BENCH_RESULT {json}`` last; the parent
parses it and keeps the child's other output only for error messages.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class ChildFailed(RuntimeError):
    """A benchmark child exited without a result; the message carries the tail of its output."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_gflops(dtype: Any, rows: int, k: int, n: int, windows: int = 5) -> float:
    """GFLOP/s of a ``rows x k @ k x n`` matmul in torch ``dtype``: the rate a compute floor
    divides by. Best of ``windows`` 0.3 s windows: other processes only ever slow it down."""
    import torch

    a = torch.randn(rows, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.3:
            a @ b
            count += 1
        best = max(best, 2.0 * rows * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def emit_result(result: dict[str, Any]) -> None:
    """The child's last line: what the parent reads back."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(
    script: str | Path,
    spec: dict[str, Any],
    *,
    timeout: float | None = None,
    echo: bool = False,
    python: str | None = None,
) -> dict[str, Any]:
    """Run ``script _child SPEC`` in a fresh interpreter and return the JSON it reports.

    ``python`` picks another interpreter (vLLM lives in its own venv, with its own
    transformers pin), so one script can time both sides of a comparison."""
    cmd = [python or sys.executable, str(script), "_child", json.dumps(spec)]
    env = child_env()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - start
    lines = proc.stdout.splitlines()
    if echo:
        for line in lines:
            if not line.startswith(RESULT_PREFIX):
                print("    | " + line, flush=True)
    found = [line for line in lines if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-25:])
        raise ChildFailed(f"child exited with {proc.returncode} after {wall:.0f} s:\n{tail}")
    result = json.loads(found[-1][len(RESULT_PREFIX) :])
    result["child_wall_s"] = wall
    return result


def child_env() -> dict[str, str]:
    """The environment of a benchmark's child process: unbuffered, no tokenizer threads."""
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def cpu_class(avx512_bf16: bool, amx_bf16: bool, avx2: bool) -> str:
    """What a CPU's matmuls can do, which sets how far an hour of training gets.

    >>> cpu_class(True, False, True), cpu_class(False, False, True), cpu_class(False, False, False)
    ('bf16 (avx512_bf16)', 'avx2 only (no bf16 matmuls: fp32)', 'no avx2')
    """
    bf16 = [name for name, on in (("avx512_bf16", avx512_bf16), ("amx", amx_bf16)) if on]
    if bf16:
        return f"bf16 ({'+'.join(bf16)})"
    return "avx2 only (no bf16 matmuls: fp32)" if avx2 else "no avx2"


def code_version() -> str | None:
    """The commit of the deepsynapse package this process imports (``-dirty`` when its
    sources differ from it); None outside a git checkout. Studies span sessions while the
    code moves on: runs compare only when they trained the same code."""
    import deepsynapse

    src = Path(deepsynapse.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short=10", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and flags, cores, library versions."""
    import torch

    model, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "amx_bf16": "amx_bf16" in flags.split(),
        "avx2": "avx2" in flags.split(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    info["cpu_class"] = cpu_class(info["avx512_bf16"], info["amx_bf16"], info["avx2"])
    from deepsynapse.models.loading import onednn_cap_below_bf16, resolve_dtype

    # The flags say what the CPU can do; whether bf16 pays is measured (an Intel Xeon with
    # AVX512-BF16 and no AMX ran it at 0.5-0.7x fp32), and this is what training computes in.
    auto = resolve_dtype("auto")
    info["auto_dtype"] = auto.reason
    if info["cpu_class"].startswith("bf16") and auto.dtype == torch.float32:
        info["cpu_class"] = info["cpu_class"].replace("bf16 (", "fp32 (bf16 slower here: ", 1)

    cap = onednn_cap_below_bf16()
    if cap:  # a bf16 CPU standing in for the AVX2 class: its numbers are that class's, emulated
        info["onednn_max_cpu_isa"] = cap
        info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_class"] = f"avx2 only, emulated (oneDNN capped at {cap}; {info['cpu_class']})"
    if torch.cuda.is_available():  # the trainer then runs on cuda:0 (Accelerate's default)
        info["gpu"] = torch.cuda.get_device_name(0)
    info["code"] = code_version()
    for name in ("transformers", "peft", "accelerate", "trl"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # not installed (trl is optional)
            info[name] = None
    return info


def median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values present (std 0 for one value)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells already formatted or formatted with ``fmt``."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, rule, *body])


def save_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def save_report(stem: Path, report: Any, text: str) -> None:
    """A benchmark's results: ``stem.json`` (the numbers) and ``stem.md`` (the table)."""
    save_json(stem.with_suffix(".json"), report)
    stem.with_suffix(".md").write_text(text + "\n", encoding="utf-8")


def write_gsm8k_jsonl(problems: Sequence[Any], path: Path) -> Path:
    """Problems back in GSM8K's own row format, so ``data.train=<file>`` loads exactly them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            answer = f"{p.solution}\n#### {p.answer}" if p.solution else f"#### {p.answer}"
            f.write(json.dumps({"question": p.question, "answer": answer}) + "\n")
    return path
