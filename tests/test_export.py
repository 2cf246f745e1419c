"""``.smz`` export: size bound, exact round trip, checksum, fp16, learned inner rates, per-step
batch norm, and the experiment's level choice."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsemeta.config import build_config
from sparsemeta.experiments.export import (
    choose_level,
    export_bytes,
    export_command,
    export_experiment,
    export_run,
)
from sparsemeta.experiments.onnx import export_onnx
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import write_json
from sparsemeta.meta.learners import build_learner, model_spec
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.masks import prunable_names, save_mask
from sparsemeta.sparsity.prune import random_filter_mask
from sparsemeta.training.rundir import Evaluation, RunDir, RunResult
from sparsemeta_edge import smz
from sparsemeta_edge.manifest import Architecture

OVERRIDES = ["device=cpu", "data.image_size=28", "model.filters=16", "meta.bn=support",
             "meta.inner_lr=0.3", "meta.eval_inner_steps=5"]


#: learners beyond plain MAML, as the trainer builds them (``train.build_learner``)
METASGD = ["meta.algorithm=metasgd"]
LSLR_PER_STEP_BN = ["meta.algorithm=mamlpp", "mamlpp.lslr=true", "mamlpp.per_step_bn=true",
                    "meta.inner_steps=2", "meta.eval_inner_steps=3"]
RUNNING = ["meta.algorithm=mamlpp", "meta.bn=running", "mamlpp.lslr=true",
           "mamlpp.per_step_bn=true", "meta.inner_steps=2", "meta.eval_inner_steps=3"]


def make_run(run: Path, density: float, seed: int = 0, overrides: list[str] | None = None,
             accuracy: float = 0.5, perturb: bool = True, test_accuracy: float | None = None) -> dict:
    """A run directory as ``sparsemeta train`` leaves it (config, best.pt, mask.pt, eval.json),
    with random weights and a random mask at ``density``; pruned weights are left non-zero in
    best.pt, as training may leave them (the mask, not the stored value, defines them).

    ``best.pt`` is the learner's flat state: learned inner rates (``inner_lr.*``), per-step batch
    norm and running statistics where the config has them — those always random (every weight,
    step and slot distinct, so a mix-up of steps or slots shows). The mask covers the prunable
    weights, as the lottery runner's does (never batch norm, per-step or not)."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = build_config(None, OVERRIDES + (overrides or []))
    learned = {k: v for k, v in build_learner(cfg, 1).state_dict().items()
               if k.startswith("inner_lr.")}
    torch.manual_seed(seed)
    model = build_model(model_spec(cfg, 1))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if perturb:  # every tensor non-trivial (Conv4's init zeroes biases)
                p.normal_()
            elif p.dim() == 2 and ".bn." in name:  # per-step batch norm
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                        else 0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():  # running statistics (meta.bn=running)
            b.copy_(0.3 * torch.randn(b.shape, generator=g) if name.endswith("mean")
                    else 0.5 + torch.rand(b.shape, generator=g))
    state = dict(model.state_dict())
    for name, rate in learned.items():
        state[name] = cfg.meta.inner_lr * (0.5 + torch.rand(rate.shape, generator=g))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.save(state, run / "best.pt")
    mask = {}
    if density < 1.0:
        g = torch.Generator().manual_seed(seed + 1)
        params = dict(model.named_parameters())
        mask = {k: torch.rand(params[k].shape, generator=g) < density
                for k in prunable_names(params)}
        save_mask(mask, run / "mask.pt")
    test_accuracy = accuracy if test_accuracy is None else test_accuracy
    rows = [{"step": k, "accuracy": test_accuracy, "ci95": 0.02, "loss": 1.0} for k in range(4)]
    evaluation = Evaluation("test", 10, 3, test_accuracy, 0.02, 3, rows)
    RunDir(run).write_result(RunResult(10, 10, 2, 20, 1.0, density, evaluation,
                                       val_accuracy=accuracy, val_ci95=0.02, best_iteration=10))
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
    loaded = smz.load(tmp_path / "m.smz")
    m = loaded.manifest
    assert m.architecture == Architecture(in_channels=1, image_size=28, filters=16,
                                          layer_filters=(16,) * 4, downsample="maxpool", ways=5)
    # the config's names: meta.inner_steps (meta-training, 1) and meta.eval_inner_steps (5)
    assert (m.bn, m.inner_lr, m.inner_steps, m.eval_inner_steps, m.algorithm) == (
        "support", 0.3, 1, 5, "maml")
    assert m.input.size == 28 and m.input.channels == 1
    assert m.input.mean == (0.0,) and m.input.std == (1.0,)  # glyphs: x / 255
    assert len(loaded.checksum) == 64 and m.density == pytest.approx(0.3, abs=0.02)


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
        return sum(t.values[1] for t in m.tensors if len(t.shape) >= 2)

    assert value_bytes(tmp_path / "b.smz") * 2 == value_bytes(tmp_path / "a.smz")
    # stored deflated (version 4): float32's exponent bytes compress a little better than
    # float16's, so the file saves a little less than half of the decoded value bytes
    assert r32["bytes"] - r16["bytes"] > 0.4 * value_bytes(tmp_path / "a.smz")
    m16 = smz.load(tmp_path / "b.smz")
    assert m16.manifest.values_dtype == "float16"
    for k, v in made["state"].items():
        expect = (v * made["mask"][k]).numpy() if k in made["mask"] else v.numpy()
        tol = 1e-3 if k in made["mask"] else 0.0  # biases and batch norm stay fp32
        np.testing.assert_allclose(m16.params[k], expect, rtol=tol, atol=tol * 1e-2)


def test_experiment_export_picks_sparsest_level_within_dense_ci_on_validation(tmp_path):
    exp = tmp_path / "exp"
    accs = {0: 0.80, 1: 0.81, 2: 0.785, 3: 0.76}  # dense CI ±0.02: levels 1 and 2 qualify
    # test accuracies that would pick level 3 if the choice looked at test (it must not)
    tests = {0: 0.80, 1: 0.70, 2: 0.70, 3: 0.85}
    for level, acc in accs.items():
        make_run(exp / "seed_0" / f"level_{level:02d}" / "ticket", 0.8 ** level, seed=level,
                 accuracy=acc, test_accuracy=tests[level])
    rows = [{"method": "ticket", "level": lv, "density": 0.8 ** lv, "accuracy": a, "ci95": 0.02}
            for lv, a in accs.items()]
    rows.append({"method": "random", "level": 3, "density": 0.5, "accuracy": 0.9, "ci95": 0.02})
    write_json(exp / "summary.json", {"rows": rows})
    assert choose_level(rows[:4])[0] == 2

    result = export_experiment(exp, tmp_path / "t.smz")
    assert result["level"] == 2 and "level 2" in result["choice"]
    assert "on validation" in result["choice"]
    assert smz.load(tmp_path / "t.smz").manifest.source.run.endswith("level_02/ticket")
    assert export_experiment(exp, tmp_path / "t3.smz", level=3)["level"] == 3

    (exp / "summary.json").unlink()  # the choice reads the runs' eval.json files alone
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


def test_a_best_pt_that_does_not_fit_its_config_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    made = make_run(run, 1.0, overrides=METASGD)
    state = {k: v for k, v in made["state"].items() if k != "inner_lr.head.bias"}
    torch.save(state, run / "best.pt")
    with pytest.raises(UserError, match=r"best.pt' does not fit the model its config.yaml "
                                        r"describes \(inner_lr.head.bias: missing") as err:
        export_run(run, tmp_path / "m.smz")
    assert "\n" not in str(err.value)
    make_run(run, 1.0, overrides=["meta.bn=running"])
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("running", "support"))
    with pytest.raises(UserError, match=r"does not fit the model .*running_mean"):
        export_run(run, tmp_path / "m.smz")
    make_run(run, 1.0)  # a width the weights do not have: refused, not exported (as before)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(
        "filters: 16", "filters: 32"))
    for export in (export_run, export_onnx):
        with pytest.raises(UserError, match=r"does not fit the model .*\(blocks.0.conv.weight"):
            export(run, tmp_path / "m.out")


# -- learned inner rates and per-step batch norm ---------------------------------------------
def _kept_bits(state: dict, mask: dict) -> tuple[int, int, int]:
    """(mask bits, kept weights, other values) of a model's conv and linear weights vs the rest."""
    weights = [k for k in state if not k.startswith("inner_lr.") and state[k].dim() >= 2
               and ".bn." not in k]
    kept = sum(int(mask[k].sum()) if k in mask else state[k].numel() for k in weights)
    bits = sum(state[k].numel() for k in weights)
    return bits, kept, sum(v.numel() for k, v in state.items()
                           if k not in weights and not k.startswith("inner_lr."))


@pytest.mark.parametrize("fp16", [False, True])
def test_metasgd_alpha_is_stored_for_kept_weights_only(tmp_path, fp16):
    """α travels packed under its weight's bitmask: kept entries only, in the weight's dtype; a
    pruned weight's α is not in the file. The bound counts 32 more bits per kept weight."""
    made = make_run(tmp_path / "run", 0.25, overrides=METASGD)
    state, mask = made["state"], made["mask"]
    result = export_run(tmp_path / "run", tmp_path / "m.smz", fp16=fp16)
    model = smz.load(tmp_path / "m.smz")
    man = model.manifest
    assert (man.algorithm, man.lr_rule, man.version) == ("metasgd", "metasgd", smz.FORMAT_VERSION)
    width = 2 if fp16 else 4
    for t in man.tensors:
        name, shape = t.name, t.shape
        alpha = state[f"inner_lr.{name}"]
        kept = int(mask[name].sum()) if t.encoding == "sparse" else alpha.numel()
        small = name not in mask or ".bn." in name
        assert t.inner_lr[1] == kept * (4 if small else width), name  # no α of pruned weights
        expect = (alpha * mask[name] if name in mask else alpha).numpy()
        if fp16 and not small:
            np.testing.assert_allclose(model.rates[name], expect, rtol=1e-3)
        else:
            np.testing.assert_array_equal(model.rates[name], expect)
        assert model.rates[name].shape == shape
    # size: mask bits + 32 bits per kept weight for θ and again for α, small tensors likewise
    bits, kept, small = _kept_bits(state, mask)
    bound = (bits + 2 * 32 * kept + 2 * 32 * small) / 8 + 4096
    assert result["bytes"] == (tmp_path / "m.smz").stat().st_size <= bound
    assert result["bytes"] <= smz.size_bound(model) <= bound
    values = sum(t.values[1] for t in man.tensors)
    assert sum(t.inner_lr[1] for t in man.tensors) == values  # α costs what θ costs
    assert result["dense_fp32_bytes"] == 4 * sum(v.numel() for v in state.values())
    assert result["bytes"] - man.payload_bytes <= 4096  # header and manifest: the slack


def test_lslr_per_step_and_running_batch_norm_round_trip_exactly(tmp_path):
    """MAML++'s per-layer-per-step rates, per-step BN weights and biases (steps, C) and per-step
    running statistics arrive bit-exact, with the manifest saying how to use them."""
    made = make_run(tmp_path / "run", 0.3, overrides=RUNNING)
    state, mask = made["state"], made["mask"]
    export_run(tmp_path / "run", tmp_path / "m.smz")
    model = smz.load(tmp_path / "m.smz")
    man = model.manifest
    assert (man.algorithm, man.lr_rule, man.bn, man.bn_steps) == ("mamlpp", "lslr", "running", 3)
    # version 5 names the steps as the config does: meta.inner_steps, meta.eval_inner_steps
    assert (man.inner_steps, man.eval_inner_steps, man.version) == (2, 3, smz.FORMAT_VERSION)
    assert list(model.params) == [k for k in state if not k.startswith("inner_lr.")]
    for k, v in state.items():
        if k.startswith("inner_lr."):
            assert v.shape == (3,)  # max(inner_steps, eval_inner_steps) rates per tensor
            np.testing.assert_array_equal(model.rates[k[len("inner_lr."):]], v.numpy())
        else:
            np.testing.assert_array_equal(model.params[k], (v * mask[k] if k in mask else v).numpy())
    assert model.params["blocks.2.bn.running_var"].shape == (3, 16)
    assert "blocks.2.bn.running_var" not in model.masks  # statistics are never pruned
    assert "blocks.1.bn.weight" not in mask and "blocks.1.bn.weight" not in model.masks
    bits, kept, _ = _kept_bits(state, mask)
    assert man.nonzeros == kept and man.prunable == bits
    assert (tmp_path / "m.smz").stat().st_size <= smz.size_bound(model)
    plain = make_run(tmp_path / "plain", 0.3)
    export_run(tmp_path / "plain", tmp_path / "p.smz")
    assert smz.load(tmp_path / "p.smz").manifest.version == 5  # every file is written as 5
    assert not plain["state"].keys() - smz.load(tmp_path / "p.smz").params.keys()
    text = export_command(tmp_path / "run", tmp_path / "c.smz")
    assert "adaptation: mamlpp, learned rates per layer and step, batch norm 'running', " \
           "per-step batch norm (3 slots)" in text


def test_newer_format_versions_are_refused_with_what_to_do(tmp_path):
    make_run(tmp_path / "run", 0.5)
    export_run(tmp_path / "run", tmp_path / "m.smz")
    raw = (tmp_path / "m.smz").read_bytes()
    assert raw[:4] == smz.MAGIC_V5
    typed, payload, _ = smz.read_manifest(raw)
    manifest = typed.to_dict()
    manifest["version"] = smz.FORMAT_VERSION + 1
    text = json.dumps(manifest).encode()
    table = struct.pack("<BII", smz.DEFLATE, len(packed := smz._deflate(text)), len(text))
    table += struct.pack("<BII", smz.RAW, len(payload), len(payload))
    body = smz.MAGIC_V5 + b"\x02" + table + packed + bytes(payload)
    with pytest.raises(smz.SmzError, match=f"version {smz.FORMAT_VERSION + 1}; .* update sparsemeta-edge"):
        smz.decode(body + hashlib.sha256(body).digest())
    with pytest.raises(smz.SmzError, match="newer container .* update sparsemeta-edge"):
        smz.decode(b"SMZ\x06" + raw[4:])


def make_filter_run(run: Path, keep_fraction: float = 0.5, seed: int = 0,
                    overrides: list[str] | None = None) -> dict:
    """A filter-pruned run (``prune.structure=filters``): ``make_run``'s random, non-trivial
    weights — removed filters' bias and batch norm too, so their batch-norm output is a non-zero
    constant — with ``keep_fraction`` of each conv layer's filters kept at random."""
    made = make_run(run, 1.0, seed=seed, overrides=["prune.structure=filters", *(overrides or [])])
    g = torch.Generator().manual_seed(seed + 7)
    shapes = {k: v.shape for k, v in made["state"].items()  # the parameters, as the runner
              if v.dim() >= 2 and not k.startswith("inner_lr.") and "running" not in k}
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
    assert man.architecture.filters == 16 and man.architecture.layer_filters == (8,) * 4
    assert {t.encoding for t in man.tensors} == {"dense"}  # no bitmask left to store
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes["blocks.0.conv.weight"] == (8, 1, 3, 3)
    assert shapes["blocks.2.conv.weight"] == (8, 8, 3, 3) and shapes["blocks.2.bn.bias"] == (8,)
    assert shapes["head.weight"] == (5, 8)  # rows stay; columns of removed filters go
    kept = {k: int(v.sum()) for k, v in made["mask"].items()}
    assert man.nonzeros == sum(kept.values()) == 8 * 9 + 3 * 8 * 8 * 9 + 5 * 8
    assert result["density"] == pytest.approx(man.nonzeros / 7136)  # of the 16-filter Conv4
    # size: 4 bytes per value of the 8-filter network plus header and manifest, no mask bits
    values = sum(v.size for v in model.params.values())
    assert man.payload_bytes == 4 * values
    assert not any(t.mask is not None for t in man.tensors)
    text = json.dumps(man.to_dict(), separators=(",", ":")).encode()  # stored deflated
    assert result["bytes"] <= 5 + 9 * 2 + len(smz._deflate(text)) + 4 * values + smz.TRAILER_BYTES
    assert result["bytes"] == export_bytes(tmp_path / "run") == out.stat().st_size
    assert result["dense_fp32_bytes"] == 4 * 7333 and 4 * values / result["dense_fp32_bytes"] < 0.27
    # the same parameter count unstructured needs bitmasks: the structured file is smaller
    make_run(tmp_path / "u", man.nonzeros / 7136)
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
