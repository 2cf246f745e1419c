"""The cheap ways to a ticket (one-shot, early-bird at the target, gradual magnitude pruning)
and the compute they are charged, in tasks and sparse-aware MACs."""

from __future__ import annotations

import json

import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.experiments.methods.base import ImpPlan
from sparsemeta.experiments.report import write_report
from sparsemeta.experiments.runner import run_experiment
from sparsemeta.foundations.errors import UserError
from sparsemeta.meta.learners import model_spec
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.flops import TaskShape, forward_macs, train_task_macs
from sparsemeta.sparsity.masks import load_mask
from sparsemeta.sparsity.prune import cubic_counts, top_magnitude_mask
from sparsemeta.training.rundir import RunDir, level_dir
from tests.conftest import make_data

ITERATIONS, META_BATCH = 10, 2
OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8",
             f"train.iterations={ITERATIONS}", f"train.meta_batch={META_BATCH}",
             "train.val_every=5", "train.val_tasks=4", "train.checkpoint_every=5",
             "eval.tasks=6", "data.queries=2", "prune.levels=3", "prune.rate=0.5",
             "prune.targets=[0.5, 0.13]", "gmp.start_fraction=0.2", "gmp.end_fraction=0.6",
             "gmp.every=2", "earlybird.every=1", "earlybird.window=2", "earlybird.epsilon=0.5"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("cheap")
    run_experiment(build_config(overrides=OVERRIDES), root,
                   ["lottery", "oneshot", "ebtarget", "gmp"], [0], ["random"], progress=False,
                   data=make_data())
    return root


def _counts(mask) -> dict[str, int]:  # noqa: ANN001
    return {k: int(m.sum()) for k, m in mask.items()}


def test_targets_map_to_the_nearest_imp_levels_and_only_there_are_other_runs(experiment):
    # rate 0.5: levels 1, 2, 3 keep about 50%, 25%, 12.5% of the weights
    seed = experiment / "seed_0"
    assert sorted(p.name for p in (seed / "level_01").iterdir()) == [
        "eb_target", "gmp", "gmp_ticket", "oneshot", "random", "ticket"]
    assert sorted(p.name for p in (seed / "level_02").iterdir()) == ["ticket"]
    assert "oneshot" in {p.name for p in (seed / "level_03").iterdir()}


def test_oneshot_prunes_the_dense_model_once_to_imps_counts_and_rewinds(experiment):
    dense = RunDir(level_dir(experiment, 0, 0, "ticket"))
    for level in (1, 3):
        ticket = load_mask(level_dir(experiment, 0, level, "ticket") / "mask.pt")
        path = level_dir(experiment, 0, level, "oneshot")
        mask = load_mask(path / "mask.pt")
        assert _counts(mask) == _counts(ticket)
        expected = top_magnitude_mask(dense.trained_weights(), _counts(ticket))
        assert all(torch.equal(mask[k], expected[k]) for k in mask)
        init, theta0 = RunDir(path).weights("init.pt"), dense.weights("init.pt")
        assert all(torch.equal(init[k], theta0[k]) for k in theta0)
    # pruned once from the dense weights, IMP's level 3 pruned three times: not the same mask
    deep = load_mask(level_dir(experiment, 0, 3, "ticket") / "mask.pt")
    once = load_mask(level_dir(experiment, 0, 3, "oneshot") / "mask.pt")
    assert any(not torch.equal(deep[k], once[k]) for k in deep)


def test_early_bird_at_the_target_stops_the_search_when_every_mask_has_settled(experiment):
    search = RunDir(level_dir(experiment, 0, 0, "eb_target_search"))
    result = search.result()
    state = search.checkpoint().hooks
    assert set(state["drawn"]) == {1, 3}
    assert result.iterations_run == max(state["drawn_at"].values()) < ITERATIONS
    for level in (1, 3):
        mask = load_mask(level_dir(experiment, 0, level, "eb_target") / "mask.pt")
        assert all(torch.equal(mask[k], state["drawn"][level][k]) for k in mask)


def test_gradual_pruning_shrinks_on_the_cubic_schedule_and_ends_at_imps_counts(experiment):
    path = level_dir(experiment, 0, 3, "gmp")
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    moves = [(m["iteration"], m["density"]) for m in lines if m["split"] == "mask"]
    assert [it for it, _ in moves] == [2, 4, 6]  # start 0.2·10, every 2, end 0.6·10
    assert all(a[1] > b[1] for a, b in zip(moves, moves[1:]))
    ticket = _counts(load_mask(level_dir(experiment, 0, 3, "ticket") / "mask.pt"))
    final = load_mask(path / "mask.pt")
    assert _counts(final) == ticket
    result = RunDir(path).result()
    assert result.best_iteration >= 6  # chosen only at the target density
    gt = level_dir(experiment, 0, 3, "gmp_ticket")
    assert all(torch.equal(final[k], m) for k, m in load_mask(gt / "mask.pt").items())
    # one step: the schedule halfway keeps final + (total − final)/8
    assert cubic_counts({"w": 1000}, {"w": 200}, 0.5) == {"w": 300}


def test_every_run_records_its_macs_at_its_densities(experiment):
    cfg = build_config(overrides=OVERRIDES)
    model = build_model(model_spec(cfg, 1))
    sizes = {k: p.numel() for k, p in model.named_parameters() if k in model.positions}
    shape = TaskShape(support=5, query=10, inner_steps=1)
    path = level_dir(experiment, 0, 3, "ticket")
    kept = _counts(load_mask(path / "mask.pt"))
    macs = RunDir(path).result().macs
    per_task = train_task_macs(forward_macs(model.positions, kept), shape)
    assert macs["train"] == ITERATIONS * META_BATCH * per_task
    assert macs["train_dense"] == ITERATIONS * META_BATCH * train_task_macs(
        forward_macs(model.positions, sizes), shape)
    assert macs["eval"] > 0 and macs["eval"] < macs["eval_dense"]
    # gradual pruning pays for its denser start: between the target's cost and dense cost
    gmp = RunDir(level_dir(experiment, 0, 3, "gmp")).result().macs
    assert macs["train"] < gmp["train"] < macs["train_dense"] == gmp["train_dense"]


def test_report_charges_each_model_its_derivation_relative_to_imp(experiment):
    rows = {(r["method"], r["level"]): r for r in write_report([experiment])["rows"]}
    runs = {(r["method"], r["level"]): r for r in write_report([experiment])["runs"]}
    imp3 = sum(runs[("ticket", lv)]["train_macs"] for lv in range(4))
    assert rows[("ticket", 3)]["flops_vs_imp"] == pytest.approx(1.0)
    one = runs[("oneshot", 3)]
    assert one["compute_macs"] == one["train_macs"] + runs[("ticket", 0)]["train_macs"]
    assert rows[("oneshot", 3)]["flops_vs_imp"] == pytest.approx(one["compute_macs"] / imp3)
    gt = runs[("gmp_ticket", 3)]
    assert gt["compute_macs"] == gt["train_macs"] + runs[("gmp", 3)]["train_macs"]
    assert rows[("gmp", 3)]["tasks_vs_imp"] == pytest.approx(1 / 4)
    assert rows[("random", 1)]["diff_vs_ticket"] == pytest.approx(
        rows[("random", 1)]["accuracy"] - rows[("ticket", 1)]["accuracy"])
    md = (experiment / "report.md").read_text()
    assert "Δ vs IMP ticket" in md and (experiment / "pareto_flops.png").exists()


def test_a_target_below_the_last_level_is_refused_naming_the_key():
    cfg = build_config(overrides=[*OVERRIDES, "prune.targets=[0.05]"])
    with pytest.raises(UserError, match=r"prune.targets has 0.05.*raise prune.levels"):
        ImpPlan.of(cfg, 1)
