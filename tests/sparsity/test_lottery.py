"""Iterative magnitude pruning end to end on a tiny synthetic data set."""

from __future__ import annotations

import json
from concurrent.futures import Executor, Future

import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.experiments.export import export_run
from sparsemeta.experiments.methods import METHODS
from sparsemeta.experiments.methods.base import ImpPlan, SeedRun
from sparsemeta.experiments.report import write_report
from sparsemeta.experiments.runner import parse_controls, parse_seeds, run_experiment, run_lottery
from sparsemeta.foundations.errors import UserError
from sparsemeta.meta.core import MetaLearner
from sparsemeta.sparsity.masks import density, load_mask
from sparsemeta.training.rundir import level_dir
from sparsemeta.training.setup import prepare
from tests.conftest import TIMINGS, make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=4",
             "train.meta_batch=2", "train.val_every=2", "train.val_tasks=4",
             "train.checkpoint_every=1", "eval.tasks=6", "data.queries=2", "prune.levels=2",
             "prune.rate=0.5"]


def _load(path):
    obj = torch.load(path, weights_only=False)
    return obj.get("model", obj)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("lottery")
    cfg = build_config(overrides=OVERRIDES + ["prune.rewind=step:2"])
    run_lottery(cfg, root, [0], ["reinit", "random"], progress=False, data=make_data())
    return root


def test_every_level_has_ticket_and_controls_at_the_exact_density(experiment):
    for level in (1, 2):
        ticket = load_mask(level_dir(experiment, 0, level) / "mask.pt")
        rand = load_mask(level_dir(experiment, 0, level, "random") / "mask.pt")
        reinit = load_mask(level_dir(experiment, 0, level, "reinit") / "mask.pt")
        assert all(torch.equal(ticket[k], reinit[k]) for k in ticket)
        assert {k: int(m.sum()) for k, m in rand.items()} == {k: int(m.sum()) for k, m in ticket.items()}
        assert any(not torch.equal(rand[k], ticket[k]) for k in ticket)
        hidden = ticket["blocks.0.conv.weight"]
        assert int(hidden.sum()) == round(hidden.numel() * 0.5 ** level)
    d1 = density(load_mask(level_dir(experiment, 0, 1) / "mask.pt"))
    d2 = density(load_mask(level_dir(experiment, 0, 2) / "mask.pt"))
    assert 1.0 > d1 > d2


def test_pruned_weights_and_adam_moments_stay_exactly_zero(experiment):
    run = level_dir(experiment, 0, 2)
    mask = load_mask(run / "mask.pt")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    params = list(ckpt["model"])  # Adam's state is indexed in parameter order
    for name, m in mask.items():
        assert torch.count_nonzero(ckpt["model"][name][~m]) == 0
        assert torch.count_nonzero(ckpt["model"][name][m]) > 0
        state = ckpt["optimizer"]["state"][params.index(name)]
        assert torch.count_nonzero(state["exp_avg"][~m]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][~m]) == 0
        assert torch.count_nonzero(state["exp_avg"][m]) > 0
    best = torch.load(run / "best.pt", weights_only=True)
    assert all(torch.count_nonzero(best[k][~m]) == 0 for k, m in mask.items())


def test_late_rewinding_restores_weights_after_k_iterations_on_survivors(experiment):
    step2 = _load(level_dir(experiment, 0, 0) / "step_2.pt")
    theta0 = _load(level_dir(experiment, 0, 0) / "init.pt")
    for level in (1, 2):
        start = _load(level_dir(experiment, 0, level) / "init.pt")
        assert all(torch.equal(start[k], step2[k]) for k in step2)
        assert not all(torch.equal(start[k], theta0[k]) for k in theta0)
        reinit = _load(level_dir(experiment, 0, level, "reinit") / "init.pt")
        assert not torch.equal(reinit["blocks.0.conv.weight"], start["blocks.0.conv.weight"])


def test_rewind_to_init_restores_theta0_and_none_keeps_trained_weights(tmp_path):
    data = make_data()
    cfg = build_config(overrides=OVERRIDES + ["prune.levels=1"])
    run_lottery(cfg, tmp_path / "init", [0], [], progress=False, data=data)
    theta0 = _load(level_dir(tmp_path / "init", 0, 0) / "init.pt")
    start = _load(level_dir(tmp_path / "init", 0, 1) / "init.pt")
    assert all(torch.equal(start[k], theta0[k]) for k in theta0)
    cfg = build_config(overrides=OVERRIDES + ["prune.levels=1", "prune.rewind=none"])
    run_lottery(cfg, tmp_path / "none", [0], [], progress=False, data=data)
    trained = _load(level_dir(tmp_path / "none", 0, 0) / "checkpoint.pt")
    start = _load(level_dir(tmp_path / "none", 0, 1) / "init.pt")
    assert all(torch.equal(start[k], trained[k]) for k in trained)


def _rows(root):
    """Summary rows without what may differ between two directories: wall time only (the
    export's manifest names seed/level/method, not the path, so exported bytes must agree)."""
    summary = write_report([root])
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in summary["rows"]]


def test_controls_trained_in_a_background_process_give_the_same_summary(tmp_path, experiment):
    """--workers 2 with one seed: the controls train in a spawned process (the data set handed
    to it, not reloaded from the config) beside the IMP chain — and every number is the same
    as one process's, bit for bit."""
    cfg = build_config(overrides=OVERRIDES + ["prune.rewind=step:2"])
    run_experiment(cfg, tmp_path, ["lottery"], [0], ["reinit", "random"], progress=False,
                   data=make_data(), workers=2)
    assert _rows(tmp_path) == _rows(experiment)


def test_per_level_methods_in_background_processes_give_the_same_summary(tmp_path):
    """One-shot, RigL (its hooks pickled to the other process) and random pruning make their
    per-level runs in the background with --workers 2: the same numbers as one process."""
    cfg = build_config(overrides=OVERRIDES + ["rigl.update_every=2"])
    for workers in (1, 2):
        run_experiment(cfg, tmp_path / str(workers), ["oneshot", "rigl", "random"], [0], [],
                       progress=False, data=make_data(), workers=workers)
    rows = _rows(tmp_path / "2")
    assert {r["method"] for r in rows} >= {"oneshot", "rigl", "random"}
    assert rows == _rows(tmp_path / "1")


class HeldPool(Executor):
    """A pool that never starts what it is given: every job stays cancellable."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        self.paths.append(args[1])
        return Future()


def test_controls_go_to_the_pool_and_unstarted_ones_are_trained_here(tmp_path, experiment):
    """The chain never waits for the pool (it trains in this process); the controls are handed
    to the pool in level order, and at the end this process trains those the pool has not
    started — so the experiment completes, equal to the one-process run."""
    cfg, data = build_config(overrides=OVERRIDES + ["prune.rewind=step:2"]), make_data()
    pool, done = HeldPool(), []
    s = SeedRun(prepare(cfg, data), ImpPlan.of(cfg, data.channels), tmp_path, 0, data,
                lambda name, result, seconds: done.append(name), False, ["reinit", "random"],
                pool=pool)
    METHODS["lottery"].run(s)
    assert pool.paths == [str(level_dir(tmp_path, 0, level, branch))
                          for level in (1, 2) for branch in ("reinit", "random")]
    assert not (level_dir(tmp_path, 0, 1, "reinit") / "eval.json").exists()
    assert (level_dir(tmp_path, 0, 2) / "eval.json").exists()  # the chain did not wait
    s.join()
    assert done == ["seed 0 level 0 dense", "seed 0 level 1/2 ticket", "seed 0 level 2/2 ticket",
                    "seed 0 level 1/2 reinit", "seed 0 level 1/2 random",
                    "seed 0 level 2/2 reinit", "seed 0 level 2/2 random"]
    assert _rows(tmp_path) == _rows(experiment)


def test_interrupted_level_resumed_gives_same_summary(tmp_path, monkeypatch, experiment):
    cfg = build_config(overrides=OVERRIDES + ["prune.rewind=step:2"])
    real = MetaLearner.meta_gradient_step
    calls = {"n": 0}

    def crash(self, params, tasks):
        calls["n"] += 1
        if calls["n"] == 11:  # inside level 1's reinit control
            raise RuntimeError("simulated crash")
        return real(self, params, tasks)

    monkeypatch.setattr(MetaLearner, "meta_gradient_step", crash)
    with pytest.raises(RuntimeError):
        run_lottery(cfg, tmp_path, [0], ["reinit", "random"], progress=False, data=make_data())
    assert not (level_dir(tmp_path, 0, 1, "reinit") / "eval.json").exists()
    monkeypatch.setattr(MetaLearner, "meta_gradient_step", real)
    run_lottery(cfg, tmp_path, [0], ["reinit", "random"], progress=False, data=make_data())
    assert _rows(tmp_path) == _rows(experiment)


def test_report_files_contain_the_numbers_of_the_run_directories(experiment, tmp_path):
    """Every summary row against values computed here from the run directories' own files:
    density from mask.pt, accuracy/CI/per-step from eval.json, bytes from an actual export."""
    summary = write_report([experiment])
    saved = json.loads((experiment / "summary.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(summary["rows"]))
    rows = {(r["method"], r["level"]): r for r in saved["rows"]}
    expected_runs = {("ticket", 0), ("ticket", 1), ("ticket", 2), ("reinit", 1), ("reinit", 2),
                     ("random", 1), ("random", 2)}
    assert set(rows) == expected_runs
    md = (experiment / "report.md").read_text()
    for (method, level), row in rows.items():
        run = level_dir(experiment, 0, level, method)
        result = json.loads((run / "eval.json").read_text())
        assert row["seeds"] == 1 and row["ci_over"] == "tasks"
        assert row["accuracy"] == result["accuracy"] and row["ci95"] == result["ci95"]
        assert row["per_step"] == [s["accuracy"] for s in result["per_step"]]
        assert row["early_stop_iteration"] == result["best_iteration"]
        if level == 0:
            assert not (run / "mask.pt").exists() and row["density"] == 1.0
        else:
            mask = torch.load(run / "mask.pt", weights_only=True)
            kept = sum(int(m.sum()) for m in mask.values())
            total = sum(m.numel() for m in mask.values())
            assert row["density"] == kept / total and row["nonzeros"] == kept
            # prune.rate=0.5 per level, the output layer at half the rate
            assert row["density"] == pytest.approx(0.5 ** level, abs=0.06)
        out = tmp_path / f"{method}_{level}.smz"
        export_run(run, out)
        assert row["exported_bytes"] == out.stat().st_size
        assert f"{100 * row['accuracy']:.2f} ± {100 * row['ci95']:.2f}" in md
    sizes = [rows[("ticket", lvl)]["exported_bytes"] for lvl in (0, 1, 2)]
    assert sizes[0] > sizes[1] > sizes[2] and all(f"{n:,}" in md for n in sizes)
    # controls share their level's density exactly (same counts per layer)
    for level in (1, 2):
        assert rows[("ticket", level)]["density"] == rows[("random", level)]["density"] == \
            rows[("reinit", level)]["density"]
    for name in ("accuracy_vs_density.png", "early_stop_vs_density.png", "accuracy_vs_step.png",
                 "accuracy_vs_bytes.png"):
        assert (experiment / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changed_config_is_refused_and_cli_lists_are_validated(experiment):
    cfg = build_config(overrides=OVERRIDES + ["prune.rewind=init"])
    with pytest.raises(UserError, match="prune.rewind: 'step:2' in the run, 'init' now"):
        run_lottery(cfg, experiment, [0], [], progress=False, data=make_data())
    assert parse_controls("reinit,random") == ["reinit", "random"]
    assert parse_controls("none") == []
    with pytest.raises(UserError, match="unknown control 'foo'"):
        parse_controls("foo")
    assert parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(UserError, match="--seeds"):
        parse_seeds("a,b")
