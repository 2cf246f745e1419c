"""``.smz`` export: size bound, exact round trip, checksum, fp16, and the experiment's level choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsemeta.config import build_config
from sparsemeta.errors import UserError
from sparsemeta.experiment import write_json
from sparsemeta.export import (
    choose_level,
    export_bytes,
    export_command,
    export_experiment,
    export_run,
)
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.masks import prunable_names, save_mask
from sparsemeta.sparsity.prune import random_filter_mask
from sparsemeta_edge import smz

OVERRIDES = ["device=cpu", "data.image_size=28", "model.filters=16", "meta.bn=support",
             "meta.inner_lr=0.3", "meta.eval_inner_steps=5"]


def make_run(run: Path, density: float, seed: int = 0, overrides: list[str] | None = None,
             accuracy: float = 0.5, perturb: bool = True) -> dict[str, torch.Tensor]:
    """A run directory as ``sparsemeta train`` leaves it (config, best.pt, mask.pt, eval.json),
    with random weights and a random mask at ``density``; pruned weights are left non-zero in
    best.pt, as training may leave them (the mask, not the stored value, defines them)."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = build_config(None, OVERRIDES + (overrides or []))
    torch.manual_seed(seed)
    model = build_model(cfg, in_channels=1)
    if perturb:  # every tensor non-trivial (Conv4's init zeroes biases)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    state = model.state_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.save(state, run / "best.pt")
    mask = {}
    if density < 1.0:
        g = torch.Generator().manual_seed(seed + 1)
        mask = {k: torch.rand(state[k].shape, generator=g) < density for k in prunable_names(state)}
        save_mask(mask, run / "mask.pt")
    write_json(run / "eval.json", {"accuracy": accuracy, "ci95": 0.02, "density": density})
    return {"state": state, "mask": mask}


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.1, 0.02])
def test_size_bound_holds_and_round_trip_is_exact(tmp_path, density):
    made = make_run(tmp_path / "run", density)
    out = tmp_path / "m.smz"
    result = export_run(tmp_path / "run", out)
    state, mask = made["state"], made["mask"]

    mask_bits = sum(state[k].numel() for k in prunable_names(state))
    nnz = sum(int(mask[k].sum()) if k in mask else state[k].numel() for k in prunable_names(state))
    small = sum(v.numel() for k, v in state.items() if k not in prunable_names(state))
    bound = (mask_bits + 32 * nnz + 32 * small) / 8 + 4096
    assert out.stat().st_size == result["bytes"] <= bound
    assert result["dense_fp32_bytes"] == 4 * sum(v.numel() for v in state.values())
    if density <= 0.5:
        assert result["bytes"] < result["dense_fp32_bytes"] * (density + 1 / 32) + 4096

    model = smz.load(out)
    assert list(model.params) == list(state)  # state_dict order kept
    for k, v in state.items():
        expect = (v * mask[k]).numpy() if k in mask else v.numpy()
        np.testing.assert_array_equal(model.params[k], expect)  # bit-exact fp32
        assert model.params[k].dtype == np.float32
        if k in prunable_names(state):
            want = mask[k].numpy() if k in mask else np.ones(v.shape, bool)
            np.testing.assert_array_equal(model.masks[k], want)
    assert model.density == pytest.approx(nnz / mask_bits)
    assert result["density"] == pytest.approx(density, abs=0.02)


def test_manifest_carries_what_adaptation_needs(tmp_path):
    make_run(tmp_path / "run", 0.3)
    export_run(tmp_path / "run", tmp_path / "m.smz")
    m = smz.load(tmp_path / "m.smz").manifest
    assert m["architecture"] == {"name": "conv4", "in_channels": 1, "image_size": 28,
                                 "filters": 16, "layer_filters": [16] * 4,
                                 "downsample": "maxpool", "ways": 5}
    assert (m["bn"], m["inner_lr"], m["inner_steps"], m["algorithm"]) == ("support", 0.3, 5, "maml")
    assert m["input"]["size"] == 28 and m["input"]["channels"] == 1
    assert m["input"]["mean"] == [0.0] and m["input"]["std"] == [1.0]  # glyphs: x / 255
    assert len(m["payload_sha256"]) == 64 and m["density"] == pytest.approx(0.3, abs=0.02)


def test_checksum_mismatch_and_truncation_are_detected(tmp_path):
    make_run(tmp_path / "run", 0.5)
    out = tmp_path / "m.smz"
    export_run(tmp_path / "run", out)
    raw = bytearray(out.read_bytes())
    raw[-100] ^= 0x01
    bad = tmp_path / "bad.smz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(smz.SmzError, match="checksum"):
        smz.load(bad)
    bad.write_bytes(out.read_bytes()[:-10])
    with pytest.raises(smz.SmzError, match="truncated"):
        smz.load(bad)
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(smz.SmzError, match="not a .smz"):
        smz.load(bad)


def test_fp16_halves_the_value_bytes(tmp_path):
    made = make_run(tmp_path / "run", 0.3)
    r32 = export_run(tmp_path / "run", tmp_path / "a.smz")
    r16 = export_run(tmp_path / "run", tmp_path / "b.smz", fp16=True)

    def value_bytes(path: Path) -> int:
        m = smz.load(path).manifest
        return sum(t["values"][1] for t in m["tensors"] if len(t["shape"]) >= 2)

    assert value_bytes(tmp_path / "b.smz") * 2 == value_bytes(tmp_path / "a.smz")
    assert r32["bytes"] - r16["bytes"] > 0.45 * value_bytes(tmp_path / "a.smz")
    m16 = smz.load(tmp_path / "b.smz")
    assert m16.manifest["values_dtype"] == "float16"
    for k, v in made["state"].items():
        expect = (v * made["mask"][k]).numpy() if k in made["mask"] else v.numpy()
        tol = 1e-3 if k in made["mask"] else 0.0  # biases and batch norm stay fp32
        np.testing.assert_allclose(m16.params[k], expect, rtol=tol, atol=tol * 1e-2)


def test_experiment_export_picks_sparsest_level_within_dense_ci(tmp_path):
    exp = tmp_path / "exp"
    accs = {0: 0.80, 1: 0.81, 2: 0.785, 3: 0.76}  # dense CI ±0.02: levels 1 and 2 qualify
    for level, acc in accs.items():
        make_run(exp / "seed_0" / f"level_{level:02d}" / "ticket", 0.8 ** level, seed=level,
                 accuracy=acc)
    rows = [{"method": "ticket", "level": lv, "density": 0.8 ** lv, "accuracy": a, "ci95": 0.02}
            for lv, a in accs.items()]
    rows.append({"method": "random", "level": 3, "density": 0.5, "accuracy": 0.9, "ci95": 0.02})
    write_json(exp / "summary.json", {"rows": rows})
    assert choose_level(rows[:4])[0] == 2

    result = export_experiment(exp, tmp_path / "t.smz")
    assert result["level"] == 2 and "level 2" in result["choice"]
    assert smz.load(tmp_path / "t.smz").manifest["source"]["run"].endswith("level_02/ticket")
    assert export_experiment(exp, tmp_path / "t3.smz", level=3)["level"] == 3

    (exp / "summary.json").unlink()  # falls back to the runs' eval.json files
    assert export_experiment(exp, tmp_path / "t4.smz")["level"] == 2
    text = export_command(exp, tmp_path / "t5.smz")
    assert "level 2" in text and "dense fp32" in text
    assert json.loads(export_command(exp / "seed_0/level_01/ticket", tmp_path / "t6.smz",
                                     as_json=True))["bytes"] > 0


def test_export_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "m.smz")
    make_run(tmp_path / "run", 0.5)
    with pytest.raises(UserError, match="does not exist"):
        export_run(tmp_path / "run", tmp_path / "nope" / "m.smz")
    with pytest.raises(UserError, match="no finished ticket"):
        export_experiment(tmp_path / "run", tmp_path / "m.smz")


@pytest.mark.parametrize("case", ["metasgd", "running"])
def test_runs_the_edge_runtime_cannot_reproduce_are_refused_by_name(tmp_path, case):
    run = tmp_path / "run"
    if case == "metasgd":
        made = make_run(run, 1.0, overrides=["meta.algorithm=metasgd"])
        state = dict(made["state"])
        state["inner_lr.head.weight"] = torch.full_like(state["head.weight"], 0.1)
        torch.save(state, run / "best.pt")  # the learner's flat state, as train.py saves it
        needle = "learned inner learning rates"
    else:
        make_run(run, 1.0, overrides=["meta.bn=running"])
        needle = "running batch-norm statistics"
    with pytest.raises(UserError, match=needle):
        export_run(run, tmp_path / "m.smz")


def make_filter_run(run: Path, keep_fraction: float = 0.5, seed: int = 0,
                    overrides: list[str] | None = None) -> dict:
    """A filter-pruned run (``prune.structure=filters``): ``make_run``'s random, non-trivial
    weights — removed filters' bias and batch norm too, so their batch-norm output is a non-zero
    constant — with ``keep_fraction`` of each conv layer's filters kept at random."""
    made = make_run(run, 1.0, seed=seed, overrides=["prune.structure=filters", *(overrides or [])])
    g = torch.Generator().manual_seed(seed + 7)
    shapes = {k: v.shape for k, v in made["state"].items() if v.dim() >= 2}
    counts = {k: round(keep_fraction * s[0]) for k, s in shapes.items() if len(s) == 4}
    mask = random_filter_mask(shapes, counts, g)
    save_mask(mask, run / "mask.pt")
    return {**made, "mask": mask}


def test_filter_pruned_ticket_exports_as_a_smaller_dense_conv4(tmp_path):
    made = make_filter_run(tmp_path / "run", 0.5)
    out = tmp_path / "m.smz"
    result = export_run(tmp_path / "run", out)
    model = smz.load(out)
    man = model.manifest
    assert man["architecture"]["filters"] == 16 and man["architecture"]["layer_filters"] == [8] * 4
    assert {t["encoding"] for t in man["tensors"]} == {"dense"}  # no bitmask left to store
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes["blocks.0.conv.weight"] == (8, 1, 3, 3)
    assert shapes["blocks.2.conv.weight"] == (8, 8, 3, 3) and shapes["blocks.2.bn.bias"] == (8,)
    assert shapes["head.weight"] == (5, 8)  # rows stay; columns of removed filters go
    kept = {k: int(v.sum()) for k, v in made["mask"].items()}
    assert man["nonzeros"] == sum(kept.values()) == 8 * 9 + 3 * 8 * 8 * 9 + 5 * 8
    assert result["density"] == pytest.approx(man["nonzeros"] / 7136)  # of the 16-filter Conv4
    # size: 4 bytes per value of the 8-filter network plus header and manifest, no mask bits
    values = sum(v.size for v in model.params.values())
    assert man["payload_bytes"] == 4 * values
    assert result["bytes"] == 8 + len(json.dumps(man, separators=(",", ":")).encode()) + 4 * values
    assert result["bytes"] == export_bytes(tmp_path / "run") == out.stat().st_size
    assert result["dense_fp32_bytes"] == 4 * 7333 and 4 * values / result["dense_fp32_bytes"] < 0.27
    # the same parameter count unstructured needs bitmasks: the structured file is smaller
    make_run(tmp_path / "u", man["nonzeros"] / 7136)
    assert result["bytes"] < export_run(tmp_path / "u", tmp_path / "u.smz")["bytes"]
    assert "compacted to 8/8/8/8 filters" in export_command(tmp_path / "run", tmp_path / "c.smz")


def test_export_refuses_to_compact_a_removed_filter_that_is_still_read(tmp_path):
    """Cutting out a filter whose constant batch-norm output the next layer reads would change
    the network's function: refused, not silently approximated."""
    mask = make_filter_run(tmp_path / "run")["mask"]
    removed = int((~mask["blocks.1.conv.weight"].flatten(1).any(1)).nonzero()[0])
    mask["blocks.2.conv.weight"][0, removed, 1, 1] = True
    save_mask(mask, tmp_path / "run" / "mask.pt")
    with pytest.raises(UserError, match="blocks.2.conv.weight' reads removed filters"):
        export_run(tmp_path / "run", tmp_path / "m.smz")
