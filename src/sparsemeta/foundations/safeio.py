"""Every untrusted file and value, read with limits: one clear line instead of a hang, a
``MemoryError``, a ``RecursionError`` or a 10 MB error message.

A config, a sweep, a run directory's ``config.yaml``/``eval.json``, a ``splits.json`` or a
``--set`` value may come from anyone, so each read here is bounded three ways:

* **size** — :func:`read_bytes` opens without blocking, refuses anything but a regular file
  (a fifo or ``/dev/zero`` would otherwise be read until memory runs out) and never reads more
  than ``limit + 1`` bytes;
* **depth** — YAML and JSON nesting is counted before any recursive code sees it;
* **expansion** — YAML aliases are counted with their multiplicity while parsing, so a
  "billion laughs" document is refused after reading a few hundred events, not expanded.

YAML is read as YAML 1.2 (``ruamel.yaml``'s safe loader): numbers as Python reads them (``010``
is 10, ``0x1F`` 31, ``1:30`` and ``yes`` stay strings), plain ``dict``/``list``/scalars only.
Every refusal is a :class:`~sparsemeta.foundations.errors.UserError` of one line naming the
file (the caller's ``what``/``where``) and what to do; values in messages go through
:func:`short`.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import reprlib
import stat
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ruamel.yaml import YAML
from ruamel.yaml.constructor import ConstructorError, SafeConstructor
from ruamel.yaml.error import YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    MappingStartEvent,
    NodeEvent,
)
from ruamel.yaml.reader import ReaderError

from sparsemeta.foundations.errors import UserError

#: a config, preset or sweep file: ours are a few KB; a megabyte is thousands of settings
MAX_CONFIG_BYTES = 1 << 20
#: a run directory's or experiment's JSON: the reduced all-methods experiment's summary.json
#: is 57 KB (2026-12, 23 rows, 11 runs); a full one with thousands of validation points per run
#: stays within a few MB, so 32 MiB leaves 10x room while json's worst case (``[[],[],...]``,
#: about 20 bytes of memory per byte) stays under a gigabyte
MAX_JSON_BYTES = 32 << 20
#: nesting levels of a YAML or JSON document: a config has 2, a sweep 4; Python's json and
#: ruamel's composer recurse per level and fail near 1000
MAX_DEPTH = 32
#: values (scalars and collections) of a YAML document with every alias expanded: a config has
#: about 100, a sweep grid a few thousand
MAX_NODES = 100_000
#: characters of a value quoted in an error message
MAX_SHOWN = 60
#: characters of a parser's own problem text kept in a message
_MAX_PROBLEM = 160

#: what a path may be, as messages name it
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a fifo"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))
_BOM = b"\xef\xbb\xbf"
#: a fifo opened without O_NONBLOCK waits for a writer, possibly forever
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


# -- files -------------------------------------------------------------------------------------
def read_bytes(path: str | Path, *, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. ``what`` names it in messages
    (``"config file 'x.yaml'"``). Opened with ``O_NONBLOCK`` and checked with ``fstat`` on the
    open descriptor, so a fifo (or a file swapped for one after a check) never blocks and a
    device is never read; at most ``limit + 1`` bytes are read from anything."""
    path = os.fspath(path)
    _check_kind(path, what)  # before opening: a device is not even opened
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _open_error(what, exc) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{what} {_not_regular(info.st_mode)}")
        if info.st_size > limit:
            raise UserError(f"{what} is {info.st_size:,} bytes, more than the {limit:,} this "
                            "reads; check it is the right file")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise UserError(f"{what} cannot be read ({exc.strerror or exc}); check the path and "
                        "its permissions") from None
    finally:
        os.close(fd)
    if left <= 0:  # grew after fstat, or a /proc-like file that reports size 0
        raise UserError(f"{what} is more than the {limit:,} bytes this reads; check it is the "
                        "right file")
    return b"".join(chunks)


def _check_kind(path: str, what: str) -> None:
    """Missing, a directory, or not a regular file: each its own message."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"{what} is a symbolic link to a missing file; check the "
                            "path") from None
        raise UserError(f"{what} does not exist; check the path") from None
    except OSError as exc:
        raise _open_error(what, exc) from None
    except ValueError:  # a path from a YAML or JSON file may hold "\0"
        raise UserError(f"{what} is not a usable path (it holds a NUL character); check the "
                        "path") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} is a directory; give the path of a file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {_not_regular(mode)}")


def mode_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, for a message ("a file", "a fifo", …)."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _not_regular(mode: int) -> str:
    return f"is not a regular file ({mode_kind(mode)}); give the path of a file"


def _open_error(what: str, exc: OSError) -> UserError:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return UserError(f"{what} does not exist; check the path")
    if isinstance(exc, PermissionError):
        return UserError(f"{what} cannot be read ({exc.strerror or 'Permission denied'}); "
                         "check its permissions")
    return UserError(f"{what} cannot be read ({exc.strerror or exc}); check the path")


def read_text(path: str | Path, *, limit: int, what: str) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped), bounded as :func:`read_bytes`."""
    raw = read_bytes(path, limit=limit, what=what)
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        raise UserError(f"{what} is not UTF-8 text (byte {raw[offset]:#04x} at offset "
                        f"{offset}); save it as UTF-8") from None


def read_yaml(path: str | Path, *, what: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    """:func:`read_text` then :func:`load_yaml`: the one call for a YAML file."""
    return load_yaml(read_text(path, limit=limit, what=what), where=what)


def read_json(path: str | Path, *, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """:func:`read_text` then :func:`load_json`: the one call for a JSON file."""
    return load_json(read_text(path, limit=limit, what=what), where=what)


# -- YAML --------------------------------------------------------------------------------------
#: explicit tags read: those that build a plain object from any node of their kind. Others
#: build non-plain objects (``!!binary``, ``!!set``, ``!!python/...``, ``!local``), and ruamel's
#: ``!!bool``/``!!int`` crash with KeyError/IndexError on a value that is not one ("!!bool x")
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "seq", "map"))


class _Limit(Exception):
    """Valid YAML that is too deep or too large: refused even where invalid YAML is not
    (:func:`parse_value` keeps invalid text as a string)."""

    def __init__(self, problem: str, mark: Any, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.mark, self.fix = problem, mark, fix


class _Constructor(SafeConstructor):
    """ruamel's safe constructor with our duplicate-key message and dates kept as text
    (``2024-01-01`` is a string, as JSON and Python would read it)."""

    def check_mapping_key(self, node: Any, key_node: Any, mapping: Any, key: Any,
                          value: Any) -> bool:
        if key in mapping:
            raise ConstructorError(None, None, f"key {short(key)} appears twice in one mapping",
                                   key_node.start_mark)
        return True

    def construct_yaml_timestamp(self, node: Any, values: Any = None) -> Any:
        return self.construct_scalar(node)


_Constructor.add_constructor("tag:yaml.org,2002:timestamp", _Constructor.construct_yaml_timestamp)


def _yaml() -> YAML:
    """A fresh loader per document: ruamel's YAML object keeps per-stream state."""
    yaml = YAML(typ="safe", pure=True)
    yaml.Constructor = _Constructor
    return yaml


def load_yaml(text: str, *, where: str) -> Any:
    """YAML 1.2 text as plain ``dict``/``list``/``str``/``int``/``float``/``bool``/``None``,
    nothing shared between two places (an alias is copied, so editing one section never
    edits another). ``where`` names the source in messages (``"config file 'x.yaml'"``)."""
    try:
        return _load_yaml(text)
    except _Limit as exc:
        raise UserError(f"{where} {exc.problem} ({_at(exc.mark)}); {exc.fix}") from None
    except (YAMLError, ValueError) as exc:  # ValueError: an integer of over 4300 digits
        raise UserError(f"{where} is not valid YAML ({_problem(exc, text)}); fix it") from None


def parse_value(text: str, *, where: str = "the --set value") -> Any:
    """One ``--set`` value read as a YAML 1.2 scalar or flow value (``010`` is 10, ``[1, 2]`` a
    list); text that is not valid YAML stays the string as typed, and empty text is ``""``.
    Depth and expansion limits still hold (a value of ``[[[[...`` is refused)."""
    if not text.strip():
        return ""
    try:
        return _load_yaml(text)
    except _Limit as exc:
        raise UserError(f"{where} {short(text)} {exc.problem}; {exc.fix}") from None
    except (YAMLError, ValueError):
        return text


def _load_yaml(text: str) -> Any:
    _scan(text)
    return _unshared(_yaml().load(text))


@dataclass
class _Open:
    """A collection being parsed: its kind, children so far, anchor, and the node count
    when it opened (its expanded size is the count when it closes, minus that)."""

    mapping: bool
    anchor: str | None
    start: int
    children: int = 0


def _scan(text: str) -> None:
    """Check the parse events before anything is built: depth, expanded size (an alias counts
    as the whole node it names, from sizes remembered per anchor, so nothing is expanded),
    tags, keys that are collections and aliases to a node still open. Linear in the text."""
    stack: list[_Open] = []
    anchors: dict[str, tuple[int, bool] | None] = {}  # (expanded size, is a collection); None: open
    total = 0
    for ev in _yaml().parse(text):
        if isinstance(ev, CollectionEndEvent):
            done = stack.pop()
            if done.anchor is not None:
                anchors[done.anchor] = (total - done.start, True)
            continue
        if not isinstance(ev, NodeEvent):  # stream and document boundaries
            _check_version(ev)
            continue
        is_key = bool(stack) and stack[-1].mapping and stack[-1].children % 2 == 0
        if stack:
            stack[-1].children += 1
        if isinstance(ev, AliasEvent):
            total += _alias_size(ev, anchors, is_key)
        else:
            _check_tag(ev)
            total += 1
            if isinstance(ev, CollectionStartEvent):
                _check_open(ev, stack, is_key)
                stack.append(_Open(isinstance(ev, MappingStartEvent), ev.anchor, total - 1))
                if ev.anchor is not None:
                    anchors[ev.anchor] = None
            elif ev.anchor is not None:
                anchors[ev.anchor] = (1, False)
        if total > MAX_NODES:
            raise _Limit(f"has more than {MAX_NODES:,} values once its aliases are expanded",
                         ev.start_mark, "write fewer values or use fewer aliases")


def _alias_size(ev: AliasEvent, anchors: dict[str, tuple[int, bool] | None],
                is_key: bool) -> int:
    if ev.anchor not in anchors:
        raise ConstructorError(None, None, f"alias *{short(ev.anchor)} names no anchor above "
                               "it", ev.start_mark)
    seen = anchors[ev.anchor]
    if seen is None:
        raise ConstructorError(None, None, f"alias *{short(ev.anchor)} is inside the node it "
                               "names (a value cannot contain itself)", ev.start_mark)
    if is_key and seen[1]:
        raise ConstructorError(None, None, f"alias *{short(ev.anchor)} puts a list or mapping "
                               "where a key is expected; keys are names or numbers",
                               ev.start_mark)
    return seen[0]


def _check_version(ev: Any) -> None:
    """``%YAML 1.1`` would bring back 1.1's numbers (``010`` is 8) that this module is for."""
    version = getattr(ev, "version", None)
    if version is not None and tuple(version) != (1, 2):
        raise ConstructorError(None, None, f"'%YAML {'.'.join(map(str, version))}' asks for "
                               "another YAML version; this reads YAML 1.2: remove that line",
                               ev.start_mark)


def _check_tag(ev: NodeEvent) -> None:
    tag = ev.tag
    if tag is not None and tag not in _PLAIN_TAGS:
        shown = tag.replace("tag:yaml.org,2002:", "!!")
        raise ConstructorError(None, None, f"the tag {short(shown)} is not read here; write "
                               "plain values without tags", ev.start_mark)


def _check_open(ev: CollectionStartEvent, stack: list[_Open], is_key: bool) -> None:
    kind = "mapping" if isinstance(ev, MappingStartEvent) else "list"
    if is_key:
        raise ConstructorError(None, None, f"a {kind} used as a key; keys are names or numbers",
                               ev.start_mark)
    if len(stack) >= MAX_DEPTH:
        raise _Limit(f"nests deeper than {MAX_DEPTH} levels", ev.start_mark,
                     "no setting needs that many; flatten it")


def _unshared(data: Any) -> Any:
    """A copy in which no list or dict appears twice (aliases share them); bounded, because
    :func:`_scan` has counted every expanded value, and shallow, because it checked depth."""
    if isinstance(data, dict):
        return {k: _unshared(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_unshared(v) for v in data]
    return data


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _line_column(text: str, offset: int) -> str:
    line, column = text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)
    return f"line {line}, column {column}"


def _problem(exc: Exception, text: str) -> str:
    """Where and what of a parser's error, on one line: 'line 3, column 7: expected ...'."""
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
    if isinstance(exc, ReaderError):
        return (f"{_line_column(text, exc.position)}: the character U+{exc.character:04X} is "
                "not allowed in YAML")
    if not isinstance(exc, YAMLError) and "integer string conversion" in str(exc):
        return "an integer has too many digits to read"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and problem.startswith("but "):  # "expected a single document ..., but found"
        problem = f"{context}, {problem}"
    problem = " ".join(problem.split())
    if len(problem) > _MAX_PROBLEM:
        problem = problem[: _MAX_PROBLEM - 1] + "…"
    return f"{_at(mark)}: {problem}" if mark is not None else problem


# -- JSON --------------------------------------------------------------------------------------
#: a JSON string: brackets inside it do not nest
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
#: a JSON string (no group) or a bracket outside one (group 1 opening, group 2 closing)
_JSON_TOKEN = re.compile(_JSON_STRING.pattern + r"|([\[{])|([\]}])", re.S)
#: every byte but the four brackets (UTF-8 continuation bytes are never one of them)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class _DuplicateKey(ValueError):
    """A JSON object that names one key twice (json itself keeps the last silently)."""


def load_json(text: str, *, where: str) -> Any:
    """JSON text, refused in one line if it nests deeper than :data:`MAX_DEPTH` (checked before
    parsing: Python's json recurses per level), repeats a key in one object, or is not JSON.
    ``NaN`` and ``Infinity`` are accepted: Python's json writes them, and our eval.json and
    summary.json hold NaN where an accuracy or interval is undefined."""
    deep = _too_deep(text)
    if deep is not None:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels "
                        f"({_line_column(text, deep)}); fix or restore it")
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except ValueError as exc:  # also a repeated key, or an integer of over 4300 digits
        raise UserError(f"{where} is not valid JSON ({_problem(exc, text)}); fix or restore "
                        "it") from None


def _too_deep(text: str) -> int | None:
    """Offset of the first bracket nested deeper than :data:`MAX_DEPTH` outside strings, or
    None. The depth is a cumulative sum over the brackets alone, in C and numpy (0.25 s for
    32 MiB where a Python loop takes 1-4 s); only a refused text is walked again to say where."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    outside = _JSON_STRING.sub("", text).encode("utf-8", "surrogatepass")
    codes = np.frombuffer(outside.translate(None, _NOT_BRACKET), np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    depth = np.cumsum(opens.astype(np.int8) * 2 - 1, dtype=np.int32)
    if depth.size == 0 or depth.max() <= MAX_DEPTH:
        return None
    nth = int(np.argmax(depth > MAX_DEPTH))  # the same brackets, in the same order:
    brackets = (m.start() for m in _JSON_TOKEN.finditer(text) if m.lastindex)
    return next(itertools.islice(brackets, nth, None))


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"key {short(key)} appears twice in one object")
    return obj


# -- messages ----------------------------------------------------------------------------------
class _Short(reprlib.Repr):
    """reprlib that looks at a bounded part of anything: dicts and sets are not sorted (reprlib
    sorts them whole), bytes and huge ints are cut before ``repr``, strings keep their start."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 8
        self.maxstring = self.maxother = self.maxlong = limit

    def repr_dict(self, x: dict, level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in itertools.islice(x.items(), self.maxdict)]
        return "{" + ", ".join(items + ["..."] * (len(x) > self.maxdict)) + "}"

    def repr_set(self, x: set | frozenset, level: int) -> str:
        if level <= 0:
            return f"{type(x).__name__}(...)"
        items = [self.repr1(v, level - 1) for v in itertools.islice(x, self.maxset)]
        return f"{type(x).__name__}({{{', '.join(items + ['...'] * (len(x) > self.maxset))}}})"

    repr_frozenset = repr_set

    def repr_str(self, x: str, level: int) -> str:  # cut at the end (reprlib cuts the middle)
        return repr(x[: self.maxstring])

    repr_bytes = repr_str

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * self.maxlong:  # more digits than are shown; repr may refuse
            return f"<an integer of {x.bit_length():,} bits>"
        return repr(x)


def short(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` of at most ``limit`` characters, ending in "…" when cut; looks at a few
    items per level and a few levels only, so a 10 MB or self-containing value costs nothing."""
    text = _Short(limit).repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):  # keep the closing quote: 'abc…'
        return text[: limit - 2] + "…" + text[-1]
    return text[: limit - 1] + "…"


_NOT_GIVEN = object()
#: a string YAML reads back as the same string when written without quotes
_PLAIN_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,59}")


def check_key(key: str, known: Iterable[str], *, value: Any = _NOT_GIVEN) -> str | None:
    """A hint for an unknown key, to append to its error, or None: a non-ASCII look-alike
    character (``trаin`` with a Cyrillic 'а'), a dotted key written at the level of its first
    part (``train.iterations: 5`` in a YAML file; ``value`` shows the nested form), or the
    nearest known name."""
    names = list(known)
    odd = next((c for c in key if not c.isascii()), None)
    if odd is not None:
        return _lookalike(key, odd, names)
    head, _, rest = key.partition(".")
    if rest and head in names:
        nested = _flow(value)
        for part in reversed(rest.split(".")):
            nested = f"{{{part}: {nested}}}"
        return f"write it nested: {head}: {nested}"
    close = difflib.get_close_matches(key, names, n=1) if len(key) <= MAX_SHOWN else []
    return f"did you mean '{close[0]}'?" if close else None


def _lookalike(key: str, odd: str, names: list[str]) -> str:
    name = unicodedata.name(odd, "a character with no name")
    said = f"it contains {odd!r} (U+{ord(odd):04X} {name})"
    at = key.index(odd)
    for known in names:  # same length, same ASCII letters: the odd ones stand for known's
        if len(known) == len(key) and all(a == b or not a.isascii() for a, b in zip(key, known)):
            return f"{said}, not ASCII {known[at]!r}: write '{known}'"
    folded = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
    close = difflib.get_close_matches(folded, names, n=1) if len(key) <= MAX_SHOWN else []
    return f"{said}; keys are ASCII" + (f": did you mean '{close[0]}'?" if close else "")


def _flow(value: Any) -> str:
    """A value as YAML would write it in a hint; "…" if absent or not a short scalar."""
    if value is _NOT_GIVEN or isinstance(value, (list, dict)):
        return "…"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str) and _PLAIN_WORD.fullmatch(value) and parse_value(value) == value:
        return value
    return short(value)
