"""The ``.smz`` file: a compact, checksummed, NumPy-readable sparse Conv4.

Layout (little-endian), versions 5 (what the writer writes) and 4 (still read)::

    b"SMZ\x05" (b"SMZ\x04") | uint8 k | k × (uint8 codec, uint32 stored length, uint32 decoded
        length) | section 0: manifest (UTF-8 JSON, deflated) | sections 1..k-1: payload
        | SHA-256 (32 bytes)

Version 5 changes only the manifest: the inner steps carry the config's names (``inner_steps``
meta-training's, ``eval_inner_steps`` the adaptation steps; versions 1-4 wrote
``train_inner_steps`` and ``inner_steps``), and the container byte says which (a version-4
reader refuses a version-5 file as a newer container). ``Manifest`` (``sparsemeta_edge.manifest``)
is the typed manifest of every version.

Versions 1-3 (still read)::

    b"SMZ\x01" | uint32 manifest length | manifest (UTF-8 JSON) | payload | SHA-256 (3 only)

Version 4 stores the manifest deflated (its tensor table is most of a small int8 ticket's fixed
cost: 2.6 KB → 0.7 KB) and the payload in sections of one kind of bytes each — bitmasks, int8,
float16, float32, float64, in that order — each stored as is (codec 0), deflated (1) or as
deflated byte planes of its 2-, 4- or 8-byte items (codec 2, 4, 8: a float's sign and exponent
bytes compress, its low mantissa bytes do not); the writer keeps the smallest. Deflate is raw
(RFC 1951, ``zlib`` with ``wbits=-15``, level 9). Tensor ranges index the decoded payload (the
sections concatenated), so everything after decoding is as in version 3. The reader checks the
section table against the file's length, the checksum, and each decoded length against caps
(``MAX_MANIFEST_BYTES``, ``MAX_PAYLOAD_BYTES``, and ``DEFLATE_MAX_RATIO`` × stored) *before*
decoding, and decodes with ``decompressobj().decompress(data, declared)``: a deflate bomb
never allocates more than the declared length, and a stream that is corrupt, ends early, or
holds more than declared is one ``SmzError``. A newer container (``SMZ`` + another byte) or
manifest version is refused with "update sparsemeta-edge".

The manifest describes the model (architecture, batch-norm policy, inner learning rate and
steps, input preprocessing, density) and lists every tensor with its byte ranges in the payload.
The trailing SHA-256 covers everything stored before it — header, manifest and payload as
stored (compressed, in version 4) — and is checked on every load, so that a truncated or
modified file (a flipped bit in ``input.mean`` as much as in a weight) is refused instead of
silently giving wrong predictions. The manifest is then checked field by field against its
schema (``sparsemeta_edge.schema``) and every declared size against the bytes present, before
any array is allocated; weights must be finite. Versions 1
and 2 (no trailer; ``payload_sha256`` in the manifest covers the payload only) are still read;
a version-3 file read by an older runtime is refused with "update sparsemeta-edge" (a version-4
file by a version-3 runtime: "bad magic bytes").

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
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsemeta_edge import schema
from sparsemeta_edge.errors import EdgeError, SmzError, printable
from sparsemeta_edge.files import TEMP_PREFIX, check_output, read_regular
from sparsemeta_edge.manifest import DERIVED, FORMAT_VERSION, Manifest
from sparsemeta_edge.nn import is_prunable

__all__ = ["EdgeError", "FORMAT_VERSION", "MAGIC", "Manifest", "SmzError", "SmzModel", "decode",
           "encode", "is_prunable", "load", "printable", "read_manifest", "save", "save_model",
           "size_bound"]

_RUNNING = ("running_mean", "running_var")
_STATS = ("mean", "var")
MAGIC = b"SMZ\x01"
MAGIC_V4 = b"SMZ\x04"  # version 4: compressed sections (see the module docstring)
MAGIC_V5 = b"SMZ\x05"  # version 5: version 4's container, the inner steps' names of the config
#: the container each manifest version must come in
_CONTAINER = {1: MAGIC, 2: MAGIC, 3: MAGIC, 4: MAGIC_V4, 5: MAGIC_V5}
_SECTIONED = (MAGIC_V4, MAGIC_V5)
_HEADER = struct.Struct("<4sI")  # versions 1-3: magic, manifest length
_HEADER_V4 = struct.Struct("<4sB")  # version 4: magic, section count
_SECTION = struct.Struct("<BII")  # codec, stored length, length once decoded
MAX_SECTIONS = 16  # the manifest + one section per kind of payload bytes (≤ 6 are written)
RAW, DEFLATE = 0, 1  # section codecs; 2, 4, 8: byte planes of 2-/4-/8-byte items, then deflate
_CODECS = (RAW, DEFLATE, 2, 4, 8)
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more (+ a few bytes): a bound before decoding
MAX_PAYLOAD_BYTES = 64 << 20  # decoded payload of a version-4 file (a Conv4 ticket: < 10 MB)
TRAILER_BYTES = 32  # SHA-256 of everything before it (versions 3 and 4)
MAX_FILE_BYTES = 256 << 20  # a Conv4 ticket is well under 10 MB; refuse before reading more
INT8_MIN_ELEMENTS = 1024  # smaller weights stay float32: a scale per channel would eat the saving
INT8_LEVELS = 127  # symmetric int8: q in [-127, 127]


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

    manifest: Manifest
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
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=path.parent)
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


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9)  # raw deflate: no header, no Adler-32
    return packer.compress(data) + packer.flush()


def pack_section(data: bytes, width: int) -> tuple[int, bytes]:
    """The smallest of: stored as is, deflated, and (items of ``width`` > 1 bytes) deflated byte
    planes — a float's sign and exponent bytes compress, its low mantissa bytes do not."""
    options = [(RAW, data), (DEFLATE, _deflate(data))]
    if width > 1 and len(data) % width == 0:
        planes = np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()
        options.append((width, _deflate(planes)))
    return min(options, key=lambda o: len(o[1]))


def unpack_section(codec: int, data: bytes | memoryview, length: int) -> bytes:
    """Decode one section to exactly ``length`` bytes (already capped by the caller);
    ``ValueError`` if the stream is corrupt or decodes to another length."""
    if codec == RAW:
        return bytes(data)
    unpacker = zlib.decompressobj(-15)
    try:
        out = unpacker.decompress(data, length)  # never more than the declared length
    except zlib.error as exc:
        raise ValueError(f"is not a valid deflate stream ({exc})") from None
    if len(out) != length or not unpacker.eof or unpacker.unconsumed_tail or unpacker.unused_data:
        raise ValueError(f"does not decode to its declared {length} bytes")
    if codec > DEFLATE:
        out = np.frombuffer(out, np.uint8).reshape(codec, -1).T.tobytes()
    return out


_KINDS = ("|u1", "|i1", "<f2", "<f4", "<f8")  # payload order: bitmasks, int8, floats by width


class _Payload:
    """Chunks of the payload by kind (bytes of one dtype), each with its byte range; the
    ranges' offsets are set by ``sections`` once every chunk is in."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[tuple[bytes, list[int]]]] = {k: [] for k in _KINDS}
        self.offset = 0

    def add(self, array: np.ndarray, dtype: str | np.dtype, name: str) -> list[int]:
        with np.errstate(over="ignore"):  # beyond float16's range: refused just below
            stored = np.ascontiguousarray(array, dtype=np.dtype(dtype))
        if stored.dtype.kind == "f" and not np.isfinite(stored).all():
            raise SmzError(f"'{name}' has values that are not finite in {np.dtype(dtype).name} "
                           "(NaN, inf, or beyond float16's range); a file that holds them "
                           "would be refused")
        raw = stored.tobytes()
        span = [0, len(raw)]
        self.chunks[stored.dtype.str].append((raw, span))
        self.offset += len(raw)
        return span

    def sections(self) -> list[tuple[int, bytes, int]]:
        """(codec, stored bytes, decoded length) of each non-empty kind, in payload order;
        sets every range's offset."""
        out, offset = [], 0
        for kind, chunks in self.chunks.items():
            for raw, span in chunks:
                span[0], offset = offset, offset + len(raw)
            data = b"".join(raw for raw, _ in chunks)
            if data:
                out.append((*pack_section(data, np.dtype(kind).itemsize), len(data)))
        return out


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


ManifestLike = Manifest | dict[str, Any]


def _entries(params: dict[str, np.ndarray], masks: dict[str, np.ndarray],
             extra: dict[str, np.ndarray], rates: dict[str, np.ndarray], lr_rule: str,
             value_dtype: np.dtype, int8: bool, out: _Payload) -> tuple[list[dict], int, int]:
    """The tensor table's entries (their arrays added to ``out``), kept and prunable weights."""
    if set(rates) - set(params) or (rates and lr_rule not in ("metasgd", "lslr")):
        raise SmzError(f"learned rates need lr_rule metasgd or lslr and a parameter each; got "
                       f"lr_rule {lr_rule!r} for {sorted(rates)[:3]}")
    riding: set[str] = set()  # names stored on a batch-norm bias entry
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
                                           lr_rule == "metasgd", out)
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
    return entries, kept, total


def encode(
    manifest: ManifestLike,
    params: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    fp16: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    rates: dict[str, np.ndarray] | None = None,
    *,
    int8: bool = False,
) -> list[bytes]:
    """Header, section table, sections and checksum of a version-5 ``.smz`` file (see the
    module docstring). ``manifest`` describes the model (a ``Manifest`` or its ``to_dict``;
    what the arrays determine — tensor table, counts, value type, version — is derived here);
    ``rates`` are the learned inner learning rates of its ``lr_rule``. The complete manifest is
    checked against the reader's schema."""
    if fp16 and int8:
        raise SmzError("fp16 and int8 both set the weights' value type; choose one of them")
    described = (manifest.describing() if isinstance(manifest, Manifest)
                 else {k: v for k, v in manifest.items() if k not in DERIVED})
    lr_rule = described.get("lr_rule", "scalar")  # the writer's input, checked below
    out = _Payload()
    entries, kept, total = _entries(params, masks or {}, extra or {}, rates or {}, lr_rule,
                                    np.dtype("<f2") if fp16 else np.dtype("<f4"), int8, out)
    sections = out.sections()  # sets the ranges' offsets: before the manifest is made
    full = {
        **described,
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
        typed = Manifest.from_dict(full)
    except schema.Invalid as exc:
        raise SmzError(f"refusing to write a file the reader would refuse: {exc}") from None
    text = json.dumps(typed.to_dict(), separators=(",", ":")).encode()
    sections.insert(0, (DEFLATE, _deflate(text), len(text)))
    table = b"".join(_SECTION.pack(codec, len(data), n) for codec, data, n in sections)
    chunks = [_HEADER_V4.pack(MAGIC_V5, len(sections)), table, *(d for _, d, _ in sections)]
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(c)
    return [*chunks, digest.digest()]


def save(
    path: str | os.PathLike,
    manifest: ManifestLike,
    params: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    fp16: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    rates: dict[str, np.ndarray] | None = None,
    *,
    int8: bool = False,
) -> int:
    """Write a ``.smz`` file atomically (a failed write leaves no file and any old one as it
    was) and return its size in bytes."""
    path = Path(path)
    check_output(path)
    data = encode(manifest, params, masks, fp16, extra, rates, int8=int8)
    _atomic_write(path, data)
    return sum(len(c) for c in data)


def _corrupt(source: str, what: str) -> SmzError:
    return SmzError(f"'{source}' {what}; re-export the model or copy the file again")


def _sections_v4(raw: bytes, source: str) -> list[tuple[int, int, int]]:
    """(codec, stored length, decoded length) of each section of a version-4 file, every size
    checked against the bytes present and the caps before anything is decoded."""
    count = raw[4] if len(raw) >= _HEADER_V4.size else 0
    start = _HEADER_V4.size + _SECTION.size * count
    if not 1 <= count <= MAX_SECTIONS or start + TRAILER_BYTES > len(raw):
        raise _corrupt(source, f"is truncated or corrupt: its header declares {count} sections "
                               f"(1 to {MAX_SECTIONS}), the file has {len(raw)} bytes")
    table = [_SECTION.unpack_from(raw, _HEADER_V4.size + _SECTION.size * i) for i in range(count)]
    stored = start + sum(t[1] for t in table) + TRAILER_BYTES
    if stored != len(raw):
        raise _corrupt(source, f"is truncated or padded: {len(raw)} bytes, its header declares "
                               f"{stored}")
    decoded = sum(t[2] for t in table[1:])
    for i, (codec, size, length) in enumerate(table):
        what = "the manifest" if i == 0 else f"payload section {i}"
        bad = (codec not in _CODECS or (codec == RAW and length != size)
               or length > DEFLATE_MAX_RATIO * size + 64 or (codec > DEFLATE and length % codec))
        if bad or (i == 0 and (codec == RAW or length > schema.MAX_MANIFEST_BYTES)):
            raise _corrupt(source, f"is corrupt: {what} declares codec {codec}, {size} bytes "
                                   f"stored, {length} decoded")
    if decoded > MAX_PAYLOAD_BYTES:
        raise _corrupt(source, f"is corrupt: its payload declares {decoded} bytes, more than "
                               f"any model ({MAX_PAYLOAD_BYTES >> 20} MiB)")
    return table


def _body_v4(raw: bytes, source: str) -> tuple[bytes, memoryview, str]:
    """Manifest text, decoded payload and checksum (hex) of a version-4 file."""
    table = _sections_v4(raw, source)
    view = memoryview(raw)
    whole, trailer = hashlib.sha256(view[:-TRAILER_BYTES]).digest(), bytes(view[-TRAILER_BYTES:])
    if whole != trailer:
        raise _corrupt(source, f"failed its checksum (sha256 {whole.hex()[:12]}… != "
                               f"{trailer.hex()[:12]}…): the file is corrupt or was modified")
    parts, at = [], _HEADER_V4.size + _SECTION.size * len(table)
    for i, (codec, size, length) in enumerate(table):
        try:
            parts.append(unpack_section(codec, view[at:at + size], length))
        except ValueError as exc:
            what = "its manifest" if i == 0 else f"its payload section {i}"
            raise _corrupt(source, f"is corrupt: {what} {exc}") from None
        at += size
    return parts[0], memoryview(b"".join(parts[1:])), whole.hex()


def _body_legacy(raw: bytes, source: str) -> tuple[bytes, memoryview, bytes]:
    """Manifest text, payload and trailer (empty if there is no room for one) of versions 1-3."""
    _, n = _HEADER.unpack_from(raw)
    if n > schema.MAX_MANIFEST_BYTES or _HEADER.size + n > len(raw):
        raise _corrupt(source, f"is truncated or corrupt: its header declares a {n}-byte "
                               f"manifest, the file has {len(raw)} bytes")
    view = memoryview(raw)
    trailer = bytes(view[-TRAILER_BYTES:]) if len(raw) >= _HEADER.size + n + TRAILER_BYTES else b""
    return bytes(view[_HEADER.size:_HEADER.size + n]), view[_HEADER.size + n:], trailer


def _check_legacy(raw: bytes, manifest: dict[str, Any], rest: memoryview, trailer: bytes,
                  source: str) -> tuple[memoryview, str]:
    """Payload and checksum (hex) of a version 1-3 file, its sizes and checksum verified."""
    version = manifest.get("version", 1)
    declared = manifest.get("payload_bytes")
    if version == 3:
        end = len(rest) - TRAILER_BYTES
        if type(declared) is not int or not trailer or declared != end:
            raise _corrupt(source, f"is truncated or padded: {len(raw)} bytes, the manifest "
                                   f"declares {len(raw) - len(rest)} + {declared} + {TRAILER_BYTES}")
        whole = hashlib.sha256(memoryview(raw)[:-TRAILER_BYTES]).digest()
        if whole != trailer:
            raise _corrupt(source, f"failed its checksum (sha256 {whole.hex()[:12]}… != "
                                   f"{trailer.hex()[:12]}…): the file is corrupt or was modified")
        return rest[:end], whole.hex()
    if len(rest) != declared:
        raise _corrupt(source, f"is truncated or padded: payload has {len(rest)} bytes, "
                               f"manifest says {printable(str(declared)[:20])}")
    checksum = hashlib.sha256(rest).hexdigest()
    if checksum != manifest.get("payload_sha256"):
        raise _corrupt(source, f"failed its checksum (sha256 {checksum[:12]}… != "
                               f"{printable(str(manifest.get('payload_sha256'))[:12])}…): "
                               "the file is corrupt or was modified")
    return rest, checksum


def read_manifest(raw: bytes, source: str = "model") -> tuple[Manifest, memoryview, str]:
    """Parse the header and manifest and verify the checksum (versions 3 to 5: of everything;
    1 and 2: of the payload) and the schema of the manifest's version. Returns the typed
    manifest, the payload (decoded) and the checksum (hex)."""
    magic = raw[:4]
    known = (MAGIC, *_SECTIONED)
    if len(raw) >= 4 and magic[:3] == MAGIC[:3] and magic not in known:
        raise SmzError(f"'{source}' is a .smz file of a newer container ({magic[3]}) than this "
                       f"sparsemeta-edge reads (up to version {FORMAT_VERSION}) — update "
                       "sparsemeta-edge")
    if len(raw) < _HEADER.size or magic not in known:
        raise SmzError(f"'{source}' is not a .smz model file (bad magic bytes)")
    if magic in _SECTIONED:
        text, payload, checksum = _body_v4(raw, source)
    else:
        text, rest, trailer = _body_legacy(raw, source)
    try:
        parsed = schema.parse_manifest(text)
    except schema.Invalid as exc:
        raise _corrupt(source, f"is corrupt ({exc})") from None
    version = parsed.get("version", 1)
    if type(version) is int and version > FORMAT_VERSION:
        raise SmzError(f"'{source}' is .smz version {version}; this sparsemeta-edge reads up to "
                       f"version {FORMAT_VERSION} — update sparsemeta-edge")
    container = _CONTAINER.get(version) if type(version) is int else None
    if container != magic and (magic in _SECTIONED or container is not None):
        raise _corrupt(source, f"is corrupt: a version-{printable(str(version)[:8])} manifest in "
                               f"a container of version {'1-3' if magic == MAGIC else magic[3]}")
    if magic == MAGIC:
        payload, checksum = _check_legacy(raw, parsed, rest, trailer, source)
    try:
        manifest = Manifest.from_dict(parsed)
    except schema.Invalid as exc:
        raise schema.refuse(source, exc) from None
    return manifest, payload, checksum


def _decode_entries(manifest: Manifest, payload: memoryview, dtype: np.dtype,
                    masks_found: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], ...]:
    """Params, masks, extra and rates of checked entries (every size already verified)."""
    params: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    rates: dict[str, np.ndarray] = {}

    def read(span: tuple[int, int], dt: str) -> np.ndarray:
        start, length = span
        return np.frombuffer(payload[start:start + length], dtype=np.dtype(dt))

    def scatter(values: np.ndarray, mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        if mask is None:
            return values.astype(dtype).reshape(shape)
        full = np.zeros(mask.size, dtype=dtype)
        full[mask.ravel()] = values
        return full.reshape(shape)

    for e in manifest.tensors:
        name, shape = e.name, e.shape
        values = read(e.values, e.dtype)
        if e.extra:
            extra[name] = values.reshape(shape).copy()
            continue
        mask = masks_found.get(name)
        if mask is not None:
            mask = masks[name] = mask.reshape(shape)
        elif is_prunable(name, shape):
            masks[name] = np.ones(shape, bool)
        params[name] = scatter(values, mask, shape)
        if e.scale is not None:  # int8: q · scale of the output channel
            scale = read(e.scale, "<f4").astype(dtype)
            params[name].reshape(shape[0], -1)[...] *= scale[:, None]
        if e.inner_lr is not None:
            if manifest.lr_rule == "metasgd":
                rate_dtype = "<f4" if e.dtype == "|i1" else e.dtype
                rates[name] = scatter(read(e.inner_lr, rate_dtype), mask, shape)
            else:
                rates[name] = read(e.inner_lr, "<f4").astype(dtype)
        for key, (names, dt) in _riders(name).items():
            span = e.span(key)
            if span is not None:  # running: (steps, C) each, in the model's dtype; bn_stats: (C,)
                pair = read(span, dt).reshape(2, -1, shape[-1])
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
    """Read and verify a ``.smz`` file (any defect → ``SmzError``, one line); anything but a
    regular file of at most ``MAX_FILE_BYTES`` is refused before it is read."""
    raw = read_regular(path, MAX_FILE_BYTES, "model file")
    return decode(raw, dtype, str(path))


def save_model(path: str | os.PathLike, model: SmzModel, fp16: bool | None = None,
               int8: bool | None = None) -> int:
    """Write a loaded (possibly fine-tuned) model back, keeping its manifest and value dtype
    (an int8 model is quantised again: fine-tuned weights are off the old grid)."""
    stored = model.manifest.values_dtype
    fp16 = stored == "float16" if fp16 is None else fp16
    int8 = stored == "int8" and not fp16 if int8 is None else int8
    return save(path, model.manifest, model.params, model.masks, fp16, model.extra, model.rates,
                int8=int8)


def size_bound(model: SmzModel) -> int:
    """The format's promise: (mask bits + 32 bits per kept weight + 32 bits per value of a dense
    tensor + 64 bits per extra value) / 8 + 4 KB (header, manifest and checksum) + the class
    names a fine-tuning stored (user data of any length). Learned rates count like values:
    Meta-SGD's α 32 bits per kept weight (its weight's mask serves it, no bits of its own) or
    per value of a dense tensor; MAML++'s per-step rates 32 bits each. (int8 stays far below:
    8 bits per kept weight + 32 per output channel.)"""
    names = model.manifest.class_names
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

