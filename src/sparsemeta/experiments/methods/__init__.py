"""The registry of sparsity methods: one module per method, each defining ``METHOD``.

Adding a method is one new module in this package plus one line in ``_MODULES``; the runner,
the report, ``tune``, the config (a method's settings section) and the CLI learn about it from
``METHODS`` alone. Order matters: it is the order in which an experiment runs the methods, the
report lists their branches and a saved config lists their sections.
"""

from __future__ import annotations

import dataclasses
import importlib

from sparsemeta.config import add_section, remove_section
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
    "short_imp",
    "eb_continue",
)

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method; its branches must not contradict a registered method's."""
    for branch in method.branches:
        other = branches().get(branch.name)
        if other is not None and other != branch:
            raise ValueError(f"branch '{branch.name}' of method '{method.name}' differs from "
                             "the registered branch of that name")
    fields = ({f.name.rstrip("_") for f in dataclasses.fields(method.settings)}
              if method.settings is not None else set())
    for field, param in method.search.items():
        if field not in fields or param.key != f"{method.name}.{field}":
            raise ValueError(f"method '{method.name}' searches '{field}' as '{param.key}', which "
                             f"is not '{method.name}.<one of its settings>'")
    if method.settings is not None:
        add_section(method.name, method.settings)
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method and its config section (configs built afterwards lack it)."""
    METHODS.pop(name, None)
    remove_section(name)


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
