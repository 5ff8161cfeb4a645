"""What a run measures of task accuracy, not reward: held-out evaluation and skill probes.

``evaluate_heldout`` scores the held-out problems before and after training
(``eval_<tag>.json``); with ``probes.every`` the skill probes and a small held-out slice run
every N steps (``probes/...``, ``accuracy/heldout``) and the emergence detector reads them.
Each process evaluates its share; the records are gathered before they are summarised.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from deepsynapse.config import Config
from deepsynapse.eval import probes
from deepsynapse.eval.harness import evaluate, summarize
from deepsynapse.rl.budget import evaluating
from deepsynapse.rl.collect import synced_engine
from deepsynapse.rl.ranks import gather_all
from deepsynapse.rl.setup import build_problems
from deepsynapse.telemetry.run_logger import release_freed_memory


def build_probes(cfg: Config) -> tuple[list[Any], probes.EmergenceDetector | None]:
    """The skill probe items and the emergence detector (a controller) that ``cfg`` asks for."""
    items = (
        probes.build_probe_suite(
            cfg.probes.seed, cfg.probes.per_skill, cfg.probes.skills or probes.SKILLS
        )
        if cfg.probes.every
        else []
    )
    emergence = (
        probes.EmergenceDetector(n_items=cfg.probes.per_skill)
        if cfg.probes.every and cfg.probes.emergence
        else None
    )
    return items, emergence


def decoding(trainer) -> dict[str, Any]:
    """Who decodes a measurement: vLLM's engine at the policy's current weights where the run
    samples with it (the faster one), else our decoder with the hypernetwork's per-prompt
    scales (``around``)."""
    engine = synced_engine(trainer)
    if engine is None:
        return {"around": trainer.adaptive.for_prompts, "sampler": None}
    return {"around": None, "sampler": engine.generate}


def evaluate_heldout(
    trainer, tag: str, limit: int | None = None, save: bool = True
) -> dict[str, Any] | None:
    """Accuracy of the trainer's policy on the first ``limit`` held-out problems
    (``eval.limit`` by default), saved as ``eval_<tag>.json`` if ``save``; None if limit is 0."""
    cfg = trainer.cfg
    limit = cfg.eval.limit if limit is None else limit
    if limit <= 0:
        return None
    problems, _ = build_problems(cfg.data.eval, "test", cfg)
    problems = problems[:limit]
    shard = problems[trainer.rank :: trainer.world]
    with evaluating(trainer):  # measurement, not training: off the clock where asked
        result = evaluate(
            trainer.unwrapped.peft_model,
            trainer.tokenizer,
            shard,
            trainer.schema,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            progress=trainer.progress and trainer.accelerator.is_main_process,
            desc=f"eval ({tag})",
            pad_multiple=cfg.model.pad_to_multiple_of,
            **decoding(trainer),
        )
    if cfg.train.trim_memory:
        release_freed_memory()
    records = gather_all(trainer.accelerator, result["records"])
    summary = summarize(records, result["seconds"])
    summary["backend"] = result["backend"]
    summary["dtype"] = str(trainer.dtype_choice.dtype)  # greedy answers differ between dtypes
    if save and trainer.accelerator.is_main_process:
        (trainer.run_dir / f"eval_{tag}.json").write_text(json.dumps(summary, indent=1))
    return summary


def shared_before_fits(trainer) -> bool:
    """Whether the ``eval_before.json`` already in the run folder can stand for this run's.

    A study's runs start from the same untrained model, so their evaluations before are the
    same answer for answer where the held-out settings and the dtype are (measured: plain and
    full-critique, seeds 9-13, identical within a dtype, 254 of 384 answers apart between
    fp32 and bf16). ``benchmarks/learning.py`` puts an earlier run's there, marked
    ``shared_from``; it serves if it was made in this run's dtype and decoder. A file without
    the mark is this run's own (an earlier attempt that stopped before its first checkpoint).
    """
    path = trainer.run_dir / "eval_before.json"
    if not path.is_file():
        return False
    result = json.loads(path.read_text(encoding="utf-8"))
    source = result.get("shared_from")
    if source is None:
        return True
    made_in = (result.get("dtype"), result.get("backend"))
    wanted = (str(trainer.dtype_choice.dtype), "ours" if trainer.vllm is None else "vllm")
    if made_in != wanted:
        trainer.say(
            f"evaluation before: the shared one from {source} was made in {made_in[0]} by "
            f"{made_in[1]}, this run decodes in {wanted[0]} by {wanted[1]}: evaluating again"
        )
        return False
    trainer.say(f"evaluation before: the untrained model's, shared from {source}")
    trainer.event("eval_shared", "evaluation before shared", source=source)
    return True


def run_probes(trainer) -> dict[str, float]:
    """Skill probes and a small held-out slice: task accuracy, not reward (3.16)."""
    with evaluating(trainer):
        return _run_probes(trainer)


def _run_probes(trainer) -> dict[str, float]:
    cfg = trainer.cfg
    with torch.random.fork_rng():
        result = probes.run_probes(
            trainer.unwrapped.peft_model,
            trainer.tokenizer,
            trainer.probe_items[trainer.rank :: trainer.world],
            trainer.schema,
            batch_size=cfg.probes.batch_size,
            max_new_tokens=cfg.probes.max_new_tokens,
            pad_multiple=cfg.model.pad_to_multiple_of,
            **decoding(trainer),
        )
    records = gather_all(trainer.accelerator, result["records"])
    out = probes.probe_metrics(probes.summarize_probes(records))
    if cfg.probes.heldout:
        held = evaluate_heldout(trainer, "probe", limit=cfg.probes.heldout, save=False)
        if held is not None:
            out["accuracy/heldout"] = held["accuracy"]
            out["format/heldout_valid_rate"] = held["format_validity"]
    if trainer.emergence is not None:
        for ev in trainer.emergence.observe(trainer.step, out):
            trainer.log.event(trainer.step, ev)
    return out
