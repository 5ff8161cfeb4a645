"""The C allocator a DeepSynapse command runs on: tcmalloc where the machine has it.

Why: CPU tensors live on the C heap. glibc's malloc hands large freed buffers back to the
kernel (and ``train.trim_memory``, which keeps RSS flat under glibc, makes it do so every
step), so every step faults its activations in again. Measured on SmolLM2, plain GRPO at
``benchmarks/vs_trl.py``'s reference settings (1 core of a Xeon with AMX): glibc 9.4 M minor
faults and 14 s of kernel time in 3 steps, 33.0 s a step, peak 5.6 GB; tcmalloc 1.5 M faults,
2.8 s, **26.0 s a step, peak 4.8 GB** (jemalloc and mimalloc fared no better than glibc;
docs/benchmarks.md). An allocator must be loaded before the process starts, so the command
line re-executes itself once with ``LD_PRELOAD`` (as ``torch.backends.xeon.run_cpu`` does).

``DEEPSYNAPSE_ALLOCATOR``: ``auto`` (default: tcmalloc if found, else glibc), ``glibc``
(no re-execution), ``tcmalloc`` (an error if it is not installed), or a path to a malloc
library. Install tcmalloc with ``apt-get install libtcmalloc-minimal4`` (``make setup`` does
where it runs as root).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

ENV = "DEEPSYNAPSE_ALLOCATOR"
_LOADED = "DEEPSYNAPSE_ALLOCATOR_LOADED"  # set on the re-executed process: never twice
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
_KNOWN = ("tcmalloc", "jemalloc", "mimalloc")


class AllocatorError(ValueError):
    """``DEEPSYNAPSE_ALLOCATOR`` names something this machine does not have."""


def find_tcmalloc() -> str | None:
    """The path of tcmalloc's shared library on this machine, or None."""
    dirs = [*_LIB_DIRS, str(Path(sys.prefix) / "lib"), "/usr/local/lib"]
    for name in TCMALLOC_NAMES:
        for d in dirs:
            path = Path(d) / name
            if path.is_file():
                return str(path)
    # else a bare soname from the loader's cache, which LD_PRELOAD resolves the same way
    return ctypes.util.find_library("tcmalloc_minimal")


def active_allocator() -> str:
    """Which C allocator this process runs on: tcmalloc, jemalloc, mimalloc or glibc."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    return allocator_name(maps)


def allocator_name(loaded: str | None) -> str:
    """The allocator a library path (or a process's maps) names; glibc for None or none.

    >>> allocator_name("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"), allocator_name(None)
    ('tcmalloc', 'glibc')
    """
    return next((name for name in _KNOWN if f"lib{name}" in (loaded or "")), "glibc")


def wanted_library(choice: str) -> str | None:
    """The library ``choice`` (a ``DEEPSYNAPSE_ALLOCATOR`` value) asks for; None for glibc.

    >>> wanted_library("glibc") is None
    True
    """
    if choice == "glibc":
        return None
    if choice in ("auto", "tcmalloc"):
        lib = find_tcmalloc()
        if lib is None and choice == "tcmalloc":
            raise AllocatorError(
                f"{ENV}=tcmalloc, but tcmalloc is not installed (apt-get install "
                f"libtcmalloc-minimal4); set {ENV}=glibc or auto to run without it"
            )
        return lib
    if "/" in choice:
        if not Path(choice).is_file():
            raise AllocatorError(f"{ENV}={choice}: no such file (expected a malloc library)")
        return choice
    raise AllocatorError(
        f"{ENV}={choice!r}: expected auto, glibc, tcmalloc or a path to a malloc library"
    )


def reexec_with_allocator() -> None:
    """Re-execute this very command with the chosen allocator preloaded, once; else return.

    Nothing happens off Linux, under ``glibc``, when an allocator is already preloaded, or
    in the re-executed process itself. Call it first thing in a command-line entry point,
    never from library code (it replaces the process).
    """
    choice = os.environ.get(ENV, "auto").strip() or "auto"
    if not sys.platform.startswith("linux") or os.environ.get(_LOADED):
        return
    lib = wanted_library(choice)
    if lib is None or active_allocator() != "glibc":
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    env[_LOADED] = lib
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
