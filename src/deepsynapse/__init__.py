"""DeepSynapse: GRPO-family RL fine-tuning of language models to reason in a strict XML format."""

import os

__version__ = "0.1.0"

# oneDNN (PyTorch's CPU kernels) keeps a compiled primitive for every tensor shape it meets, up
# to 1024 of them. Rollouts and updates meet new sequence lengths at every step, so that cache
# alone grew resident memory by ~20 MB a step on SmolLM2 (benchmarks/soak.py), and it hardly
# ever hits; a small one costs no speed (measured). Both caps below are read when the first
# matmul runs, so they are set on import, and never over a value the user chose.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
# ideep (the layer between PyTorch and oneDNN for bf16 matmuls) keeps a second per-shape cache
# of its own, LRU_CACHE_CAPACITY entries (default 1024) of ~1.6 MB each: the ~10 MB a step
# that SmolLM2 runs still grew by with the cache above capped. 32 keeps the shapes a step
# reuses across its layers, at the same speed (measured: 1024, 128, 32 on benchmarks/soak.py).
os.environ.setdefault("LRU_CACHE_CAPACITY", "32")
