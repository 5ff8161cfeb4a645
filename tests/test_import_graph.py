"""The two import cycles the review found stay broken (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import deepsynapse

ROOT = Path(deepsynapse.__file__).parent


def imports_of(module: str) -> set[str]:
    """Every deepsynapse module ``module`` imports, at top level or inside a function."""
    path = ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("deepsynapse")}


@pytest.mark.parametrize(
    ("upper", "lower"),
    [("deepsynapse.config", "deepsynapse.control.build"), ("deepsynapse.cli", "deepsynapse.api")],
)
def test_the_lower_layer_does_not_import_the_upper(upper, lower):
    assert lower in imports_of(upper)  # the direction that stays
    assert upper not in imports_of(lower), f"{lower} imports {upper}: a cycle"
