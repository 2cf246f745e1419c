"""One ``Manifest`` type for the ``.smz`` format: the main package's writer (``export_run``) and
the edge runtime's reader agree on it for every learner the trainer builds, and the edge's
``Manifest``/schema round-trips exactly what the writer stored."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from sparsemeta.experiments.export import export_bytes, export_run, torch_learner
from sparsemeta.training.rundir import load_run_config
from sparsemeta_edge import schema, smz
from sparsemeta_edge.manifest import Architecture, InputSpec, Manifest, Tensor
from tests.test_export import LSLR_PER_STEP_BN, METASGD, RUNNING, make_filter_run, make_run

#: every learner and batch-norm policy the trainer builds, plain and filter-compacted
VARIANTS = {
    "maml-transductive": (["meta.bn=transductive"], False),
    "maml-support": ([], False),
    "maml-running": (["meta.bn=running"], False),
    "maml-first-order": (["meta.first_order=true", "meta.inner_steps=2"], False),
    "metasgd-support": ([*METASGD, "meta.bn=support"], False),
    "mamlpp-lslr-per-step-bn": (LSLR_PER_STEP_BN, False),
    "mamlpp-running": (RUNNING, False),
    "maml-compacted": (["meta.bn=transductive"], True),
    "metasgd-compacted": ([*METASGD, "meta.bn=support"], True),
    "mamlpp-running-compacted": (RUNNING, True),
}
RULES = {"maml": "scalar", "metasgd": "metasgd", "mamlpp": "lslr"}


def stored_manifest(raw: bytes) -> dict:
    """The manifest JSON exactly as stored, read by hand from the documented layout (magic,
    section count, table of (codec, stored, decoded) — the manifest is section 0, raw
    deflate), not through the reader under test."""
    count = raw[4]
    _, stored, _ = struct.unpack_from("<BII", raw, 5)
    start = 5 + 9 * count
    return json.loads(zlib.decompress(raw[start:start + stored], -15))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_writers_manifest_round_trips_through_the_edge_manifest(tmp_path, variant):
    overrides, compacted = VARIANTS[variant]
    run = tmp_path / "run"
    if compacted:
        make_filter_run(run, 0.5, seed=3, overrides=overrides)
    else:
        make_run(run, 0.4, seed=3, overrides=overrides)
    cfg = load_run_config(run)
    export_run(run, tmp_path / "m.smz")
    raw = (tmp_path / "m.smz").read_bytes()
    assert raw[:4] == smz.MAGIC_V5
    stored = stored_manifest(raw)
    schema.check_manifest(stored)  # the edge's schema accepts what the writer stored …
    typed = Manifest.from_dict(stored)
    assert typed.to_dict() == stored  # … and the typed manifest is exactly that, both ways
    assert "train_inner_steps" not in stored and stored["version"] == 5
    # the facts as the config states them, under the config's names
    assert (typed.inner_steps, typed.eval_inner_steps) == (cfg.meta.inner_steps,
                                                          cfg.meta.eval_inner_steps)
    assert (typed.algorithm, typed.lr_rule, typed.bn, typed.first_order, typed.inner_lr) == (
        cfg.meta.algorithm, RULES[cfg.meta.algorithm], cfg.meta.bn, cfg.meta.first_order,
        cfg.meta.inner_lr)
    per_step = cfg.meta.algorithm == "mamlpp"
    assert typed.bn_steps == (max(cfg.meta.inner_steps, cfg.meta.eval_inner_steps)
                              if per_step else 1)
    widths = (8,) * 4 if compacted else (16,) * 4
    assert typed.architecture == Architecture(in_channels=1, image_size=28, filters=16,
                                              downsample="maxpool", ways=5, layer_filters=widths)
    assert typed.architecture.compacted == compacted
    assert typed.input == InputSpec(size=28, channels=1, mean=(0.0,), std=(1.0,), invert=False,
                                    stats_source="glyphs")
    assert all(isinstance(t, Tensor) for t in typed.tensors)
    # the reader gives the same typed manifest; the file's learner adapts as configured
    model = smz.load(tmp_path / "m.smz")
    assert model.manifest == typed
    learner = torch_learner(model)
    assert (learner.inner_steps, learner.lr_rule, learner.bn) == (
        cfg.meta.inner_steps, typed.lr_rule, typed.bn)
    assert export_bytes(run) == len(raw)


@pytest.mark.parametrize("values", ["fp16", "int8"])
def test_the_value_type_is_recorded_and_round_trips(tmp_path: Path, values: str):
    make_run(tmp_path / "run", 0.4, overrides=METASGD)
    export_run(tmp_path / "run", tmp_path / "m.smz", **{values: True})
    stored = stored_manifest((tmp_path / "m.smz").read_bytes())
    assert Manifest.from_dict(stored).to_dict() == stored
    assert stored["values_dtype"] == {"fp16": "float16", "int8": "int8"}[values]


def test_the_writer_takes_the_typed_manifest_or_its_dict_alike(tmp_path):
    """``smz.encode`` of a loaded model's ``Manifest`` and of its ``to_dict`` are the same bytes;
    a dict in version 4's names is refused, not misread."""
    make_run(tmp_path / "run", 0.4, overrides=LSLR_PER_STEP_BN)
    export_run(tmp_path / "run", tmp_path / "m.smz")
    model = smz.load(tmp_path / "m.smz")
    args = (model.params, model.masks)
    typed = b"".join(smz.encode(model.manifest, *args, rates=model.rates))
    plain = b"".join(smz.encode(model.manifest.to_dict(), *args, rates=model.rates))
    assert typed == plain == (tmp_path / "m.smz").read_bytes()
    old = model.manifest.describing()
    old["train_inner_steps"] = old.pop("inner_steps")
    with pytest.raises(smz.SmzError, match="unknown field.*train_inner_steps"):
        smz.encode(old, *args, rates=model.rates)
