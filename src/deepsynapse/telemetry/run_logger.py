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


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> bool:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim``); False elsewhere.

    Why: CPU tensors live on the C heap; glibc keeps freed chunks below the heap's top, so
    the varying shapes of rollouts and updates leave RSS ratcheting up step after step
    although nothing leaks. One trim per step costs milliseconds.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


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


def truncate_jsonl_after(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint's step so each step appears once."""
    if not path.is_file():
        return
    rows = [r for r in read_jsonl(path) if int(r.get("step", -1)) <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    os.replace(tmp, path)
