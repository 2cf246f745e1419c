"""The method registry and the run-directory contract, seen from outside: a new method added
through the registry alone runs, reports and tunes; a run's exported model is the model its
``eval.json`` scored."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from sparsemeta.cli import main
from sparsemeta.config import build_config
from sparsemeta.data.tasks import sampler_for
from sparsemeta.experiments import methods
from sparsemeta.experiments.export import export_run, torch_learner
from sparsemeta.experiments.methods.base import Branch, Method, SeedRun
from sparsemeta.experiments.methods.rigl import RigLHooks
from sparsemeta.experiments.report import write_report
from sparsemeta.experiments.runner import parse_methods, planned_runs, run_experiment
from sparsemeta.meta.engine import Engine
from sparsemeta.sparsity.masks import load_mask
from sparsemeta.sparsity.prune import magnitude_prune
from sparsemeta.training import loop, rundir
from sparsemeta.training.evaluate import evaluate
from sparsemeta.training.loop import train_config as train
from sparsemeta.training.rundir import RunDir, level_dir
from sparsemeta_edge import smz
from tests.conftest import make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=4",
             "train.meta_batch=2", "train.val_every=2", "train.val_tasks=4", "eval.tasks=6",
             "data.queries=2", "prune.levels=2"]


def _magnitude_at_init(s: SeedRun) -> None:
    """A toy method: prune θ₀ by magnitude to every level's density, train from θ₀."""
    theta0 = s.theta0()
    mask = s.full
    for level in range(1, s.levels + 1):
        mask = magnitude_prune(theta0, mask, s.cfg.prune.rate, "layerwise", 0.5)
        s.run(f"{s.label(level)} toy", s.dir(level, "toy"), init=theta0, mask=mask)


TOY = Method(name="toy", help="magnitude pruning at initialisation",
             branches=(Branch("toy", "tab:olive"),), run=_magnitude_at_init,
             plan=lambda cfg, controls: cfg.prune.num_levels(), score_branch="toy")


@pytest.fixture
def toy():
    methods.register(TOY)
    yield TOY
    methods.unregister(TOY.name)


def test_a_method_added_through_the_registry_alone_runs_reports_and_tunes(toy, tmp_path, capsys):
    cfg = build_config(overrides=OVERRIDES)
    assert parse_methods("toy,lottery") == ["toy", "lottery"]
    assert planned_runs(cfg, ["toy"], []) == 2
    root = run_experiment(cfg, tmp_path / "exp", ["toy"], [0], [], progress=False,
                          data=make_data())
    for level in (1, 2):
        assert RunDir(level_dir(root, 0, level, "toy")).finished
    rows = {(r["method"], r["level"]): r for r in write_report([root])["rows"]}
    assert set(rows) == {("toy", 1), ("toy", 2)}
    assert rows[("toy", 2)]["density"] == pytest.approx(0.8 ** 2, abs=0.01)
    assert rows[("toy", 1)]["compute_tasks"] == 4 * 2  # its own run only: no prior branch
    # tune knows it too (scored on its branch, validation only)
    out = tmp_path / "study"
    assert main(["tune", *sum((["--set", o] for o in OVERRIDES[:-1] if "image_size" not in o), []),
                 "--set", "prune.levels=1", "--method", "toy", "--trials", "1",
                 "--out", str(out)]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["method"] == "toy" and best["density"] == pytest.approx(0.8, abs=0.01)
    assert set(best["best_params"]) == {"inner_lr", "meta_lr"}


def test_a_method_whose_branch_contradicts_a_registered_one_is_refused():
    clash = dataclasses.replace(TOY, name="clash", branches=(Branch("ticket", "tab:red"),))
    with pytest.raises(ValueError, match="branch 'ticket'"):
        methods.register(clash)
    assert "clash" not in methods.METHODS


def test_rigl_export_is_the_model_eval_json_scored_though_the_mask_moved_later(
        tmp_path, monkeypatch):
    """RigL moves its mask after the best validation: export must pair best.pt with the mask it
    was evaluated with (best_mask.pt), not the final mask.pt."""
    cfg = build_config(overrides=OVERRIDES[:-1] + ["train.iterations=6", "train.val_every=3"])
    data = make_data()
    real = loop.evaluate

    def best_at_three(engine, learner, params, sampler, tasks, steps, progress=False):
        res = real(engine, learner, params, sampler, tasks, steps, progress)
        if sampler.split != "val":
            return res
        fake = 0.9 if not hasattr(best_at_three, "seen") else 0.1  # the first validation wins
        best_at_three.seen = True
        return dataclasses.replace(res, accuracy=fake)

    monkeypatch.setattr(loop, "evaluate", best_at_three)
    shapes = {k: v.shape for k, v in make_model_params(cfg, data).items()}
    mask = {k: torch.rand(s, generator=torch.Generator().manual_seed(1)) < 0.5
            for k, s in shapes.items()}
    result = train(cfg, tmp_path / "run", data=data, mask=mask, progress=False,
                   hooks=RigLHooks(0.3, every=1, end=100))
    run = RunDir(tmp_path / "run")
    assert result.best_iteration == 3
    best_mask, final_mask = load_mask(run.file(rundir.BEST_MASK)), load_mask(run.file(rundir.MASK))
    assert any(not torch.equal(best_mask[k], final_mask[k]) for k in best_mask)

    export_run(run.path, tmp_path / "m.smz")
    model = smz.load(tmp_path / "m.smz")
    for k, m in best_mask.items():
        np.testing.assert_array_equal(model.masks[k], m.numpy())
    learner = torch_learner(model)
    ev = real(Engine(), learner, dict(learner.model.named_parameters()),
              sampler_for(cfg.task_spec(), data, "test"), cfg.eval.tasks,
              cfg.meta.eval_inner_steps)
    assert ev.accuracy == pytest.approx(result.evaluation.accuracy, abs=1e-12)
    assert [r["accuracy"] for r in ev.per_step] == pytest.approx(
        [r["accuracy"] for r in result.evaluation.per_step], abs=1e-12)


def make_model_params(cfg, data) -> dict[str, torch.Tensor]:
    from sparsemeta.meta.learners import model_spec
    from sparsemeta.models.conv4 import build_model
    from sparsemeta.sparsity.masks import prunable_names

    params = dict(build_model(model_spec(cfg, data.channels)).named_parameters())
    return {k: params[k] for k in prunable_names(params)}


def test_evaluate_is_what_the_loop_uses():
    """The RigL test above replaces the loop's evaluate; it must be the training one."""
    assert loop.evaluate is evaluate
