"""The ``.smz`` manifest as one typed, immutable value: what the writer records and every reader
reads, by attribute.

``Manifest.from_dict`` takes a parsed manifest of any version (1 to ``FORMAT_VERSION``),
checks it against its version's schema (``sparsemeta_edge.schema``) and fills what older
versions did not record: no ``lr_rule`` is ``scalar``, no ``bn`` is ``transductive``, no
``bn_steps`` is 1, no ``algorithm`` is ``maml``, no ``adapted_steps`` is 0, no
``layer_filters`` is ``filters`` in every block. Versions 1-4 named the inner steps the other way
round (``inner_steps`` the adaptation steps, ``train_inner_steps`` meta-training's); they are
mapped to version 5's names, which are the config's: ``inner_steps`` (``meta.inner_steps``,
meta-training) and ``eval_inner_steps`` (``meta.eval_inner_steps``, the default adaptation
steps on a device). ``to_dict`` gives the manifest as the current version stores it.

Fields a writer does not set (the tensor table, counts, ``values_dtype``, ``version``) are
derived from the arrays by ``smz.encode``; a manifest built by hand leaves them at their
defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sparsemeta_edge import schema
from sparsemeta_edge.schema import FORMAT_VERSION

__all__ = ["FORMAT_VERSION", "Architecture", "Finetuned", "InputSpec", "Manifest", "Source",
           "Span", "Tensor", "plain"]

Span = tuple[int, int]  # (start, length) of a byte range in the decoded payload
#: fields of a file that ``smz.encode`` derives from the arrays, never from what it is given
DERIVED = ("format", "version", "values_dtype", "nonzeros", "prunable", "density", "tensors",
           "payload_bytes", "payload_sha256")


def plain(value: Any) -> Any:
    """JSON-ready form of a manifest value: dataclasses as objects without their unset (None)
    fields, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(v) for f in dataclasses.fields(value)
                if (v := getattr(value, f.name)) is not None}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def _tuple(value: list | None) -> tuple | None:
    return None if value is None else tuple(value)


@dataclass(frozen=True)
class Architecture:
    """The Conv4: input channels and side, meta-trained width, per-block widths of a compacted
    (filter-pruned) ticket, downsampling and ways."""

    in_channels: int
    image_size: int
    filters: int
    downsample: str
    ways: int
    layer_filters: tuple[int, ...] = ()
    name: str = "conv4"

    def __post_init__(self) -> None:
        if not self.layer_filters:  # not compacted: every block is meta-training's width
            object.__setattr__(self, "layer_filters", (self.filters,) * 4)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Architecture:
        return cls(d["in_channels"], d["image_size"], d["filters"], d["downsample"], d["ways"],
                   tuple(d.get("layer_filters", ())), d.get("name", "conv4"))

    @property
    def compacted(self) -> bool:
        return self.layer_filters != (self.filters,) * 4


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the network's input: side, channels, per-channel normalisation of
    ``x / 255`` (None: unknown, the local data's is used), Omniglot-style inversion."""

    size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    invert: bool = False
    stats_source: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(d.get("size"), d.get("channels"), _tuple(d.get("mean")), _tuple(d.get("std")),
                   d.get("invert", False), d.get("stats_source"))


@dataclass(frozen=True)
class Source:
    """Where an exported model came from (informational)."""

    run: str | None = None
    data: str | None = None
    level: float | None = None
    method: str | None = None
    seed: float | None = None
    test_accuracy: float | None = None
    test_ci95: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Source:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Finetuned:
    """What ``sparsemeta-edge finetune`` did (informational)."""

    epochs: int | None = None
    lr_rule: str | None = None
    lr: float | None = None
    batch: int | None = None
    train_images: int | None = None
    holdout_images: int | None = None
    seed: int | None = None
    holdout_loss: float | None = None
    holdout_accuracy: float | None = None
    reference_images: int | None = None
    update: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finetuned:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Tensor:
    """One entry of the tensor table: a parameter's name, shape, stored dtype and encoding, and
    the byte ranges of its values and of what rides on it (bitmask, int8 scales, learned rates,
    batch-norm statistics). ``extra``: a version-1 entry of fine-tuning's statistics."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    values: Span
    mask: Span | None = None
    scale: Span | None = None
    inner_lr: Span | None = None
    running: Span | None = None
    bn_stats: Span | None = None
    extra: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tensor:
        spans = {k: _tuple(d.get(k)) for k in schema.SPAN_KEYS}
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d["encoding"], **spans,
                   extra=d.get("extra"))

    def span(self, key: str) -> Span | None:
        """The byte range called ``key`` (one of ``schema.SPAN_KEYS``)."""
        return getattr(self, key)


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to adapt a ``.smz`` model as meta-training did, and the
    tensor table that locates its arrays in the payload."""

    architecture: Architecture
    inner_lr: float
    eval_inner_steps: int
    inner_steps: int | None = None  # meta-training's; None where a file did not record it
    algorithm: str = "maml"
    lr_rule: str = "scalar"
    first_order: bool | None = None
    bn: str = "transductive"
    bn_steps: int = 1
    shots: int | None = None
    input: InputSpec = field(default_factory=InputSpec)
    class_names: tuple[str, ...] | None = None
    source: Source | None = None
    finetuned: Finetuned | None = None
    adapted_steps: int = 0
    # derived by the writer from the arrays
    version: int = FORMAT_VERSION
    values_dtype: str = "float32"
    nonzeros: int = 0
    prunable: int = 0
    density: float = 1.0
    tensors: tuple[Tensor, ...] = ()
    payload_bytes: int = 0
    payload_sha256: str | None = None  # versions 1 and 2: the payload's checksum
    format: str = "smz"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """A parsed manifest of any version, checked by its schema (``schema.Invalid`` if it
        fails), with old versions' names mapped and their omissions filled."""
        schema.check_manifest(d)
        if d["version"] < FORMAT_VERSION:  # versions 1-4: the steps' names were swapped
            steps = {"eval_inner_steps": d["inner_steps"], "inner_steps": d.get("train_inner_steps")}
        else:
            steps = {"eval_inner_steps": d["eval_inner_steps"], "inner_steps": d.get("inner_steps")}
        nested = {"source": Source, "finetuned": Finetuned}
        return cls(
            architecture=Architecture.from_dict(d["architecture"]), inner_lr=d["inner_lr"],
            **steps, algorithm=d.get("algorithm", "maml"), lr_rule=d.get("lr_rule", "scalar"),
            first_order=d.get("first_order"), bn=d.get("bn", "transductive"),
            bn_steps=d.get("bn_steps", 1), shots=d.get("shots"),
            input=InputSpec.from_dict(d.get("input", {})),
            class_names=_tuple(d.get("class_names")),
            **{k: None if d.get(k) is None else kind.from_dict(d[k]) for k, kind in nested.items()},
            adapted_steps=d.get("adapted_steps", 0), version=d["version"],
            values_dtype=d["values_dtype"], nonzeros=d["nonzeros"], prunable=d["prunable"],
            density=d["density"], tensors=tuple(Tensor.from_dict(t) for t in d["tensors"]),
            payload_bytes=d["payload_bytes"], payload_sha256=d.get("payload_sha256"))

    def to_dict(self) -> dict[str, Any]:
        """The manifest as the current version stores it (JSON-ready; unset fields omitted):
        a loaded file of an older version comes out in version 5's layout."""
        out = plain(self)
        out["version"] = FORMAT_VERSION
        out.pop("payload_sha256", None)  # versions ≥ 3 checksum everything after the payload
        return out

    def describing(self) -> dict[str, Any]:
        """``to_dict`` without what the writer derives from the arrays: what ``smz.encode``
        takes from a manifest."""
        return {k: v for k, v in self.to_dict().items() if k not in DERIVED}

    def replace(self, **changes: Any) -> Manifest:
        """A copy with ``changes`` (the manifest is immutable)."""
        return dataclasses.replace(self, **changes)
