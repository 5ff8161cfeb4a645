"""The batch contract of one GRPO step, and the operations that must never drop a field.

One :class:`GroupBatch` flows through a step in three stages:

- **rollout**: ``problems``, ``prompts`` and ``rollout`` are set;
- **scored**: ``parsed``, ``scores``, ``calibrated``, ``correct``, ``reward`` (and
  ``ref_logp`` when KL is a reward objective) are added;
- **advantaged**: ``advantages`` are added, and :meth:`GroupBatch.to` has put every tensor
  on the policy's device: what the loss reads lives where the loss runs.

Every field declares its axis in its metadata: ``group`` (one entry per prompt, B),
``row`` (one per completion, N = B*G, groups contiguous) or ``meta`` (the batch as a
whole). :func:`select_groups` and :func:`concat_batches` walk the fields by that
declaration, so a field added later is selected and joined like the others, or the
operation fails loudly (``_take``/``_join`` know tensors, lists, dicts of lists and
nested contracts, nothing else).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from deepsynapse.data.problems import Problem
from deepsynapse.rollout.hf import RolloutOutput

GROUP, ROW, META = "group", "row", "meta"


def _axis(kind: str, pad: str = "right", pad_value: float = 0) -> dict[str, Any]:
    return {"axis": kind, "pad": pad, "pad_value": pad_value}


@dataclass
class GroupBatch:
    """Everything one step exchanges between rollout, rewards and loss (this process's share)."""

    problems: list[Problem] = field(metadata=_axis(GROUP))  # B
    prompts: list[str] = field(metadata=_axis(GROUP))  # B prompt texts
    rollout: RolloutOutput = field(metadata=_axis(ROW))  # N = B*G completions
    scores: dict[str, list[float | None]] = field(metadata=_axis(ROW))  # component -> N
    correct: torch.Tensor = field(metadata=_axis(ROW))  # [N] 0/1 ground truth, not shaped
    reward: torch.Tensor = field(metadata=_axis(ROW))  # [N] fused: what advantages use
    parsed: list[Any] = field(default_factory=list, metadata=_axis(ROW))  # N parsed
    advantages: torch.Tensor | None = field(default=None, metadata=_axis(ROW))  # [N]
    calibrated: dict[str, list[float | None]] = field(
        default_factory=dict, metadata=_axis(ROW)
    )  # component -> N calibrated scores
    ref_logp: torch.Tensor | None = field(default=None, metadata=_axis(ROW))  # [N, T]
    sampler_logp: torch.Tensor | None = field(default=None, metadata=_axis(ROW))  # [N, T]
    reward_metrics: dict[str, float] = field(default_factory=dict, metadata=_axis(META))

    @property
    def size(self) -> int:
        return len(self.rollout.texts)

    def to(self, device: torch.device | str) -> GroupBatch:
        """The same batch with every tensor (nested ones included) on ``device``."""
        return _to_device(self, torch.device(device))


# ------------------------------------------------------------------ generic over fields


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: _to_device(getattr(obj, f.name), device)
            for f in dataclasses.fields(obj)
            if isinstance(getattr(obj, f.name), torch.Tensor)
            or dataclasses.is_dataclass(getattr(obj, f.name))
        }
        return dataclasses.replace(obj, **changes)
    return obj


def _take(value: Any, idx: list[int]) -> Any:
    """Rows ``idx`` of one field value."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(idx, dtype=torch.long, device=value.device)]
    if isinstance(value, list):
        return [value[i] for i in idx]
    if isinstance(value, dict):
        return {k: _take(v, idx) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(
            value, **{f.name: _take(getattr(value, f.name), idx) for f in dataclasses.fields(value)}
        )
    raise TypeError(f"cannot select rows of a {type(value).__name__}")


def _pad_width(x: torch.Tensor, width: int, side: str, value: float) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    filler = x.new_full((x.shape[0], extra), value)
    return torch.cat([filler, x] if side == "left" else [x, filler], 1)


def _join(values: list[Any], sizes: list[int], pad: str, pad_value: float) -> Any:
    """Concatenate one field over parts; 2-D tensors are padded to the widest part."""
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError("a field is set in some parts of a batch and not in others")
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.dim() >= 2:
            width = max(v.shape[1] for v in values)
            values = [_pad_width(v, width, pad, pad_value) for v in values]
        return torch.cat(values)
    if isinstance(first, list):
        return [x for v in values for x in v]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {
            k: _join(
                [v.get(k, [None] * n) for v, n in zip(values, sizes, strict=True)],
                sizes,
                pad,
                pad_value,
            )
            for k in keys
        }
    if dataclasses.is_dataclass(first):
        out = {}
        for f in dataclasses.fields(first):
            meta = f.metadata or {}
            out[f.name] = _join(
                [getattr(v, f.name) for v in values],
                sizes,
                meta.get("pad", "right"),
                _pad_value(values, meta.get("pad_value", 0)),
            )
        return type(first)(**out)
    raise TypeError(f"cannot join a {type(first).__name__}")


def _pad_value(values: list[Any], declared: Any) -> float:
    """``"pad_id"`` resolves to the padding token the rollout used (last id of a padded row)."""
    if declared != "pad_id":
        return declared
    for v in values:
        ids = v.completion_ids
        if ids.numel():
            return int(ids.flatten()[-1])
    return 0


def select_groups(batch: GroupBatch, keep: torch.Tensor, group_size: int) -> GroupBatch:
    """The groups where ``keep`` [B] is True, every field included."""
    keep = keep.cpu()
    groups = keep.nonzero().flatten().tolist()
    rows = keep.repeat_interleave(group_size).nonzero().flatten().tolist()
    out = {}
    for f in dataclasses.fields(batch):
        axis = f.metadata["axis"]
        value = getattr(batch, f.name)
        out[f.name] = value if axis == META else _take(value, groups if axis == GROUP else rows)
    return GroupBatch(**out)


def concat_batches(parts: list[GroupBatch]) -> GroupBatch:
    """Join rollout rounds (dynamic sampling) into one batch, padding to common widths."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for f in dataclasses.fields(GroupBatch):
        values = [getattr(p, f.name) for p in parts]
        if f.metadata["axis"] == META:
            out[f.name] = values[-1]
            continue
        sizes = [len(p.problems) if f.metadata["axis"] == GROUP else p.size for p in parts]
        out[f.name] = _join(values, sizes, f.metadata["pad"], f.metadata["pad_value"])
    return GroupBatch(**out)
