"""Two processes on CPU (gloo) through Accelerate: rollouts sharded, parameters identical."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *modes: str, timeout: float = 600) -> dict[str, tuple[dict, dict]]:
    """One torchrun of two processes through every mode (the start-up paid once); per mode,
    what rank 0 and rank 1 wrote."""
    worker = Path(__file__).parent / "dist_worker.py"
    # PYTHONFAULTHANDLER: a rank that aborts in C++ prints where its Python threads were.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONFAULTHANDLER": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(worker),
        str(tmp_path),
        *modes,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        mode: tuple(json.loads((tmp_path / mode / f"rank{i}.json").read_text()) for i in (0, 1))
        for mode in modes
    }


@pytest.mark.heavy
def test_two_processes_take_the_same_decisions_and_plan_the_same_budgeted_steps(tmp_path):
    """Both 2-process properties from one launch of two processes (each check below)."""
    ranks = launch(tmp_path, "controllers", "budget")
    check_the_same_decisions_every_step(tmp_path / "controllers", *ranks["controllers"])
    check_clocks_apart_plan_the_same_budgeted_steps(*ranks["budget"])


def check_the_same_decisions_every_step(out: Path, r0: dict, r1: dict) -> None:
    """Two processes on gloo, curriculum with locking, an adaptive allocator and KL-temperature
    on: rollouts sharded, and after every step the knobs, the decisions logged, the data
    cursors and the parameters are identical on both ranks."""
    assert r0["world"] == r1["world"] == 2
    # Each rank rolled out its own half of each step's prompts.
    for a, b in zip(r0["seen"][:2], r1["seen"][:2], strict=True):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    # DDP moved the trainable parameters from LoRA's zero init; evaluation was sharded and
    # gathered: 4 problems in all.
    assert any(abs(v) > 0 for n, v in r0["params"].items() if "lora_B" in n)
    assert r0["eval_n"] == 4
    assert (out / "run" / "metrics.jsonl").is_file()
    assert len(r0["steps"]) == len(r1["steps"]) == 4
    for k, (a, b) in enumerate(zip(r0["steps"], r1["steps"], strict=True)):
        assert a["knobs"] == b["knobs"], f"knobs differ after step {k + 1}"
        assert a["decided"] == b["decided"], f"decisions differ after step {k + 1}"
        assert a["cursor"] == b["cursor"], f"data cursors differ after step {k + 1}"
        for name, value in a["params"].items():
            assert abs(value - b["params"][name]) < 1e-6 * max(1.0, abs(value)), (k, name)
    phases = [s["knobs"]["phase"] for s in r0["steps"]]
    assert phases[0] == "structure" and phases[-1] == "reasoning"  # the curriculum moved
    assert r0["steps"][0]["knobs"]["trainable_groups"] == ["lora_mlp"]  # locking acted
    assert r0["steps"][0]["decided"]["weights/strict_format"] == 0.9  # phase weight reached


def check_clocks_apart_plan_the_same_budgeted_steps(r0: dict, r1: dict) -> None:
    """A time budget is planned on each process's own clock; one started 6 s later would plan
    fewer steps and leave the other waiting in a collective for ever. Every process runs the
    fewest any planned, and all stop when one's clock runs out. The same launch asks for dtype
    auto with bf16's probe reading 0.9x fp32 on one process and 1.5x on the other: both must
    compute in the first's pick, fp32."""
    assert r0["dtype"] == r1["dtype"] == "torch.float32"
    assert r0["param_dtype"] == r1["param_dtype"] == "torch.float32"
    assert r0["dtype_reason"] == r1["dtype_reason"] and "0.90x" in r0["dtype_reason"]
    assert r0["sft_steps"] == r1["sft_steps"] < 40  # the budget cut the warm-up, alike
    assert r0["grpo_steps"] == r1["grpo_steps"] < 500
    assert len(r0["steps"]) == len(r1["steps"]) == r0["grpo_steps"]
    for name, value in r0["params"].items():
        assert abs(value - r1["params"][name]) < 1e-6 * max(1.0, abs(value)), name
