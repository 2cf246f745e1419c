"""The method registry and the run-directory contract, seen from outside: a new method added
through the registry alone runs, reports and tunes; a run's exported model is the model its
``eval.json`` scored."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsemeta.cli import main
from sparsemeta.config import build_config, config_from_dict
from sparsemeta.data.tasks import sampler_for
from sparsemeta.experiments import methods
from sparsemeta.experiments.export import export_run, torch_learner
from sparsemeta.experiments.methods.base import Branch
from sparsemeta.experiments.methods.rigl import RigLHooks
from sparsemeta.experiments.report import write_report
from sparsemeta.experiments.runner import parse_methods, planned_runs, run_experiment
from sparsemeta.foundations.errors import UserError
from sparsemeta.meta.engine import Engine
from sparsemeta.sparsity.masks import load_mask
from sparsemeta.sparsity.prune import MagnitudeRule
from sparsemeta.training import loop, rundir
from sparsemeta.training.evaluate import evaluate
from sparsemeta.training.loop import train_config as train
from sparsemeta.training.rundir import RunDir
from sparsemeta_edge import smz
from tests import toy_method
from tests.conftest import make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=4",
             "train.meta_batch=2", "train.val_every=2", "train.val_tasks=4", "eval.tasks=6",
             "data.queries=2", "prune.levels=2"]


@pytest.fixture
def toy():
    methods.register(toy_method.METHOD)  # the one line that adds a method
    yield toy_method.METHOD
    methods.unregister("toy")


def test_a_method_added_by_one_file_and_one_line_runs_reports_and_tunes_its_own_setting(
        toy, tmp_path, capsys):
    """``tests/toy_method.py`` (settings, tuning range, lifecycle) plus its registration: its
    setting is a config key (--set, validated, listed by ``config keys``), the experiment uses
    it, and ``tune`` searches it — nothing else in the package names the method."""
    cfg = build_config(overrides=[*OVERRIDES, "toy.rate=0.5"])
    assert cfg.section("toy").rate == 0.5 and cfg.to_dict()["toy"] == {"rate": 0.5}
    with pytest.raises(UserError, match=r"toy\.rate must be in \(0, 1\), got 1.5"):
        build_config(overrides=["toy.rate=1.5"])
    assert main(["config", "keys"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "toy.rate" in line]
    assert len(listed) == 1 and "float" in listed[0] and "0.2" in listed[0]
    assert parse_methods("toy,lottery") == ["toy", "lottery"]
    assert planned_runs(cfg, ["toy"], []) == 2
    data = make_data()
    root = run_experiment(cfg, tmp_path / "exp", ["toy"], [0], [], progress=False, data=data)
    rows = {(r["method"], r["level"]): r for r in write_report([root])["rows"]}
    assert set(rows) == {("toy", 1), ("toy", 2)}
    full = make_model_params(cfg, data)
    counts = MagnitudeRule(0.5).counts({k: torch.ones_like(v, dtype=torch.bool)
                                        for k, v in full.items()}, 2)
    for level in (1, 2):  # toy.rate, not prune.rate (0.2), set each level's density
        assert rows[("toy", level)]["density"] == pytest.approx(
            sum(counts[level].values()) / sum(counts[0].values()), abs=1e-9)
    assert rows[("toy", 1)]["compute_tasks"] == 4 * 2  # its own run only: no prior branch
    # tune searches its setting by default (scored on its branch, validation only)
    out = tmp_path / "study"
    assert main(["tune", *sum((["--set", o] for o in OVERRIDES[:-1] if "image_size" not in o), []),
                 "--set", "prune.levels=1", "--method", "toy", "--trials", "1",
                 "--out", str(out)]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["method"] == "toy" and set(best["best_params"]) == {"inner_lr", "meta_lr",
                                                                   "toy_rate"}
    assert 0.1 <= best["best_params"]["toy_rate"] <= 0.5
    trial = config_from_dict(yaml.safe_load(
        (Path(best["best_run_dir"]) / "experiment.yaml").read_text())["config"])
    assert trial.section("toy").rate == best["best_params"]["toy_rate"]


def test_an_unregistered_method_leaves_no_config_key(toy):
    methods.unregister("toy")
    with pytest.raises(UserError, match="unknown config key 'toy'"):
        build_config(overrides=["toy.rate=0.5"])


def test_a_method_whose_branch_contradicts_a_registered_one_is_refused():
    clash = dataclasses.replace(toy_method.METHOD, name="clash",
                                branches=(Branch("ticket", "tab:red"),))
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
