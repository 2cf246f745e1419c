"""Every sparsity method through the one runner, compared at the same densities."""

from __future__ import annotations

import json

import pytest

from sparsemeta.cli import main
from sparsemeta.config import build_config
from sparsemeta.experiments.report import write_report
from sparsemeta.experiments.runner import run_experiment
from sparsemeta.training.rundir import level_dir
from tests.conftest import make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=6",
             "train.meta_batch=2", "train.val_every=3", "train.val_tasks=4",
             "train.checkpoint_every=2", "eval.tasks=6", "data.queries=2", "prune.levels=2",
             "prune.rate=0.5", "l1.finetune_iterations=2", "rigl.update_every=2",
             "rigl.end_fraction=1.0",
             "earlybird.every=1", "earlybird.window=2", "earlybird.epsilon=0.5"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("all")
    cfg = build_config(overrides=OVERRIDES)
    run_experiment(cfg, root, ["lottery", "l1", "rigl", "earlybird"], [0], ["reinit", "random"],
                   progress=False, data=make_data())
    return root


def test_all_methods_are_reported_at_the_same_densities(experiment):
    rows = write_report([experiment])["rows"]
    by = {(r["method"], r["level"]): r for r in rows}
    for level in (1, 2):
        ticket = by[("ticket", level)]["density"]
        for method in ("reinit", "random", "l1", "l1_oneshot", "earlybird"):
            assert by[(method, level)]["density"] == pytest.approx(ticket), method
        assert by[("rigl", level)]["density"] == pytest.approx(ticket, abs=0.002)  # ERK rounding
    assert ("l1", 0) in by and ("ticket", 0) in by
    assert not any(r["method"] == "eb_search" for r in rows)


def test_compute_is_accounted_relative_to_full_imp(experiment):
    rows = {(r["method"], r["level"]): r for r in write_report([experiment])["rows"]}
    assert rows[("ticket", 2)]["compute_vs_full_imp"] == pytest.approx(1.0)
    assert rows[("ticket", 0)]["compute_vs_full_imp"] == pytest.approx(1 / 3)
    assert rows[("rigl", 1)]["compute_vs_full_imp"] == pytest.approx(1 / 3)
    assert rows[("random", 2)]["compute_vs_full_imp"] == pytest.approx(1 / 3)
    # L1: the dense L1 run (6 iterations) + a 2-iteration fine-tune; one-shot: no extra training
    assert rows[("l1", 1)]["compute_tasks"] == (6 + 2) * 2
    assert rows[("l1_oneshot", 1)]["compute_tasks"] == 6 * 2
    # early bird: its search runs stop early, so its tickets cost less than IMP's
    eb = json.loads((level_dir(experiment, 0, 0, "eb_search") / "eval.json").read_text())
    assert eb["iterations_run"] < 6
    assert rows[("earlybird", 2)]["compute_tasks"] < rows[("ticket", 2)]["compute_tasks"]
    md = (experiment / "report.md").read_text()
    assert "FLOPs ×IMP" in md and (experiment / "pareto_flops.png").exists()


def test_rigl_run_keeps_its_density_and_moved_its_mask(experiment):
    from sparsemeta.sparsity.masks import load_mask

    run = level_dir(experiment, 0, 1, "rigl")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    updates = [m for m in metrics if m["split"] == "mask"]
    assert [m["iteration"] for m in updates] == [2, 4]
    assert len({round(m["density"], 9) for m in updates}) == 1
    final = load_mask(run / "mask.pt")
    ckpt_mask = __import__("torch").load(run / "checkpoint.pt", weights_only=False)["mask"]
    assert all(bool((final[k] == ckpt_mask[k]).all()) for k in final)


def test_seeds_in_parallel_workers_equal_sequential_seeds(tmp_path):
    tiny = ["--set", "device=cpu", "--set", "model.filters=8", "--set", "train.iterations=3",
            "--set", "train.meta_batch=2", "--set", "train.val_every=3", "--set",
            "train.val_tasks=4", "--set", "eval.tasks=5", "--set", "data.queries=2"]
    assert main(["run", "--method", "dense", "--seeds", "0,1", *tiny, "--out",
                 str(tmp_path / "seq")]) == 0
    assert main(["run", "--method", "dense", "--seeds", "0,1", "--workers", "2", *tiny,
                 "--out", str(tmp_path / "par")]) == 0
    for seed in (0, 1):
        a = json.loads((level_dir(tmp_path / "seq", seed, 0) / "eval.json").read_text())
        b = json.loads((level_dir(tmp_path / "par", seed, 0) / "eval.json").read_text())
        assert a["per_step"] == b["per_step"]
