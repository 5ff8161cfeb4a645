"""Quickstart: train, evaluate, export and try a model from Python, in notebook-style cells.

    python examples/quickstart.py              # tiny random model: the whole loop in seconds
    python examples/quickstart.py --smollm2    # SmolLM2-135M-Instruct (CPU: about 10 minutes)

Each ``# %%`` cell runs on its own in Jupyter or VS Code. The tiny model is random, so its
numbers mean nothing; it shows the calls. With ``--smollm2`` the same calls train the real
model: an SFT warm-up for the XML format, then GRPO on easy synthetic problems.
"""

# %% Setup
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import deepsynapse.api as ds
from deepsynapse.data.answers import normalize_answer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smollm2", action="store_true", help="train the real SmolLM2-135M-Instruct")
parser.add_argument("--out", default="runs", help="parent folder of the run")
args, _ = parser.parse_known_args()  # parse_known_args: Jupyter passes its own flags

# %% A config, built in code (a YAML path or a Config object work the same way)
if args.smollm2:
    config = "configs/demo-cpu.yaml"
    overrides = ["sft.steps=20", "train.steps=4", "eval.limit=16"]
else:
    config = {
        "model": {"name": "tiny-random", "dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": "synthetic", "eval": "gsm8k"},
        "rollout": {"num_generations": 2, "max_new_tokens": 16},
        "grpo": {"prompts_per_step": 2, "micro_batch_size": 4},
        "rewards": {"weights": {"correctness": 1.0, "strict_format": 0.5, "soft_format": 0.5}},
        "eval": {"limit": 4, "max_new_tokens": 16},
        "train": {"steps": 2, "save_every": 0},
    }
    overrides = []
name = "quickstart-smollm2" if args.smollm2 else "quickstart-tiny"
run_dir = Path(args.out) / name
shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run folder: start afresh


# %% Rewards are plain functions in TRL's convention; a TRL reward function works unchanged.
def integer_answer(completions, parsed, **kwargs):
    """GSM8K answers are whole numbers: a small bonus when <answer> holds an integer."""
    out = []
    for p in parsed:  # `parsed`: the XML Structural Guardian's verdict on each completion
        value = normalize_answer(p.answer) if p.answer else None
        out.append(0.2 if value is not None and "." not in value else 0.0)
    return out


def reward_len(completions, **kwargs):  # verbatim from TRL's documentation
    return [-abs(20 - len(c)) for c in completions]


# %% Train (a run folder: config.yaml, metrics.jsonl, events.jsonl, checkpoints/, summary.json)
result = ds.train(
    config,
    overrides=[*overrides, "rewards.weights.reward_len=0.01"],
    rewards={"integer_answer": integer_answer, "reward_len": reward_len},
    run_dir=run_dir,
    progress=True,
)
print(json.dumps(result.summary["last_steps"], indent=1))

# %% Evaluate on held-out GSM8K (greedy)
scores = ds.evaluate(result.run_dir, limit=4 if not args.smollm2 else 32, max_new_tokens=64)
print({k: scores[k] for k in ("n", "accuracy", "format_validity")})

# %% Export: a merged transformers folder and a GGUF file for llama.cpp / Ollama
merged = ds.export(result.run_dir, "merged", run_dir / "export-merged")
gguf_file = ds.export(result.run_dir, "gguf", run_dir / "export-gguf", gguf_dtype="f16")
print("merged folder:", merged, "\nGGUF file:", gguf_file)

# %% Try it: load once, ask several questions
model, tokenizer = ds.load(result.run_dir)
for question in [
    "Tom has 3 boxes of 12 pencils and gives away 5 pencils. How many pencils are left?",
    "A train travels 60 km per hour for 3 hours. How far does it go?",
]:
    answer = ds.generate((model, tokenizer), question, max_new_tokens=128)
    print(f"\n{question}\n-> answer {answer.answer!r}, valid format: {answer.valid}")
    print(answer.text)
