"""The ``.smz`` manifest's schema, checked before a single array is allocated.

A file comes from anywhere (a copy, a download, an attacker), so every field is checked for type,
range and allowed keys, nesting is bounded, and every tensor's declared shape is checked against
the architecture and against the bytes actually present in the payload (which must be tiled
exactly by the tensors' byte ranges). After ``check_manifest`` and ``check_tensors`` decoding can
only allocate what the file's bytes pay for: at most 8 mask bits per stored byte and one value per
stored value — a 3 KB file cannot ask for a 10⁵ × 10⁵ array. The writer runs the same checks, so
it cannot write a file its reader refuses. Each version has its schema: version 5 names the inner
steps ``inner_steps`` (meta-training) and ``eval_inner_steps`` (adaptation), versions 1-4
``train_inner_steps`` and ``inner_steps``; a field of the other naming is an unknown field.
``check_manifest`` checks the parsed JSON; ``check_tensors`` the typed ``Manifest`` built from it.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from sparsemeta_edge.errors import SmzError
from sparsemeta_edge.nn import feature_size, is_prunable, param_shapes, running_names

if TYPE_CHECKING:  # the typed manifest is built from what this module checks
    from sparsemeta_edge.manifest import Manifest, Tensor

MAX_MANIFEST_BYTES = 1 << 20  # class names are user data, but 1 MiB holds 10⁴ long ones
MAX_DEPTH = 4  # the deepest legal value: manifest → tensors → entry → shape/span list
MAX_TENSORS = 64  # Conv4 has ≤ 18 entries (+ 8 bn_stats in version-1 files)
MAX_CHANNELS = 16
MAX_IMAGE = 2048
MAX_FILTERS = 4096
MAX_WAYS = 100_000
MAX_STEPS = 10_000
MAX_COUNT = 1 << 40  # images, seeds, byte counts: any real value, never an overflow
MAX_TEXT = 1024  # characters in one class name or informational string
MAX_ELEMENTS = 1 << 28  # elements in one tensor (the payload bound is the real limit)
VALUE_DTYPES = ("<f4", "<f2", "<f8", "|i1")
SPAN_KEYS = ("values", "mask", "scale", "inner_lr", "running", "bn_stats")
_NAME = re.compile(r"blocks\.[0-3]\.(conv\.(weight|bias)|bn\.(weight|bias))|head\.(weight|bias)")
_STAT = re.compile(r"bn_stats\.([0-3])\.(mean|var)")
_IDENT = re.compile(r"[A-Za-z0-9_.+-]{1,64}")

Check = Callable[[Any, str], None]


class Invalid(Exception):
    """One field is wrong: its path and what it should be."""


def _fail(path: str, what: str, value: Any) -> None:
    raise Invalid(f"{path} {what} (got {reprlib.repr(value)})")


def integer(lo: int, hi: int) -> Check:
    def check(v: Any, path: str) -> None:
        if type(v) is not int or not lo <= v <= hi:
            _fail(path, f"must be an integer in [{lo}, {hi}]", v)
    return check


def number(lo: float, hi: float) -> Check:
    def check(v: Any, path: str) -> None:
        if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
            _fail(path, f"must be a finite number in [{lo}, {hi}]", v)
    return check


def text(limit: int = MAX_TEXT, pattern: re.Pattern[str] | None = None) -> Check:
    def check(v: Any, path: str) -> None:
        if type(v) is not str or len(v) > limit or (pattern and not pattern.fullmatch(v)):
            _fail(path, f"must be a string of at most {limit} characters"
                  + (f" matching {pattern.pattern}" if pattern else ""), v)
    return check


def choice(*options: Any) -> Check:
    def check(v: Any, path: str) -> None:
        if type(v) not in (str, int, bool) or v not in options:
            _fail(path, f"must be one of {', '.join(map(str, options))}", v)
    return check


def boolean(v: Any, path: str) -> None:
    if type(v) is not bool:
        _fail(path, "must be true or false", v)


def optional(check: Check) -> Check:
    def wrapped(v: Any, path: str) -> None:
        if v is not None:
            check(v, path)
    return wrapped


def array(item: Check, lo: int, hi: int) -> Check:
    def check(v: Any, path: str) -> None:
        if type(v) is not list or not lo <= len(v) <= hi:
            _fail(path, f"must be a list of {lo} to {hi} items", v)
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")
    return check


def obj(fields: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    def check(v: Any, path: str) -> None:
        if type(v) is not dict:
            _fail(path, "must be an object", v)
        unknown = sorted(set(v) - set(fields))
        if unknown:
            _fail(path, f"has unknown field(s) {', '.join(map(reprlib.repr, unknown[:3]))}", v)
        missing = [k for k in required if k not in v]
        if missing:
            _fail(path, f"lacks required field(s) {', '.join(missing)}", v)
        for key, value in v.items():
            fields[key](value, f"{path}.{key}")
    return check


_RATE = number(0.0, 1e6)
_FINITE = number(-1e300, 1e300)
_STEPS = integer(0, MAX_STEPS)
_SPAN = array(integer(0, MAX_COUNT), 2, 2)
_STATS = optional(array(number(-1e30, 1e30), 1, MAX_CHANNELS))

ARCHITECTURE = obj({
    "name": choice("conv4"), "in_channels": integer(1, MAX_CHANNELS),
    "image_size": integer(1, MAX_IMAGE), "filters": integer(1, MAX_FILTERS),
    "layer_filters": array(integer(1, MAX_FILTERS), 4, 4),
    "downsample": choice("maxpool", "stride"), "ways": integer(1, MAX_WAYS),
}, required=("in_channels", "image_size", "filters", "downsample", "ways"))
INPUT = obj({
    "size": integer(1, MAX_IMAGE), "channels": integer(1, MAX_CHANNELS), "mean": _STATS,
    "std": optional(array(number(1e-12, 1e30), 1, MAX_CHANNELS)), "invert": boolean,
    "stats_source": optional(text(MAX_TEXT)),
})
SOURCE = obj({"run": optional(text()), "data": optional(text()), "level": optional(_FINITE),
              "method": optional(text()), "seed": optional(_FINITE),
              "test_accuracy": optional(_FINITE), "test_ci95": optional(_FINITE)})
FINETUNED = obj({
    "epochs": integer(0, MAX_COUNT), "lr_rule": choice("scalar", "metasgd", "lslr"),
    "lr": optional(_RATE), "batch": integer(1, MAX_COUNT), "train_images": integer(0, MAX_COUNT),
    "holdout_images": integer(0, MAX_COUNT), "seed": integer(-MAX_COUNT, MAX_COUNT),
    "holdout_loss": optional(_FINITE), "holdout_accuracy": optional(number(0.0, 1.0)),
    "reference_images": integer(0, MAX_COUNT), "update": optional(text(32)),
})
TENSOR = obj({
    "name": text(32), "shape": array(integer(1, MAX_ELEMENTS), 1, 4),
    "dtype": choice(*VALUE_DTYPES), "encoding": choice("dense", "sparse"), "extra": boolean,
    **{key: _SPAN for key in SPAN_KEYS},
}, required=("name", "shape", "dtype", "encoding", "values"))
#: the version the writer writes; the reader reads 1 to this
FORMAT_VERSION = 5
_VERSION = integer(1, FORMAT_VERSION)
_FIELDS = {
    "format": choice("smz"), "version": _VERSION, "architecture": ARCHITECTURE,
    "algorithm": text(32, _IDENT), "lr_rule": choice("scalar", "metasgd", "lslr"),
    "first_order": boolean, "bn": choice("transductive", "support", "running"),
    "bn_steps": integer(1, MAX_STEPS), "inner_lr": _RATE, "shots": optional(integer(0, MAX_COUNT)),
    "input": INPUT, "class_names": optional(array(text(), 1, MAX_WAYS)),
    "source": optional(SOURCE), "finetuned": optional(FINETUNED),
    "adapted_steps": integer(0, MAX_COUNT), "values_dtype": choice("float32", "float16", "int8"),
    "nonzeros": integer(0, MAX_COUNT), "prunable": integer(1, MAX_COUNT),
    "density": number(0.0, 1.0), "tensors": array(TENSOR, 1, MAX_TENSORS),
    "payload_bytes": integer(0, MAX_COUNT),
}
_REQUIRED = ("format", "version", "architecture", "inner_lr", "values_dtype", "nonzeros",
             "prunable", "density", "tensors", "payload_bytes")
#: version 5: ``inner_steps`` are meta-training's inner steps and ``eval_inner_steps`` the
#: adaptation steps on the device, as ``meta.inner_steps`` and ``meta.eval_inner_steps``
MANIFEST = obj({**_FIELDS, "inner_steps": _STEPS, "eval_inner_steps": _STEPS},
               required=(*_REQUIRED, "eval_inner_steps"))
#: versions 1-4 named them the other way round: ``inner_steps`` the adaptation steps,
#: ``train_inner_steps`` meta-training's; 1 and 2 carry the payload's checksum in the manifest
MANIFEST_V1_4 = obj({**_FIELDS, "inner_steps": _STEPS, "train_inner_steps": _STEPS,
                     "payload_sha256": text(64, re.compile(r"[0-9a-f]{64}"))},
                    required=(*_REQUIRED, "inner_steps"))


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {literal[:20]}")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (a deep value cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """The manifest's JSON: no NaN/Infinity, no number beyond float range, bounded nesting."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                           parse_float=_finite_float)
    except RecursionError:
        raise Invalid(f"manifest is nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, huge ints, NaN
        raise Invalid(f"manifest is not valid JSON ({str(exc)[:80]})") from None
    if _depth(value) > MAX_DEPTH:
        raise Invalid(f"manifest is nested deeper than {MAX_DEPTH} levels")
    if type(value) is not dict:
        raise Invalid("manifest is not a JSON object")
    return value


def check_manifest(manifest: dict[str, Any]) -> None:
    """Types, ranges, allowed keys and cross-field consistency of a parsed manifest, by the
    schema of its version."""
    version = manifest.get("version") if type(manifest) is dict else None
    (MANIFEST if version == FORMAT_VERSION else MANIFEST_V1_4)(manifest, "manifest")
    arch, inp = manifest["architecture"], manifest.get("input", {})
    widths = arch.get("layer_filters", [arch["filters"]] * 4)
    if max(widths) > arch["filters"]:
        _fail("manifest.architecture.layer_filters", "cannot exceed filters", widths)
    if feature_size(arch["image_size"], arch["downsample"]) < 1:
        _fail("manifest.architecture.image_size", "is too small for four blocks", arch["image_size"])
    for key in ("mean", "std"):
        if inp.get(key) is not None and len(inp[key]) != arch["in_channels"]:
            _fail(f"manifest.input.{key}", f"must have {arch['in_channels']} value(s)", inp[key])
    names = manifest.get("class_names")
    if names is not None and len(names) != arch["ways"]:
        _fail("manifest.class_names", f"must name the {arch['ways']} ways", len(names))
    if manifest["version"] >= 3 and "payload_sha256" in manifest:
        _fail("manifest", "of version 3 carries its checksum after the payload", "payload_sha256")
    if manifest["version"] < 3 and "payload_sha256" not in manifest:
        _fail("manifest", "lacks payload_sha256", sorted(manifest)[:4])


def _expected(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    arch = manifest.architecture
    return param_shapes(arch.in_channels, arch.ways, arch.image_size, arch.filters,
                        arch.downsample, manifest.bn_steps, manifest.bn == "running",
                        arch.layer_filters)


def _span(e: Tensor, key: str, nbytes: int, path: str, spans: list[tuple[int, int]]) -> None:
    span = e.span(key)
    if span is None:
        _fail(f"{path}.{key}", f"is missing (a {e.encoding} {e.dtype} entry needs it)", e.name)
    start, length = span
    if length != nbytes:
        _fail(f"{path}.{key}", f"must span {nbytes} bytes for shape {list(e.shape)}", list(span))
    spans.append((start, length))


def _mask(e: Tensor, count: int, payload: memoryview, path: str) -> np.ndarray:
    """The unpacked mask of a sparse entry; padding bits of its last byte must be zero."""
    start, length = e.mask
    if start + length > len(payload):
        _fail(f"{path}.mask", "runs past the payload", list(e.mask))
    bits = np.frombuffer(payload[start:start + length], dtype=np.uint8)
    full = np.unpackbits(bits)
    if full[count:].any():
        _fail(f"{path}.mask", "has bits set past the tensor's end", list(e.mask))
    return full[:count].astype(bool)


def _rates(e: Tensor, path: str, rule: str, kept: int, spans: list[tuple[int, int]]) -> None:
    """Learned rates ride on their parameter's entry exactly when ``lr_rule`` is not scalar."""
    if (e.inner_lr is not None) != (rule != "scalar"):
        _fail(f"{path}.inner_lr", f"must be present exactly when lr_rule is not scalar ({rule})",
              e.inner_lr)
    if rule == "metasgd":  # α as its weight: kept entries, the weight's float dtype
        itemsize = 4 if e.dtype == "|i1" else np.dtype(e.dtype).itemsize
        _span(e, "inner_lr", kept * itemsize, path, spans)
    elif rule == "lslr":
        steps = e.inner_lr[1] // 4
        if not 1 <= steps <= MAX_STEPS:
            _fail(f"{path}.inner_lr", f"must hold 1 to {MAX_STEPS} float32 rates", list(e.inner_lr))
        _span(e, "inner_lr", 4 * steps, path, spans)


def _entry(e: Tensor, path: str, manifest: Manifest, payload: memoryview,
           spans: list[tuple[int, int]]) -> tuple[int, np.ndarray | None]:
    """Check one tensor entry's bytes; returns its kept-value count and (sparse) mask."""
    dtype = np.dtype(e.dtype)
    count = math.prod(e.shape)
    if count > MAX_ELEMENTS:
        _fail(f"{path}.shape", f"has more than {MAX_ELEMENTS} elements", list(e.shape))
    prunable = is_prunable(e.name, e.shape)
    if dtype.str in ("<f2", "|i1") and not prunable:
        _fail(f"{path}.dtype", "may be float16 or int8 for conv and linear weights only", e.dtype)
    mask = None
    if e.encoding == "sparse":
        _span(e, "mask", (count + 7) // 8, path, spans)
        mask = _mask(e, count, payload, path)
    elif e.mask is not None:
        _fail(f"{path}.mask", "belongs to sparse entries only", list(e.mask))
    kept = count if mask is None else int(mask.sum())
    _span(e, "values", kept * dtype.itemsize, path, spans)
    if dtype.str == "|i1":
        _span(e, "scale", e.shape[0] * 4, path, spans)
    elif e.scale is not None:
        _fail(f"{path}.scale", "belongs to int8 entries only", list(e.scale))
    _rates(e, path, manifest.lr_rule, kept, spans)
    return kept, mask


def _riders(e: Tensor, path: str, manifest: Manifest, expected: dict[str, tuple[int, ...]],
            spans: list[tuple[int, int]]) -> list[str]:
    """Check what rides on a batch-norm bias (running and reference statistics)."""
    riders: list[str] = []
    if not e.name.endswith(".bn.bias"):
        for key in ("running", "bn_stats"):
            if e.span(key) is not None:
                _fail(f"{path}.{key}", "rides on batch-norm biases only", list(e.span(key)))
        return riders
    block = int(e.name.split(".")[1])
    if (e.running is not None) != (manifest.bn == "running"):
        _fail(f"{path}.running", "must be present exactly when bn is 'running'", e.running)
    if e.running is not None:
        _span(e, "running", 2 * 4 * math.prod(expected[running_names(block)[0]]), path, spans)
        riders.extend(running_names(block))
    if e.bn_stats is not None:
        _span(e, "bn_stats", 2 * 8 * e.shape[-1], path, spans)
        riders.extend(f"bn_stats.{block}.{s}" for s in ("mean", "var"))
    return riders


def _extra(e: Tensor, path: str, widths: tuple[int, ...], spans: list[tuple[int, int]]) -> str:
    """A version-1 ``extra`` entry: fine-tuning's reference statistics of one block, float64."""
    match = _STAT.fullmatch(e.name)
    others = [k for k in SPAN_KEYS if k != "values" and e.span(k) is not None]
    if not match or e.shape != (widths[int(match.group(1))],) or e.dtype != "<f8" \
            or e.encoding != "dense" or others:
        _fail(path, "is not a valid extra (bn_stats) entry", e.name)
    _span(e, "values", 8 * e.shape[0], path, spans)
    return e.name


def check_tensors(manifest: Manifest, payload: memoryview) -> dict[str, np.ndarray]:
    """Every tensor's name and shape against the architecture and its byte ranges against the
    payload (which they must tile exactly); the counts against ``nonzeros``/``prunable``.
    Returns the unpacked masks of sparse entries (they were needed to count kept values)."""
    if manifest.payload_bytes != len(payload):
        _fail("manifest.payload_bytes", f"must equal the payload's {len(payload)} bytes",
              manifest.payload_bytes)
    try:
        expected = _expected(manifest)
    except ValueError as exc:
        raise Invalid(f"manifest.architecture is impossible ({exc})") from None
    spans: list[tuple[int, int]] = []
    masks: dict[str, np.ndarray] = {}
    seen: list[str] = []
    kept_total = prunable_total = 0
    for i, e in enumerate(manifest.tensors):
        path = f"tensors[{i}]"
        if e.extra:
            seen.append(_extra(e, path, manifest.architecture.layer_filters, spans))
            continue
        if not _NAME.fullmatch(e.name) or e.shape != expected.get(e.name):
            _fail(path, f"is not a tensor of this architecture (expected shape "
                  f"{expected.get(e.name)})", [e.name, list(e.shape)])
        kept, mask = _entry(e, path, manifest, payload, spans)
        if mask is not None:
            masks[e.name] = mask
        if is_prunable(e.name, e.shape):
            kept_total += kept
            prunable_total += math.prod(e.shape)
        seen += [e.name, *_riders(e, path, manifest, expected, spans)]
    _check_names(seen, expected)
    _check_tiling(spans, len(payload))
    if (manifest.nonzeros, manifest.prunable) != (kept_total, prunable_total) or \
            abs(manifest.density - kept_total / prunable_total) > 1e-9:
        _fail("manifest.nonzeros/prunable/density", f"must be {kept_total}/{prunable_total}",
              [manifest.nonzeros, manifest.prunable, manifest.density])
    return masks


def _check_names(seen: list[str], expected: dict[str, tuple[int, ...]]) -> None:
    stats = {n for n in seen if n.startswith("bn_stats.")}
    plain = [n for n in seen if not n.startswith("bn_stats.")]
    if len(set(seen)) != len(seen):
        _fail("manifest.tensors", "name a tensor twice", sorted(n for n in seen if seen.count(n) > 1))
    if set(plain) != set(expected):
        missing, unknown = sorted(set(expected) - set(plain)), sorted(set(plain) - set(expected))
        _fail("manifest.tensors", f"do not match the architecture (missing {missing[:3]}, "
              f"unexpected {unknown[:3]})", len(plain))
    if stats and len(stats) != 8:
        _fail("manifest.tensors", "must hold the reference statistics of all 4 blocks or none",
              sorted(stats))


def _check_tiling(spans: list[tuple[int, int]], size: int) -> None:
    """Byte ranges in order, without gap or overlap, covering the payload exactly."""
    at = 0
    for start, length in sorted(spans):
        if start != at:
            _fail("manifest.tensors", f"leave a gap or overlap at payload byte {at}", start)
        at = start + length
    if at != size:
        _fail("manifest.tensors", f"cover {at} of the payload's {size} bytes", at)


def refuse(source: str, exc: Invalid) -> SmzError:
    """The one-line error for an invalid manifest."""
    return SmzError(f"'{source}' has an invalid manifest: {exc}; re-export the model")
