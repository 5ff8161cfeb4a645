"""The run folder's live files (metrics, events, samples) and the trackers behind Accelerate.

Every metric goes to ``metrics.jsonl`` (one object a step) and to whichever trackers the
config names (TensorBoard, Weights & Biases...) through ``Accelerator.log``. Events and
samples go to their own files. Only the main process writes.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

from deepsynapse.allocator import active_allocator
from deepsynapse.control.knobs import Event


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _load_glibc():
    """glibc, where this process allocates with it; None under tcmalloc (the command line's
    default, ``deepsynapse.allocator``) or off glibc: then its counts and knobs do nothing."""
    if active_allocator() != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None
    if not all(hasattr(libc, f) for f in ("malloc_trim", "mallopt")):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _MallInfo2
    return libc


_GLIBC = _load_glibc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_GLIBC_DEFAULT_TRIM_THRESHOLD = 128 << 10
# Settings a user may have given glibc's allocator; when present, theirs win.
_USER_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def release_freed_memory() -> bool:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim``); False elsewhere.

    Why: CPU tensors live on the C heap; glibc keeps freed chunks below the heap's top, so
    the varying shapes of rollouts and updates leave RSS ratcheting up step after step
    although nothing leaks. One trim per step costs milliseconds.
    """
    if _GLIBC is None:
        return False
    _GLIBC.malloc_trim(0)
    return True


def malloc_usage_mb() -> dict[str, float] | None:
    """The C heap's live bytes (``in_use``) and mmapped buffers (``mmapped``), in MB; None
    off glibc (< 2.33 has no ``mallinfo2``).

    Why: RSS alone cannot tell memory something holds from freed memory the allocator keeps;
    RSS minus these two is what glibc keeps (plus code and Python's own arenas).
    """
    if _GLIBC is None or not hasattr(_GLIBC, "mallinfo2"):
        return None
    info = _GLIBC.mallinfo2()
    return {"in_use": info.uordblks / 2**20, "mmapped": info.hblkhd / 2**20}


def fix_malloc_thresholds(mmap_threshold_bytes: int = 4 << 20) -> bool:
    """Serve buffers of ``mmap_threshold_bytes`` or more with mmap, and stop glibc raising it.

    Why: by default glibc raises its mmap threshold (up to 32 MB) and its trim threshold (up
    to 64 MB) each time a large buffer is freed. From then on, tens-of-MB tensors come from
    the heaps, and each worker thread's heap keeps its freed top below the raised trim
    threshold, which ``malloc_trim`` does not touch: on SmolLM2 RSS jumped by ~45 MB for a
    few steps at a time. Fixed thresholds (mmap at ``mmap_threshold_bytes``, trim back at
    glibc's default 128 KB, in case a free before this call raised it) hand such buffers
    back when they are freed, at the same step time (measured, docs/reliability.md). Leaves
    glibc alone when the environment already tunes it; False then, or off glibc.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if _GLIBC is None or "malloc." in tunables:
        return False
    if any(name in os.environ for name in _USER_MALLOC_SETTINGS):
        return False
    mmap_set = _GLIBC.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_bytes))
    trim_set = _GLIBC.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    def __init__(self, run_dir: Path, accelerator=None, enabled: bool = True):
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.enabled = enabled
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, obj: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in obj.items()}, ensure_ascii=False) + "\n")

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._append("metrics.jsonl", {"step": step, "time": time.time(), **metrics})
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step
            )

    def event(self, step: int, event: Event) -> None:
        self._append(
            "events.jsonl",
            {
                "step": step,
                "time": time.time(),
                "kind": event.kind,
                "message": event.message,
                "evidence": event.evidence,
            },
        )

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._append("samples.jsonl", {"step": step, **row})


def sample_rows(batch, num_generations: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` completions of a step's ``GroupBatch`` with their per-component
    rewards, as ``samples.jsonl`` rows."""
    g = num_generations
    rows = []
    for i in range(min(count, len(batch.rollout.texts))):
        problem = batch.problems[i // g]
        rows.append(
            {
                "problem_id": problem.id,
                "question": problem.question,
                "gold": problem.answer,
                "completion": batch.rollout.texts[i],
                "rewards": {k: v[i] for k, v in batch.scores.items()},
                "fused_reward": float(batch.reward[i]),
                "advantage": float(batch.advantages[i]) if batch.advantages is not None else None,
                "correct": bool(batch.correct[i]),
                "format_errors": batch.parsed[i].errors,
                "truncated": bool(batch.rollout.truncated[i]),
            }
        )
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a kill mid-write) is ignored."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_jsonl_after(path: Path, step: int, sft_step: int | None = None) -> None:
    """On resume, drop rows logged after the checkpoint's step so each step appears once.

    Warm-up rows (``sft/step``, logged at step 0) are also dropped past ``sft_step``.
    """
    if not path.is_file():
        return
    rows = [
        r
        for r in read_jsonl(path)
        if int(r.get("step", -1)) <= step
        and (sft_step is None or int(r.get("sft/step", 0)) <= sft_step)
    ]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    os.replace(tmp, path)
