"""`deepsynapse train` prints nothing a user cannot act on (no library deprecation chatter)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TINY

NOISE = ("FutureWarning", "DeprecationWarning", "deprecated", "UserWarning")


@pytest.mark.heavy
def test_train_prints_no_library_warnings(tmp_path):
    # The demo recipe (every part it switches on), shrunk to the tiny model.
    overrides = [o for o in TINY if not o.startswith("rewards.weights")] + [
        "train.steps=1",
        "sft.steps=1",
        "eval.limit=1",
        f"train.output_dir={tmp_path}",
        "train.run_name=quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "deepsynapse.cli", "train", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    noisy = [line for line in text.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy)
    # The command line re-executed itself onto tcmalloc where the machine has it, and says so.
    from deepsynapse.allocator import ENV, find_tcmalloc
    from deepsynapse.telemetry.run_logger import read_jsonl

    (start,) = [e for e in read_jsonl(tmp_path / "quiet" / "events.jsonl") if e["kind"] == "start"]
    on_tcmalloc = find_tcmalloc() and os.environ.get(ENV, "auto") in ("auto", "tcmalloc")
    assert start["evidence"]["allocator"] == ("tcmalloc" if on_tcmalloc else "glibc")
    assert f"C allocator {start['evidence']['allocator']}" in proc.stdout + proc.stderr
