"""The one loader of a trained policy: a run's checkpoint back as the function it trained.

A checkpoint (``RUN/checkpoints/step-N``) holds the PEFT adapter (``adapter/``) and the
``trainer_state`` tree; the adapter alone is *not* the trained policy when DeepSynapse's
parts were on: per-module LoRA scales, the hypernetwork that scales LoRA per prompt, the
neural memory (``AdaptivePolicy``), and a LoRA rank grown during training. Everything that
runs a trained policy goes through here: ``deepsynapse eval / probe / generate / chat``, the
Python API, export, and the trainer's resume (``restore_policy_state``).

    trained = load_trained_policy("runs/demo-cpu")       # newest complete checkpoint
    trained.evaluate(problems)                           # greedy, hypernet per prompt
    generate_groups(trained.model, tok, prompts, ..., around=trained.around)

The model is rebuilt exactly as the trainer builds it (``load_model`` + ``apply_lora`` with
the run's config + ``AdaptivePolicy``), then restored in the trainer's order: grow to the
saved rank, restore module scales / hypernetwork / memory, then load the adapter weights.
The hypernetwork's scales depend on the prompt, so generation must run inside
``trained.around(prompt_ids, prompt_mask)`` (the ``around=`` hook of ``generate_groups``,
``evaluate``, ``complete``) and log-probs inside ``adaptive.for_rows`` (see
``completion_logprobs``); without the hypernetwork both are no-ops.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepsynapse.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_tree,
)
from deepsynapse.config import Config, load_config

__all__ = [
    "TRAINED_POLICY_ATTR",
    "RunCheckpoint",
    "TrainedPolicy",
    "find_checkpoint",
    "load_trained_policy",
    "locate_run",
    "policy_identity",
    "restore_policy_state",
    "trained_policy_of",
]

# on a loaded PeftModel: its TrainedPolicy (trained_policy_of); removed when a copy stops
# being that function (export bakes the parts into plain LoRA)
TRAINED_POLICY_ATTR = "_deepsynapse_trained"


# ------------------------------------------------------------------ finding the checkpoint


@dataclass(frozen=True)
class RunCheckpoint:
    """A run folder, its resolved config and one of its complete checkpoints."""

    run_dir: Path
    checkpoint: Path
    config: Config

    @property
    def adapter_dir(self) -> Path:
        return self.checkpoint / "adapter"

    @property
    def step(self) -> int:
        return int(self.checkpoint.name.removeprefix("step-"))


def find_checkpoint(run_dir: str | os.PathLike, checkpoint: str | None = None) -> RunCheckpoint:
    """The run's newest complete checkpoint, or the one named (``step-N``, ``N`` or a folder)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run} is not a run folder (no config.yaml)")
    root = run / "checkpoints"
    if checkpoint is None:
        chosen = latest_checkpoint(root)
        if chosen is None:
            raise CheckpointError(f"{run}: no complete checkpoint under {root}")
    else:
        name = Path(str(checkpoint)).name
        name = name if name.startswith("step-") else f"step-{name}"
        chosen = root / name
        complete = complete_checkpoints(root)
        if chosen not in complete:
            found = ", ".join(p.name for p in complete) or "none"
            raise CheckpointError(
                f"{run}: no complete checkpoint '{name}' (complete checkpoints: {found})"
            )
    if not (chosen / "adapter" / "adapter_config.json").is_file():
        raise CheckpointError(f"{chosen}: no PEFT adapter (adapter/adapter_config.json)")
    return RunCheckpoint(run, chosen, load_config(run / "config.yaml"))


def locate_run(path: str | os.PathLike) -> tuple[Path, str | None] | None:
    """``(run folder, checkpoint name or None)`` when ``path`` is a run folder, one of its
    ``checkpoints/step-N`` folders or such a checkpoint's ``adapter`` folder; else None."""
    p = Path(path).expanduser()
    checkpoint = None
    if p.name == "adapter" and p.parent.parent.name == "checkpoints":
        p = p.parent
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        checkpoint, p = p.name, p.parent.parent
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        return p, checkpoint
    return None


# ------------------------------------------------------------------ restoring state


def policy_identity(cfg: Config, adaptive: Any) -> dict[str, Any]:
    """What a checkpoint's ``identity`` must agree on for its policy to be rebuilt from
    ``cfg`` (a subset of the trainer's ``identity``: the model and the adaptive parts)."""
    return {
        "model": cfg.model.name,
        "lora_targets": list(cfg.lora.target_modules),
        **adaptive.identity(),
    }


def _check_identity(state: dict[str, Any], ours: dict[str, Any], folder: Path) -> None:
    theirs = state.get("identity") or {}
    diff = {k: (theirs[k], v) for k, v in ours.items() if k in theirs and theirs[k] != v}
    if diff:
        detail = "; ".join(
            f"{k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in diff.items()
        )
        raise CheckpointError(f"{folder} was made for another setup ({detail})")


def _saved_rank(weights: dict[str, torch.Tensor]) -> int:
    ranks = [w.shape[0] for k, w in weights.items() if "lora_A" in k and w.ndim == 2]
    if not ranks:
        raise CheckpointError("the adapter holds no LoRA A weights")
    return max(ranks)


def restore_policy_state(
    peft_model: torch.nn.Module,
    adaptive: Any,
    folder: str | os.PathLike,
    optimizer: Any = None,
    *,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Put a checkpoint's policy into ``peft_model`` + ``adaptive`` (an ``AdaptivePolicy``
    built on it from the run's config), in place; returns the ``trainer_state`` tree.

    Order matters and is the same for evaluation and resume: grow LoRA to the saved rank
    (``optimizer``, when given, gets the grown parameters so that its state loads after
    this), restore module scales, hypernetwork, context encoder and memory, then load the
    adapter weights. ``state``: the ``trainer_state`` tree if already read. A missing,
    damaged or mismatched file is a ``CheckpointError`` naming it. The caller checks the
    identity (the trainer compares its own; ``load_trained_policy`` compares the policy's).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    if state is None:
        state = load_tree(folder, "trainer_state")
    adapter_file = folder / "adapter" / "adapter_model.safetensors"
    try:
        weights = load_file(str(adapter_file))
    except Exception as exc:  # missing or damaged: say which file
        raise CheckpointError(f"{adapter_file}: unreadable adapter ({exc})") from exc
    parts = state.get("adaptive")
    if parts is None:  # no adaptive state saved: the rank is in the weights, nothing else
        parts = {"lora": {"rank": _saved_rank(weights), "module_scales": None}}
    try:
        adaptive.load_state_dict(parts, optimizer)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: adaptive state does not fit the policy ({exc})") from exc
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as exc:  # shapes that do not fit
        raise CheckpointError(f"{adapter_file}: adapter does not fit the model ({exc})") from exc
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{folder}: adapter has unexpected keys {result.unexpected_keys[:3]}")
    lora_parts = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")
    missing = [k for k in getattr(result, "missing_keys", []) if any(p in k for p in lora_parts)]
    if missing:
        raise CheckpointError(f"{folder}: adapter lacks LoRA weights {missing[:3]}")
    return state


# ------------------------------------------------------------------ the loaded policy


@dataclass
class TrainedPolicy:
    """A run's policy as it trained, in eval mode, with what it needs to run right."""

    model: Any  # the PeftModel, adaptive parts attached (module scales, memory hooks)
    tokenizer: Any
    adaptive: Any  # AdaptivePolicy: the hypernetwork's per-prompt context, metrics, state
    run: RunCheckpoint
    state: dict[str, Any] = field(repr=False, default_factory=dict)  # the trainer_state tree
    _policy: Any = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        return self.run.config

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def checkpoint(self) -> Path:
        return self.run.checkpoint

    @property
    def step(self) -> int:
        return self.run.step

    @property
    def schema(self) -> str:
        """The XML schema the run trained with."""
        return self.config.rewards.schema

    @property
    def pad_multiple(self) -> int:
        return self.config.model.pad_to_multiple_of

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def around(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> contextlib.AbstractContextManager:
        """The ``around=`` hook of generation: the hypernetwork's scales for these prompts."""
        return self.adaptive.for_prompts(prompt_ids, prompt_mask)

    @property
    def policy(self):
        """The log-prob module the trainer scores with (``PolicyModule``) on this model."""
        if self._policy is None:
            from deepsynapse.models.policy import PolicyModule

            self._policy = PolicyModule(
                self.model,
                chunk_tokens=self.config.grpo.logprob_chunk_tokens,
                pad_multiple=self.pad_multiple,
            ).eval()
        return self._policy

    @torch.no_grad()
    def completion_logprobs(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Per-token log-probs [N, T] of completions after (left-padded) prompts, as the
        trainer computes them (hypernetwork scales per row)."""
        ids = torch.cat([prompt_ids, completion_ids], 1)
        attn = torch.cat([prompt_mask, completion_mask], 1)
        with self.adaptive.for_rows(prompt_ids, prompt_mask):
            return self.policy(ids, attn, completion_mask, temperature).logp

    def evaluate(self, problems, schema: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """``eval.harness.evaluate`` on this policy (hypernet per prompt, the run's padding
        and schema unless given); keywords go to ``evaluate``."""
        from deepsynapse.eval.harness import evaluate
        from deepsynapse.formats import get_schema

        kwargs.setdefault("pad_multiple", self.pad_multiple)
        return evaluate(
            self.model,
            self.tokenizer,
            problems,
            get_schema(schema or self.schema),
            around=self.around,
            **kwargs,
        )


def trained_policy_of(model: Any) -> TrainedPolicy | None:
    """The ``TrainedPolicy`` a model was loaded as by ``load_trained_policy``, if any (so a
    bare ``(model, tokenizer)`` pair still generates with the hypernetwork's scales)."""
    return getattr(model, TRAINED_POLICY_ATTR, None)


def _torch_dtype(dtype: str | torch.dtype | None, cfg: Config, device: torch.device):
    from deepsynapse.models.loading import resolve_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    name = cfg.model.dtype if dtype in (None, "auto") else dtype
    return resolve_dtype(name, device).dtype


def load_trained_policy(
    run_dir: str | os.PathLike | RunCheckpoint,
    checkpoint: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> TrainedPolicy:
    """A run's newest (or named) complete checkpoint as the policy it trained, in eval mode.

    ``run_dir``: a run folder, a ``checkpoints/step-N`` folder or its ``adapter`` folder, or
    a ``RunCheckpoint`` (which names its checkpoint: ``checkpoint`` is then ignored). ``device``: default cuda when available, else cpu. ``dtype``: the
    base model's dtype (a torch dtype, ``bf16``, ``fp32``); None or ``auto`` = the run's
    ``model.dtype`` as training resolved it. LoRA weights and the adaptive parts stay fp32
    (as trained). The global RNG is left as it was.
    """
    from deepsynapse.models.adaptive import AdaptivePolicy
    from deepsynapse.models.loading import load_model, load_tokenizer
    from deepsynapse.models.policy import apply_lora

    if isinstance(run_dir, RunCheckpoint):
        run = run_dir
    else:
        located = locate_run(run_dir)
        if located is not None:
            run_dir, named = located
            checkpoint = checkpoint or named
        run = find_checkpoint(run_dir, checkpoint)
    cfg = run.config
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _torch_dtype(dtype, cfg, device)
    state: dict[str, Any] = {}
    if (run.checkpoint / "trainer_state.json").is_file():
        state = load_tree(run.checkpoint, "trainer_state")
    tokenizer = load_tokenizer(cfg.model.name)
    with torch.random.fork_rng(devices=[]):  # LoRA A, hypernet and memory init draw from it
        base = load_model(cfg.model.name, torch_dtype, tokenizer)
        peft_model = apply_lora(
            base, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules
        )
        adaptive = AdaptivePolicy(peft_model, cfg)
    _check_identity(state, policy_identity(cfg, adaptive), run.checkpoint)
    state = restore_policy_state(peft_model, adaptive, run.checkpoint, state=state)
    # requires_grad stays as training had it: the bf16 log-prob path (low_precision_adapters)
    # keys on it, and every use here runs under no_grad anyway
    peft_model.to(device).eval()
    trained = TrainedPolicy(peft_model, tokenizer, adaptive, run, state)
    setattr(peft_model, TRAINED_POLICY_ATTR, trained)
    return trained
