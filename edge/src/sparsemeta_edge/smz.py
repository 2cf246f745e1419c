"""The ``.smz`` file: a compact, checksummed, NumPy-readable sparse Conv4.

Layout (little-endian), version 3::

    b"SMZ\\x01" | uint32 manifest length | manifest (UTF-8 JSON) | payload | SHA-256 (32 bytes)

The manifest describes the model (architecture, batch-norm policy, inner learning rate and
steps, input preprocessing, density) and lists every tensor with its byte ranges in the payload.
The trailing SHA-256 covers everything before it — header, manifest and payload — and is checked
on every load, so that a truncated or modified file (a flipped bit in ``input.mean`` as much as
in a weight) is refused instead of silently giving wrong predictions. The manifest is then
checked field by field against its schema (``sparsemeta_edge.schema``) and every declared size
against the bytes present, before any array is allocated; weights must be finite. Versions 1
and 2 (no trailer; ``payload_sha256`` in the manifest covers the payload only) are still read;
a version-3 file read by an older runtime is refused with "update sparsemeta-edge".

A prunable tensor (conv and linear weights, see ``is_prunable``) with pruned entries is stored as
``np.packbits`` of its mask plus the kept values only (float32, float16 with ``fp16``, or int8
with ``int8``); one with nothing pruned is stored dense (its mask would be all ones). Biases and
batch-norm tensors are stored dense in float32 — unless the run's mask prunes some of their
entries (the trainer masks every rank-≥2 parameter, MAML++'s per-step batch norm included): then
bitmask + kept values. No zip container: per-member headers would cost more than the 4 KB of
slack the size bound has.

``int8`` (version 3): the kept values of a conv or linear weight of at least
``INT8_MIN_ELEMENTS`` entries are quantised symmetrically per output channel — q = round(w / s),
s = max |w| / 127 over the channel's kept weights — and stored as int8 (``dtype`` ``|i1``) with
one float32 scale per output channel (``scale``); the reader dequantises to q·s, within s/2 of
the weight. Smaller tensors (the first conv on grey images, a small head) and everything else
stay float32, as does Meta-SGD's α of a quantised weight. ``int8`` and ``fp16`` both choose the
weights' value type: asking for both is refused.

Version 2 adds what MAML++ and Meta-SGD learn besides θ (version-1 files are unchanged):

* learned inner learning rates, ``lr_rule`` in the manifest: ``metasgd`` — Meta-SGD's α, one per
  weight, stored under its weight's entry (``inner_lr``) like the weight itself: under a mask
  only the kept entries' α (a pruned weight's α has no effect), in the weight's dtype;
  ``lslr`` — MAML++'s rate per tensor and inner step, ``inner_lr`` holds float32 (steps,);
* per-step batch norm: weights and biases of shape (steps, C) (``bn_steps`` in the manifest);
* with ``bn=running``, running statistics ``blocks.{i}.bn.running_mean|var`` (steps, C).

Per-block statistics ride on the entry of their block's ``bn.bias`` (mean then var): running
statistics as ``running`` (float32), fine-tuning's reference statistics ``bn_stats.{i}.*`` as
``bn_stats`` (float64) — an entry of their own would cost the manifest ~100 bytes each of the
bound's 4 KB. (Version 1 stored the latter as ``extra`` entries; they are still read.)

A filter-pruned ticket is stored compacted: a smaller dense Conv4 whose per-layer filter counts
are ``architecture.layer_filters`` (``filters`` stays the meta-trained width). Readers take every
tensor's shape from its entry, so format-1 readers run such files unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsemeta_edge import schema
from sparsemeta_edge.errors import EdgeError, SmzError, printable
from sparsemeta_edge.nn import is_prunable

__all__ = ["EdgeError", "FORMAT_VERSION", "MAGIC", "SmzError", "SmzModel", "decode", "encode",
           "is_prunable", "load", "printable", "read_manifest", "save", "save_model", "size_bound"]

_RUNNING = ("running_mean", "running_var")
_STATS = ("mean", "var")
MAGIC = b"SMZ\x01"
FORMAT_VERSION = 3
_HEADER = struct.Struct("<4sI")
TRAILER_BYTES = 32  # SHA-256 of header + manifest + payload (version 3)
MAX_FILE_BYTES = 256 << 20  # a Conv4 ticket is well under 10 MB; refuse before reading more
INT8_MIN_ELEMENTS = 1024  # smaller weights stay float32: a scale per channel would eat the saving
INT8_LEVELS = 127  # symmetric int8: q in [-127, 127]
_DERIVED = ("tensors", "payload_bytes", "payload_sha256", "nonzeros", "prunable", "density",
            "values_dtype", "format", "version")


@dataclass
class SmzModel:
    """A loaded model: manifest, ``state_dict`` entries in PyTorch layout (parameters and any
    running statistics) and masks of pruned tensors.

    Pruned entries of ``params`` are exactly zero, so the stored weight is the effective weight
    θ ⊙ m; ``masks`` holds a boolean mask for every prunable tensor (all ones where dense).
    ``rates`` holds learned inner learning rates by parameter name (``lr_rule`` in the
    manifest): Meta-SGD's α in the parameter's shape (0 at pruned entries, which are not stored)
    or MAML++'s per-step rates (steps,). ``extra`` holds auxiliary arrays (e.g. batch-norm
    statistics saved by fine-tuning). ``checksum`` is the verified SHA-256 (hex) of the whole
    file (version 3) or of the payload (versions 1 and 2).
    """

    manifest: dict[str, Any]
    params: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    rates: dict[str, np.ndarray] = field(default_factory=dict)
    checksum: str = ""

    @property
    def density(self) -> float:
        """Kept fraction of the conv and linear weights (as the manifest's ``density``)."""
        masks = [m for k, m in self.masks.items() if is_prunable(k, m.shape)]
        total = sum(m.size for m in masks)
        return sum(int(m.sum()) for m in masks) / total if total else 1.0


def _riders(bias: str) -> dict[str, tuple[list[str], str]]:
    """What rides on a batch-norm bias entry: key → (names of mean and var, stored dtype);
    nothing on any other entry."""
    if not bias.endswith(".bn.bias"):
        return {}
    block = bias[:-len("bn.bias")]  # "blocks.{i}."
    return {"running": ([f"{block}bn.{s}" for s in _RUNNING], "<f4"),
            "bn_stats": ([f"bn_stats.{block.split('.')[1]}.{s}" for s in _STATS], "<f8")}


_FILE_MODE = 0o666


def _umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: list[bytes]) -> None:
    """Temporary file + rename: an interrupted save never leaves a torn model behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE & ~_umask())  # mkstemp makes 0600: a model is for sharing
        with os.fdopen(fd, "wb") as fh:
            for chunk in data:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def quantise(value: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of the kept entries: (q of the kept entries in ravel
    order, float32 scale per channel). A channel with nothing kept (or all zero) gets scale 0."""
    rows = value.reshape(value.shape[0], -1).astype(np.float64)
    kept = mask.reshape(rows.shape)
    peak = np.where(kept, np.abs(rows), 0.0).max(axis=1)
    scale = (peak / INT8_LEVELS).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None]
    q = np.clip(np.rint(rows / safe), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return q.ravel()[kept.ravel()], scale


class _Payload:
    """Chunks of the payload and the byte range of each."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0

    def add(self, array: np.ndarray, dtype: str | np.dtype, name: str) -> list[int]:
        with np.errstate(over="ignore"):  # beyond float16's range: refused just below
            stored = np.ascontiguousarray(array, dtype=np.dtype(dtype))
        if stored.dtype.kind == "f" and not np.isfinite(stored).all():
            raise SmzError(f"'{name}' has values that are not finite in {np.dtype(dtype).name} "
                           "(NaN, inf, or beyond float16's range); a file that holds them "
                           "would be refused")
        raw = stored.tobytes()
        self.chunks.append(raw)
        span = [self.offset, len(raw)]
        self.offset += len(raw)
        return span


def _weight_entry(name: str, value: np.ndarray, mask: np.ndarray | None, value_dtype: np.dtype,
                  int8: bool, out: _Payload) -> tuple[dict[str, Any], np.ndarray | None]:
    """The entry of one parameter (values, bitmask, int8 scales); returns it and its mask."""
    entry: dict[str, Any] = {"name": name, "shape": list(value.shape)}
    prunable = is_prunable(name, value.shape)
    if mask is not None and mask.shape != value.shape:
        raise SmzError(f"mask of '{name}' has shape {mask.shape}, weight {value.shape}")
    if mask is None and prunable:
        mask = np.ones(value.shape, bool)
    if mask is not None and not prunable and mask.all():
        mask = None  # a batch-norm tensor with nothing pruned: plain dense
    quantised = int8 and prunable and value.size >= INT8_MIN_ELEMENTS
    dtype = np.dtype("|i1") if quantised else value_dtype if prunable else np.dtype("<f4")
    entry["dtype"] = dtype.str
    sparse = mask is not None and not mask.all()
    entry["encoding"] = "sparse" if sparse else "dense"
    if sparse:
        entry["mask"] = out.add(np.packbits(mask.ravel()), "u1", name)
    if quantised:
        q, scale = quantise(value, mask)
        entry["values"] = out.add(q, dtype, name)
        entry["scale"] = out.add(scale, "<f4", name)
    else:
        kept = value.ravel()[mask.ravel()] if sparse else value
        entry["values"] = out.add(kept, dtype, name)
    return entry, mask


def _rate_span(name: str, value: np.ndarray, rate: np.ndarray, entry: dict[str, Any],
               mask: np.ndarray | None, alpha: bool, out: _Payload) -> list[int]:
    """Byte range of a parameter's learned rate: Meta-SGD's α as its weight (kept entries, the
    weight's float dtype; float32 under int8), MAML++'s per-step rates float32 (steps,)."""
    if alpha:
        if rate.shape != value.shape:
            raise SmzError(f"α of '{name}' has shape {rate.shape}, weight {value.shape}")
        kept = rate if entry["encoding"] == "dense" else rate.ravel()[mask.ravel()]
        return out.add(kept, "<f4" if entry["dtype"] == "|i1" else entry["dtype"], name)
    if rate.ndim != 1:
        raise SmzError(f"per-step rates of '{name}' must be 1-D, got {rate.shape}")
    return out.add(rate, "<f4", name)


def encode(
    manifest: dict[str, Any],
    params: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    fp16: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    rates: dict[str, np.ndarray] | None = None,
    *,
    int8: bool = False,
) -> list[bytes]:
    """Header, manifest, payload chunks and checksum of a version-3 ``.smz`` file (see the
    module docstring); ``rates`` are the learned inner learning rates of
    ``manifest["lr_rule"]``. The complete manifest is checked against the reader's schema."""
    if fp16 and int8:
        raise SmzError("fp16 and int8 both set the weights' value type; choose one of them")
    masks, rates, extra = masks or {}, rates or {}, extra or {}
    riding: set[str] = set()  # names stored on a batch-norm bias entry
    alpha = manifest.get("lr_rule") == "metasgd"
    if set(rates) - set(params) or (rates and manifest.get("lr_rule") not in ("metasgd", "lslr")):
        raise SmzError(f"learned rates need lr_rule metasgd or lslr and a parameter each; got "
                       f"lr_rule {manifest.get('lr_rule')!r} for {sorted(rates)[:3]}")
    value_dtype = np.dtype("<f2") if fp16 else np.dtype("<f4")
    out = _Payload()
    entries = []
    kept = total = 0
    for name, value in params.items():
        if name.endswith(_RUNNING):
            continue  # stored with their block's bias
        value = np.asarray(value)
        mask = masks.get(name)
        entry, mask = _weight_entry(name, value, None if mask is None else np.asarray(mask, bool),
                                    value_dtype, int8, out)
        if is_prunable(name, value.shape):  # density counts conv and linear weights only
            kept += int(mask.sum())
            total += mask.size
        if name in rates:
            entry["inner_lr"] = _rate_span(name, value, np.asarray(rates[name]), entry, mask,
                                           alpha, out)
        for key, (names, dt) in _riders(name).items():
            source = params if key == "running" else extra
            if names[0] in source:
                entry[key] = out.add(np.stack([source[n] for n in names]), dt, name)
                riding.update(names)
        entries.append(entry)
    orphans = [k for k in params if k.endswith(_RUNNING) and k not in riding]
    if orphans:
        raise SmzError(f"running statistics without their batch-norm bias: {orphans}")
    for name, value in extra.items():
        if name not in riding:
            value = np.asarray(value)
            entries.append({"name": name, "shape": list(value.shape), "encoding": "dense",
                            "dtype": "<f8", "extra": True, "values": out.add(value, "<f8", name)})
    full = {
        **{k: v for k, v in manifest.items() if k not in _DERIVED},
        "format": "smz",
        "version": FORMAT_VERSION,
        "values_dtype": "int8" if int8 else "float16" if fp16 else "float32",
        "nonzeros": kept,
        "prunable": total,
        "density": kept / total if total else 1.0,
        "tensors": entries,
        "payload_bytes": out.offset,
    }
    try:
        schema.check_manifest(full)
    except schema.Invalid as exc:
        raise SmzError(f"refusing to write a file the reader would refuse: {exc}") from None
    text = json.dumps(full, separators=(",", ":")).encode()
    chunks = [_HEADER.pack(MAGIC, len(text)), text, *out.chunks]
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(c)
    return [*chunks, digest.digest()]


def save(
    path: str | os.PathLike,
    manifest: dict[str, Any],
    params: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    fp16: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    rates: dict[str, np.ndarray] | None = None,
    *,
    int8: bool = False,
) -> int:
    """Write a ``.smz`` file atomically and return its size in bytes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise EdgeError(f"directory '{path.parent}' does not exist; create it or choose another path")
    data = encode(manifest, params, masks, fp16, extra, rates, int8=int8)
    _atomic_write(path, data)
    return sum(len(c) for c in data)


def _corrupt(source: str, what: str) -> SmzError:
    return SmzError(f"'{source}' {what}; re-export the model or copy the file again")


def read_manifest(raw: bytes, source: str = "model") -> tuple[dict[str, Any], memoryview, str]:
    """Parse the header and manifest and verify the checksum (version 3: of everything; 1 and
    2: of the payload) and the schema. Returns manifest, payload and checksum (hex)."""
    if len(raw) < _HEADER.size or raw[:4] != MAGIC:
        raise SmzError(f"'{source}' is not a .smz model file (bad magic bytes)")
    _, n = _HEADER.unpack_from(raw)
    if n > schema.MAX_MANIFEST_BYTES or _HEADER.size + n > len(raw):
        raise _corrupt(source, f"is truncated or corrupt: its header declares a {n}-byte "
                               f"manifest, the file has {len(raw)} bytes")
    view = memoryview(raw)
    trailer = bytes(view[-TRAILER_BYTES:]) if len(raw) >= _HEADER.size + n + TRAILER_BYTES else b""
    whole = hashlib.sha256(view[:-TRAILER_BYTES]).digest() if trailer else b""
    try:
        manifest = schema.parse_manifest(bytes(view[_HEADER.size:_HEADER.size + n]))
    except schema.Invalid as exc:
        raise _corrupt(source, f"is corrupt ({exc})") from None
    version = manifest.get("version", 1)
    if type(version) is int and version > FORMAT_VERSION:
        raise SmzError(f"'{source}' is .smz version {version}; this sparsemeta-edge reads up to "
                       f"version {FORMAT_VERSION} — update sparsemeta-edge")
    declared = manifest.get("payload_bytes")
    if version == FORMAT_VERSION:
        end = len(raw) - TRAILER_BYTES
        if type(declared) is not int or _HEADER.size + n + declared != end:
            raise _corrupt(source, f"is truncated or padded: {len(raw)} bytes, the manifest "
                                   f"declares {_HEADER.size + n} + {declared} + {TRAILER_BYTES}")
        if whole != trailer:
            raise _corrupt(source, f"failed its checksum (sha256 {whole.hex()[:12]}… != "
                                   f"{trailer.hex()[:12]}…): the file is corrupt or was modified")
        payload, checksum = view[_HEADER.size + n:end], whole.hex()
    else:
        payload = view[_HEADER.size + n:]
        if len(payload) != declared:
            raise _corrupt(source, f"is truncated or padded: payload has {len(payload)} bytes, "
                                   f"manifest says {printable(str(declared)[:20])}")
        checksum = hashlib.sha256(payload).hexdigest()
        if checksum != manifest.get("payload_sha256"):
            raise _corrupt(source, f"failed its checksum (sha256 {checksum[:12]}… != "
                                   f"{printable(str(manifest.get('payload_sha256'))[:12])}…): "
                                   "the file is corrupt or was modified")
    try:
        schema.check_manifest(manifest)
    except schema.Invalid as exc:
        raise schema.refuse(source, exc) from None
    return manifest, payload, checksum


def _decode_entries(manifest: dict[str, Any], payload: memoryview, dtype: np.dtype,
                    masks_found: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], ...]:
    """Params, masks, extra and rates of checked entries (every size already verified)."""
    params: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    rates: dict[str, np.ndarray] = {}

    def read(span: list[int], dt: str) -> np.ndarray:
        start, length = span
        return np.frombuffer(payload[start:start + length], dtype=np.dtype(dt))

    def scatter(values: np.ndarray, mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        if mask is None:
            return values.astype(dtype).reshape(shape)
        full = np.zeros(mask.size, dtype=dtype)
        full[mask.ravel()] = values
        return full.reshape(shape)

    for e in manifest["tensors"]:
        name, shape = e["name"], tuple(e["shape"])
        values = read(e["values"], e["dtype"])
        if e.get("extra"):
            extra[name] = values.reshape(shape).copy()
            continue
        mask = masks_found.get(name)
        if mask is not None:
            mask = masks[name] = mask.reshape(shape)
        elif is_prunable(name, shape):
            masks[name] = np.ones(shape, bool)
        params[name] = scatter(values, mask, shape)
        if "scale" in e:  # int8: q · scale of the output channel
            scale = read(e["scale"], "<f4").astype(dtype)
            params[name].reshape(shape[0], -1)[...] *= scale[:, None]
        if "inner_lr" in e:
            if manifest.get("lr_rule") == "metasgd":
                rate_dtype = "<f4" if e["dtype"] == "|i1" else e["dtype"]
                rates[name] = scatter(read(e["inner_lr"], rate_dtype), mask, shape)
            else:
                rates[name] = read(e["inner_lr"], "<f4").astype(dtype)
        for key, (names, dt) in _riders(name).items():
            if key in e:  # running: (steps, C) each, in the model's dtype; bn_stats: (C,)
                pair = read(e[key], dt).reshape(2, -1, shape[-1])
                target = params if key == "running" else extra
                for n, array in zip(names, pair):
                    target[n] = array.astype(dtype) if key == "running" else array[0].copy()
    return params, masks, extra, rates


def _check_finite(source: str, *groups: dict[str, np.ndarray]) -> None:
    for group in groups:
        for name, array in group.items():
            if not np.isfinite(array).all():
                bad = int(np.size(array) - np.isfinite(array).sum())
                raise _corrupt(source, f"holds {bad} non-finite value(s) (NaN or inf) in "
                                       f"'{name}'; such a model cannot be used")


def decode(raw: bytes, dtype: np.dtype | type = np.float32, source: str = "model") -> SmzModel:
    """Parameters (pruned entries zero), masks, learned rates and extra arrays from the bytes
    of a file; any defect is one ``SmzError``."""
    manifest, payload, checksum = read_manifest(raw, source)
    try:
        masks_found = schema.check_tensors(manifest, payload)
    except schema.Invalid as exc:
        raise schema.refuse(source, exc) from None
    try:
        params, masks, extra, rates = _decode_entries(manifest, payload, np.dtype(dtype),
                                                      masks_found)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        # the schema should make this unreachable; if it is not, still one line, not a traceback
        raise schema.refuse(source, schema.Invalid(f"inconsistent ({exc})")) from None
    _check_finite(source, params, rates, extra)
    return SmzModel(manifest, params, masks, extra, rates, checksum)


def load(path: str | os.PathLike, dtype: np.dtype | type = np.float32) -> SmzModel:
    """Read and verify a ``.smz`` file (any defect → ``SmzError``, one line)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_file() and size > MAX_FILE_BYTES:
            raise SmzError(f"'{path}' has {size} bytes, more than any .smz model "
                           f"({MAX_FILE_BYTES >> 20} MiB); is it the right file?")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EdgeError(f"model file '{path}' does not exist") from None
    except IsADirectoryError:
        raise EdgeError(f"'{path}' is a directory, not a .smz model file") from None
    except OSError as exc:
        raise EdgeError(f"cannot read '{path}' ({exc.strerror})") from None
    return decode(raw, dtype, str(path))


def save_model(path: str | os.PathLike, model: SmzModel, fp16: bool | None = None,
               int8: bool | None = None) -> int:
    """Write a loaded (possibly fine-tuned) model back, keeping its manifest and value dtype
    (an int8 model is quantised again: fine-tuned weights are off the old grid)."""
    stored = model.manifest.get("values_dtype")
    fp16 = stored == "float16" if fp16 is None else fp16
    int8 = stored == "int8" and not fp16 if int8 is None else int8
    base = {k: v for k, v in model.manifest.items() if k not in _DERIVED}
    return save(path, base, model.params, model.masks, fp16, model.extra, model.rates, int8=int8)


def size_bound(model: SmzModel) -> int:
    """The format's promise: (mask bits + 32 bits per kept weight + 32 bits per value of a dense
    tensor + 64 bits per extra value) / 8 + 4 KB (header, manifest and checksum) + the class
    names a fine-tuning stored (user data of any length). Learned rates count like values:
    Meta-SGD's α 32 bits per kept weight (its weight's mask serves it, no bits of its own) or
    per value of a dense tensor; MAML++'s per-step rates 32 bits each. (int8 stays far below:
    8 bits per kept weight + 32 per output channel.)"""
    names = model.manifest.get("class_names")
    bits = 8 * len(json.dumps(names).encode()) if names else 0
    for name, value in model.params.items():
        if name in model.masks:
            bits += value.size + 32 * int(model.masks[name].sum())
        else:
            bits += 32 * value.size
    for name, rate in model.rates.items():
        mask = model.masks.get(name)
        bits += 32 * (int(mask.sum()) if mask is not None and mask.shape == rate.shape else rate.size)
    for value in model.extra.values():
        bits += 64 * value.size
    return bits // 8 + 4096

