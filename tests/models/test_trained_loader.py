"""One loader of a trained policy: what eval, probe, generate, the API and export run is what
the trainer trained (module scales, hypernetwork per prompt, neural memory), not the raw
PEFT adapter, and the trainer's resume restores the same state through the same code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import EXTRA_REWARDS, TINY
from peft import PeftModel

import deepsynapse.api as ds
from deepsynapse.checkpoint import CheckpointError, latest_checkpoint
from deepsynapse.cli import main
from deepsynapse.config import load_config
from deepsynapse.eval.harness import evaluate
from deepsynapse.formats import get_schema
from deepsynapse.interactive import complete
from deepsynapse.models.dynamic_lora import adaptive_modules, module_scales
from deepsynapse.models.loading import load_model
from deepsynapse.models.policy import PolicyModule
from deepsynapse.prompting import build_prompt
from deepsynapse.rl.trainer import Trainer, build_problems
from deepsynapse.rollout.hf import generate_groups

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
LIMIT, MAX_NEW = 3, 8
OVERRIDES = [
    "train.steps=2",
    "sft.steps=0",
    "eval.limit=0",
    "optim.lr=0.05",
    "lora.module_scales=true",
    "hypernet.enabled=true",
    "memory.enabled=true",
    f"eval.max_new_tokens={MAX_NEW}",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with module scales, the hypernetwork and the neural memory.

    Two steps hardly move those parts, so before the last checkpoint is written they are set
    to clearly non-trivial values (scales away from 1, prompt-dependent hypernet multipliers,
    an open memory gate): the trainer's in-memory policy is then the reference every loader
    must reproduce.
    """
    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(None, TINY + OVERRIDES)
    trainer = Trainer(cfg, run_dir=root / "run", progress=False, reward_fns=EXTRA_REWARDS)
    trainer.train()
    model = trainer.unwrapped.peft_model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        scales = module_scales(model).scales
        scales.copy_(torch.linspace(0.3, 1.9, scales.numel()))
        hypernet = adaptive_modules(model)["hypernet"]
        hypernet.up.weight.copy_(torch.randn(hypernet.up.weight.shape, generator=g) * 0.5)
        adaptive_modules(model)["memory"].gate.fill_(0.7)
    trainer.save_checkpoint()  # step-2 again, now holding these values
    model.eval()
    problems = build_problems("gsm8k", "test", cfg)[0][:LIMIT]
    return {"trainer": trainer, "run": root / "run", "cfg": cfg, "problems": problems}


def trainer_eval(trained) -> list[str]:
    t = trained["trainer"]
    result = evaluate(
        t.unwrapped.peft_model,
        t.tokenizer,
        trained["problems"],
        get_schema("base"),
        batch_size=16,
        max_new_tokens=MAX_NEW,
        progress=False,
        around=t.adaptive.for_prompts,
        pad_multiple=t.cfg.model.pad_to_multiple_of,
    )
    return [r["completion"] for r in result["records"]]


def rollout(trained):
    """Greedy completions of the trainer's policy (with its hypernet scales) to score."""
    t = trained["trainer"]
    prompts = [
        build_prompt(t.tokenizer, p.question, get_schema("base")) for p in trained["problems"]
    ]
    return generate_groups(
        t.unwrapped.peft_model,
        t.tokenizer,
        prompts,
        num_generations=1,
        max_new_tokens=MAX_NEW,
        greedy=True,
        prefix_sharing=False,
        around=t.adaptive.for_prompts,
    )


@torch.no_grad()
def logprobs(policy: PolicyModule, adaptive, out) -> torch.Tensor:
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    attn = torch.cat([out.prompt_mask, out.completion_mask], 1)
    ctx = adaptive.for_rows(out.prompt_ids, out.prompt_mask) if adaptive is not None else None
    if ctx is None:
        return policy(ids, attn, out.completion_mask).logp
    with ctx:
        return policy(ids, attn, out.completion_mask).logp


def test_the_loader_gives_the_trainers_policy_and_the_raw_adapter_does_not(trained):
    from deepsynapse.models.trained import load_trained_policy

    t = trained["trainer"]
    loaded = load_trained_policy(trained["run"], device="cpu")
    assert loaded.checkpoint == latest_checkpoint(trained["run"] / "checkpoints")
    assert loaded.step == 2 and loaded.schema == "base"
    assert loaded.model.dtype == torch.float32 and not loaded.model.training
    # the adaptive parts are back, with the trained values
    assert torch.equal(
        module_scales(loaded.model).scales, module_scales(t.unwrapped.peft_model).scales
    )
    assert loaded.adaptive.scaler is not None and loaded.adaptive.memory is not None

    out = rollout(trained)
    expected = logprobs(t.unwrapped, t.adaptive, out)
    got = logprobs(loaded.policy, loaded.adaptive, out)
    mask = out.completion_mask.bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5), (got - expected).abs().max()
    assert torch.equal(
        loaded.completion_logprobs(
            out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask
        ),
        got,
    )
    result = loaded.evaluate(trained["problems"], max_new_tokens=MAX_NEW, progress=False)
    assert [r["completion"] for r in result["records"]] == trainer_eval(trained)

    # The old path (the raw PEFT adapter on the base) is a different function.
    raw = PeftModel.from_pretrained(
        load_model("tiny-random", torch.float32, t.tokenizer), str(loaded.checkpoint / "adapter")
    ).eval()
    old = logprobs(PolicyModule(raw), None, out)
    assert (old[mask] - expected[mask]).abs().max() > 1e-3


def test_cli_eval_api_evaluate_and_generate_run_the_trained_policy(trained, tmp_path, capsys):
    t = trained["trainer"]
    expected = trainer_eval(trained)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", "tiny-random", "--adapter", str(trained["run"]), "--quiet"]
    argv += ["--limit", str(LIMIT), "--max-new-tokens", str(MAX_NEW), "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert [r["completion"] for r in saved["records"]] == expected
    assert saved["checkpoint"].endswith("step-2") and saved["model"] == "tiny-random"
    capsys.readouterr()

    result = ds.evaluate(trained["run"], limit=LIMIT, max_new_tokens=MAX_NEW, progress=False)
    assert [r["completion"] for r in result["records"]] == expected

    want = complete(
        t.unwrapped.peft_model, t.tokenizer, QUESTION, "base", max_new_tokens=MAX_NEW,
        around=t.adaptive.for_prompts,
    )  # fmt: skip
    got = ds.generate(trained["run"], QUESTION, max_new_tokens=MAX_NEW)
    assert got.text == want.text
    # load() keeps the hypernetwork: the (model, tokenizer) pair generates the same
    again = ds.generate(ds.load(trained["run"]), QUESTION, max_new_tokens=MAX_NEW)
    assert again.text == want.text
    # a checkpoint folder and its adapter folder name the same policy
    step = trained["run"] / "checkpoints" / "step-2"
    assert ds.generate(step / "adapter", QUESTION, max_new_tokens=MAX_NEW).text == want.text


def test_cli_probe_loads_the_run_through_the_one_loader(trained, tmp_path, monkeypatch):
    import deepsynapse.models.trained as trained_module

    calls = []
    real = trained_module.load_trained_policy

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(trained_module, "load_trained_policy", spy)
    out = tmp_path / "probe.json"
    argv = ["probe", "--model", "tiny-random", "--adapter", str(trained["run"])]
    argv += ["--per-skill", "1", "--max-new-tokens", "4", "-o", str(out)]
    assert main(argv) == 0
    assert calls and set(json.loads(out.read_text())["skills"]) >= {"arithmetic", "format"}


def test_restore_policy_state_is_what_resume_needs(trained, tmp_path):
    """A fresh trainer (a new process resuming) gets the trained function back from the
    checkpoint through ``restore_policy_state``, optimizer included."""
    from deepsynapse.models.trained import restore_policy_state

    t = trained["trainer"]
    fresh = Trainer(trained["cfg"], run_dir=tmp_path / "fresh", progress=False,
                    reward_fns=EXTRA_REWARDS)  # fmt: skip
    out = rollout(trained)
    mask = out.completion_mask.bool()
    before = logprobs(fresh.unwrapped, fresh.adaptive, out)
    expected = logprobs(t.unwrapped, t.adaptive, out)
    assert (before[mask] - expected[mask]).abs().max() > 1e-3
    ckpt = latest_checkpoint(trained["run"] / "checkpoints")
    state = restore_policy_state(fresh.unwrapped.peft_model, fresh.adaptive, ckpt, fresh.optimizer)
    assert state["step"] == 2
    fresh.unwrapped.eval()
    after = logprobs(fresh.unwrapped, fresh.adaptive, out)
    assert torch.allclose(after[mask], expected[mask], atol=1e-5)


def test_a_config_that_disagrees_with_the_checkpoint_is_refused(trained, tmp_path):
    from deepsynapse.models.trained import load_trained_policy

    run = tmp_path / "copy"
    shutil.copytree(trained["run"], run)
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["lora"]["module_scales"] = False
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match="module_scales"):
        load_trained_policy(run)
    with pytest.raises(CheckpointError, match="no complete checkpoint 'step-9'"):
        load_trained_policy(trained["run"], "step-9")
