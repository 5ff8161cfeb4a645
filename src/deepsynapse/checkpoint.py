"""Atomic checkpoints as safetensors + JSON: nothing is pickled, a kill never breaks the newest.

A checkpoint is written into ``checkpoints/.tmp-step-N``; the last file written is
``COMPLETE``, then the folder is renamed to ``step-N``. A folder without ``COMPLETE`` (or
still named ``.tmp-*``) is never loaded, so a kill during a save leaves the previous
checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or made for something else; the message says which."""


def flatten_tree(tree: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace tensors in nested dicts/lists by references, collecting them in ``tensors``."""
    if isinstance(tree, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = tree.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"cannot store key {k!r} of type {type(k).__name__}")
            out[("i:" if isinstance(k, int) else "s:") + str(k)] = flatten_tree(
                v, tensors, f"{prefix}.{k}"
            )
        return out
    if isinstance(tree, (list, tuple)):
        items = [flatten_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(tree)]
        return {_TUPLE: items} if isinstance(tree, tuple) else items
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store {type(tree).__name__} at {prefix} in a checkpoint")


def unflatten_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        if set(tree) == {_TUPLE}:
            return tuple(unflatten_tree(v, tensors) for v in tree[_TUPLE])
        out = {}
        for k, v in tree.items():
            kind, _, name = k.partition(":")
            out[int(name) if kind == "i" else name] = unflatten_tree(v, tensors)
        return out
    if isinstance(tree, list):
        return [unflatten_tree(v, tensors) for v in tree]
    return tree


def save_tree(tree: Any, folder: Path, name: str) -> None:
    """Write ``name.json`` (structure) and ``name.safetensors`` (tensors, if any)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_tree(tree, tensors)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    _write_json(folder / f"{name}.json", structure)


def load_tree(folder: Path, name: str) -> Any:
    """Inverse of `save_tree`. A missing, damaged or crafted file is a CheckpointError naming
    it, never a crash deep in a decoder (checkpoints may come from someone else)."""
    folder = Path(folder)
    structure_path, path = folder / f"{name}.json", folder / f"{name}.safetensors"
    try:
        structure = json.loads(structure_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{structure_path}: unreadable checkpoint file ({exc})") from exc
    try:
        tensors = load_file(str(path)) if path.is_file() else {}
    except Exception as exc:  # safetensors raises its own SafetensorError on damage
        raise CheckpointError(f"{path}: unreadable checkpoint file ({exc})") from exc
    try:
        return unflatten_tree(structure, tensors)
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(
            f"{structure_path}: structure does not match {path.name} ({exc!r})"
        ) from exc


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    root: Path, step: int, write: Callable[[Path], None], keep: int, pinned: Collection[int] = ()
) -> Path:
    """Run ``write(tmp_folder)``, mark it complete, rename it to ``step-N``, prune old ones.

    The newest ``keep`` are kept, and every step in ``pinned`` besides (``step-0``, the end of
    the SFT warm-up: where GRPO starts, which a paired "what GRPO gave" evaluates).

    If ``write`` raises (disk full, a failing writer), the temporary folder is removed and the
    previous checkpoints are untouched; the error propagates with the folder named.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _write_json(tmp / COMPLETE, {"step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception):
            raise CheckpointError(f"could not write checkpoint {final}: {exc}") from exc
        raise
    for old in complete_checkpoints(root)[:-keep]:
        if int(old.name.removeprefix("step-")) not in pinned:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE).is_file():
            try:
                found.append((int(p.name.removeprefix("step-")), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None
