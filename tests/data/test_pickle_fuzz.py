"""Malformed mini-ImageNet pickles: each one ends in a one-line UserError, quickly, in bounded
memory. The loads run in a fresh subprocess so that its peak RSS (getrusage) measures only them."""

from __future__ import annotations

import codecs
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sparsemeta.data import miniimagenet
from sparsemeta.data.miniimagenet import read_pickle
from sparsemeta.foundations.errors import UserError

SRC = str(Path(miniimagenet.__file__).parents[2])
N = 6
IMAGES = np.arange(N * 8 * 8 * 3, dtype=np.int64).astype(np.uint8).reshape(N, 8, 8, 3)
GOOD = {"n01": [0, 1, 2], "n02": [3, 4, 5]}
MAX_SECONDS = 1.0
MAX_RSS_MB = 200


class Reduce:
    """Pickles as ``func(*args)`` (how a hostile pickle calls whatever it names)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def dump(obj, protocol: int = 4) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


def mini(class_dict=None, image_data=IMAGES, protocol: int = 4) -> bytes:
    return dump({"image_data": image_data, "class_dict": GOOD if class_dict is None else class_dict},
                protocol)


def nested_list(depth: int) -> bytes:
    """Opcodes of a list nested ``depth`` deep (too deep for pickle.dumps to write)."""
    return b"]" * depth + b"a" * (depth - 1)


def deep_value(depth: int) -> bytes:
    """A valid pickle whose class_dict['n01'] is a list nested ``depth`` deep (protocol 2)."""
    marker = "PLACEHOLDER-FOR-THE-DEEP-LIST"
    blob = mini({"n01": marker}, protocol=2)
    op = b"X" + struct.pack("<I", len(marker)) + marker.encode()
    assert blob.count(op) == 1
    return blob.replace(op, nested_list(depth))


def shared_tree(levels: int) -> list:
    x: list = [0]
    for _ in range(levels):
        x = [x, x]  # pickled once per level thanks to the memo: 2**levels leaves, a few bytes each
    return x


def cases() -> dict[str, bytes]:
    good = mini()
    hexbomb: object = "ab"
    for _ in range(30):  # each level doubles the bytes: 2**30 x from a ~1 KB pickle
        hexbomb = Reduce(codecs.encode, hexbomb, "hex")
    out = {
        # damaged files
        "truncated half": good[: len(good) // 2],
        "truncated after 5 bytes": good[:5],
        "one byte": b"\x80",
        "flipped PROTO byte": bytes([good[0] ^ 0xFF]) + good[1:],
        "flipped STOP byte": good[:-1] + bytes([good[-1] ^ 0xFF]),
        "BINBYTES8 claiming 1 TB": b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.",
        "FRAME claiming 1 TB": b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.",
        "memo index 2**26 (1 GB memo in the C unpickler)": b"\x80\x02Nr" + struct.pack("<I", 2**26) + b".",
        "int with a million digits": b"\x80\x02L" + b"9" * 1_000_000 + b"L\n.",
        # wrong types at each level
        "top level is a list": dump([1, 2, 3]),
        "top level nested 100000 deep": b"\x80\x02" + nested_list(100_000) + b".",
        "no class_dict, mixed key types": dump({"image_data": IMAGES, 1: 2, ("a",): 3, None: 4}),
        "image_data is a list": mini(image_data=[[1, 2, 3]]),
        "image_data is float32": mini(image_data=IMAGES.astype(np.float32)),
        "image_data is 3-D": mini(image_data=IMAGES.reshape(N, 8, 24)),
        "image_data has no images": mini(image_data=IMAGES[:0]),
        "class_dict is a list": mini([[0, 1, 2]]),
        "class_dict is empty": mini({}),
        "class_dict mixed key types": mini({"n01": [0, 1], 2: [2, 3]}),
        "class label with a newline": mini({"n01\nx": [0, 1]}),
        "class value is a string": mini({"n01": "012"}),
        "class value is a dict": mini({"n01": {0: 1}}),
        "class value holds floats": mini({"n01": [0.0, 1.0]}),
        "class value holds bools": mini({"n01": [True, False]}),
        "class value is an object array": mini({"n01": np.array([0, 1], dtype=object)}),
        "class value is a 2-D array": mini({"n01": np.array([[0, 1], [2, 3]])}),
        "class value nested 100000 deep": deep_value(100_000),
        "class value is a 2**20-leaf shared tree": mini({"n01": shared_tree(20)}),
        "class with no images": mini({"n01": [], "n02": [0]}),
        # counts and indices
        "200,000 indices": dump({"image_data": IMAGES, "class_dict": {"n01": [0] * 200_000}}, 2),
        "BYTEARRAY8 claiming 1 GB": b"\x80\x05\x96" + struct.pack("<Q", 2**30) + b"abc.",
        "more classes than images": mini({f"n{i:02d}": [i % N] for i in range(N + 1)}),
        "negative index": mini({"n01": [0, -1]}),
        "index past the end": mini({"n01": [0, N]}),
        "index 10**30": mini({"n01": [10**30]}),
        "uint64 index 2**64-1": mini({"n01": np.array([2**64 - 1], dtype=np.uint64)}),
        "duplicate index": mini({"n01": [0, 0, 1]}),
        "index in two classes": mini({"n01": [0, 1], "n02": [1, 2]}),
        # globals
        "disallowed global os.system": dump(os.system),
        "disallowed call eval": dump(Reduce(eval, "1+1")),
        "ndarray called directly (10**10 elements)": dump(Reduce(np.ndarray, (10**5, 10**5))),
        "_reconstruct with a 10**10 shape": dump(Reduce(np._core.multiarray._reconstruct,
                                                        np.ndarray, (10**10,), b"B")),
        "bytearray(10**9)": dump(Reduce(bytearray, 10**9)),
        "_codecs.encode hex doubling 30 times": dump(hexbomb),
        "scalar of a 10**9-byte dtype": dump(Reduce(np._core.multiarray.scalar,
                                                    np.dtype("V1000000000"))),
    }
    return out


RUNNER = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    from sparsemeta.data.miniimagenet import read_pickle
    from sparsemeta.foundations.errors import UserError

    def reset_peak():
        # Linux: VmHWM is this process's own peak (ru_maxrss may carry the forking parent's
        # peak across exec) and writing 5 to clear_refs restarts it, so each case is measured
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mb():
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    results = []
    for path in sorted(Path(sys.argv[1]).glob("*.pkl")):
        reset_peak()
        t = time.perf_counter()
        try:
            read_pickle(path)
            outcome, msg = "loaded", ""
        except UserError as exc:
            outcome, msg = "UserError", str(exc)
        except BaseException as exc:
            outcome, msg = type(exc).__name__, repr(exc)[:300]
        results.append([path.name, outcome, msg, time.perf_counter() - t, peak_mb()])
    print(json.dumps(results))
""")


def test_malformed_pickles_end_in_one_line_user_errors_fast_and_small(tmp_path):
    all_cases = cases()
    assert len(all_cases) >= 15
    names = {}
    for k, (name, blob) in enumerate(all_cases.items()):
        file = f"{k:03d}.pkl"
        (tmp_path / file).write_bytes(blob)
        names[file] = name
        assert len(blob) < 3_000_000
    (tmp_path / "zzz-valid.pkl").write_bytes(mini())
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results[-1][:2] == ["zzz-valid.pkl", "loaded"]  # the checks do not refuse good files
    failures = []
    for file, outcome, msg, seconds, _ in results[:-1]:
        name = names[file]
        if outcome != "UserError" or "\n" in msg or not msg.startswith("'"):
            failures.append(f"{name}: {outcome}: {msg!r}")
        if seconds > MAX_SECONDS:
            failures.append(f"{name}: took {seconds:.2f} s")
    peak = max(r[4] for r in results)
    worst = max(results[:-1], key=lambda r: r[3])
    for file, outcome, _msg, seconds, rss in results:
        print(f"{seconds:7.3f} s {rss:6.0f} MB  {names.get(file, file)}: {outcome}")
    print(f"{len(results) - 1} malformed pickles; slowest {names[worst[0]]!r} {worst[3]:.3f} s; "
          f"peak RSS {peak:.0f} MB")
    assert not failures, "\n".join(failures)
    assert peak < MAX_RSS_MB, f"peak RSS {peak:.0f} MB"


@pytest.mark.parametrize("name, words", [
    ("negative index", "points outside image_data (index -1"),
    ("duplicate index", "lists image 0 more than once"),
    ("index in two classes", "image 1 is in two classes, 'n01' and 'n02'"),
    ("200,000 indices", "claims 200,000 images but only 6"),
    ("BINBYTES8 claiming 1 TB", "is truncated or not a pickle"),
    ("class value is a 2**20-leaf shared tree", "holds a list, not an image index"),
    ("no class_dict, mixed key types", "found keys ['image_data', <a int>, <a tuple>"),
    ("class_dict mixed key types", "has the key <a int>"),
    ("memo index 2**26 (1 GB memo in the C unpickler)", "found a NoneType"),
    ("disallowed global os.system", "refusing to load it"),
    ("bytearray(10**9)", "refusing to load it"),
])
def test_the_message_says_what_is_wrong(tmp_path, name, words):
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(cases()[name])
    with pytest.raises(UserError) as err:
        read_pickle(path)
    assert words in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_random_byte_flips_never_escape_as_other_exceptions(tmp_path, protocol):
    good = mini(protocol=protocol)
    path = tmp_path / "x.pkl"
    path.write_bytes(good)
    data, classes = read_pickle(path)
    assert np.array_equal(data, IMAGES) and {k: v.tolist() for k, v in classes.items()} == GOOD
    rng = random.Random(protocol)
    raw = IMAGES.tobytes()
    if protocol == 2:  # bytes travel as the UTF-8 of a latin-1 str
        raw = raw.decode("latin1").encode("utf-8")
    pixels = good.index(raw)  # flips in the pixels give valid files: skip them
    positions = [i for i in range(len(good)) if not pixels <= i < pixels + len(raw)]
    refused = 0
    for _ in range(150):
        blob = bytearray(good)
        for i in rng.sample(positions, rng.randint(1, 3)):
            blob[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(blob))
        try:
            read_pickle(path)
        except UserError as exc:
            assert "\n" not in str(exc)
            refused += 1
    assert refused > 75
