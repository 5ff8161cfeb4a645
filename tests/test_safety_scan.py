"""Safe loading: nothing in the package runs code taken from data, and checkpoints are checked.

The scan reads every module's AST (not its text, so comments and strings do not count and
aliases such as ``import pickle as p`` do) and refuses the calls that turn bytes into code:
``eval``/``exec``/``compile``, pickle-family loaders, ``marshal``, ``__import__``,
``importlib.import_module`` of a computed name, ``torch.load`` without
``weights_only=True``, ``yaml.load`` without a safe loader, ``trust_remote_code=True`` and
``shell=True``. Positive controls prove that the scanner sees each of them.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from deepsynapse.checkpoint import CheckpointError, load_tree, save_tree
from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deepsynapse"

CODE_BUILTINS = {"eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"}
CODE_BUILTINS |= {"builtins.compile", "builtins.__import__", "importlib.__import__"}
# Any call into these runs code or rebuilds arbitrary objects from bytes.
UNPICKLERS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "cPickle.load",
    "cPickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "shelve.open",
    "pandas.read_pickle",
    "torch.jit.load",
}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it was imported as (``import numpy as np`` -> np: numpy)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    head = a.name.split(".")[0]
                    names[head] = head
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(func: ast.expr, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load`` through the module's imports; None for computed callees."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_literal_string(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """Every call in ``source`` that could run code taken from data, as 'file:line: why'."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        why = None
        if name in CODE_BUILTINS:
            why = f"{name}() runs code"
        elif name in UNPICKLERS:
            why = f"{name}() unpickles"
        elif name and (name == "marshal" or name.startswith("marshal.")):
            why = f"{name}() loads code objects"
        elif name == "importlib.import_module" and not (
            node.args and _is_literal_string(node.args[0])
        ):
            why = "importlib.import_module() of a computed name"
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            why = "torch.load() without weights_only=True"
        elif name in ("numpy.load",) and _is_true(_keyword(node, "allow_pickle")):
            why = "numpy.load(allow_pickle=True)"
        elif name in UNSAFE_YAML:
            why = f"{name}() builds arbitrary objects"
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _dotted(loader, aliases) if loader is not None else None
            if not loader_name or loader_name.split(".")[-1] not in SAFE_YAML_LOADERS:
                why = f"{name}() without a safe Loader"
        if why is None and _is_true(_keyword(node, "trust_remote_code")):
            why = "trust_remote_code=True runs code from a model repository"
        if why is None and _is_true(_keyword(node, "shell")):
            why = "shell=True runs a string through the shell"
        if why:
            found.append(f"{filename}:{node.lineno}: {why}")
    return found


def test_package_has_no_code_execution_from_data():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the whole package, not an empty glob
    found = []
    for path in files:
        found += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert found == []


@pytest.mark.parametrize(
    "snippet",
    [
        "eval(text)",
        "exec(code)",
        "compile(src, 'f', 'exec')",
        "__import__(name)",
        "import builtins\nbuiltins.eval(x)",
        "import pickle\npickle.loads(blob)",
        "import pickle as p\np.load(f)",
        "from pickle import loads\nloads(b)",
        "from pickle import loads as undo\nundo(b)",
        "import marshal\nmarshal.loads(b)",
        "import importlib\nimportlib.import_module(cfg['module'])",
        "from importlib import import_module\nimport_module(name)",
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
        "from torch import load\nload(path)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import yaml\nyaml.full_load(text)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
        "import subprocess\nsubprocess.run(cmd, shell=True)",
    ],
)
def test_scanner_catches_each_unsafe_call(snippet):
    assert len(unsafe_calls(snippet)) == 1, snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import re\nre.compile(r'x')",
        "model.eval()",
        "import yaml\nyaml.safe_load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nfrom yaml import CSafeLoader\nyaml.load(text, CSafeLoader)",
        "import torch\ntorch.load(path, weights_only=True)",
        "import importlib\nimportlib.import_module('json')",
        "# eval(x) in a comment\ns = 'exec(code)'",
        "import numpy as np\nnp.load(f)",
    ],
)
def test_scanner_passes_safe_calls(snippet):
    assert unsafe_calls(snippet) == []


# ----------------------------------------------------------------- checkpoint compatibility

BASE = TINY[:-1] + ["sft.steps=0", "eval.limit=0", "train.steps=1"]  # built-in rewards only


def _trainer(tmp_path: Path, name: str, *overrides: str) -> Trainer:
    cfg = load_config(None, BASE + list(overrides))
    return Trainer(cfg, run_dir=tmp_path / name, progress=False)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    """One real checkpoint of the tiny model with lora.r=4 and the base schema."""
    tmp = tmp_path_factory.mktemp("compat")
    trainer = _trainer(tmp, "source")
    path = trainer.save_checkpoint()
    assert path is not None
    return path


def test_checkpoint_holds_no_pickle(saved_checkpoint: Path):
    files = {p.name for p in saved_checkpoint.rglob("*") if p.is_file()}
    assert not {n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))}
    for p in saved_checkpoint.rglob("*"):
        if p.suffix == ".json" or p.name == "COMPLETE":
            json.loads(p.read_text(encoding="utf-8"))
    state = load_tree(saved_checkpoint, "trainer_state")
    assert state["identity"]["lora_r"] == 4
    assert load_file(str(saved_checkpoint / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["lora.r=8", "lora.alpha=16"], ["lora_r", "checkpoint has 4", "config has 8"]),
        (["rewards.schema=deepsynapse"], ["schema", "'base'", "'deepsynapse'"]),
        (["rewards.weights={correctness: 1.0}"], ["rewards"]),
    ],
    ids=["lora-rank", "schema", "reward-set"],
)
def test_checkpoint_for_another_setup_is_refused(tmp_path, saved_checkpoint, overrides, words):
    trainer = _trainer(tmp_path, "other", *overrides)
    before = {k: v.clone() for k, v in trainer.unwrapped.peft_model.state_dict().items()}
    with pytest.raises(CheckpointError, match="made for another setup") as info:
        trainer.load_checkpoint(saved_checkpoint)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    after = trainer.unwrapped.peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before touching
    assert trainer.step == 0


def test_checkpoint_for_another_model_is_refused(tmp_path, saved_checkpoint):
    """A checkpoint whose identity names another base model (as one from a SmolLM2 run)."""
    copy = tmp_path / "step-0"
    for p in saved_checkpoint.rglob("*"):
        if p.is_file():
            target = copy / p.relative_to(saved_checkpoint)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    state = load_tree(copy, "trainer_state")
    state["identity"]["model"] = "smollm2-135m-instruct"
    save_tree(state, copy, "trainer_state")
    trainer = _trainer(tmp_path, "other")
    with pytest.raises(CheckpointError) as info:
        trainer.load_checkpoint(copy)
    message = str(info.value)
    assert "model: checkpoint has 'smollm2-135m-instruct', config has 'tiny-random'" in message


@pytest.mark.parametrize("damage", ["json", "safetensors", "tensor-ref"])
def test_damaged_checkpoint_tree_is_a_checkpoint_error(tmp_path, damage):
    """A damaged file (or one crafted by someone else) is refused with its name, not a crash."""
    save_tree({"w": torch.ones(3), "step": 2}, tmp_path, "state")
    if damage == "json":
        (tmp_path / "state.json").write_text('{"s:step": 2, ', encoding="utf-8")
    elif damage == "safetensors":
        blob = (tmp_path / "state.safetensors").read_bytes()
        (tmp_path / "state.safetensors").write_bytes(blob[: len(blob) // 2])
    else:
        (tmp_path / "state.json").write_text(
            json.dumps({"s:w": {"__tensor__": "t.missing"}}), encoding="utf-8"
        )
    with pytest.raises(CheckpointError, match="state"):
        load_tree(tmp_path, "state")
