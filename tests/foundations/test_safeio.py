"""Reading untrusted files and values with limits (foundations.safeio): every refusal is one
line that says what is wrong and what to do, and none hangs, recurses or expands without bound."""

from __future__ import annotations

import ast
import json
import os
import socket
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from sparsemeta.foundations import safeio
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.safeio import (
    MAX_DEPTH,
    MAX_NODES,
    MAX_SHOWN,
    check_key,
    load_json,
    load_yaml,
    parse_value,
    read_bytes,
    read_json,
    read_text,
    read_yaml,
    short,
)

POSIX = os.name == "posix"
WHAT = "config file 'x.yaml'"
#: 9 levels of 9 aliases each: 9**9 (387 million) values once expanded
LAUGHS = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))


def refusal(call, *fragments: str) -> str:
    """The UserError message of ``call``: one line, holding every fragment."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def finishes_within(seconds: float, call) -> None:
    """Run ``call`` in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    done: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            done.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            done.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if done[0] is not None:
        raise done[0]


# -- files -------------------------------------------------------------------------------------
def test_a_regular_file_within_the_limit_is_read_and_one_byte_more_is_refused(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"a" * 100)
    assert read_bytes(path, limit=100, what=WHAT) == b"a" * 100
    path.write_bytes(b"a" * 101)
    refusal(lambda: read_bytes(path, limit=100, what=WHAT),
            f"{WHAT} is 101 bytes, more than the 100 this reads")


def test_missing_paths_and_directories_have_their_own_messages(tmp_path):
    refusal(lambda: read_bytes(tmp_path / "gone.yaml", limit=10, what=WHAT),
            f"{WHAT} does not exist; check the path")
    refusal(lambda: read_bytes(tmp_path / "gone" / "x.yaml", limit=10, what=WHAT),
            "does not exist")
    refusal(lambda: read_bytes(tmp_path, limit=10, what=WHAT),
            f"{WHAT} is a directory; give the path of a file")
    (tmp_path / "file").write_text("x")
    refusal(lambda: read_bytes(tmp_path / "file" / "x.yaml", limit=10, what=WHAT),
            "does not exist")  # a path through a file: ENOTDIR, not a traceback
    refusal(lambda: read_bytes("x\0.yaml", limit=10, what=WHAT),
            f"{WHAT} is not a usable path (it holds a NUL character)")
    refusal(lambda: read_bytes("x" * 5000, limit=10, what=WHAT), "cannot be read (File name")


@pytest.mark.skipif(not POSIX, reason="symbolic links and fifos")
def test_a_dangling_symlink_is_named_as_one(tmp_path):
    (tmp_path / "link.yaml").symlink_to(tmp_path / "nowhere.yaml")
    refusal(lambda: read_bytes(tmp_path / "link.yaml", limit=10, what=WHAT),
            "is a symbolic link to a missing file")


@pytest.mark.skipif(not POSIX, reason="fifos")
def test_a_fifo_and_a_symlink_to_one_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    link = tmp_path / "link.yaml"
    link.symlink_to(fifo)
    for path in (fifo, link):  # no writer ever opens it: a blocking open would never return
        finishes_within(5, lambda p=path: refusal(
            lambda: read_bytes(p, limit=10, what=WHAT),
            f"{WHAT} is not a regular file (a fifo); give the path of a file"))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_refused_not_read_until_memory_runs_out():
    finishes_within(5, lambda: refusal(
        lambda: read_bytes("/dev/zero", limit=10, what="summary '/dev/zero'"),
        "summary '/dev/zero' is not a regular file (a character device)"))


@pytest.mark.skipif(not POSIX, reason="unix sockets")
def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        refusal(lambda: read_bytes(path, limit=10, what=WHAT), "(a socket)")


@pytest.mark.skipif(not POSIX, reason="fifos")
def test_the_open_descriptor_is_checked_too_so_a_swap_after_the_check_cannot_block(
        tmp_path, monkeypatch):
    """The path check happens before opening; a fifo or device swapped in after it is caught
    by fstat on the descriptor, which O_NONBLOCK opened without waiting for a writer."""
    monkeypatch.setattr(safeio, "_check_kind", lambda path, what: None)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    finishes_within(5, lambda: refusal(lambda: read_bytes(fifo, limit=10, what=WHAT),
                                       "not a regular file (a fifo)"))
    if os.path.exists("/dev/zero"):
        refusal(lambda: read_bytes("/dev/zero", limit=10, what=WHAT), "(a character device)")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs procfs")
def test_a_file_that_reports_size_zero_is_still_read_only_to_the_limit():
    """procfs files say 0 bytes and hold more (as a file growing after the check would)."""
    refusal(lambda: read_bytes("/proc/self/status", limit=100, what="status"),
            "status is more than the 100 bytes this reads")
    assert b"Name:" in read_bytes("/proc/self/status", limit=1 << 16, what="status")


def test_an_unreadable_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(safeio.os, "open", denied)
    refusal(lambda: read_bytes(path, limit=10, what=WHAT),
            f"{WHAT} cannot be read (Permission denied); check its permissions")


def test_text_is_utf8_with_an_optional_bom_and_a_bad_byte_is_located(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"\xef\xbb\xbftrain: {iterations: 5}\n")
    assert read_text(path, limit=100, what=WHAT) == "train: {iterations: 5}\n"
    path.write_bytes("a: 1  # caf\u00e9\n".encode("latin-1"))
    refusal(lambda: read_text(path, limit=100, what=WHAT),
            f"{WHAT} is not UTF-8 text (byte 0xe9 at offset 11); save it as UTF-8")
    path.write_bytes(b"\xef\xbb\xbfa: \xff\n")  # the offset counts the BOM: it is in the file
    refusal(lambda: read_text(path, limit=100, what=WHAT), "byte 0xff at offset 6")


def test_read_yaml_and_read_json_apply_their_size_limits(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train: {iterations: 010}\n")
    assert read_yaml(path, what=WHAT) == {"train": {"iterations": 10}}
    refusal(lambda: read_yaml(path, what=WHAT, limit=10), "more than the 10 this reads")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"rows": [{"accuracy": 0.5}]}))
    assert read_json(summary, what="summary") == {"rows": [{"accuracy": 0.5}]}
    assert safeio.MAX_JSON_BYTES > 100 * 57_000  # a reduced experiment's summary is 57 KB


# -- YAML --------------------------------------------------------------------------------------
def test_yaml_numbers_are_read_as_yaml_1_2_and_python_read_them():
    text = ("octal_looking: 010\nhex: 0x1F\ntime: 1:30\nsmall: 1e-3\nhalf: .5\nyes_word: yes\n"
            "on_word: on\nunderscored: 1_000\nday: 2024-01-01\nnothing: ~\nflag: true\n")
    assert load_yaml(text, where=WHAT) == {
        "octal_looking": 10, "hex": 31, "time": "1:30", "small": 0.001, "half": 0.5,
        "yes_word": "yes", "on_word": "on", "underscored": 1000, "day": "2024-01-01",
        "nothing": None, "flag": True}


def test_yaml_gives_plain_python_objects_and_aliases_are_copies_not_shared():
    data = load_yaml("base: &b {lr: 1, steps: [1, 2]}\nother: *b\nmerged: {<<: *b, lr: 2}\n",
                     where=WHAT)
    assert data == {"base": {"lr": 1, "steps": [1, 2]}, "other": {"lr": 1, "steps": [1, 2]},
                    "merged": {"lr": 2, "steps": [1, 2]}}
    assert type(data) is dict and type(data["base"]["steps"]) is list
    data["other"]["steps"].append(3)  # a caller editing one section edits only that one
    assert data["base"]["steps"] == [1, 2]


def test_a_key_given_twice_is_refused_naming_the_key_and_its_line():
    refusal(lambda: load_yaml("train:\n  iterations: 3\ntrain:\n  iterations: 5\n", where=WHAT),
            f"{WHAT} is not valid YAML (line 3, column 1: key 'train' appears twice in one "
            "mapping); fix it")
    refusal(lambda: load_yaml("a: {x: 1, x: 2}\n", where=WHAT), "key 'x' appears twice")


@pytest.mark.parametrize("text, kind", [("[1, 2]: x\n", "a list"), ("{a: 1}: x\n", "a mapping"),
                                        ("? - 1\n: x\n", "a list"),
                                        ("a: &l [1]\n*l : x\n", "alias *'l' puts a list")])
def test_a_list_or_mapping_as_a_key_is_refused_not_a_crash(text, kind):
    refusal(lambda: load_yaml(text, where=WHAT), f"{WHAT} is not valid YAML (line ", kind,
            "keys are names or numbers")


@pytest.mark.parametrize("text, tag", [
    ("a: !!python/object/apply:os.system ['true']\n", "'!!python/object/apply:os.system'"),
    ("a: !!binary aGk=\n", "'!!binary'"), ("a: !!set {x}\n", "'!!set'"),
    ("a: !local 1\n", "'!local'"),
    ("%TAG !! tag:example.com,2000:\n---\na: !!str x\n", "'tag:example.com,2000:str'"),
    ("a: !!bool x\n", "'!!bool'"), ("a: !!int\n", "'!!int'")])  # ruamel: KeyError, IndexError
def test_tags_other_than_the_plain_types_are_refused(text, tag):
    refusal(lambda: load_yaml(text, where=WHAT), "is not valid YAML (line ", f"the tag {tag} is "
            "not read here")


def test_tags_that_only_restate_a_plain_kind_are_read():
    assert load_yaml("a: !!str 010\nb: !!seq [1]\nc: !!map {x: 1}\n", where=WHAT) == {
        "a": "010", "b": [1], "c": {"x": 1}}


@pytest.mark.parametrize("text, problem", [
    ("train:\n  iterations: 5\n bad: [1, 2\n", "line 3, column 2:"),
    ("a: [1, 2\n", "expected ',' or ']'"),
    ("a: 1\n---\nb: 2\n", "expected a single document in the stream, but found another"),
    ("a: *nowhere\n", "alias *'nowhere' names no anchor above it"),
    ("a: &r [1, *r]\n", "alias *'r' is inside the node it names"),
    ("a: b\x00\n", "line 1, column 5: the character U+0000 is not allowed in YAML"),
    ("a: 1" + "0" * 5000 + "\n", "an integer has too many digits"),
    ("a: !!seq x\n", "expected a sequence node, but found scalar"),
    ("%YAML 1.1\n---\na: 010\n", "'%YAML 1.1' asks for another YAML version")])
def test_invalid_yaml_is_one_line_with_where(text, problem):
    refusal(lambda: load_yaml(text, where=WHAT), f"{WHAT} is not valid YAML (", problem,
            "); fix it")


@pytest.mark.parametrize("text", ["[" * 10_000 + "]" * 10_000,
                                  "".join(f"{' ' * i}k{i}:\n" for i in range(10_000)) + "x",
                                  "- " * 10_000 + "x\n"])
def test_deep_yaml_is_refused_fast_before_anything_recurses(text):
    start = time.perf_counter()
    refusal(lambda: load_yaml(text, where=WHAT), f"{WHAT} nests deeper than {MAX_DEPTH} levels "
            "(line ", "flatten it")
    assert time.perf_counter() - start < 2  # ruamel's flow scanner alone takes ~0.4 s


def test_nesting_up_to_the_limit_is_read():
    assert load_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH, where=WHAT) is not None


def test_billion_laughs_are_refused_fast_and_small():
    tracemalloc.start()
    start = time.perf_counter()
    try:
        refusal(lambda: load_yaml(LAUGHS, where=WHAT),
                f"{WHAT} has more than {MAX_NODES:,} values once its aliases are expanded "
                "(line ", "use fewer aliases")
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1
    assert peak < 5 << 20


def test_aliases_within_the_limit_are_expanded():
    text = "a: &a [1, 2, 3]\nb: [*a, *a, *a]\n"
    assert load_yaml(text, where=WHAT) == {"a": [1, 2, 3], "b": [[1, 2, 3]] * 3}


def test_a_flat_document_over_the_node_limit_is_refused_too(monkeypatch):
    monkeypatch.setattr(safeio, "MAX_NODES", 50)  # 100,000 plain values take 2 s to parse
    assert len(load_yaml("[" + ", ".join(["1"] * 49) + "]", where=WHAT)) == 49
    refusal(lambda: load_yaml("[" + ", ".join(["1"] * 50) + "]", where=WHAT),
            "more than 50 values once its aliases are expanded (line 1, column 149)")


# -- --set values ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, value", [
    ("010", 10), ("0x1F", 31), ("1:30", "1:30"), ("1e-3", 0.001), (".5", 0.5), ("yes", "yes"),
    ("null", None), ("true", True), ("[1, 2]", [1, 2]), ("{a: 1}", {"a": 1}), ("", ""),
    ("  ", ""), ("a: b: c", "a: b: c"), ("!foo", "!foo"), ("[1, 2", "[1, 2"),
    ("C:\\data", "C:\\data"), ("{a: 1, a: 2}", "{a: 1, a: 2}")])
def test_a_set_value_is_yaml_1_2_and_invalid_yaml_stays_the_string_typed(raw, value):
    assert parse_value(raw) == value


def test_a_set_value_over_the_limits_is_refused_not_kept_as_a_string():
    flow = "[" * 1000 + "]" * 1000
    message = refusal(lambda: parse_value(flow), "the --set value '[[[",
                      f"nests deeper than {MAX_DEPTH} levels")
    assert len(message) < 200  # the value is quoted cut short
    laughs = "{" + LAUGHS.replace("\n", ", ") + "}"
    refusal(lambda: parse_value(laughs, where="--set x"), "--set x '{a0",
            f"more than {MAX_NODES:,} values")


# -- JSON --------------------------------------------------------------------------------------
def test_json_is_read_and_nan_written_by_python_is_accepted():
    data = load_json('{"accuracy": NaN, "ci95": Infinity, "rows": [1, 2.5, "x"]}', where="e")
    assert data["accuracy"] != data["accuracy"] and data["ci95"] == float("inf")
    assert data["rows"] == [1, 2.5, "x"]


def test_deep_json_is_refused_before_parsing_with_where():
    start = time.perf_counter()
    for text in ("[" * 10_000 + "]" * 10_000, '{"a": ' * 10_000 + "1" + "}" * 10_000,
                 "[" * 1_000_000):
        refusal(lambda t=text: load_json(t, where="eval.json"),
                f"eval.json nests deeper than {MAX_DEPTH} levels (line 1, column ",
                "fix or restore it")
    assert time.perf_counter() - start < 1
    assert load_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, where="x") is not None


def test_json_depth_ignores_brackets_inside_strings():
    text = json.dumps({"names": ["[" * 100, "{" * 100, '\\"[' * 50]})
    assert load_json(text, where="x")["names"][0] == "[" * 100
    deep = '{"s": "[\\"]",\n "x": ' + "[" * 40 + "]" * 40 + "}"
    refusal(lambda: load_json(deep, where="x"), "(line 2, column 38)")  # 1 + 31 brackets in


@pytest.mark.parametrize("text, problem", [
    ('{"a": 1,}', "line 1, column 9: Expecting property name"),
    ("", "line 1, column 1: Expecting value"),
    ('{"a": 1, "a": 2}', "key 'a' appears twice in one object"),
    ("1" * 5000, "an integer has too many digits")])
def test_invalid_json_is_one_line(text, problem):
    refusal(lambda: load_json(text, where="splits.json"), "splits.json is not valid JSON (",
            problem, "fix or restore it")


# -- messages ----------------------------------------------------------------------------------
def test_short_cuts_any_value_without_walking_it():
    huge = list(range(10**6))
    start = time.perf_counter()
    shown = [short(huge), short("x" * 10**7), short({i: i for i in range(10**5)}),
             short(10**20000), short(b"a" * 10**6), short(set(range(10**5)))]
    assert time.perf_counter() - start < 0.5
    assert all(len(s) <= MAX_SHOWN for s in shown), shown
    assert shown[0] == "[0, 1, 2, 3, 4, 5, 6, 7, ...]"
    assert shown[1] == "'" + "x" * (MAX_SHOWN - 3) + "…'"
    assert shown[2].startswith("{0: 0, 1: 1,")  # insertion order, not a sort of everything
    assert shown[3] == "<an integer of 66,439 bits>"
    loop: list = []
    loop.append(loop)
    assert short(loop) == "[[[[...]]]]"
    assert short("train") == "'train'" and short(5) == "5"
    assert short("a\nb") == "'a\\nb'"  # one line


def test_check_key_names_a_lookalike_character_and_the_key_meant():
    known = ["train", "meta", "data"]
    assert check_key("tr\u0430in", known) == (
        "it contains '\u0430' (U+0430 CYRILLIC SMALL LETTER A), not ASCII 'a': write 'train'")
    assert check_key("\uff54rain", known).endswith("not ASCII 't': write 'train'")  # fullwidth
    assert check_key("tr\u200bain", known) == (
        "it contains '\\u200b' (U+200B ZERO WIDTH SPACE); keys are ASCII: did you mean 'train'?")


def test_check_key_shows_a_dotted_key_nested():
    known = ["train", "meta"]
    assert check_key("train.iterations", known, value=5) == (
        "write it nested: train: {iterations: 5}")
    assert check_key("train.a.b", known) == "write it nested: train: {a: {b: …}}"
    assert check_key("train.x", known, value="true") == "write it nested: train: {x: 'true'}"
    assert check_key("train.x", known, value=None) == "write it nested: train: {x: null}"


def test_check_key_suggests_the_nearest_name_or_nothing():
    assert check_key("trian", ["train", "meta"]) == "did you mean 'train'?"
    assert check_key("zzzz", ["train", "meta"]) is None
    assert check_key("x" * 10**6, ["train"]) is None  # no quadratic matching of a huge key


def test_every_refusal_quotes_values_cut_short():
    key = "k" * 10_000
    message = refusal(lambda: load_yaml(f"? {key}\n: 1\n? {key}\n: 2\n", where=WHAT),
                      "appears twice")
    assert len(message) < 250
    message = refusal(lambda: load_json(f'{{"{key}": 1, "b": 2, "{key}": 3}}', where="x"),
                      "key 'kkk", "…' appears twice")
    assert len(message) < 200


def test_the_module_stays_in_its_layer():
    """foundations may import only the standard library, numpy, torch and ruamel.yaml."""
    tree = ast.parse(Path(safeio.__file__).read_text())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
              for a in n.names}
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "torch", "ruamel", "sparsemeta"}
