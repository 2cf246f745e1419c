"""The ``.smz`` file: a compact, checksummed, NumPy-readable sparse Conv4.

Layout (little-endian)::

    b"SMZ\\x01" | uint32 manifest length | manifest (UTF-8 JSON) | payload

The manifest describes the model (architecture, batch-norm policy, inner learning rate and
steps, input preprocessing, density) and lists every tensor with its byte ranges in the payload;
``payload_sha256`` is the SHA-256 of the payload, checked on every load so that a truncated or
modified file is refused instead of silently giving wrong predictions.

A prunable tensor (rank ≥ 2) with pruned entries is stored as ``np.packbits`` of its mask plus the
kept values only (float32, or float16 with ``fp16``); one with nothing pruned is stored dense
(its mask would be all ones). Biases and batch-norm parameters are stored dense in float32.
No zip container: per-member headers would cost more than the 4 KB of slack the size bound has.

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

MAGIC = b"SMZ\x01"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sI")


class EdgeError(Exception):
    """A mistake the user can fix (bad file, bad option); the CLI prints one line, exit 2."""


class SmzError(EdgeError):
    """The file is not a valid ``.smz`` (wrong magic, bad manifest, checksum mismatch)."""


@dataclass
class SmzModel:
    """A loaded model: manifest, parameters in PyTorch layout and masks of pruned tensors.

    Pruned entries of ``params`` are exactly zero, so the stored weight is the effective weight
    θ ⊙ m; ``masks`` holds a boolean mask for every prunable tensor (all ones where dense).
    ``extra`` holds auxiliary arrays (e.g. batch-norm statistics saved by fine-tuning).
    """

    manifest: dict[str, Any]
    params: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def density(self) -> float:
        total = sum(m.size for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return kept / total if total else 1.0


def is_prunable(array: np.ndarray) -> bool:
    """Conv and linear weights (rank ≥ 2), as in ``sparsemeta.sparsity.masks.prunable_names``."""
    return array.ndim >= 2


def _atomic_write(path: Path, data: list[bytes]) -> None:
    """Temporary file + rename: an interrupted save never leaves a torn model behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in data:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode(
    manifest: dict[str, Any],
    params: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    fp16: bool = False,
    extra: dict[str, np.ndarray] | None = None,
) -> list[bytes]:
    """Header, manifest and payload chunks of a ``.smz`` file (see the module docstring)."""
    masks = masks or {}
    value_dtype = np.dtype("<f2") if fp16 else np.dtype("<f4")
    chunks: list[bytes] = []
    offset = 0
    entries = []
    kept = total = 0

    def add(raw: bytes) -> list[int]:
        nonlocal offset
        chunks.append(raw)
        span = [offset, len(raw)]
        offset += len(raw)
        return span

    for name, value in params.items():
        value = np.asarray(value)
        entry: dict[str, Any] = {"name": name, "shape": list(value.shape)}
        if is_prunable(value):
            mask = masks.get(name)
            mask = np.ones(value.shape, bool) if mask is None else np.asarray(mask, bool)
            if mask.shape != value.shape:
                raise SmzError(f"mask of '{name}' has shape {mask.shape}, weight {value.shape}")
            kept += int(mask.sum())
            total += mask.size
            entry["dtype"] = value_dtype.str
            if mask.all():
                entry["encoding"] = "dense"
                entry["values"] = add(value.astype(value_dtype).tobytes())
            else:
                entry["encoding"] = "sparse"
                entry["mask"] = add(np.packbits(mask.ravel()).tobytes())
                entry["values"] = add(value.ravel()[mask.ravel()].astype(value_dtype).tobytes())
        else:
            entry["encoding"] = "dense"
            entry["dtype"] = "<f4"
            entry["values"] = add(value.astype("<f4").tobytes())
        entries.append(entry)
    for name, value in (extra or {}).items():
        value = np.asarray(value)
        entries.append({"name": name, "shape": list(value.shape), "encoding": "dense",
                        "dtype": "<f8", "extra": True, "values": add(value.astype("<f8").tobytes())})

    payload_hash = hashlib.sha256()
    for c in chunks:
        payload_hash.update(c)
    full = {
        **manifest,
        "format": "smz",
        "version": FORMAT_VERSION,
        "values_dtype": "float16" if fp16 else "float32",
        "nonzeros": kept,
        "prunable": total,
        "density": kept / total if total else 1.0,
        "tensors": entries,
        "payload_bytes": offset,
        "payload_sha256": payload_hash.hexdigest(),
    }
    text = json.dumps(full, separators=(",", ":")).encode()
    return [_HEADER.pack(MAGIC, len(text)), text, *chunks]


def save(
    path: str | os.PathLike,
    manifest: dict[str, Any],
    params: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    fp16: bool = False,
    extra: dict[str, np.ndarray] | None = None,
) -> int:
    """Write a ``.smz`` file atomically and return its size in bytes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise EdgeError(f"directory '{path.parent}' does not exist; create it or choose another path")
    data = encode(manifest, params, masks, fp16, extra)
    _atomic_write(path, data)
    return sum(len(c) for c in data)


def read_manifest(raw: bytes, source: str = "model") -> tuple[dict[str, Any], memoryview]:
    """Parse the header and manifest; verify the payload's length and checksum."""
    if len(raw) < _HEADER.size or raw[:4] != MAGIC:
        raise SmzError(f"'{source}' is not a .smz model file (bad magic bytes)")
    _, n = _HEADER.unpack_from(raw)
    try:
        manifest = json.loads(bytes(raw[_HEADER.size:_HEADER.size + n]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SmzError(f"'{source}' has a corrupt manifest; re-export the model") from None
    payload = memoryview(raw)[_HEADER.size + n:]
    expected = manifest.get("payload_bytes")
    if len(payload) != expected:
        raise SmzError(f"'{source}' is truncated or padded: payload has {len(payload)} bytes, "
                       f"manifest says {expected}; re-export or copy the file again")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest.get("payload_sha256"):
        raise SmzError(f"'{source}' failed its checksum (sha256 {digest[:12]}… != "
                       f"{str(manifest.get('payload_sha256'))[:12]}…): the file is corrupt or was "
                       "modified; re-export or copy it again")
    return manifest, payload


def decode(raw: bytes, dtype: np.dtype | type = np.float32, source: str = "model") -> SmzModel:
    """Parameters (pruned entries zero), masks and extra arrays from the bytes of a file."""
    manifest, payload = read_manifest(raw, source)
    params: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    try:
        for e in manifest["tensors"]:
            shape = tuple(e["shape"])
            start, length = e["values"]
            values = np.frombuffer(payload[start:start + length], dtype=np.dtype(e["dtype"]))
            if e.get("extra"):
                extra[e["name"]] = values.reshape(shape).copy()
                continue
            if e["encoding"] == "sparse":
                ms, ml = e["mask"]
                size = int(np.prod(shape))
                bits = np.frombuffer(payload[ms:ms + ml], dtype=np.uint8)
                mask = np.unpackbits(bits, count=size).astype(bool)
                full = np.zeros(size, dtype=dtype)
                full[mask] = values
                params[e["name"]] = full.reshape(shape)
                masks[e["name"]] = mask.reshape(shape)
            else:
                params[e["name"]] = values.astype(dtype).reshape(shape)
                if len(shape) >= 2:
                    masks[e["name"]] = np.ones(shape, bool)
    except (KeyError, TypeError, ValueError) as exc:
        raise SmzError(f"'{source}' has an inconsistent manifest ({exc}); re-export the model") from None
    return SmzModel(manifest, params, masks, extra)


def load(path: str | os.PathLike, dtype: np.dtype | type = np.float32) -> SmzModel:
    """Read and verify a ``.smz`` file (checksum mismatch → ``SmzError``)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EdgeError(f"model file '{path}' does not exist") from None
    except IsADirectoryError:
        raise EdgeError(f"'{path}' is a directory, not a .smz model file") from None
    except OSError as exc:
        raise EdgeError(f"cannot read '{path}' ({exc.strerror})") from None
    return decode(raw, dtype, str(path))


def save_model(path: str | os.PathLike, model: SmzModel, fp16: bool | None = None) -> int:
    """Write a loaded (possibly fine-tuned) model back, keeping its manifest and value dtype."""
    if fp16 is None:
        fp16 = model.manifest.get("values_dtype") == "float16"
    base = {k: v for k, v in model.manifest.items()
            if k not in ("tensors", "payload_bytes", "payload_sha256", "nonzeros", "prunable",
                         "density", "values_dtype", "format", "version")}
    return save(path, base, model.params, model.masks, fp16, model.extra)


def size_bound(model: SmzModel) -> int:
    """The format's promise: (mask bits + 32 bits per non-zero + dense tensors) / 8 + 4 KB."""
    bits = 0
    for name, value in model.params.items():
        if name in model.masks:
            bits += value.size + 32 * int(model.masks[name].sum())
        else:
            bits += 32 * value.size
    for value in model.extra.values():
        bits += 64 * value.size
    return bits // 8 + 4096
