"""The ``.smz`` file: a compact, checksummed, NumPy-readable sparse Conv4.

Layout (little-endian)::

    b"SMZ\\x01" | uint32 manifest length | manifest (UTF-8 JSON) | payload

The manifest describes the model (architecture, batch-norm policy, inner learning rate and
steps, input preprocessing, density) and lists every tensor with its byte ranges in the payload;
``payload_sha256`` is the SHA-256 of the payload, checked on every load so that a truncated or
modified file is refused instead of silently giving wrong predictions.

A prunable tensor (conv and linear weights, see ``is_prunable``) with pruned entries is stored as
``np.packbits`` of its mask plus the kept values only (float32, or float16 with ``fp16``); one
with nothing pruned is stored dense (its mask would be all ones). Biases and batch-norm tensors
are stored dense in float32 — unless the run's mask prunes some of their entries (the trainer
masks every rank-≥2 parameter, MAML++'s per-step batch norm included): then bitmask + kept values.
No zip container: per-member headers would cost more than the 4 KB of slack the size bound has.

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

_RUNNING = ("running_mean", "running_var")
_STATS = ("mean", "var")
MAGIC = b"SMZ\x01"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<4sI")


class EdgeError(Exception):
    """A mistake the user can fix (bad file, bad option); the CLI prints one line, exit 2."""


class SmzError(EdgeError):
    """The file is not a valid ``.smz`` (wrong magic, bad manifest, checksum mismatch)."""


@dataclass
class SmzModel:
    """A loaded model: manifest, ``state_dict`` entries in PyTorch layout (parameters and any
    running statistics) and masks of pruned tensors.

    Pruned entries of ``params`` are exactly zero, so the stored weight is the effective weight
    θ ⊙ m; ``masks`` holds a boolean mask for every prunable tensor (all ones where dense).
    ``rates`` holds learned inner learning rates by parameter name (``lr_rule`` in the
    manifest): Meta-SGD's α in the parameter's shape (0 at pruned entries, which are not stored)
    or MAML++'s per-step rates (steps,). ``extra`` holds auxiliary arrays (e.g. batch-norm
    statistics saved by fine-tuning).
    """

    manifest: dict[str, Any]
    params: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    rates: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def density(self) -> float:
        """Kept fraction of the conv and linear weights (as the manifest's ``density``)."""
        masks = [m for k, m in self.masks.items() if is_prunable(k, m.shape)]
        total = sum(m.size for m in masks)
        return sum(int(m.sum()) for m in masks) / total if total else 1.0


def is_prunable(name: str, shape: tuple[int, ...]) -> bool:
    """Conv and linear weights: rank ≥ 2 (``sparsemeta.sparsity.masks.prunable_names``), but not
    batch norm's (steps, C) per-step weights and running statistics."""
    return len(shape) >= 2 and ".bn." not in name


def _riders(bias: str) -> dict[str, tuple[list[str], str]]:
    """What rides on a batch-norm bias entry: key → (names of mean and var, stored dtype);
    nothing on any other entry."""
    if not bias.endswith(".bn.bias"):
        return {}
    block = bias[:-len("bn.bias")]  # "blocks.{i}."
    return {"running": ([f"{block}bn.{s}" for s in _RUNNING], "<f4"),
            "bn_stats": ([f"bn_stats.{block.split('.')[1]}.{s}" for s in _STATS], "<f8")}


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
    rates: dict[str, np.ndarray] | None = None,
) -> list[bytes]:
    """Header, manifest and payload chunks of a ``.smz`` file (see the module docstring);
    ``rates`` are the learned inner learning rates of ``manifest["lr_rule"]``."""
    masks, rates, extra = masks or {}, rates or {}, extra or {}
    riding: set[str] = set()  # names stored on a batch-norm bias entry
    alpha = manifest.get("lr_rule") == "metasgd"
    if set(rates) - set(params) or (rates and manifest.get("lr_rule") not in ("metasgd", "lslr")):
        raise SmzError(f"learned rates need lr_rule metasgd or lslr and a parameter each; got "
                       f"lr_rule {manifest.get('lr_rule')!r} for {sorted(rates)[:3]}")
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
        if name.endswith(_RUNNING):
            continue  # stored with their block's bias
        value = np.asarray(value)
        entry: dict[str, Any] = {"name": name, "shape": list(value.shape)}
        prunable = is_prunable(name, value.shape)
        mask = masks.get(name)
        mask = None if mask is None else np.asarray(mask, bool)
        if mask is not None and mask.shape != value.shape:
            raise SmzError(f"mask of '{name}' has shape {mask.shape}, weight {value.shape}")
        if mask is None and prunable:
            mask = np.ones(value.shape, bool)
        if mask is not None and not prunable and mask.all():
            mask = None  # a batch-norm tensor with nothing pruned: plain dense
        dtype = value_dtype if prunable else np.dtype("<f4")
        entry["dtype"] = dtype.str
        if prunable:  # density counts conv and linear weights only
            kept += int(mask.sum())
            total += mask.size
        if mask is None or mask.all():
            entry["encoding"] = "dense"
            entry["values"] = add(value.astype(dtype).tobytes())
        else:
            entry["encoding"] = "sparse"
            entry["mask"] = add(np.packbits(mask.ravel()).tobytes())
            entry["values"] = add(value.ravel()[mask.ravel()].astype(dtype).tobytes())
        if name in rates:
            rate = np.asarray(rates[name])
            if alpha:  # α is stored as its weight is: kept entries only, in the weight's dtype
                if rate.shape != value.shape:
                    raise SmzError(f"α of '{name}' has shape {rate.shape}, weight {value.shape}")
                kept_rate = rate if entry["encoding"] == "dense" else rate.ravel()[mask.ravel()]
                entry["inner_lr"] = add(kept_rate.astype(dtype).tobytes())
            else:
                if rate.ndim != 1:
                    raise SmzError(f"per-step rates of '{name}' must be 1-D, got {rate.shape}")
                entry["inner_lr"] = add(rate.astype("<f4").tobytes())
        for key, (names, dt) in _riders(name).items():
            source = params if key == "running" else extra
            if names[0] in source:
                entry[key] = add(np.stack([source[n] for n in names]).astype(dt).tobytes())
                riding.update(names)
        entries.append(entry)
    orphans = [k for k in params if k.endswith(_RUNNING) and k not in riding]
    if orphans:
        raise SmzError(f"running statistics without their batch-norm bias: {orphans}")
    for name, value in extra.items():
        if name in riding:
            continue
        value = np.asarray(value)
        entries.append({"name": name, "shape": list(value.shape), "encoding": "dense",
                        "dtype": "<f8", "extra": True, "values": add(value.astype("<f8").tobytes())})

    payload_hash = hashlib.sha256()
    for c in chunks:
        payload_hash.update(c)
    # version 1 where nothing of version 2 is used: such files stay readable by older runtimes
    uses_v2 = bool(rates or riding) or any(np.ndim(v) == 2 and ".bn." in k
                                           for k, v in params.items())
    full = {
        **manifest,
        "format": "smz",
        "version": FORMAT_VERSION if uses_v2 else 1,
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
    rates: dict[str, np.ndarray] | None = None,
) -> int:
    """Write a ``.smz`` file atomically and return its size in bytes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise EdgeError(f"directory '{path.parent}' does not exist; create it or choose another path")
    data = encode(manifest, params, masks, fp16, extra, rates)
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
        manifest = None
    if not isinstance(manifest, dict):
        raise SmzError(f"'{source}' has a corrupt manifest; re-export the model")
    if manifest.get("version", 1) > FORMAT_VERSION:
        raise SmzError(f"'{source}' is .smz version {manifest['version']}; this sparsemeta-edge "
                       f"reads up to version {FORMAT_VERSION} — update sparsemeta-edge")
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
    """Parameters (pruned entries zero), masks, learned rates and extra arrays from the bytes
    of a file."""
    manifest, payload = read_manifest(raw, source)
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

    try:
        for e in manifest["tensors"]:
            name, shape = e["name"], tuple(e["shape"])
            values = read(e["values"], e["dtype"])
            if e.get("extra"):
                extra[name] = values.reshape(shape).copy()
                continue
            mask = None
            if e["encoding"] == "sparse":
                bits = read(e["mask"], "u1")
                mask = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
                masks[name] = mask
            elif is_prunable(name, shape):
                masks[name] = np.ones(shape, bool)
            params[name] = scatter(values, mask, shape)
            if "inner_lr" in e:
                if manifest.get("lr_rule") == "metasgd":
                    rates[name] = scatter(read(e["inner_lr"], e["dtype"]), mask, shape)
                else:
                    rates[name] = read(e["inner_lr"], "<f4").astype(dtype)
            for key, (names, dt) in _riders(name).items():
                if key in e:  # running: (steps, C) each, in the model's dtype; bn_stats: (C,)
                    pair = read(e[key], dt).reshape(2, -1, shape[-1])
                    target = params if key == "running" else extra
                    for n, array in zip(names, pair):
                        target[n] = array.astype(dtype) if key == "running" else array[0].copy()
    except (KeyError, TypeError, ValueError) as exc:
        raise SmzError(f"'{source}' has an inconsistent manifest ({exc}); re-export the model") from None
    return SmzModel(manifest, params, masks, extra, rates)


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
    return save(path, base, model.params, model.masks, fp16, model.extra, model.rates)


def size_bound(model: SmzModel) -> int:
    """The format's promise: (mask bits + 32 bits per kept weight + 32 bits per value of a dense
    tensor + 64 bits per extra value) / 8 + 4 KB (header and manifest) + the class names a
    fine-tuning stored (user data of any length). Learned rates count like values: Meta-SGD's
    α 32 bits per kept weight (its weight's mask serves it, no bits of its own) or per value of
    a dense tensor; MAML++'s per-step rates 32 bits each."""
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
