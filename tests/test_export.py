"""Exports round-trip: what PEFT, transformers and GGUF readers load gives the trained logits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import EXTRA_REWARDS, TINY
from peft import PeftModel
from safetensors.torch import load_file

from deepsynapse.checkpoint import CheckpointError, load_tree
from deepsynapse.cli import main
from deepsynapse.config import load_config
from deepsynapse.export import (
    ExportError,
    RunCheckpoint,
    _bake_adaptive_parts,
    export_run,
    find_checkpoint,
    gguf_tensor_name,
    rope_interleave,
    tokenizer_pre_name,
    write_gguf,
)
from deepsynapse.formats import system_prompt
from deepsynapse.models.loading import load_model
from deepsynapse.rl.trainer import Trainer

TEXTS = [
    "Natalia sold 48 clips in April and half as many in May. How many in all?",
    "<reasoning>\n48 / 2 = 24\n</reasoning>\n<answer>\n72\n</answer>",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step run with per-module LoRA scales, trained far enough that merging matters.

    The scales only move once lora_B is non-zero (step 2); exports must fold them in.
    """
    root = tmp_path_factory.mktemp("export")
    overrides = ["train.steps=2", "sft.steps=0", "eval.limit=0", "optim.lr=0.05"]
    cfg = load_config(None, TINY + overrides + ["lora.module_scales=true"])
    trainer = Trainer(cfg, run_dir=root / "run", progress=False, reward_fns=EXTRA_REWARDS)
    trainer.train()
    policy = trainer.unwrapped.peft_model.eval()
    enc = trainer.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = policy(**enc).logits
        with policy.disable_adapter():
            base_logits = policy(**enc).logits
    return {
        "root": root,
        "run": root / "run",
        "tokenizer": trainer.tokenizer,
        "enc": enc,
        "logits": logits,
        "base_logits": base_logits,
    }


def max_diff(model, trained) -> float:
    enc = trained["enc"]
    with torch.no_grad():
        out = model(**enc).logits
    mask = enc["attention_mask"].bool()
    return float((out - trained["logits"])[mask].abs().max())


def adapter_effect(trained) -> float:
    mask = trained["enc"]["attention_mask"].bool()
    return float((trained["logits"] - trained["base_logits"])[mask].abs().max())


def test_peft_export_loads_in_plain_peft_and_matches(trained):
    out = export_run(trained["run"], "peft", trained["root"] / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    run = find_checkpoint(trained["run"])
    scales = load_tree(run.checkpoint, "trainer_state")["adaptive"]["lora"]["module_scales"]
    assert (scales["values"] - 1.0).abs().max() > 1e-3  # the scales moved: baking matters
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert exported.keys() == load_file(str(run.adapter_dir / "adapter_model.safetensors")).keys()
    base = load_model("tiny-random", torch.float32, trained["tokenizer"])
    model = PeftModel.from_pretrained(base, str(out)).eval()
    assert adapter_effect(trained) > 0.05
    assert max_diff(model, trained) < 1e-5
    # The checkpoint's raw adapter, without the scales baked in, is a different function.
    base = load_model("tiny-random", torch.float32, trained["tokenizer"])
    raw = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    assert max_diff(raw, trained) > 1e-3


def test_merged_export_loads_with_plain_transformers(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_run(trained["run"], "merged", trained["root"] / "merged")
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
    } <= names
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.dtype == torch.float32
    assert not any("lora" in n for n, _ in model.named_parameters())
    diff = max_diff(model, trained)
    assert diff < 1e-5, diff
    assert adapter_effect(trained) > 1000 * max(diff, 1e-7) or diff == 0.0
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == trained["tokenizer"].chat_template
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == trained["tokenizer"](text)["input_ids"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == trained["tokenizer"].eos_token_id


def test_model_card_has_config_prompt_and_format(trained):
    out = trained["root"] / "card"
    export_run(trained["run"], "peft", out)
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "## Training configuration" in card
    assert "name: tiny-random" in card and "steps: 2" in card
    assert system_prompt("base") in card
    assert "<|im_start|>system" in card  # the chat template, rendered
    assert "<answer>" in card
    assert (out / "system_prompt.txt").read_text().strip() == system_prompt("base")
    assert json.loads((out / "deepsynapse.json").read_text())["schema"] == "base"


def test_gguf_export_of_a_run_writes_llama_metadata(trained):
    from transformers.integrations.gguf.reader import read_gguf_metadata

    path = export_run(trained["run"], "gguf", trained["root"] / "gguf", gguf_dtype="f16")
    assert path.suffix == ".gguf" and (path.parent / "README.md").is_file()
    meta, tensors = read_gguf_metadata(str(path))
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == 1  # MOSTLY_F16
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.rope.dimension_count"] == 16
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.eos_token_id"] == trained["tokenizer"].eos_token_id
    assert meta["tokenizer.chat_template"] == trained["tokenizer"].chat_template
    assert "output.weight" not in tensors  # tied embeddings
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_norm.weight"} <= set(tensors)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("gguf_type", "tolerance"), [("f32", 1e-5), ("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 8e-2)]
)
def test_gguf_of_a_run_reloads_in_transformers(trained, gguf_type, tolerance):
    """The full-vocabulary file through transformers' GGUF reader (5-8 s: it parses 49k tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = export_run(
        trained["run"], "gguf", trained["root"] / f"gguf-{gguf_type}", gguf_dtype=gguf_type
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    diff = max_diff(model, trained)
    print(
        f"GGUF {gguf_type}: max |logit diff| = {diff:.3e}, adapter effect {adapter_effect(trained):.3f}"
    )
    assert diff < tolerance
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tokenizer.chat_template == trained["tokenizer"].chat_template
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == trained["tokenizer"](text)["input_ids"]


def test_parts_that_cannot_be_baked_are_refused(trained):
    run = find_checkpoint(trained["run"])
    with_memory = load_config(None, TINY + ["memory.enabled=true"])
    with pytest.raises(ExportError, match="neural memory"):
        _bake_adaptive_parts(None, RunCheckpoint(run.run_dir, run.checkpoint, with_memory))
    with_hypernet = load_config(None, TINY + ["hypernet.enabled=true"])
    with pytest.raises(ExportError, match="needs eval problems"):
        _bake_adaptive_parts(None, RunCheckpoint(run.run_dir, run.checkpoint, with_hypernet))


def test_hypernet_run_exports_its_mean_scales_and_reports_the_accuracy_change(tmp_path, capsys):
    overrides = ["train.steps=2", "sft.steps=0", "eval.limit=0", "optim.lr=0.05"]
    cfg = load_config(None, TINY + overrides + ["hypernet.enabled=true", "lora.module_scales=true"])
    run_dir = tmp_path / "run"
    Trainer(cfg, run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS).train()
    out = tmp_path / "peft"
    argv = ["export", str(run_dir), "--format", "peft", "--out", str(out), "--eval-limit", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "hypernetwork baked at its mean scales over 3 eval problems" in printed
    report = json.loads((out / "hypernet_bake.json").read_text())
    assert report["problems"] == 3
    for key in ("per_input", "baked_mean"):
        assert set(report[key]) == {"accuracy", "format_validity"}
    assert report["accuracy_difference"] == pytest.approx(
        report["baked_mean"]["accuracy"] - report["per_input"]["accuracy"]
    )
    mean = torch.tensor(report["mean_multipliers"])
    assert mean.ndim == 1 and not torch.allclose(mean, torch.ones_like(mean))  # it trained

    # The plain adapter PEFT loads == the trained policy with the hypernet held at the mean.
    from deepsynapse.export import trained_policy
    from deepsynapse.models.hypernet import hypernet_scales

    run = find_checkpoint(run_dir)
    model, tok, adaptive = trained_policy(run)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), hypernet_scales(model, mean.unsqueeze(0).expand(len(TEXTS), -1)):
        expected = model(**enc).logits
    loaded = PeftModel.from_pretrained(load_model("tiny-random", torch.float32, tok), str(out))
    with torch.no_grad():
        got = loaded.eval()(**enc).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    with pytest.raises(ExportError, match="--eval-limit must be > 0"):
        export_run(run_dir, "peft", tmp_path / "again", eval_limit=0, progress=False)


# ------------------------------------------------------------------ GGUF layout on small models


@pytest.fixture(scope="module")
def small_tokenizer():
    """A 300-token byte-level BPE: GGUF files that transformers reads back in a blink."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return hf


def small_model(arch: str, tokenizer):
    """Random weights large enough that attention is far from uniform (q/k layout matters)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, config_cls = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
    }[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(config).eval()
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # zero/one at init: make them count
                p.data += 0.1 * torch.randn_like(p)
    return model


def rounded_like_gguf(model, gguf_type: str):
    """A copy of ``model`` whose 2-D weights went through the GGUF type and back."""
    import copy

    import gguf

    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[gguf_type]
    out = copy.deepcopy(model)
    for p in out.parameters():
        if p.ndim == 2:
            q = gguf.quants.quantize(p.detach().numpy(), qtype)
            p.data = torch.from_numpy(np.array(gguf.quants.dequantize(q, qtype), np.float32))
    return out


def logits_of(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc["attention_mask"].bool()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_layout_round_trips_exactly(tmp_path, small_tokenizer, arch, gguf_type):
    """Reloaded logits equal the original model's with weights rounded to the GGUF type."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = small_model(arch, small_tokenizer)
    path = write_gguf(model, small_tokenizer, tmp_path / "m.gguf", gguf_type)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert type(loaded) is type(model)
    assert loaded.config.tie_word_embeddings is False
    ours, mask = logits_of(loaded, small_tokenizer)
    expected, _ = logits_of(rounded_like_gguf(model, gguf_type), small_tokenizer)
    assert float((ours - expected)[mask].abs().max()) < 1e-4
    exact, _ = logits_of(model, small_tokenizer)
    assert float((ours - exact)[mask].abs().max()) < 0.1 * float(exact[mask].abs().max())
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == small_tokenizer(text)["input_ids"]


def test_gguf_without_the_rope_permutation_would_be_caught(tmp_path, small_tokenizer, monkeypatch):
    """The round-trip check is sensitive to the q/k layout: skipping the permutation fails it."""
    from transformers import AutoModelForCausalLM

    import deepsynapse.export as export

    model = small_model("llama", small_tokenizer)
    monkeypatch.setattr(export, "rope_interleave", lambda w, n_head: w)
    path = write_gguf(model, small_tokenizer, tmp_path / "bad.gguf", "f32")
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours, mask = logits_of(loaded, small_tokenizer)
    expected, _ = logits_of(model, small_tokenizer)
    assert float((ours - expected)[mask].abs().max()) > 1e-2


def test_rope_interleave_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    # one head of dim 4: halves (a0, a1) and (b0, b1) become neighbours (a0, b0, a1, b1)
    w = torch.tensor([[1.0], [2.0], [10.0], [20.0]])
    assert rope_interleave(w, 1).flatten().tolist() == [1.0, 10.0, 2.0, 20.0]
    processor = LlamaTensorProcessor({"num_attention_heads": 9, "num_key_value_heads": 3})
    for rows, n in ((9 * 64, 9), (3 * 64, 3)):  # SmolLM2's q and k projections
        weight = torch.randn(rows, 576)
        name = "blk.0.attn_q.weight" if n == 9 else "blk.0.attn_k.weight"
        back = processor.process(rope_interleave(weight, n).numpy(), name).weights
        assert np.array_equal(back, weight.numpy())


def test_gguf_tensor_names():
    assert gguf_tensor_name("model.layers.0.self_attn.q_proj.weight") == "blk.0.attn_q.weight"
    assert gguf_tensor_name("model.layers.11.mlp.down_proj.weight") == "blk.11.ffn_down.weight"
    assert gguf_tensor_name("model.layers.2.input_layernorm.weight") == "blk.2.attn_norm.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    with pytest.raises(ExportError, match="no llama.cpp name"):
        gguf_tensor_name("model.layers.0.memory.slots")


def test_gguf_refuses_other_architectures(tmp_path, small_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320))
    with pytest.raises(ExportError, match="this model is GPT2LMHeadModel"):
        write_gguf(model, small_tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_tokenizer_pre_names_and_refusals(tmp_path, small_tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert tokenizer_pre_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    smollm = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    assert tokenizer_pre_name({"pre_tokenizer": smollm}) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated"}
    qwen = {"type": "Sequence", "pretokenizers": [split, dict(byte_level, use_regex=False)]}
    assert tokenizer_pre_name({"pre_tokenizer": qwen}) == "qwen2"
    with pytest.raises(ExportError, match="unrecognised pre-tokenizer"):
        tokenizer_pre_name({"pre_tokenizer": {"type": "Whitespace"}})
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(len(small_tokenizer) - 1)}}
    word_level = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ExportError, match="byte-level BPE"):
        write_gguf(small_model("llama", small_tokenizer), word_level, tmp_path / "w.gguf")


# ------------------------------------------------------------------ choosing what to export


def test_checkpoint_choice_and_errors(trained, tmp_path):
    assert find_checkpoint(trained["run"]).checkpoint.name == "step-2"
    assert find_checkpoint(trained["run"], "1").step == 1
    with pytest.raises(CheckpointError, match="no complete checkpoint 'step-7'.*step-1, step-2"):
        find_checkpoint(trained["run"], "step-7")
    with pytest.raises(CheckpointError, match="not a run folder"):
        find_checkpoint(tmp_path)
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export_run(trained["run"], "onnx", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_run(trained["run"], "peft", tmp_path / "full")


def test_cli_export_and_its_errors(trained, capsys):
    out = trained["root"] / "cli-peft"
    assert main(["export", str(trained["run"]), "--format", "peft", "-o", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert "exported peft" in capsys.readouterr().out
    assert main(["export", str(trained["root"] / "nope"), "-f", "merged"]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "Traceback" not in err
    assert main(["export", str(trained["run"]), "--checkpoint", "step-9"]) == 2
    assert "no complete checkpoint 'step-9'" in capsys.readouterr().err
