"""The registry of sparsity methods: one module per method, each defining ``METHOD``.

Adding a method is one new module in this package plus one line in ``_MODULES``; the runner,
the report, ``tune`` and the CLI learn about it from ``METHODS`` alone. Order matters: it is the
order in which an experiment runs the methods and the report lists their branches.
"""

from __future__ import annotations

import importlib

from sparsemeta.experiments.methods.base import Branch, Method

_MODULES = (
    "lottery",
    "dense",
    "random",
    "l1",
    "rigl",
    "earlybird",
    "oneshot",
    "ebtarget",
    "gmp",
)

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method; its branches must not contradict a registered method's."""
    for branch in method.branches:
        other = branches().get(branch.name)
        if other is not None and other != branch:
            raise ValueError(f"branch '{branch.name}' of method '{method.name}' differs from "
                             "the registered branch of that name")
    METHODS[method.name] = method
    return method


def branches() -> dict[str, Branch]:
    """Every branch of every registered method, in registry order (first definition wins)."""
    out: dict[str, Branch] = {}
    for method in METHODS.values():
        for branch in method.branches:
            out.setdefault(branch.name, branch)
    return out


def names() -> list[str]:
    return list(METHODS)


for _name in _MODULES:
    register(importlib.import_module(f"{__name__}.{_name}").METHOD)
