"""Worker for the 2-process tests: `torchrun --nproc_per_node 2 tests/rl/dist_worker.py OUT MODE...`.

For each mode in turn (one launch: the processes, their imports and the process group are
set up once), each rank trains the tiny model in ``OUT/MODE`` and writes which problems it
rolled out, a fingerprint of its trainable parameters, and (mode ``controllers``: curriculum
with locking, an adaptive allocator, KL-temperature on) the knobs, controller metrics and
parameters after every step, so the test can check sharding and that every rank took the
same decisions.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: conftest
from conftest import EXTRA_REWARDS, TINY  # noqa: E402

from deepsynapse.config import load_config  # noqa: E402
from deepsynapse.models import loading  # noqa: E402
from deepsynapse.rl.setup import end_processes  # noqa: E402
from deepsynapse.rl.trainer import Trainer  # noqa: E402

CONTROLLERS = [
    "train.steps=4",
    "grpo.beta=0.05",
    "rewards.allocator=mirror",
    "control.curriculum.enabled=true",
    "control.curriculum.phases=[{name: structure, trainable_groups: [lora_mlp], min_steps: 1,"
    " reward_weights: {strict_format: 0.9}, temperature: [1.0, 0.8],"
    " exit: {metric: completion/length_mean, threshold: 0, window: 1}},"
    " {name: reasoning, beta: 0.08, reward_weights: {correctness: 2.0}}]",
    "control.kl_temperature.enabled=true",
    "control.kl_temperature.kl_target=0.0001",
]


# A time budget, and one process whose clock says 6 s more have passed (a later start): each
# plans its warm-up and GRPO steps on its own clock, and they must still run the same steps.
BUDGET = [
    "train.steps=500",
    "train.time_budget=14s",
    "train.budget_counts_evaluations=false",
    "sft.steps=40",
    "model.dtype=auto",
]
CLOCK_SKEW_S = 6.0
# And dtype auto, whose bf16 probe reads either side of fp32 on the two processes (a busy
# moment on one): both must compute in the first process's pick.
BF16_SPEEDUP_BY_RANK = (0.9, 1.5)


def fingerprint(trainer) -> dict[str, float]:
    return {
        n: p.detach().double().sum().item()
        for n, p in trainer.unwrapped.named_parameters()
        if p.requires_grad
    }


def run(out_dir: Path, mode: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"controllers": CONTROLLERS, "budget": BUDGET}.get(mode, [])
    cfg = load_config(
        None,
        TINY
        + ["grpo.prompts_per_step=4", "eval.limit=4", "sft.steps=1", "grpo.dynamic_sampling=true"]
        + extra,
    )
    if mode == "budget":
        speedup = BF16_SPEEDUP_BY_RANK[int(os.environ["RANK"])]
        loading.cpu_supports_bf16 = lambda: True
        loading.bf16_matmul_speedup = lambda: speedup
    trainer = Trainer(cfg, run_dir=out_dir / "run", progress=False, reward_fns=EXTRA_REWARDS)
    if mode == "budget" and trainer.rank == 1:
        trainer.budget.spent_before += CLOCK_SKEW_S
    seen: list[list[str]] = []
    steps: list[dict] = []
    original, original_step = trainer.rollout, trainer.train_step

    def recording_rollout(problems, knobs):
        seen.append([p.id for p in problems])
        return original(problems, knobs)

    def recording_step(step):
        metrics = original_step(step)
        steps.append(
            {
                "knobs": trainer.knobs.state_dict(),
                "decided": {
                    k: v
                    for k, v in metrics.items()
                    if k.startswith(("weights/", "knobs/", "curriculum/", "trainable/"))
                },
                "params": fingerprint(trainer),
                "cursor": trainer.sampler.cursor,
            }
        )
        return metrics

    trainer.rollout = recording_rollout
    trainer.train_step = recording_step
    summary = trainer.train()
    params = fingerprint(trainer)
    (out_dir / f"rank{trainer.rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.rank,
                "world": trainer.world,
                "seen": seen,
                "steps": steps,
                "params": params,
                "eval_n": summary["eval_after"]["n"] if summary.get("eval_after") else None,
                "sft_steps": trainer.sft_step,
                "grpo_steps": trainer.step,
                "dtype": str(trainer.dtype_choice.dtype),
                "dtype_reason": trainer.dtype_choice.reason,
                # the frozen base's dtype (the first parameter could be a LoRA one, always fp32)
                "param_dtype": ",".join(
                    sorted(
                        {
                            str(p.dtype)
                            for p in trainer.unwrapped.parameters()
                            if not p.requires_grad
                        }
                    )
                ),
            }
        )
    )


def main(out_dir: str, *modes: str) -> None:
    torch.set_num_threads(1)
    for mode in modes or ("plain",):
        run(Path(out_dir) / mode, mode)
    # As the command line does: a rank that exits with its gloo group still open can abort in
    # the group's C++ teardown ("terminate called without an active exception",
    # pytorch#190489). The same message was seen once more mid-run: not this cause alone.
    end_processes()


if __name__ == "__main__":
    main(*sys.argv[1:])
