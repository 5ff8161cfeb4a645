"""Memory settings that keep resident memory flat over a run (benchmarks/soak.py).

The kernel caches that grew resident memory every step, capped on import, and glibc's
allocator thresholds, fixed by the trainer. Each check runs in a fresh interpreter, since the
caches read their capacity once, the first time a matmul runs, and allocator settings are
process-wide. The behavioural tests reproduce what the SmolLM2 soak met (bf16 matmuls at a
new sequence length each time; a worker thread freeing tens of MB after glibc raised its
thresholds) and compare resident memory with and without the setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deepsynapse.models.loading import cpu_supports_bf16, resolve_dtype

NATIVE_BF16 = cpu_supports_bf16()

CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
MALLOC_VARS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)


def _python(code: str, *args: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter free of our memory settings; its last stdout line."""
    clean = {k: v for k, v in os.environ.items() if k not in CACHE_VARS + MALLOC_VARS}
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_import_caps_the_kernel_caches_unless_the_user_chose():
    show = f"import os, deepsynapse; print([os.environ.get(k) for k in {CACHE_VARS!r}])"
    assert _python(show) == "['8', '32']"
    assert _python(show, LRU_CACHE_CAPACITY="1024") == "['8', '1024']"


GROWTH = """
import json, random
import deepsynapse  # sets the caps, unless the environment did
import torch
from deepsynapse.telemetry.run_logger import current_rss_mb, release_freed_memory
torch.set_num_threads(1)
layers = [torch.nn.Linear(576, 1536, bias=False).bfloat16(),
          torch.nn.Linear(1536, 576, bias=False).bfloat16()]
random.seed(0)
def step(rows):
    x = torch.randn(rows, 576, dtype=torch.bfloat16, requires_grad=True)
    layers[1](layers[0](x)).sum().backward()
    for layer in layers:
        layer.weight.grad = None
step(256); release_freed_memory()
start = current_rss_mb()
for rows in random.sample(range(200, 1200), 60):  # a new sequence length every time
    step(rows)
release_freed_memory()
print(json.dumps(current_rss_mb() - start))
"""


@pytest.mark.skipif(
    not NATIVE_BF16,
    reason="no AVX512-BF16/AMX: bf16 matmuls are emulated here (minutes for these 60 shapes) "
    "and the trainer runs fp32 on this CPU",
)
def test_bf16_matmuls_at_new_shapes_do_not_grow_memory():
    capped = json.loads(_python(GROWTH))  # measured: +10 MB
    uncapped = json.loads(  # the libraries' defaults; measured: +295 MB
        _python(GROWTH, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    )
    if uncapped < 30:
        pytest.skip(f"this CPU's bf16 matmuls keep no per-shape state (+{uncapped:.0f} MB)")
    assert capped < 30, (
        f"+{capped:.0f} MB over 60 new shapes with the caps (+{uncapped:.0f} without)"
    )


THREAD_HEAP = """
import ctypes, json, sys, threading
from deepsynapse.telemetry.run_logger import (
    current_rss_mb, fix_malloc_thresholds, release_freed_memory,
)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
MB = 1 << 20
def filled(n):
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    return p
libc.free(filled(20 * MB))  # a freed large buffer: glibc raises its thresholds (by default)
# the trainer fixes them after such frees (imports, data): they must come back down
fixed = fix_malloc_thresholds() if sys.argv[1] == "fix" else None
def worker():  # a thread's buffers come from its own heap, whose top malloc_trim leaves alone
    for p in [filled(MB) for _ in range(30)]:
        libc.free(p)
start = current_rss_mb()
thread = threading.Thread(target=worker)
thread.start()
thread.join()
release_freed_memory()
print(json.dumps([fixed, current_rss_mb() - start]))
"""


def _thread_heap(mode: str, **env: str) -> tuple[bool | None, float]:
    fixed, kept = json.loads(_python(THREAD_HEAP, mode, **env))
    return fixed, kept


def test_fixed_malloc_thresholds_let_a_worker_thread_give_freed_memory_back():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc allocator behaviour")
    _, kept_by_default = _thread_heap("default")  # measured: 30 MB
    if kept_by_default < 10:
        pytest.skip(f"this C library kept {kept_by_default:.0f} MB: nothing to fix here")
    fixed, kept = _thread_heap("fix")  # measured: 0.1 MB
    assert fixed is True
    assert kept < 5, f"{kept:.0f} MB kept after the fix ({kept_by_default:.0f} MB without)"


def test_the_users_allocator_settings_win():
    fixed, _ = _thread_heap("fix", MALLOC_MMAP_THRESHOLD_=str(64 << 20))
    assert fixed is False
    fixed, _ = _thread_heap("fix", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")
    assert fixed is False


def test_malloc_usage_tells_live_heap_from_mmapped_buffers():
    from deepsynapse.telemetry.run_logger import malloc_usage_mb

    if malloc_usage_mb() is None:
        pytest.skip("not glibc >= 2.33")
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = malloc_usage_mb()
    small = [libc.malloc(64 << 10) for _ in range(160)]  # 10 MB under any mmap threshold
    large = libc.malloc(40 << 20)  # over glibc's largest: always mmapped
    during = malloc_usage_mb()
    for pointer in small + [large]:
        libc.free(pointer)
    assert 9.5 < during["in_use"] - before["in_use"] < 12
    assert 39.5 < during["mmapped"] - before["mmapped"] < 41


ATTENTION = """
import json, random, sys
import deepsynapse
import torch
from deepsynapse.models.policy import pad_to_multiple
from deepsynapse.telemetry.run_logger import (
    current_rss_mb, fix_malloc_thresholds, release_freed_memory,
)
fix_malloc_thresholds()
torch.set_num_threads(1)
multiple = int(sys.argv[1])
dtype = getattr(torch, sys.argv[2])  # the trainer's: bf16 where the CPU has it, else fp32
def step(length):  # attention forward and backward as the update runs it: a padded row
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, : length // 3] = 0
    ids, mask = pad_to_multiple(ids, mask, multiple)
    width = ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (causal & mask.bool()[:, None, None, :]) | torch.eye(width, dtype=torch.bool)
    q, k, v = (torch.randn(2, 9, width, 64, dtype=dtype, requires_grad=True)
               for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out.float().sum().backward()
for length in range(64, 768, 64):  # warm-up: every padded width met below
    step(length)
release_freed_memory()
start = current_rss_mb()
random.seed(0)
for length in random.sample(range(50, 700), 60):  # a new length every time
    step(length)
release_freed_memory()
print(json.dumps(current_rss_mb() - start))
"""


@pytest.mark.heavy
def test_padded_widths_keep_the_attention_kernel_cache_flat():
    """PyTorch's CPU flash attention keeps a kernel per new shape, uncapped (cause 6)."""
    dtype = str(resolve_dtype("auto").dtype).removeprefix("torch.")  # the trainer's pick here
    unpadded = json.loads(_python(ATTENTION, "1", dtype))  # measured: +13.2 MB (bf16)
    if unpadded < 5:
        pytest.skip(f"this CPU's attention keeps no per-shape state (+{unpadded:.1f} MB)")
    padded = json.loads(_python(ATTENTION, "64", dtype))  # measured: +0.6 MB (bf16)
    assert padded < unpadded / 4, f"+{padded:.1f} MB padded, +{unpadded:.1f} MB unpadded"


def test_every_prefill_and_update_forward_of_a_step_has_a_padded_width(tmp_path):
    from conftest import EXTRA_REWARDS, TINY

    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer

    # 88: no width under 704 is also a multiple of the default 64, so a path left unwired fails
    overrides = ["train.steps=2", "eval.limit=0", "model.pad_to_multiple_of=88"]
    cfg = load_config(None, TINY + overrides)
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False, reward_fns=EXTRA_REWARDS)
    widths: list[int] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids")
        widths.append((ids if ids is not None else kwargs["inputs_embeds"]).shape[1])

    trainer.unwrapped.causal_lm.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    wide = [w for w in widths if w > 1]  # decoding runs one token at a time
    assert len(wide) >= 6, widths  # SFT, prefills, reference and update passes
    assert all(w % 88 == 0 for w in wide), sorted(set(wide))


def test_a_checkpoint_save_leaves_no_reference_cycles(tmp_path):
    """safetensors' ctypes views form cycles that only a full collection frees (measured:
    269 objects a save on the tiny model, ~2,500 on SmolLM2)."""
    import gc

    from conftest import EXTRA_REWARDS, TINY

    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer

    cfg = load_config(None, TINY + ["train.steps=1", "eval.limit=0", "sft.steps=0"])
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False, reward_fns=EXTRA_REWARDS)
    trainer.train()  # the optimizer has state to save
    gc.disable()  # nothing collects behind the save's back
    try:
        gc.collect()
        trainer.step += 1
        trainer.save_checkpoint()
        left = gc.collect()
    finally:
        gc.enable()
    assert left < 20, f"{left} unreachable objects left by a save"
