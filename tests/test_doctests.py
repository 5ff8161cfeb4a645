"""The examples in the docstrings of rewards/ and control/ run, so they cannot go stale."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import deepsynapse.control
import deepsynapse.rewards

MODULES = [
    m.name
    for package in (deepsynapse.rewards, deepsynapse.control)
    for m in pkgutil.iter_modules(package.__path__, package.__name__ + ".")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_reward_modules_have_examples():
    attempted = sum(
        doctest.testmod(importlib.import_module(n), report=False).attempted
        for n in MODULES
        if n.startswith("deepsynapse.rewards.")
    )
    assert attempted >= 20, attempted
