"""Errors the user can act on, and how any file-derived text reaches a terminal.

Kept apart from ``smz`` so that the manifest schema and the format can both raise them.
"""

from __future__ import annotations


class EdgeError(Exception):
    """A mistake the user can fix (bad file, bad option); the CLI prints one line, exit 2."""


class SmzError(EdgeError):
    """The file is not a valid ``.smz`` (wrong magic, bad manifest, checksum mismatch)."""


def printable(text: object) -> str:
    """``text`` with every non-printable character (control, format — e.g. a bidi override —,
    line and paragraph separators, lone surrogates) written as a Python escape: class names,
    manifest fields and error messages come from files, and a terminal must show them as text
    on one line, never execute them."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)
