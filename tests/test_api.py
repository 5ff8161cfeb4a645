"""The notebook API: train from code with TRL-style rewards, then load, evaluate, generate."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

import deepsynapse.api as ds
from deepsynapse.cli import main
from deepsynapse.config import Config, ConfigError
from deepsynapse.formats import ParsedCompletion
from deepsynapse.telemetry.run_logger import read_jsonl


def reward_len(completions, **kwargs):
    """TRL's documented example reward, verbatim: completions near 20 characters score best."""
    return [-abs(20 - len(c)) for c in completions]


def positional_reward(prompts, completions, **columns):
    """DeepSynapse's own convention: (prompts, completions) first, columns by keyword."""
    return [1.0 if a in c else 0.0 for c, a in zip(completions, columns["answer"], strict=True)]


CODE_CONFIG = {
    "model": {"name": "tiny-random", "dtype": "fp32"},
    "lora": {"r": 4, "alpha": 8},
    "rollout": {"num_generations": 2, "max_new_tokens": 12},
    "grpo": {"prompts_per_step": 2, "micro_batch_size": 2},
    "optim": {"lr": 1e-3},
    "rewards": {"weights": {"correctness": 1.0, "strict_format": 0.5}},
    "eval": {"limit": 0},
    "train": {"steps": 2, "save_every": 1},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two GRPO steps from code, a TRL reward passed as a plain function."""
    root = tmp_path_factory.mktemp("api")
    result = ds.train(
        CODE_CONFIG,
        overrides=["data.train=gsm8k"],
        rewards={"reward_len": reward_len, "has_answer": positional_reward},
        run_dir=root / "run",
        progress=False,
    )
    return result


def test_two_step_training_from_code_with_a_trl_reward(run):
    assert run.summary["steps"] == 2 and (run.run_dir / "checkpoints" / "step-2").is_dir()
    assert run.config.rewards.weights == {
        "correctness": 1.0,
        "strict_format": 0.5,
        "reward_len": 1.0,
        "has_answer": 1.0,
    }
    rows = [r for r in read_jsonl(run.run_dir / "metrics.jsonl") if "reward/fused/mean" in r]
    assert len(rows) == 2 and all("rewards/reward_len/mean" in r for r in rows)
    assert all(r["weights/reward_len"] == 1.0 for r in rows)
    assert all(r["rewards/reward_len/none_rate"] == 0.0 for r in rows)  # it never failed
    samples = read_jsonl(run.run_dir / "samples.jsonl")
    assert samples
    for s in samples:  # the function saw the completions, not the prompts
        assert s["rewards"]["reward_len"] == -abs(20 - len(s["completion"]))
        assert s["rewards"]["has_answer"] == float(s["gold"] in s["completion"])
    kinds = {e["kind"] for e in read_jsonl(run.run_dir / "events.jsonl")}
    assert "reward_error" not in kinds


def test_reward_wrapper_calls_each_style_correctly():
    trl = ds.as_reward_component("reward_len", reward_len)
    ours = ds.as_reward_component("has_answer", positional_reward)
    assert trl.name == "reward_len" and ours.name == "has_answer"
    prompts, completions = ["a prompt that is long"], ["x" * 18]
    assert trl(prompts, completions, answer=["7"]) == [-2]
    assert ours(prompts, ["it is 7"], answer=["7"]) == [1.0]


def test_build_config_accepts_every_form(tmp_path):
    cfg = ds.build_config(CODE_CONFIG, ["grpo.beta=0.2"])
    assert cfg.model.name == "tiny-random" and cfg.grpo.beta == 0.2 and cfg.train.steps == 2
    again = ds.build_config(cfg, ["train.steps=5"])
    assert again.train.steps == 5 and again.lora.r == 4 and cfg.train.steps == 2
    assert ds.build_config(Config(), TINY).rollout.num_generations == 2
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: tiny-random\n")
    assert ds.build_config(path).model.name == "tiny-random"
    with pytest.raises(ConfigError, match=r"^config: unknown key 'grpo.betta'; did you mean"):
        ds.build_config({"grpo": {"betta": 0.1}})
    with pytest.raises(ConfigError, match="expected a Config, a YAML path, a dict or None"):
        ds.build_config(["model.name=x"])  # type: ignore[arg-type]


def test_load_generate_evaluate_a_run(run):
    model, tokenizer = ds.load(run.run_dir, dtype="fp32")
    assert type(model).__name__ == "PeftModelForCausalLM" and model.dtype == torch.float32
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    first = ds.generate((model, tokenizer), question, max_new_tokens=6)
    assert isinstance(first.parsed, ParsedCompletion) and first.schema == "base"
    assert 0 < first.tokens <= 6 and first.truncated and not first.valid
    again = ds.generate(run.run_dir, question, max_new_tokens=6, dtype="fp32", checkpoint="step-1")
    from_ckpt = ds.generate(run.run_dir / "checkpoints" / "step-1", question, max_new_tokens=6)
    assert again.text == from_ckpt.text  # same checkpoint, greedy
    result = ds.evaluate(run.run_dir, limit=2, max_new_tokens=6, dtype="fp32", progress=False)
    assert result["n"] == 2 and len(result["records"]) == 2
    assert 0.0 <= result["format_validity"] <= 1.0


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_generate_runs_an_export_with_its_schema(run, tmp_path, fmt):
    out = ds.export(run.run_dir, fmt, tmp_path / fmt)
    model, _ = ds.load(out, dtype="fp32")
    assert type(model).__name__ == ("PeftModelForCausalLM" if fmt == "peft" else "LlamaForCausalLM")
    completion = ds.generate((model, _), "What is 2 + 2?", max_new_tokens=4)
    assert completion.schema == "base" and completion.tokens <= 4


@pytest.mark.slow
def test_generate_runs_a_gguf_export_folder(run, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSYNAPSE_CACHE", str(tmp_path / "cache"))  # the GGUF is converted once
    out = ds.export(run.run_dir, "gguf", tmp_path / "gguf", gguf_dtype="f32")
    expected = ds.generate(run.run_dir, "What is 2 + 2?", max_new_tokens=6, dtype="fp32")
    got = ds.generate(out.parent, "What is 2 + 2?", max_new_tokens=6, dtype="fp32")
    assert got.text == expected.text and got.schema == "base"


def test_cli_generate_on_a_run_prints_fields_and_verdict(run, capsys):
    argv = ["generate", str(run.run_dir), "What is 6 times 7?", "--max-new-tokens", "5"]
    assert main(argv + ["--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "reasoning: (missing)" in out and "format: INVALID (" in out and "truncated" in out
    assert main(["generate", str(run.run_dir / "nothing"), "q"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_trainer_calls_a_raw_trl_function_by_keyword():
    from deepsynapse.rewards.base import call_components

    scores, failures = call_components([reward_len], ["p"], ["x" * 25], {"answer": ["1"]})
    assert failures == [] and scores == {"reward_len": [-5.0]}
