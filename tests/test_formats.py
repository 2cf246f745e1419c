"""One type per file format, read back with every field checked: a checkpoint of an older
version loads with its defaults, and a damaged or foreign checkpoint, eval.json or diverged.json
is one line; the chosen model is refused where it does not fit its run's config; an old run
directory resumes; the plan refuses targets it cannot tell apart; sections cannot clash."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
import yaml

from sparsemeta.config import add_section, build_config
from sparsemeta.experiments.methods.base import ImpPlan
from sparsemeta.foundations import runtime
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import atomic_torch_save
from sparsemeta.training import rundir
from sparsemeta.training.loop import Diverged
from sparsemeta.training.loop import train_config as train
from sparsemeta.training.rundir import Best, Checkpoint, ChosenModel, RunDir, RunResult
from tests.conftest import make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=3",
             "train.meta_batch=2", "train.val_every=3", "train.val_tasks=4", "eval.tasks=4",
             "data.queries=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (checkpoint, eval.json, best.pt)."""
    out = tmp_path_factory.mktemp("run")
    train(build_config(overrides=OVERRIDES), out, data=make_data(), progress=False)
    return out


def test_a_checkpoint_from_before_stopped_and_compute_were_saved_loads_with_their_defaults(
        finished, tmp_path):
    saved = torch.load(finished / rundir.CHECKPOINT, weights_only=True)
    for key in ("stopped", "compute"):
        saved.pop(key)
    atomic_torch_save(saved, tmp_path / "old.pt")
    old = Checkpoint.load(tmp_path / "old.pt")
    assert (old.stopped, old.compute, old.iteration) == (False, None, 3)
    assert isinstance(old.best, Best) and old.best.iteration == 3 and old.best.found


@pytest.mark.parametrize("damage", [
    lambda c: c.update(best=[1, 2]), lambda c: c["best"].update(extra=1),
    lambda c: c.pop("model"), lambda c: c.update(iteration="three")])
def test_a_damaged_checkpoint_is_one_line(finished, tmp_path, damage):
    saved = torch.load(finished / rundir.CHECKPOINT, weights_only=True)
    damage(saved)
    atomic_torch_save(saved, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"is not a sparsemeta checkpoint .*restore it") as info:
        Checkpoint.load(tmp_path / "bad.pt")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field, value, why", [
    ("accuracy", "0.9", "accuracy is '0.9', not float"),
    ("steps", True, "steps is True, not int"),
    ("per_step", [], "per_step must hold a row"),
    ("macs", {"train": 1.5}, "macs must map names to integers"),
    ("density", None, "density is None, not float"),
])
def test_every_field_of_eval_json_is_checked_when_it_is_read(finished, tmp_path, field, value,
                                                             why):
    result = json.loads((finished / rundir.EVAL).read_text())
    assert RunResult.load(finished / rundir.EVAL).to_dict() == result  # a good one round-trips
    result[field] = value
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps(result))
    with pytest.raises(UserError, match=f"is damaged .*{why}.*re-run the final evaluation"):
        RunResult.load(bad)


def test_a_chosen_model_that_does_not_fit_its_config_is_refused(finished):
    chosen = RunDir(finished).chosen_model()
    expected = dict(chosen.state)
    chosen.check(expected, finished)  # fits
    wider = {**expected, "head.weight": torch.zeros(5, 99)}
    with pytest.raises(UserError, match=r"best.pt' does not fit .*head.weight: \(5, \d+\) in the "
                                        r"file, \(5, 99\) in the model"):
        chosen.check(wider, finished)
    masked = ChosenModel(chosen.state, {"blocks.9.conv.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(UserError, match="names 'blocks.9.conv.weight'"):
        masked.check(expected, finished)
    shape = tuple(expected["head.weight"].shape)
    floats = ChosenModel(chosen.state, {"head.weight": torch.ones(shape)})
    with pytest.raises(UserError, match="names 'head.weight'"):
        floats.check(expected, finished)


def test_a_damaged_diverged_json_is_one_line_and_a_good_one_is_refused_to_resume(tmp_path):
    cfg = build_config(overrides=OVERRIDES)
    (tmp_path / rundir.DIVERGED).write_text(json.dumps({"iteration": "x"}))
    with pytest.raises(UserError, match=r"diverged.json' is damaged \(.*\); delete it to retry"):
        train(cfg, tmp_path, data=make_data(), progress=False)
    (tmp_path / rundir.DIVERGED).write_text(json.dumps(
        {"iteration": 2, "what": "the outer loss is nan", "loss": "nan", "meta_lr": 0.001,
         "inner_lr": 0.4, "last_checkpoint": 0}))
    with pytest.raises(Diverged, match="diverged at iteration 2: the outer loss is nan.*is not "
                                       "resumed"):
        train(cfg, tmp_path, data=make_data(), progress=False)


def test_a_run_directory_saved_with_the_old_engine_keys_resumes(finished, tmp_path):
    """``config.yaml`` written before train.core (train.vmap/train.grouped) binds to today's
    config of the same run, and a different one is still refused."""
    saved = yaml.safe_load((finished / rundir.CONFIG).read_text())
    saved["train"].pop("core")
    saved["train"].update({"vmap": False, "grouped": None})
    (tmp_path / rundir.CONFIG).write_text(yaml.safe_dump(saved))
    rundir.bind_config(tmp_path, build_config(overrides=OVERRIDES))
    with pytest.raises(UserError, match=r"different config \(train.core: 'auto' in the run, "
                                        r"'grouped' now\)"):
        rundir.bind_config(tmp_path, build_config(overrides=[*OVERRIDES,
                                                             "train.core=grouped"]))


@pytest.mark.parametrize("targets, levels, fragment", [
    ("[0.8, 0.79]", 3, "prune.targets 0.8 and 0.79 both map to IMP level 1"),
    ("[0.5, 0.5]", 3, "prune.targets has 0.5 twice"),
    ("[0.5]", 0, "prune.targets needs pruning levels to map to; prune.levels is 0"),
])
def test_targets_the_plan_cannot_tell_apart_are_refused(targets, levels, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        cfg = build_config(overrides=[*OVERRIDES, f"prune.targets={targets}",
                                      f"prune.levels={levels}"])
        ImpPlan.of(cfg, 1)


def test_the_plan_maps_each_target_to_its_nearest_level_once():
    cfg = build_config(overrides=[*OVERRIDES, "prune.targets=[0.5, 0.2]", "prune.levels=8"])
    plan = ImpPlan.of(cfg, 1)
    density = [sum(c.values()) / sum(plan.counts[0].values()) for c in plan.counts]
    assert plan.targets == [min(range(1, 9), key=lambda lv: abs(density[lv] - t))
                            for t in (0.5, 0.2)] == [3, 7]


def test_a_section_cannot_take_a_core_key_or_be_anything_but_a_dataclass():
    @dataclass
    class Clash:
        x: int = 1

    with pytest.raises(ValueError, match="clashes with a core key"):
        add_section("train", Clash)
    with pytest.raises(ValueError, match="not a dataclass"):
        add_section("other", dict)
    assert dataclasses.is_dataclass(Clash)


def test_a_run_records_its_cpu_time_beside_its_wall_time(finished):
    """The process's CPU seconds while it trained (all its threads), in eval.json and the
    checkpoint (a resumed run goes on counting from there)."""
    result = RunResult.load(finished / rundir.EVAL)
    cores = runtime.cores()
    assert 0 < result.cpu_seconds <= result.train_seconds * cores + 0.5
    assert Checkpoint.load(finished / rundir.CHECKPOINT).cpu_seconds == result.cpu_seconds
