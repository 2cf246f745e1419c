"""Meta-training run directories: resume after a crash equals an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.stats import mean_ci95, t975
from sparsemeta.meta.core import MetaLearner
from sparsemeta.training.loop import train
from tests.conftest import make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=6",
             "train.meta_batch=2", "train.val_every=3", "train.val_tasks=5",
             "train.checkpoint_every=2", "eval.tasks=10", "data.queries=2"]


def _metrics(run):
    return [{k: v for k, v in json.loads(line).items()} for line in
            (run / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path, monkeypatch):
    cfg = build_config(overrides=OVERRIDES)
    data = make_data()
    full = train(cfg, tmp_path / "a", data=data, progress=False)

    real = MetaLearner.meta_gradient_step
    calls = {"n": 0}

    def crash_on_fifth(self, params, tasks):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(self, params, tasks)

    monkeypatch.setattr(MetaLearner, "meta_gradient_step", crash_on_fifth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "b", data=data, progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["iteration"] == 4
    monkeypatch.setattr(MetaLearner, "meta_gradient_step", real)
    resumed = train(cfg, tmp_path / "b", data=data, progress=False)

    for name in ("best.pt", "init.pt"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert full.evaluation == resumed.evaluation
    assert (full.val_accuracy, full.best_iteration) == (resumed.val_accuracy, resumed.best_iteration)
    assert len(_metrics(tmp_path / "a")) == 6 + 2  # 6 train lines, 2 validations


def test_finished_run_is_not_retrained_and_other_config_is_refused(tmp_path):
    cfg = build_config(overrides=OVERRIDES)
    data = make_data()
    first = train(cfg, tmp_path, data=data, progress=False)
    mtime = (tmp_path / "best.pt").stat().st_mtime_ns
    assert train(cfg, tmp_path, data=data, progress=False) == first
    assert (tmp_path / "best.pt").stat().st_mtime_ns == mtime
    other = build_config(overrides=OVERRIDES + ["meta.inner_lr=0.1"])
    with pytest.raises(UserError, match="meta.inner_lr: 0.4 in the run, 0.1 now"):
        train(other, tmp_path, data=data, progress=False)


def test_result_records_test_accuracy_with_ci_and_model_chosen_on_validation(tmp_path):
    cfg = build_config(overrides=OVERRIDES + ["train.iterations=20", "train.val_every=5"])
    res = train(cfg, tmp_path, data=make_data(), progress=False)
    ev = res.evaluation
    assert ev.split == "test" and ev.tasks == 10 and ev.steps == 3
    assert len(ev.per_step) == 4
    assert 0.0 < ev.ci95 < 0.5
    assert ev.accuracy > 0.4  # 5-way chance is 0.2; the synthetic classes are easy
    vals = [m for m in _metrics(tmp_path) if m["split"] == "val"]
    best = max(vals, key=lambda m: m["accuracy"])
    assert res.best_iteration == best["iteration"]
    assert res.val_accuracy == best["accuracy"]


def test_vmap_option_routes_meta_batches_through_the_vmap_path(tmp_path, monkeypatch):
    """Equality of the vmap and loop meta-gradients is tested in float64 in test_batched."""
    import sparsemeta.training.loop as train_mod

    calls = []
    real = train_mod.vmap_meta_gradient_step

    def spy(learner, params, tasks):
        calls.append(len(tasks))
        return real(learner, params, tasks)

    monkeypatch.setattr(train_mod, "vmap_meta_gradient_step", spy)
    res = train(build_config(overrides=OVERRIDES + ["train.vmap=true"]), tmp_path,
                data=make_data(), progress=False)
    assert calls == [2] * 6
    assert 0.2 < res.evaluation.accuracy <= 1.0


def test_ci_over_a_few_seeds_uses_students_t_and_over_tasks_the_normal_quantile():
    seeds = np.array([0.80, 0.81, 0.83])
    sd = seeds.std(ddof=1)
    assert mean_ci95(seeds, student=True)[1] == pytest.approx(4.303 * sd / np.sqrt(3))
    assert mean_ci95(seeds)[1] == pytest.approx(1.96 * sd / np.sqrt(3))
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert t975(60) == pytest.approx(2.000, abs=0.003) and t975(120) == pytest.approx(1.980, abs=0.003)


def test_metrics_go_to_jsonl_and_tensorboard_with_the_same_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(build_config(overrides=OVERRIDES), tmp_path, data=make_data(), progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/accuracy", "val/accuracy", "val/ci95"} <= set(events.Tags()["scalars"])
    jsonl = [m for m in _metrics(tmp_path) if m["split"] == "train"]
    tb = events.Scalars("train/loss")
    assert [e.step for e in tb] == [m["iteration"] for m in jsonl] == list(range(1, 7))
    assert [e.value for e in tb] == pytest.approx([m["loss"] for m in jsonl], rel=1e-6)
    val = events.Scalars("val/accuracy")
    assert [e.step for e in val] == [3, 6]
