"""Malformed ``.smz`` files end in one line, exit 2, fast and small — never a traceback.

Every case is a file a device might meet: truncated at every region boundary, a flipped bit in
every region, trailing garbage, and manifests forged with a *valid* checksum (so the schema, not
the checksum, must refuse them): huge, negative and zero shapes, wrong types, deep nesting,
non-finite numbers and weights. NumPy only (no torch): it runs as the device would.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sparsemeta_edge import smz
from sparsemeta_edge.cli import main as edge_main
from sparsemeta_edge.nn import is_prunable, param_shapes

EDGE_SRC = str(Path(__file__).resolve().parents[1] / "edge" / "src")
SECONDS_PER_FILE = 1.0
MEMORY_LIMIT_MB = 200
FILTERS = 4  # a ~3 KB file: the "small file declaring a huge shape" of the brief
HEADER = 8


def small_model(seed: int = 0, **manifest: Any) -> tuple[dict, dict, dict, dict]:
    """Manifest, params, masks and extra (fine-tuning's statistics) of a 50%-sparse Conv4-4."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(1, 5, 28, FILTERS, "maxpool")
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    masks = {k: rng.random(s) < 0.5 for k, s in shapes.items() if is_prunable(k, s)}
    extra = {f"bn_stats.{i}.{s}": rng.random(FILTERS) + 0.5 for i in range(4) for s in ("mean", "var")}
    man = {"architecture": {"name": "conv4", "in_channels": 1, "image_size": 28,
                            "filters": FILTERS, "layer_filters": [FILTERS] * 4,
                            "downsample": "maxpool", "ways": 5},
           "algorithm": "maml", "lr_rule": "scalar", "bn": "transductive", "bn_steps": 1,
           "inner_lr": 0.4, "inner_steps": 2, "eval_inner_steps": 3, "class_names": list("abcde"),
           "input": {"size": 28, "channels": 1, "mean": [0.5], "std": [0.25], "invert": False},
           **manifest}
    return man, params, masks, extra


def base_v5(**manifest: Any) -> bytes:
    """A valid file of the current (version-5) writer."""
    man, params, masks, extra = small_model(**manifest)
    return b"".join(smz.encode(man, params, masks, extra=extra))


def legacy(man: dict, version: int) -> dict:
    """A version-5 manifest as versions 1-4 wrote it: the inner steps' names swapped."""
    old = {k: v for k, v in man.items() if k not in ("inner_steps", "eval_inner_steps")}
    old["inner_steps"] = man["eval_inner_steps"]
    if "inner_steps" in man:
        old["train_inner_steps"] = man["inner_steps"]
    return {**old, "version": version}


def base_file(**manifest: Any) -> bytes:
    """The same model as a version-3 file (uncompressed manifest and payload), which the reader
    still reads: the cases forging manifests start from it."""
    man, payload, _ = smz.read_manifest(base_v5(**manifest))
    return forge(json.dumps(legacy(man.to_dict(), 3), separators=(",", ":")).encode(),
                 bytes(payload))


def sections(raw: bytes) -> list[list]:
    """[codec, stored bytes, decoded length] of each section of a version-4 file."""
    count, at, out = raw[4], 5 + 9 * raw[4], []
    for i in range(count):
        codec, size, length = struct.unpack_from("<BII", raw, 5 + 9 * i)
        out.append([codec, raw[at:at + size], length])
        at += size
    return out


def forge_v4(parts: list[list], count: int | None = None, magic: bytes = smz.MAGIC_V5) -> bytes:
    """A file of these sections in the sectioned container (versions 4 and 5) and a *valid*
    checksum."""
    table = b"".join(struct.pack("<BII", c, len(d), n) for c, d, n in parts)
    body = magic + bytes([len(parts) if count is None else count]) + table
    body += b"".join(d for _, d, _ in parts)
    return body + hashlib.sha256(body).digest()


def _replace(raw: bytes, index: int, codec: int | None = None, data: bytes | None = None,
             length: int | None = None) -> bytes:
    parts = sections(raw)
    old = parts[index]
    parts[index] = [old[0] if codec is None else codec, old[1] if data is None else data,
                    old[2] if length is None else length]
    return forge_v4(parts)


def edit_v5(raw: bytes, change: Callable[[dict], Any], magic: bytes = smz.MAGIC_V5) -> bytes:
    """A sectioned file with its manifest changed by ``change`` (in place), re-signed."""
    parts = sections(raw)
    man = json.loads(zlib.decompress(parts[0][1], -15))
    change(man)
    text = json.dumps(man, separators=(",", ":")).encode()
    parts[0] = [smz.DEFLATE, smz._deflate(text), len(text)]
    return forge_v4(parts, magic=magic)


def _as_v4(man: dict) -> None:
    old = legacy(man, 4)
    man.clear()
    man.update(old)


def base_v4() -> bytes:
    """The base model as a version-4 file (version 5's container, the old steps' names)."""
    return edit_v5(base_v5(), _as_v4, smz.MAGIC_V4)


def v5_cases() -> dict[str, bytes]:
    """Version 5's own names, and files of one version in another's container."""
    raw = base_v5()
    out = {f"v5 wrong type: {key}": edit_v5(raw, _set(key, WRONG))
           for key in json.loads(zlib.decompress(sections(raw)[0][1], -15))}
    return {
        **out,
        "v5 with version 4's train_inner_steps": edit_v5(raw, _set("train_inner_steps", 2)),
        "v5 without eval_inner_steps": edit_v5(raw, lambda m: m.pop("eval_inner_steps")),
        "v5 with a payload checksum": edit_v5(raw, _set("payload_sha256", "0" * 64)),
        "v5 negative eval_inner_steps": edit_v5(raw, _set("eval_inner_steps", -1)),
        "v5 sparse entry without its mask": edit_v5(
            raw, lambda m: entry(m, "head.weight").pop("mask")),
        "v5 container, version-4 manifest": edit_v5(base_v4(), lambda m: m, smz.MAGIC_V5),
        "v4 container, version-5 manifest": edit_v5(raw, lambda m: m, smz.MAGIC_V4),
        "v4 with version 5's eval_inner_steps": edit_v5(
            base_v4(), _set("eval_inner_steps", 3), smz.MAGIC_V4),
        "v4 wrong type: train_inner_steps": edit_v5(
            base_v4(), _set("train_inner_steps", WRONG), smz.MAGIC_V4),
    }


def v4_cases() -> dict[str, bytes]:
    """The sectioned container's own fields (versions 4 and 5): section table, codecs,
    deflate streams, caps."""
    raw = base_v5()
    parts = sections(raw)
    text = zlib.decompress(parts[0][1], -15)
    bomb = smz._deflate(b"\0" * (20 << 20))  # 20 MB of zeros in ~20 KB
    padded = text[:-1] + b" " * smz.schema.MAX_MANIFEST_BYTES + b"}"
    over = smz._deflate(b"\0" * (smz.MAX_PAYLOAD_BYTES + 4))
    packed = smz._deflate(parts[1][1])  # the first payload section (bitmasks), deflated
    v5_manifest_v3 = text.replace(b'"version":5', b'"version":3')
    return {
        "v4 deflate bomb in payload": _replace(raw, 1, smz.DEFLATE, bomb),
        "v4 deflate bomb in manifest": _replace(raw, 0, data=bomb),
        "v4 manifest declared over the cap": _replace(raw, 0, data=smz._deflate(padded),
                                                      length=len(padded)),
        "v4 payload declared over the cap": _replace(raw, 1, smz.DEFLATE, over,
                                                     smz.MAX_PAYLOAD_BYTES + 4),
        "v4 declared past deflate's ratio": _replace(raw, 1, smz.DEFLATE, packed, 10**6),
        "v4 corrupt deflate stream": _replace(raw, 0, data=b"\xff" * len(parts[0][1])),
        "v4 corrupt payload stream": _replace(raw, 1, smz.DEFLATE, packed[:len(packed) // 2]),
        "v4 manifest declared 1 byte long": _replace(raw, 0, length=parts[0][2] + 1),
        "v4 manifest declared 1 byte short": _replace(raw, 0, length=parts[0][2] - 1),
        "v4 payload declared 1 byte short": _replace(raw, 1, smz.DEFLATE, packed, parts[1][2] - 1),
        "v4 payload declared 1 byte long": _replace(raw, 1, smz.DEFLATE, packed, parts[1][2] + 1),
        "v4 data after the stream": _replace(raw, 0, data=parts[0][1] + b"\0"),
        "v4 unknown codec": _replace(raw, 1, codec=3),
        "v4 raw manifest": _replace(raw, 0, smz.RAW, text, len(text)),
        "v4 raw length mismatch": _replace(raw, 0, smz.RAW, text, len(text) + 1),
        "v4 byte planes of a ragged length": _replace(raw, 1, codec=4, length=parts[1][2] - 1),
        "v4 no sections": forge_v4([], 0),
        "v4 200 sections": forge_v4(parts, 200),
        "v4 truncated in table": raw[:9], "v4 truncated": raw[:-40], "v4 padded": raw + b"\0",
        "v4 flip in a stream": flip(raw, 5 + 9 * len(parts) + 3),
        "v5 container, version-3 manifest": _replace(raw, 0, data=smz._deflate(v5_manifest_v3)),
        "v3 container, version-4 manifest": edit(base_file(), _set("version", 4)),
        "v3 container, version-5 manifest": edit(base_file(), _set("version", 5)),
        "newer container": b"SMZ\x06" + raw[4:],
    }


def split(raw: bytes) -> tuple[dict, bytes]:
    """Manifest and payload of a version-3 file."""
    (n,) = struct.unpack_from("<I", raw, 4)
    return json.loads(raw[HEADER:HEADER + n]), raw[HEADER + n:-smz.TRAILER_BYTES]


def forge(text: bytes | dict, payload: bytes) -> bytes:
    """A file with this manifest and payload and a *valid* checksum."""
    if isinstance(text, dict):
        text = json.dumps(text).encode()
    body = smz.MAGIC + struct.pack("<I", len(text)) + text + payload
    return body + hashlib.sha256(body).digest()


def edit(raw: bytes, change: Callable[[dict], Any]) -> bytes:
    """The base file with its manifest changed by ``change`` (in place), re-signed."""
    man, payload = split(raw)
    change(man)
    return forge(man, payload)


def flip(raw: bytes, at: int) -> bytes:
    out = bytearray(raw)
    out[at] ^= 0x04
    return bytes(out)


def entry(man: dict, name: str) -> dict:
    return next(t for t in man["tensors"] if t["name"] == name)


def _set(path: str, value: Any, tensor: str | None = None) -> Callable[[dict], None]:
    """A change setting field ``a.b`` of the manifest (or of tensor entry ``tensor``)."""
    def change(man: dict) -> None:
        keys = path.split(".")
        target = man if tensor is None else entry(man, tensor)
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


def _nonfinite_payload(raw: bytes, name: str, value: float) -> bytes:
    man, payload = split(raw)
    start = entry(man, name)["values"][0]
    bad = bytearray(payload)
    bad[start:start + 4] = np.float32(value).tobytes()
    return forge(man, bytes(bad))


@functools.cache
def cases() -> dict[str, bytes]:
    """At least 40 malformed files, by what is wrong with them."""
    raw = base_file()
    man, payload = split(raw)
    (n,) = struct.unpack_from("<I", raw, 4)
    body_end = len(raw) - smz.TRAILER_BYTES
    text = raw[HEADER:HEADER + n]
    mean_at = HEADER + text.index(b'"mean"') + 8
    version_at = HEADER + text.index(b'"version":3') + 10
    shape_at = HEADER + text.index(b'"shape":[') + 9
    out = {
        # truncated at every region
        "empty": b"", "truncated in magic": raw[:3], "truncated in header": raw[:7],
        "truncated in manifest": raw[:HEADER + n // 2], "truncated after manifest": raw[:HEADER + n],
        "truncated in payload": raw[:HEADER + n + len(payload) // 2],
        "truncated before checksum": raw[:body_end], "truncated in checksum": raw[:-1],
        # a flipped bit in every region
        "flip magic": flip(raw, 1), "flip manifest length low": flip(raw, 4),
        "flip manifest length high": flip(raw, 7), "flip input.mean": flip(raw, mean_at),
        "flip version": flip(raw, version_at), "flip shape": flip(raw, shape_at),
        "flip manifest middle": flip(raw, HEADER + n // 2),
        "flip payload first": flip(raw, HEADER + n), "flip payload middle": flip(raw, HEADER + n + len(payload) // 2),
        "flip payload last": flip(raw, body_end - 1), "flip checksum first": flip(raw, body_end),
        "flip checksum last": flip(raw, len(raw) - 1),
        # trailing garbage
        "one trailing byte": raw + b"\0", "trailing garbage": raw + b"GARBAGE" * 20,
        # header lies
        "manifest length 4 GB": raw[:4] + struct.pack("<I", 0xFFFFFFFF) + raw[HEADER:],
        "not utf-8": forge(b'{"format": "\xff\xfe"}', payload),
        "manifest is a list": forge(b"[1, 2, 3]", payload),
        "deep nesting": forge(b'{"class_names": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", payload),
        "nesting in a field": edit(raw, _set("source", {"run": {"a": {"b": {"c": [1]}}}})),
        "huge integer": forge(text.replace(b'"inner_steps":3', b'"inner_steps":' + b"9" * 5000),
                              payload),
        "NaN in manifest": forge(text.replace(b'"inner_lr":0.4', b'"inner_lr":NaN'), payload),
        "1e999 in input.mean": forge(text.replace(b'"mean":[0.5]', b'"mean":[1e999]'), payload),
        # shapes
        "huge shape": edit(raw, _set("shape", tensor="head.weight", value=[100_000, 100_000])),
        "negative shape": edit(raw, _set("shape", tensor="blocks.0.conv.weight", value=[-4, 1, 3, 3])),
        "zero shape": edit(raw, _set("shape", tensor="blocks.1.conv.bias", value=[0])),
        "shape as string": edit(raw, _set("shape", tensor="head.bias", value="5")),
        "shape float": edit(raw, _set("shape", tensor="head.bias", value=[5.0])),
        "huge architecture": edit(raw, _set("architecture.filters", 10**12)),
        "zero image size": edit(raw, _set("architecture.image_size", 0)),
        # wrong types and values of each kind of field
        "version string": edit(raw, _set("version", "3")),
        "version from the future": edit(raw, _set("version", 99)),
        "inner_lr string": edit(raw, _set("inner_lr", "fast")),
        "bn unknown": edit(raw, _set("bn", "magic")),
        "downsample unknown": edit(raw, _set("architecture.downsample", "avgpool")),
        "input.mean wrong length": edit(raw, _set("input.mean", [0.1, 0.2, 0.3])),
        "input.std zero": edit(raw, _set("input.std", [0.0])),
        "class_names too few": edit(raw, _set("class_names", ["a"])),
        "class_names not strings": edit(raw, _set("class_names", [1, 2, 3, 4, 5])),
        "unknown field": edit(raw, _set("surprise", 1)),
        "unknown tensor field": edit(raw, _set("offset", tensor="head.bias", value=3)),
        "tensors a dict": edit(raw, _set("tensors", {"head.bias": 1})),
        "tensors empty": edit(raw, _set("tensors", [])),
        "dtype object": edit(raw, _set("dtype", tensor="head.bias", value="|O")),
        "dtype float16 on a bias": edit(raw, _set("dtype", tensor="head.bias", value="<f2")),
        "span past payload": edit(raw, _set("values", tensor="head.bias", value=[0, 10**12])),
        "span negative": edit(raw, _set("values", tensor="head.bias", value=[-8, 20])),
        "span three numbers": edit(raw, _set("values", tensor="head.bias", value=[0, 1, 2])),
        "payload_bytes wrong": edit(raw, _set("payload_bytes", len(payload) + 4)),
        "nonzeros wrong": edit(raw, _set("nonzeros", 1)),
        "lr_rule metasgd without rates": edit(raw, _set("lr_rule", "metasgd")),
        "bn running without statistics": edit(raw, _set("bn", "running")),
        "duplicate tensor": edit(raw, lambda m: m["tensors"].append(dict(m["tensors"][-1]))),
        "missing tensor": edit(raw, lambda m: m["tensors"].pop()),
        "payload checksum in version 3": edit(raw, _set("payload_sha256", "0" * 64)),
        # non-finite weights (a valid file otherwise)
        "NaN weight": _nonfinite_payload(raw, "head.bias", float("nan")),
        "inf weight": _nonfinite_payload(raw, "blocks.2.bn.weight", float("inf")),
    }
    mask = entry(man, "head.weight")["mask"]
    bad = bytearray(payload)
    bad[mask[0] + mask[1] - 1] |= 0x01  # 5×4=20 bits: the last byte's 4 padding bits
    out["mask padding bit set"] = forge(man, bytes(bad))
    out["sparse entry without its mask"] = edit(raw, lambda m: entry(m, "head.weight").pop("mask"))
    return {**out, **wrong_types(raw), **v4_cases(), **v5_cases()}


WRONG = {"not a field": 1}  # the wrong type for every field: no field is an object of this key


def wrong_types(raw: bytes) -> dict[str, bytes]:
    """Every field of the manifest, of its nested objects and of a tensor entry, in turn set
    to an object of the wrong shape."""
    man, _ = split(raw)
    out = {f"wrong type: {key}": edit(raw, _set(key, WRONG)) for key in man}
    for parent in ("architecture", "input"):
        out.update({f"wrong type: {parent}.{key}": edit(raw, _set(f"{parent}.{key}", WRONG))
                    for key in man[parent]})
    tensor = entry(man, "blocks.1.conv.weight")
    out.update({f"wrong type: tensor.{key}": edit(raw, _set(key, WRONG, "blocks.1.conv.weight"))
                for key in tensor})
    return out


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    for i, (name, data) in enumerate(cases().items()):
        (root / f"{i:02d}.smz").write_bytes(data)
        (root / f"{i:02d}.txt").write_text(name)
    return root


def test_base_files_are_valid_and_small():
    """The cases start from valid files (so every refusal is caused by the defect): version 3
    (uncompressed), 4 and 5 (the current writer), with the same values; versions 3 and 4 name
    the adaptation steps ``inner_steps`` and meta-training's ``train_inner_steps``, version 5
    ``eval_inner_steps`` and ``inner_steps``, and all three read as the same ``Manifest``."""
    raw = base_file()
    assert len(raw) < 4096
    model = smz.decode(raw)
    assert model.manifest.version == 3 and model.manifest.class_names == tuple("abcde")
    assert "bn_stats.3.var" in model.extra
    current, v4 = smz.decode(base_v5()), smz.decode(base_v4())
    assert current.manifest.version == smz.FORMAT_VERSION == 5 and len(base_v5()) < len(raw)
    assert base_v5()[:4] == smz.MAGIC_V5 and base_v4()[:4] == smz.MAGIC_V4 and v4.manifest.version == 4
    for m in (model, current, v4):
        assert (m.manifest.eval_inner_steps, m.manifest.inner_steps) == (3, 2)
        assert m.manifest.replace(version=5) == current.manifest
        for k, v in model.params.items():
            np.testing.assert_array_equal(m.params[k], v, err_msg=k)


def test_there_are_at_least_40_cases():
    assert len(cases()) >= 40 + len(wrong_types(base_file())) + len(v4_cases()) + len(v5_cases())


OLD_FILES = Path(__file__).resolve().parent / "smz_files"


def test_version_1_and_2_files_of_the_previous_writer_are_still_read():
    """Files written by the version-2 writer (commit 702baee): a plain sparse MAML ticket
    (version 1) and Meta-SGD with per-step batch norm, running statistics and fine-tuning's
    reference statistics (version 2) decode to the values they were written from."""
    v1 = smz.load(OLD_FILES / "v1.smz")
    assert v1.manifest.version == 1 and len(v1.checksum) == 64
    assert (v1.manifest.eval_inner_steps, v1.manifest.inner_steps) == (3, None)  # not recorded
    assert (v1.manifest.lr_rule, v1.manifest.bn, v1.manifest.adapted_steps) == ("scalar", "transductive", 0)
    man, params, masks, _ = _v1_source()
    for k, v in params.items():
        np.testing.assert_array_equal(v1.params[k], v, err_msg=k)
    for k, m in masks.items():
        np.testing.assert_array_equal(v1.masks[k], m)
    v2 = smz.load(OLD_FILES / "v2.smz")
    assert v2.manifest.version == 2 and v2.manifest.lr_rule == "metasgd"
    assert (v2.manifest.bn, v2.manifest.bn_steps) == ("running", 3)
    assert v2.params["blocks.2.bn.running_var"].shape == (3, FILTERS)
    assert v2.params["blocks.2.bn.weight"].shape == (3, FILTERS)
    assert set(v2.rates) == {k for k in v2.params if "running" not in k}
    assert sorted(v2.extra) == sorted(f"bn_stats.{i}.{s}" for i in range(4) for s in ("mean", "var"))
    assert edge_main(["info", str(OLD_FILES / "v2.smz")]) == 0
    flipped = bytearray((OLD_FILES / "v2.smz").read_bytes())
    flipped[-3] ^= 0x10  # the payload's checksum still guards versions 1 and 2
    with pytest.raises(smz.SmzError, match="checksum"):
        smz.decode(bytes(flipped))


def _v1_source() -> tuple[dict, dict, dict, dict]:
    """What tests/smz_files/v1.smz was written from (``test_edge_device.make_model`` with
    filters 4, density 0.5, seed 3, at that commit)."""
    rng = np.random.default_rng(3)
    shapes = param_shapes(1, 5, 28, FILTERS, "maxpool")
    params, masks = {}, {}
    for name, shape in shapes.items():
        if is_prunable(name, shape):
            fan = int(np.prod(shape[1:]))
            params[name] = rng.normal(0, np.sqrt(2 / fan), size=shape).astype(np.float32)
            masks[name] = rng.random(shape) < 0.5
            params[name] *= masks[name]
        else:
            params[name] = (rng.uniform(0.5, 1.5, shape) if name.endswith("bn.weight")
                            else rng.normal(0, 0.1, shape)).astype(np.float32)
    return {}, params, masks, {}


@pytest.mark.parametrize("name", list(cases()))
def test_reader_refuses_in_one_line(name):
    with pytest.raises(smz.SmzError) as err:
        smz.decode(cases()[name], source="f.smz")
    assert "\n" not in str(err.value) and "f.smz" in str(err.value)


_CHILD = textwrap.dedent("""
    import contextlib, io, json, sys, time, tracemalloc
    from pathlib import Path
    sys.modules["torch"] = None
    from sparsemeta_edge.cli import main
    from sparsemeta_edge.runtime import peak_rss_mb
    results = {}
    for path in sorted(Path(sys.argv[1]).glob("*.smz")):
        err, out = io.StringIO(), io.StringIO()
        tracemalloc.start()
        t = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(["info", str(path)])
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results[path.with_suffix(".txt").read_text()] = {
            "rc": rc, "err": err.getvalue(), "out": out.getvalue(), "seconds": seconds,
            "peak_mb": peak / 2**20}
    print(json.dumps({"cases": results, "maxrss_mb": peak_rss_mb()}))
""")


def test_cli_info_on_every_case_one_line_exit_2_fast_and_small(fuzz_dir):
    """``sparsemeta-edge info``, in a fresh process without torch, on every case: memory per
    case by tracemalloc (NumPy reports its buffers to it), and the process's peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(fuzz_dir)], capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": EDGE_SRC, "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["cases"]) >= 40
    for name, r in report["cases"].items():
        assert r["rc"] == 2, (name, r)
        assert r["out"] == "" and r["err"].count("\n") == 1, (name, r["err"])
        assert r["err"].startswith("sparsemeta-edge: error: "), (name, r["err"])
        assert r["err"].isascii() or r["err"].isprintable() or r["err"].endswith("\n")
        assert r["seconds"] < SECONDS_PER_FILE, (name, r["seconds"])
        assert r["peak_mb"] < MEMORY_LIMIT_MB, (name, r["peak_mb"])
    assert report["maxrss_mb"] < MEMORY_LIMIT_MB


def test_entry_point_exits_2_with_one_line(fuzz_dir):
    """The real command (a process of its own) on a few cases: exit status 2, one line."""
    for path in sorted(fuzz_dir.glob("*.smz"))[::20]:
        proc = subprocess.run([sys.executable, "-m", "sparsemeta_edge", "info", str(path)],
                              capture_output=True, text=True, timeout=30,
                              env={"PYTHONPATH": EDGE_SRC, "PATH": "/usr/bin"})
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_class_names_with_control_characters_are_printed_escaped(tmp_path, capsys):
    """A valid file whose class names carry terminal escapes: shown, but as text."""
    man, params, masks, extra = small_model()
    man["class_names"] = ["\x1b[2J\x1b]0;pwned\x07", "line\nbreak", "bidi\u202eevil", "d", "e"]
    smz.save(tmp_path / "m.smz", man, params, masks, extra=extra)
    assert edge_main(["info", str(tmp_path / "m.smz")]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "\\x1b[2J\\x1b]0;pwned\\x07, line\\nbreak, bidi\\u202eevil, d, e" in shown


def test_writer_refuses_what_the_reader_would_refuse(tmp_path):
    man, params, masks, extra = small_model()
    params["head.bias"][0] = np.nan
    with pytest.raises(smz.SmzError, match="'head.bias' has values that are not finite"):
        smz.encode(man, params, masks)
    params["head.bias"][0] = 1e6  # fine in float32, not in float16 — but biases stay float32
    params["head.weight"][masks["head.weight"]] = 1e6
    with pytest.raises(smz.SmzError, match="beyond float16's range"):
        smz.encode(man, params, masks, fp16=True)
    with pytest.raises(smz.SmzError, match="schema|reader would refuse"):
        smz.encode({**man, "bn": "magic"}, params, masks)


def test_version_3_files_of_the_previous_writer_are_still_read():
    """tests/smz_files/v3.smz: ``small_model(seed=5)`` written by the version-3 writer (commit
    6957a86, uncompressed manifest and payload) decodes to the values it was written from."""
    v3 = smz.load(OLD_FILES / "v3.smz")
    assert v3.manifest.version == 3 and (OLD_FILES / "v3.smz").read_bytes()[:4] == smz.MAGIC
    assert (v3.manifest.eval_inner_steps, v3.manifest.class_names) == (3, tuple("abcde"))
    _, params, masks, extra = small_model(seed=5)
    for k, v in params.items():
        np.testing.assert_array_equal(v3.params[k], v * masks[k] if k in masks else v, err_msg=k)
    for k, m in masks.items():
        np.testing.assert_array_equal(v3.masks[k], m)
    for k, v in extra.items():
        np.testing.assert_array_equal(v3.extra[k], v)
    assert edge_main(["info", str(OLD_FILES / "v3.smz")]) == 0
    # the current writer stores the same model in version 5, smaller, and it reads back the same
    again = smz.decode(b"".join(smz.encode(small_model(seed=5)[0], params, masks, extra=extra)))
    assert again.manifest.version == 5
    for k, v in v3.params.items():
        np.testing.assert_array_equal(again.params[k], v, err_msg=k)


def _digest(a: np.ndarray) -> str:
    """As tests/smz_files/v4.json records every array: dtype, shape and bytes."""
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode()
                          + np.ascontiguousarray(a).tobytes()).hexdigest()


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return [_without_none(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("name", ["v4.smz", "v4_finetuned.smz"])
def test_version_4_files_of_the_previous_writer_are_still_read(name, tmp_path, capsys):
    """tests/smz_files/v4*.smz were written by the version-4 writer (commit 1bcd1f0; see
    tests/smz_files/README.md): an exported MAML++ ticket (LSLR, per-step and running batch
    norm, 2 meta-training and 3 adaptation steps) and an int8 Meta-SGD ticket fine-tuned on 3
    classes. v4.json holds what the version-4 reader decoded: every array (SHA-256 of dtype,
    shape and bytes) and the manifest. Read now, every array is bit-identical, the manifest is
    the same with the steps' old names mapped (``inner_steps`` → ``eval_inner_steps``,
    ``train_inner_steps`` → ``inner_steps``), and re-saved as version 5 nothing changes."""
    record = json.loads((OLD_FILES / "v4.json").read_text())[name]
    old = record["manifest"]
    model = smz.load(OLD_FILES / name)
    assert model.manifest.version == 4 and model.checksum == record["checksum"]
    assert model.manifest.eval_inner_steps == old["inner_steps"]
    assert model.manifest.inner_steps == old["train_inner_steps"] != old["inner_steps"]
    renamed = {k: v for k, v in old.items() if k not in ("inner_steps", "train_inner_steps")}
    renamed.update(eval_inner_steps=old["inner_steps"], inner_steps=old["train_inner_steps"],
                   version=smz.FORMAT_VERSION)
    renamed.setdefault("adapted_steps", 0)  # the default, which version 5 writes out
    assert model.manifest.to_dict() == _without_none(renamed)
    for group in ("params", "masks", "rates", "extra"):
        arrays = getattr(model, group)
        assert {k: _digest(v) for k, v in arrays.items()} == record[group], group
    smz.save_model(tmp_path / "again.smz", model)
    again = smz.load(tmp_path / "again.smz")
    assert again.manifest == model.manifest.replace(version=5, tensors=again.manifest.tensors,
                                                    payload_bytes=again.manifest.payload_bytes)
    for group in ("params", "masks", "rates", "extra"):
        assert {k: _digest(v) for k, v in getattr(again, group).items()} == record[group], group
    assert edge_main(["info", str(OLD_FILES / name)]) == 0
    shown = capsys.readouterr().out
    assert f"{old['inner_steps']} step(s), meta-trained with {old['train_inner_steps']}" in shown
