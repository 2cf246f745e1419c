"""Meta-training run directories: resume after a crash equals an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.data.tasks import sampler_for
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.stats import EQUIVALENCE_MARGIN, equivalence, mean_ci95, t975
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.engine import Engine
from sparsemeta.meta.learners import build_learner
from sparsemeta.training.evaluate import evaluate
from sparsemeta.training.loop import train_config as train
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
    assert full.macs == resumed.macs and full.macs["train"] > 0  # counted once, not twice
    assert (full.val_accuracy, full.best_iteration) == (resumed.val_accuracy, resumed.best_iteration)
    assert len(_metrics(tmp_path / "a")) == 6 + 2  # 6 train lines, 2 validations


#: a child that trains and SIGKILLs itself inside iteration 5's meta-gradient: no ``finally``,
#: no flush, no atexit, exactly what a killed job leaves behind
_KILLED_CHILD = """
import os, signal, sys
from sparsemeta.config import build_config
from sparsemeta.meta.core import MetaLearner
from sparsemeta.training.loop import train_config as train
from tests.conftest import make_data

real, calls = MetaLearner.meta_gradient_step, []

def step(self, params, tasks):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, params, tasks)

MetaLearner.meta_gradient_step = step
train(build_config(overrides=sys.argv[3:]), sys.argv[1], data=make_data(), progress=False)
"""


def test_run_sigkilled_between_checkpoints_resumes_bit_identical(tmp_path):
    """Checkpoints at 3, 6, 7; the kill lands in iteration 5, after the validation at 4 wrote
    best.pt and metrics lines past the checkpoint: the resumed run must replay 4 and 5 and end
    exactly where an uninterrupted run ends."""
    overrides = [o for o in OVERRIDES if not o.startswith(("train.iterations", "train.val_every",
                                                          "train.checkpoint_every", "eval.tasks",
                                                          "train.val_tasks"))]
    overrides += ["train.iterations=7", "train.val_every=2", "train.checkpoint_every=3",
                  "eval.tasks=4", "train.val_tasks=3"]
    cfg = build_config(overrides=overrides)
    data = make_data()
    full = train(cfg, tmp_path / "a", data=data, progress=False)

    killed = tmp_path / "b"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(killed), "5", *overrides],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["iteration"] == 3
    left = _metrics(killed)
    assert [(m["iteration"], m["split"]) for m in left][-3:] == [(3, "train"), (4, "train"),
                                                                  (4, "val")]
    assert not (killed / "eval.json").exists()

    resumed = train(cfg, killed, data=data, progress=False)
    for name in ("best.pt", "init.pt"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(killed / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    cb = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert ca["iteration"] == cb["iteration"] == 7
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"],
                                                                         sb["exp_avg_sq"])
    assert torch.equal(ca["torch_rng"], cb["torch_rng"])
    # metrics.jsonl: the same lines, byte for byte (no line of the killed attempt survives twice)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()
    assert len(_metrics(killed)) == 7 + 4  # 7 train lines, validations at 2, 4, 6, 7
    assert full.evaluation == resumed.evaluation
    assert (full.val_accuracy, full.val_ci95, full.best_iteration) == (
        resumed.val_accuracy, resumed.val_ci95, resumed.best_iteration)
    assert full.iterations_run == resumed.iterations_run == 7


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


def test_training_beats_the_untrained_model_and_the_result_is_the_validation_choice(tmp_path):
    """θ₀ already adapts well on the easy synthetic classes (5-way chance is 0.2, θ₀ reaches
    ~0.75), so "accuracy > chance" says nothing about meta-training: compare with θ₀ itself,
    on the same fixed validation and test tasks."""
    cfg = build_config(overrides=OVERRIDES + [
        "train.iterations=20", "train.val_every=10", "train.meta_lr=0.01", "train.val_tasks=10",
        "eval.tasks=15"])
    data = make_data()
    res = train(cfg, tmp_path / "trained", data=data, progress=False)
    untrained = train(cfg, tmp_path / "theta0", data=data, progress=False, iterations=0)
    ev, ev0 = res.evaluation, untrained.evaluation
    assert ev.split == "test" and ev.tasks == 15 and ev.steps == 3 and len(ev.per_step) == 4
    assert 0.0 < ev.ci95 < 0.2
    # measured: validation 0.90 vs 0.72, test 0.89 vs 0.75, test loss 0.84 vs 0.98
    assert res.val_accuracy > untrained.val_accuracy + 0.1
    assert ev.accuracy > ev0.accuracy + 0.05
    assert ev.per_step[-1]["loss"] < ev0.per_step[-1]["loss"] - 0.08
    metrics = _metrics(tmp_path / "trained")
    train_loss = [m["loss"] for m in metrics if m["split"] == "train"]
    assert len(train_loss) == 20
    assert np.mean(train_loss[-5:]) < np.mean(train_loss[:5]) - 0.3  # measured 1.20 vs 1.71

    # the metrics' validation lines are what the result reports
    vals = [m for m in metrics if m["split"] == "val"]
    assert [m["iteration"] for m in vals] == [10, 20]
    best = max(vals, key=lambda m: m["accuracy"])
    assert (res.best_iteration, res.val_accuracy, res.val_ci95) == (
        best["iteration"], best["accuracy"], best["ci95"])
    assert all(m["per_step"][-1] == m["accuracy"] for m in vals)
    # the reported test result is best.pt's (the weights of the best validation), recomputed
    # from the run directory's files, and eval.json holds that same result
    learner = build_learner(cfg, data.channels)
    learner.load_state_dict(torch.load(tmp_path / "trained" / "best.pt", weights_only=True))
    again = evaluate(Engine(), learner, dict(learner.model.named_parameters()),
                     sampler_for(cfg.task_spec(), data, "test"), cfg.eval.tasks,
                     cfg.meta.eval_inner_steps)
    assert again == ev
    saved = json.loads((tmp_path / "trained" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(res.to_dict()))


def test_vmap_option_routes_meta_batches_through_the_vmap_path(tmp_path, monkeypatch):
    """Equality of the vmap and loop meta-gradients is tested in float64 in test_batched."""
    import sparsemeta.meta.batched as batched

    calls = []
    real = batched.vmap_meta_gradient_step

    def spy(learner, params, tasks):
        calls.append(len(tasks))
        return real(learner, params, tasks)

    monkeypatch.setattr(batched, "vmap_meta_gradient_step", spy)
    data = make_data()
    res = train(build_config(overrides=OVERRIDES + ["train.core=vmap"]), tmp_path / "vmap",
                data=data, progress=False)
    assert calls == [2] * 6
    # and it trains the same model as the loop (float32: equal up to rounding)
    loop = train(build_config(overrides=OVERRIDES), tmp_path / "loop", data=data, progress=False)
    assert calls == [2] * 6
    a = torch.load(tmp_path / "vmap" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "loop" / "checkpoint.pt", weights_only=False)["model"]
    init = torch.load(tmp_path / "loop" / "init.pt", weights_only=True)
    for k in b:
        if k.endswith("conv.bias"):  # batch norm cancels it: Adam steps on a rounding-noise gradient
            continue
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
    assert any(not torch.allclose(init[k], b[k], rtol=1e-3, atol=1e-5) for k in b)
    assert res.evaluation.accuracy == pytest.approx(loop.evaluation.accuracy, abs=0.02)


def test_grouped_option_routes_training_and_evaluation_through_the_grouped_core(tmp_path,
                                                                                monkeypatch):
    """Equality with the loop is tested in float64 in meta/test_grouped; here: the switch is
    wired to meta-batches, validation and the test evaluation, and trains the loop's model."""
    from sparsemeta.meta.grouped import Grouped

    calls = {"meta_batch": [], "evaluated": 0}
    real_step, real_eval = Grouped.meta_gradient_step, Grouped.evaluate_tasks

    def step(self, params, tasks):
        calls["meta_batch"].append(len(tasks))
        return real_step(self, params, tasks)

    def evaluate_tasks(self, params, task, indices, steps):
        for row in real_eval(self, params, task, indices, steps):
            calls["evaluated"] += 1
            yield row

    monkeypatch.setattr(Grouped, "meta_gradient_step", step)
    monkeypatch.setattr(Grouped, "evaluate_tasks", evaluate_tasks)
    data = make_data()
    cfg = build_config(overrides=OVERRIDES + ["train.core=grouped"])
    res = train(cfg, tmp_path / "grouped", data=data, progress=False)
    assert calls["meta_batch"] == [cfg.train.meta_batch] * cfg.train.iterations
    validations = cfg.train.iterations // cfg.train.val_every
    assert calls["evaluated"] == validations * cfg.train.val_tasks + cfg.eval.tasks
    loop = train(build_config(overrides=OVERRIDES), tmp_path / "loop", data=data, progress=False)
    a = torch.load(tmp_path / "grouped" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "loop" / "checkpoint.pt", weights_only=False)["model"]
    for k in b:
        if k.endswith("conv.bias"):  # batch norm cancels it: Adam steps on a rounding-noise gradient
            continue
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
    assert res.evaluation.accuracy == pytest.approx(loop.evaluation.accuracy, abs=0.02)


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


@pytest.mark.parametrize("diffs, verdict", [
    ([0.002, -0.004, 0.001, 0.003, -0.002, 0.0, 0.004, -0.001], "equivalent"),
    ([0.03, 0.04, 0.035, 0.05, 0.03, 0.045, 0.04, 0.038], "better"),
    ([-0.05, -0.06, -0.04, -0.05, -0.055, -0.045, -0.06, -0.05], "worse"),
    ([0.01, 0.03, 0.0, 0.02, 0.04, 0.01, 0.0, 0.03], "not worse"),
    ([-0.02, 0.01, -0.03, 0.0, 0.01, -0.04, 0.02, -0.01], "inconclusive"),
    ([0.001, -0.001, 0.0], "too few seeds"),  # inside ±1.5 points, but 3 seeds are not 8
    ([-0.06, -0.05, -0.055], "worse"),  # a clear loss needs no eighth seed
])
def test_equivalence_is_judged_on_the_paired_interval_against_the_stated_margin(diffs, verdict):
    assert equivalence(np.array(diffs)) == verdict
    mean, half = mean_ci95(np.array(diffs), student=True)
    if verdict == "equivalent":
        assert mean - half > -EQUIVALENCE_MARGIN and mean + half < EQUIVALENCE_MARGIN
