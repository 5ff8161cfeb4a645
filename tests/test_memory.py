"""Memory defaults set on import: the kernel caches that grew resident memory every step.

Each check runs in a fresh interpreter, since the caches read their capacity once, the first
time a matmul runs. The behavioural test reproduces what the SmolLM2 soak met (bf16 matmuls
at a new sequence length each time) and compares resident memory with and without the cap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    out = subprocess.run(
        [sys.executable, "-c", code],
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
