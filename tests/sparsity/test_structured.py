"""Structured tickets (``prune.structure=filters``): whole filters removed, exactly, for good."""

from __future__ import annotations

import json

import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.experiments.export import export_bytes, export_run
from sparsemeta.experiments.report import write_report
from sparsemeta.experiments.runner import run_experiment, run_lottery
from sparsemeta.foundations.errors import UserError
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.learners import model_spec
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.masks import load_mask
from sparsemeta.sparsity.prune import kept_filters
from sparsemeta.training.rundir import level_dir
from sparsemeta_edge import smz
from tests.conftest import make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=4",
             "train.meta_batch=2", "train.val_every=2", "train.val_tasks=4",
             "train.checkpoint_every=1", "eval.tasks=6", "data.queries=2", "prune.levels=2",
             "prune.rate=0.5", "prune.structure=filters", "prune.rewind=step:2"]
BRANCHES = ("ticket", "reinit", "random")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    run_lottery(build_config(overrides=OVERRIDES), root, [0], ["reinit", "random"],
                progress=False, data=make_data())
    return root


def _state(path):
    obj = torch.load(path, weights_only=False)
    return obj.get("model", obj)


def test_each_level_keeps_the_exact_filter_counts_and_controls_match(experiment):
    for level, filters in ((1, 4), (2, 2)):
        masks = {b: load_mask(level_dir(experiment, 0, level, b) / "mask.pt") for b in BRANCHES}
        keep = {b: kept_filters(m) for b, m in masks.items()}
        for b in BRANCHES:
            assert [int(k.sum()) for k in keep[b].values()] == [filters] * 4, (b, level)
        assert all(torch.equal(masks["ticket"][k], masks["reinit"][k]) for k in masks["ticket"])
        assert any(not torch.equal(keep["random"][k], keep["ticket"][k]) for k in keep["ticket"])
    one = kept_filters(load_mask(level_dir(experiment, 0, 1) / "mask.pt"))
    two = kept_filters(load_mask(level_dir(experiment, 0, 2) / "mask.pt"))
    assert all(not (two[k] & ~one[k]).any() for k in one)  # level 2 prunes within level 1


def test_removed_filters_stay_removed_and_output_exactly_zero_through_training(experiment):
    """Weights, bias, batch norm and Adam moments of a removed filter are exactly zero after
    meta-training (the rewind point had them non-zero), and so is its output, before and
    after adaptation."""
    cfg = build_config(overrides=OVERRIDES)
    data = make_data()
    step2 = _state(level_dir(experiment, 0, 0) / "step_2.pt")
    for branch in BRANCHES:
        run = level_dir(experiment, 0, 2, branch)
        mask = load_mask(run / "mask.pt")
        ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
        state, names = ckpt["model"], list(ckpt["model"])
        for layer, keep in kept_filters(mask).items():
            prefix = layer[: -len("conv.weight")]
            for key in ("conv.weight", "conv.bias", "bn.weight", "bn.bias"):
                assert torch.count_nonzero(state[prefix + key][~keep]) == 0, (branch, key)
                assert torch.count_nonzero(state[prefix + key][keep]) > 0, (branch, key)
                adam = ckpt["optimizer"]["state"][names.index(prefix + key)]
                assert torch.count_nonzero(adam["exp_avg"][~keep]) == 0, (branch, key)
        if branch != "reinit":  # started from step 2, where removed filters had a β ≠ 0
            keep = kept_filters(mask)["blocks.0.conv.weight"]
            assert torch.count_nonzero(step2["blocks.0.bn.bias"][~keep]) > 0

        model = build_model(model_spec(cfg, data.channels))
        model.load_state_dict(state)
        learner = MetaLearner(model, inner_lr=cfg.meta.inner_lr, inner_steps=1, mask=mask)
        outputs: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, i, o, seen=outputs: seen.append(o))
                 for b in model.blocks]
        x = torch.randn(10, 1, 16, 16)
        params = dict(model.named_parameters())
        task_y = torch.arange(10) % 5
        fast = params
        for _ in range(3):  # the block outputs, before and after two masked SGD steps
            outputs.clear()
            logits = learner.logits(fast, x)
            for out, keep in zip(outputs, kept_filters(mask).values()):
                assert torch.count_nonzero(out[:, ~keep]) == 0, branch
                assert torch.count_nonzero(out[:, keep]) > 0, branch
            loss = torch.nn.functional.cross_entropy(logits, task_y)
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {k: v - 0.4 * g for (k, v), g in zip(fast.items(), grads)}
        for h in hooks:
            h.remove()


def test_exports_compact_to_the_kept_filters_and_report_has_bytes(experiment, tmp_path):
    sizes = {}
    for level, filters in ((0, 8), (1, 4), (2, 2)):
        run = level_dir(experiment, 0, level)
        result = export_run(run, tmp_path / f"l{level}.smz")
        model = smz.load(tmp_path / f"l{level}.smz")
        assert list(model.manifest.architecture.layer_filters) == [filters] * 4
        assert all(m.all() for m in model.masks.values())  # a dense, smaller network
        assert result["compacted"] == (level > 0)
        assert result["bytes"] == export_bytes(run) == (tmp_path / f"l{level}.smz").stat().st_size
        sizes[level] = result["bytes"]
    assert sizes[0] > sizes[1] > sizes[2]

    summary = write_report([experiment], out=tmp_path / "report")
    rows = {(r["method"], r["level"]): r for r in summary["rows"]}
    for level in (0, 1, 2):
        assert rows[("ticket", level)]["exported_bytes"] == sizes[level]
    # the controls have the ticket's filter counts, so the same compact size up to the manifest
    assert rows[("random", 2)]["exported_bytes"] == pytest.approx(sizes[2], abs=16)
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved["rows"][0]["exported_bytes"] == summary["rows"][0]["exported_bytes"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "ticket exported bytes" in md.splitlines()[2]
    assert all(f"{sizes[level]:,}" in md for level in sizes)
    png = tmp_path / "report" / "accuracy_vs_bytes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "accuracy_vs_bytes.png" in md


def test_filters_refuse_what_has_no_structured_form(tmp_path):
    with pytest.raises(UserError, match="prune.structure must be one of unstructured, filters"):
        build_config(overrides=["prune.structure=channels"])
    with pytest.raises(UserError, match="prune.scope=global needs prune.structure=unstructured"):
        build_config(overrides=OVERRIDES + ["prune.scope=global"])
    with pytest.raises(UserError, match="--method l1 needs prune.structure=unstructured"):
        run_experiment(build_config(overrides=OVERRIDES), tmp_path / "x", ["lottery", "l1"], [0],
                       [], progress=False, data=make_data())
    assert not (tmp_path / "x").exists()  # refused before anything was written



def test_random_method_removes_random_filters_at_imp_counts(tmp_path):
    run_experiment(build_config(overrides=OVERRIDES), tmp_path, ["random"], [0], [],
                   progress=False, data=make_data())
    for level, filters in ((1, 4), (2, 2)):
        run = level_dir(tmp_path, 0, level, "random")
        keep = kept_filters(load_mask(run / "mask.pt"))
        assert [int(k.sum()) for k in keep.values()] == [filters] * 4
        state = _state(run / "checkpoint.pt")
        for layer, k in keep.items():
            assert torch.count_nonzero(state[layer.replace("conv.weight", "bn.weight")][~k]) == 0
