"""DeepSynapse: GRPO-family RL fine-tuning of language models to reason in a strict XML format."""

__version__ = "0.1.0"
