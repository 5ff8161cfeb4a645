"""Per-process caches of files that a process reads many times, keyed on the file as it is now.

A benchmark or a test session builds many trainers in one process, and each read the same
GSM8K split and tokenizer again (0.1-0.5 s apiece). The key holds each file's resolved path,
size and modification time, so an edit between two loads is read again.
"""

from __future__ import annotations

from pathlib import Path

Stamp = tuple[tuple[str, int, int], ...]


def files_stamp(path: str | Path) -> Stamp | None:
    """What ``path`` (a file, or every file directly in a folder) is now; None when it cannot
    be read (the loader then says why, naming it) or does not exist on disk (a hub id)."""
    path = Path(path)
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        stamps = []
        for file in files:
            stat = file.stat()
            stamps.append((str(file.resolve()), stat.st_size, stat.st_mtime_ns))
    except OSError:
        return None
    return tuple(stamps)
