"""Worker for the 2-process launch test: `torchrun --nproc_per_node 2 tests/dist_worker.py OUT`.

Each rank trains the tiny model for two steps and writes which problems it rolled out and a
fingerprint of its trainable parameters, so the test can check sharding and equality.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import EXTRA_REWARDS, TINY  # noqa: E402

from deepsynapse.config import load_config  # noqa: E402
from deepsynapse.rl.trainer import Trainer  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(
        None,
        TINY
        + ["grpo.prompts_per_step=4", "eval.limit=4", "sft.steps=1", "grpo.dynamic_sampling=true"],
    )
    trainer = Trainer(cfg, run_dir=Path(out_dir) / "run", progress=False, reward_fns=EXTRA_REWARDS)
    seen: list[list[str]] = []
    original = trainer.rollout

    def recording_rollout(problems, knobs):
        seen.append([p.id for p in problems])
        return original(problems, knobs)

    trainer.rollout = recording_rollout
    summary = trainer.train()
    params = {
        n: p.detach().double().sum().item()
        for n, p in trainer.unwrapped.named_parameters()
        if p.requires_grad
    }
    Path(out_dir, f"rank{trainer.rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.rank,
                "world": trainer.world,
                "seen": seen,
                "params": params,
                "eval_n": summary["eval_after"]["n"] if summary.get("eval_after") else None,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
