"""The Python API for notebooks: the CLI's commands as functions.

    import deepsynapse.api as ds

    def reward_len(completions, **kwargs):          # a TRL reward function, unchanged
        return [-abs(20 - len(c)) for c in completions]

    result = ds.train("configs/demo-cpu.yaml", overrides=["train.steps=4"],
                      rewards={"reward_len": reward_len})
    ds.evaluate(result.run_dir, limit=16)
    ds.export(result.run_dir, "gguf")
    print(ds.generate(result.run_dir, "Tom has 3 apples and buys 4 more. How many?").answer)

A config is a :class:`~deepsynapse.config.Config`, a YAML path, a plain dict of sections, or
None (the CLI's default recipe); ``overrides`` are the CLI's ``key.sub=value`` strings. Reward
functions follow TRL's convention and are called as TRL calls them (keywords ``prompts`` and
``completions`` plus the columns ``answer``, ``question``, ``problem``, ``parsed``, ``schema``,
``truncated``); one not already in ``rewards.weights`` joins with weight 1.0.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepsynapse.config import Config, ConfigError, default_config_path, load_config
from deepsynapse.interactive import Completion, complete
from deepsynapse.models.policy import SEQUENCE_MULTIPLE

Reward = Callable[..., list[float | None]]
ModelOrRun = str | os.PathLike | tuple[Any, Any]

__all__ = [
    "Completion",
    "RunResult",
    "as_reward_component",
    "build_config",
    "evaluate",
    "export",
    "generate",
    "load",
    "train",
]


@dataclass
class RunResult:
    """What ``train`` leaves: the run folder (config, metrics, checkpoints) and its summary."""

    run_dir: Path
    summary: dict[str, Any]
    config: Config


# ------------------------------------------------------------------ config and rewards


def build_config(
    config: Config | str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """A validated Config from any of the accepted forms, with ``key.sub=value`` overrides."""
    overrides = list(overrides)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    if config is None:
        return load_config(default_config_path(), overrides)
    if isinstance(config, Config):
        data: Any = config.to_dict()
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise ConfigError(
            f"config: got {type(config).__name__}, expected a Config, a YAML path, a dict or None"
        )
    import yaml

    # load_config reads files; a dict goes through a private temporary YAML file so that it
    # gets exactly the same validation (unknown keys, types, ranges) as a recipe.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        try:
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: cannot be written as YAML ({exc})") from exc
        try:
            return load_config(path, overrides)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(f"{path}: ", "config: ")) from None


def _keyword_style(fn: Callable[..., Any]) -> bool:
    """True for TRL-style functions: a parameter named ``completions`` to be passed by name."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("completions")
    return p is not None and p.kind is not inspect.Parameter.POSITIONAL_ONLY


def as_reward_component(name: str, fn: Reward) -> Reward:
    """Wrap a reward function so the trainer can call it, whichever of the two styles it uses.

    TRL calls ``fn(prompts=..., completions=..., **columns)`` by keyword, so a TRL function may
    start with ``completions``; DeepSynapse components take ``(prompts, completions)`` first.
    Functions with a ``completions`` parameter are called by keyword, others positionally.
    """
    keyword = _keyword_style(fn)

    def component(prompts, completions, **columns):
        if keyword:
            return fn(prompts=prompts, completions=completions, **columns)
        return fn(prompts, completions, **columns)

    component.name = name  # type: ignore[attr-defined]
    component.__name__ = name
    component.__doc__ = fn.__doc__
    component.__wrapped__ = fn  # type: ignore[attr-defined]
    return component


# ------------------------------------------------------------------ train, evaluate, export


def train(
    config: Config | str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    overrides: Iterable[str] = (),
    rewards: Mapping[str, Reward] | None = None,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = False,
) -> RunResult:
    """Run training (``deepsynapse train``) and return the run folder and its summary."""
    from deepsynapse.rl.trainer import Trainer

    cfg = build_config(config, overrides)
    components = {name: as_reward_component(name, fn) for name, fn in (rewards or {}).items()}
    missing = {name: 1.0 for name in components if name not in cfg.rewards.weights}
    if missing:
        rewards_section = dataclasses.replace(
            cfg.rewards, weights={**cfg.rewards.weights, **missing}
        )
        cfg = dataclasses.replace(cfg, rewards=rewards_section)
    trainer = Trainer(cfg, run_dir=run_dir, reward_fns=components, progress=progress)
    summary = trainer.train(resume=resume)
    return RunResult(trainer.run_dir, summary, cfg)


def export(
    run_dir: str | os.PathLike,
    fmt: str,
    out_dir: str | os.PathLike | None = None,
    *,
    checkpoint: str | None = None,
    gguf_dtype: str = "f16",
    dtype: str = "fp32",
) -> Path:
    """``deepsynapse export``: a run as a PEFT adapter, a merged folder or a GGUF file."""
    from deepsynapse.export import export_run

    return export_run(run_dir, fmt, out_dir, checkpoint, gguf_dtype=gguf_dtype, dtype=dtype)


# ------------------------------------------------------------------ loading models and runs


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    schema: str | None  # the schema the model was trained with, when known
    # generation context per batch: the hypernetwork's per-prompt LoRA scales of a run
    around: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    pad_multiple: int = SEQUENCE_MULTIPLE  # forward widths (a run's model.pad_to_multiple_of)
    checkpoint: str | None = None  # the run checkpoint loaded, when it is one

    @classmethod
    def of_trained(cls, trained: Any, tokenizer: Any = None) -> Loaded:
        """A ``TrainedPolicy`` (``deepsynapse.models.trained``) with everything it runs with."""
        return cls(
            trained.model,
            trained.tokenizer if tokenizer is None else tokenizer,
            trained.schema,
            trained.around,
            trained.pad_multiple,
            str(trained.checkpoint),
        )


def open_model(
    model_or_run: ModelOrRun, *, checkpoint: str | None = None, dtype: str = "auto"
) -> Loaded:
    """Load a run, a checkpoint, an export or any model name, with its schema when known.

    Accepted: a run folder (newest checkpoint, or ``checkpoint``), a ``checkpoints/step-N``
    folder or its ``adapter``, a PEFT folder whose config names its base, an exported merged
    folder or GGUF file, a model alias / folder / .gguf / hub id, or a ``(model, tokenizer)``.
    A run or checkpoint loads as it trained (``deepsynapse.models.trained``: module scales,
    hypernetwork per prompt, neural memory), not as its raw PEFT adapter.
    """
    from deepsynapse.models.trained import load_trained_policy, locate_run, trained_policy_of

    if isinstance(model_or_run, tuple):
        model, tokenizer = model_or_run
        trained = trained_policy_of(model)
        if trained is not None:
            return Loaded.of_trained(trained, tokenizer)
        return Loaded(model, tokenizer, None)
    from deepsynapse.models.loading import (
        ModelLoadError,
        load_model,
        load_tokenizer,
        resolve_dtype,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(model_or_run).expanduser()
    located = locate_run(path)
    if located is not None:
        run_dir, named = located
        trained = load_trained_policy(run_dir, checkpoint or named, device=device, dtype=dtype)
        return Loaded.of_trained(trained)
    torch_dtype = resolve_dtype(dtype, device).dtype
    meta = _export_metadata(path)
    if path.is_dir() and str(meta.get("file", ".")).endswith(".gguf"):
        path = path / meta["file"]  # a GGUF export folder: the file inside it
    if (path / "adapter_config.json").is_file():
        return _open_adapter(path, torch_dtype, device)
    if not path.exists() and (path.is_absolute() or str(model_or_run).startswith(".")):
        raise ModelLoadError(f"{path}: no such run folder, model folder or file")
    name = str(path) if path.exists() else str(model_or_run)
    tokenizer = load_tokenizer(name)
    model = load_model(name, torch_dtype, tokenizer).to(device)
    model.eval()
    return Loaded(model, tokenizer, _export_metadata(path).get("schema"))


def _open_adapter(path: Path, dtype: torch.dtype, device: str) -> Loaded:
    from peft import PeftModel

    from deepsynapse.models.loading import ModelLoadError, load_model, load_tokenizer

    meta = _export_metadata(path)
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    base = meta.get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(
            f"{path}: the adapter does not name its base model (base_model_name_or_path); "
            "pass the run folder instead"
        )
    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_model(base, dtype, tokenizer), str(path))
    model.eval()
    return Loaded(model.to(device), tokenizer, meta.get("schema"))


def _export_metadata(path: Path) -> dict[str, Any]:
    """``deepsynapse.json`` of an export (schema, base model, file), or {} elsewhere."""
    if not path.exists():
        return {}
    meta = (path if path.is_dir() else path.parent) / "deepsynapse.json"
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load(
    model_or_run: ModelOrRun, *, checkpoint: str | None = None, dtype: str = "auto"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a run (the policy as trained), an export or a model name.

    A run's model remembers its hypernetwork: passing the pair to ``generate`` or
    ``evaluate`` applies the per-prompt scales (``trained_policy_of``).
    """
    loaded = open_model(model_or_run, checkpoint=checkpoint, dtype=dtype)
    return loaded.model, loaded.tokenizer


def evaluate(
    model_or_run: ModelOrRun,
    *,
    data: str = "gsm8k",
    split: str = "test",
    limit: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    schema: str | None = None,
    checkpoint: str | None = None,
    dtype: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """``deepsynapse eval``: greedy accuracy and format validity, with every completion."""
    from deepsynapse.eval.harness import evaluate as run_eval
    from deepsynapse.formats import get_schema
    from deepsynapse.rl.trainer import build_problems

    loaded = open_model(model_or_run, checkpoint=checkpoint, dtype=dtype)
    problems, _ = build_problems(data, split, Config())
    if limit:
        problems = problems[:limit]
    result = run_eval(
        loaded.model,
        loaded.tokenizer,
        problems,
        get_schema(schema or loaded.schema or "base"),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        around=loaded.around,
        pad_multiple=loaded.pad_multiple,
    )
    result["data"], result["split"] = data, split
    return result


def generate(
    model_or_run: ModelOrRun,
    question: str,
    *,
    schema: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
    checkpoint: str | None = None,
    dtype: str = "auto",
) -> Completion:
    """One answer to ``question``, parsed (``.valid``, ``.answer``, ``.fields``, ``.errors``).

    Pass the ``(model, tokenizer)`` from ``load`` to avoid reloading for every question.
    """
    loaded = open_model(model_or_run, checkpoint=checkpoint, dtype=dtype)
    return complete(
        loaded.model,
        loaded.tokenizer,
        question,
        schema or loaded.schema or "base",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        around=loaded.around,
        pad_multiple=loaded.pad_multiple,
    )
