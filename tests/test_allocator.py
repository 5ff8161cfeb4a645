"""The command line runs on tcmalloc where the machine has it (deepsynapse.allocator).

Each case starts a fresh interpreter: the allocator is chosen before a process starts, so
the check is what the re-executed process has mapped, read from its own /proc/self/maps.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deepsynapse.allocator import ENV, AllocatorError, find_tcmalloc, wanted_library

SHOW = (
    "from deepsynapse.allocator import reexec_with_allocator, active_allocator; "
    "reexec_with_allocator(); import os; "
    "print(active_allocator(), os.environ.get('LD_PRELOAD', ''))"
)


def _run(choice: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSYNAPSE_ALLOCATOR")}
    env.pop("LD_PRELOAD", None)
    if choice is not None:
        env[ENV] = choice
    return subprocess.run(
        [sys.executable, "-c", SHOW], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc not installed (make setup as root)")
@pytest.mark.parametrize("choice", [None, "auto", "tcmalloc"])
def test_a_command_re_executes_itself_onto_tcmalloc(choice):
    proc = _run(choice)
    assert proc.returncode == 0, proc.stderr
    name, preload = proc.stdout.split(maxsplit=1)
    assert name == "tcmalloc" and "tcmalloc" in preload


def test_glibc_keeps_the_process_as_it_is():
    proc = _run("glibc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["glibc"]


def test_a_bad_choice_names_the_variable_and_what_it_takes(tmp_path):
    with pytest.raises(AllocatorError, match=f"{ENV}='nope': expected auto, glibc, tcmalloc"):
        wanted_library("nope")
    with pytest.raises(AllocatorError, match="no such file"):
        wanted_library(str(tmp_path / "libmissing.so"))
    env = {**os.environ, ENV: "nope"}
    proc = subprocess.run(
        [sys.executable, "-m", "deepsynapse.cli", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2 and f"deepsynapse: error: {ENV}='nope'" in proc.stderr
