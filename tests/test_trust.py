"""Results and files a researcher can trust: divergence stops a run, one writer per directory,
early stops survive a crash, global-scope baselines use IMP's counts, no stray BN updates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sparsemeta.cli import main
from sparsemeta.config import build_config
from sparsemeta.data.tasks import Task
from sparsemeta.experiments.methods.earlybird import EarlyBirdHooks, EarlyBirdSettings
from sparsemeta.experiments.methods.rigl import RigLHooks
from sparsemeta.experiments.runner import run_experiment
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import load_tensors
from sparsemeta.meta.core import MetaLearner, accuracy
from sparsemeta.meta.learners import build_learner
from sparsemeta.sparsity.masks import full_mask, load_mask
from sparsemeta.sparsity.prune import MagnitudeRule
from sparsemeta.training import rundir
from sparsemeta.training.hooks import StepContext
from sparsemeta.training.loop import Diverged
from sparsemeta.training.loop import train_config as train
from sparsemeta.training.rundir import level_dir
from tests.conftest import make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=6",
             "train.meta_batch=2", "train.val_every=3", "train.val_tasks=4",
             "train.checkpoint_every=2", "eval.tasks=6", "data.queries=2"]


def test_a_non_finite_meta_gradient_stops_the_run_at_its_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = build_config(overrides=OVERRIDES)  # checkpoints after iterations 2 and 4
    real = MetaLearner.meta_gradient_step
    calls = {"n": 0}

    def nan_on_fifth(self, params, tasks, track_running=True):
        out = real(self, params, tasks, track_running)
        calls["n"] += 1
        if calls["n"] == 5:
            params["blocks.1.conv.weight"].grad[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(MetaLearner, "meta_gradient_step", nan_on_fifth)
    with pytest.raises(Diverged, match="diverged at iteration 5") as err:
        train(cfg, tmp_path, data=make_data(), progress=False)
    assert "\n" not in str(err.value) and "checkpoint of iteration 4" in str(err.value)
    record = json.loads((tmp_path / rundir.DIVERGED).read_text())
    assert record["what"] == "the meta-gradient of blocks.1.conv.weight is not finite"
    assert record["last_checkpoint"] == 4
    ckpt = load_tensors(tmp_path / rundir.CHECKPOINT)
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / rundir.EVAL).exists()
    monkeypatch.setattr(MetaLearner, "meta_gradient_step", real)
    with pytest.raises(Diverged, match="is not resumed"):
        train(cfg, tmp_path, data=make_data(), progress=False)


def test_an_exploding_loss_counts_as_divergence(tmp_path):
    cfg = build_config(overrides=OVERRIDES + ["meta.inner_lr=1e6"])
    with pytest.raises(Diverged, match=r"diverged at iteration 1: the outer loss is .* \(above"):
        train(cfg, tmp_path, data=make_data(), progress=False)


def test_the_cli_says_divergence_in_one_line_and_refuses_non_finite_rates(tmp_path, capsys):
    tiny = [a for o in OVERRIDES if "image_size" not in o for a in ("--set", o)]
    assert main(["train", *tiny, "--set", "meta.inner_lr=1e6", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("sparsemeta: error: training diverged at")
    assert errors[0] == err[-1]
    assert main(["train", "--set", "meta.inner_lr=inf", "--out", str(tmp_path / "s")]) == 2
    assert "meta.inner_lr" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_non_finite_logits_score_nan_not_one_over_ways():
    logits = torch.full((10, 5), float("nan"))
    assert accuracy(logits, torch.zeros(10, dtype=torch.long)) != accuracy(logits, torch.zeros(10, dtype=torch.long))  # NaN
    assert accuracy(torch.eye(5), torch.arange(5)) == 1.0


def test_a_second_writer_of_a_run_directory_gets_one_line_naming_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from sparsemeta.foundations.lock import exclusive\n"
         f"with exclusive({str(run / rundir.LOCK)!r}, 'a run', wait=False):\n"
         "    print('held', flush=True); time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by process {holder.pid}\b"):
            train(build_config(overrides=OVERRIDES), run, data=make_data(), progress=False)
        assert main(["train", "--set", "train.iterations=2", "--out", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sparsemeta: error: run directory") and str(holder.pid) in err[-1]
    finally:
        holder.kill()
        holder.wait()
    assert not (run / rundir.CONFIG).exists()  # nothing was written by the refused runs


def test_an_early_bird_stop_survives_a_crash_before_eval_json(tmp_path):
    cfg = build_config(overrides=OVERRIDES + ["train.iterations=20"])
    data = make_data()

    def hooks() -> EarlyBirdHooks:
        return EarlyBirdHooks(MagnitudeRule(0.2, "layerwise", 0.5),
                              EarlyBirdSettings(epsilon=0.99, every=1, window=2))

    first = train(cfg, tmp_path / "a", data=data, progress=False, hooks=hooks(), test=False)
    assert first.iterations_run == 3  # two distances, both below ε, after steps 2 and 3
    (tmp_path / "a" / rundir.EVAL).unlink()  # killed after the stop's checkpoint
    again = train(cfg, tmp_path / "a", data=data, progress=False, hooks=hooks(), test=False)
    assert again.iterations_run == 3
    assert load_tensors(tmp_path / "a" / rundir.CHECKPOINT)["iteration"] == 3


def test_global_scope_random_and_rigl_take_the_tickets_per_layer_counts(tmp_path):
    cfg = build_config(overrides=OVERRIDES + ["prune.scope=global", "prune.levels=1",
                                              "prune.rate=0.5", "rigl.distribution=uniform"])
    run_experiment(cfg, tmp_path, ["lottery", "random", "rigl"], [0], [], progress=False,
                   data=make_data())
    ticket = load_mask(level_dir(tmp_path, 0, 1, "ticket") / rundir.MASK)
    random = load_mask(level_dir(tmp_path, 0, 1, "random") / rundir.MASK)
    rigl = load_mask(level_dir(tmp_path, 0, 1, "rigl") / rundir.MASK)
    counts = {k: int(m.sum()) for k, m in ticket.items()}
    assert {k: int(m.sum()) for k, m in random.items()} == counts
    layerwise = {k: round(0.5 * m.numel()) for k, m in ticket.items()}
    assert counts != layerwise  # global pruning really moved weights between layers
    assert sum(int(m.sum()) for m in rigl.values()) == pytest.approx(sum(counts.values()), abs=4)
    with pytest.raises(UserError, match="together with --method lottery"):
        run_experiment(cfg, tmp_path / "alone", ["random"], [0], [], progress=False,
                       data=make_data())


def test_rigls_scoring_pass_leaves_running_batch_norm_statistics_alone():
    cfg = build_config(overrides=OVERRIDES + ["meta.bn=running"])
    data = make_data()
    params_mask = full_mask(dict(build_learner(cfg, 1).model.named_parameters()))
    mask = {k: torch.rand(m.shape, generator=torch.Generator().manual_seed(0)) < 0.5
            for k, m in params_mask.items()}
    learner: MetaLearner = build_learner(cfg, 1, mask)
    from sparsemeta.data.tasks import sampler_for

    tasks: list[Task] = [sampler_for(cfg.task_spec(), data, "train").task(i) for i in range(2)]
    params = dict(learner.model.named_parameters())
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    before = {k: b.clone() for k, b in learner.model.named_buffers()}
    assert before, "meta.bn=running must give the model running-statistics buffers"
    RigLHooks(0.3, every=1, end=100).after_step(StepContext(1, params, mask, opt, learner, tasks))
    for k, b in learner.model.named_buffers():
        assert torch.equal(b, before[k]), k


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, monkeypatch):
    cfg = build_config(overrides=OVERRIDES)
    data = make_data()
    train(cfg, tmp_path / "a", data=data, progress=False)
    real = MetaLearner.meta_gradient_step

    def crash_on_fifth(self, params, tasks, track_running=True):
        if crash_on_fifth.calls == 4:
            raise RuntimeError("simulated power loss")
        crash_on_fifth.calls += 1
        return real(self, params, tasks, track_running)

    crash_on_fifth.calls = 0
    monkeypatch.setattr(MetaLearner, "meta_gradient_step", crash_on_fifth)
    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "b", data=data, progress=False)
    with (tmp_path / "b" / rundir.METRICS).open("a") as fh:
        fh.write('{"iteration": 5, "split": "tr')  # the half-written line of a power loss
    monkeypatch.setattr(MetaLearner, "meta_gradient_step", real)
    train(cfg, tmp_path / "b", data=data, progress=False)
    lines = [(tmp_path / r / rundir.METRICS).read_text().splitlines() for r in ("a", "b")]
    assert lines[0] == lines[1] and all(json.loads(line) for line in lines[1])


TINY_CLI = ["--set", "model.filters=8", "--set", "train.iterations=2", "--set", "train.val_every=2",
            "--set", "train.val_tasks=4", "--set", "eval.tasks=4", "--set", "train.meta_batch=2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY_CLI, "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("args, fragment", [
    (["config", "show", "--set", "seed=99999999999999999999"], "seed must be <= 4294967295"),
    (["config", "show", "--set", "model.filters=100000"], "model.filters must be <= 4096"),
    (["run", "--workers", "0", *TINY_CLI], "--workers must be an integer >= 1"),
    (["run", "--method", "", *TINY_CLI], "--method is empty"),
    (["run", "--controls", "", *TINY_CLI], "--controls is empty"),
    (["eval", "{run}", "--tasks", "0"], "--tasks must be >= 1"),
    (["export", "{run}", "--out", "{run}/best.pt"], "would overwrite a file of"),
    (["report", "{root}", "--out", "{run}/eval.json"], "is a file"),
])
def test_user_mistakes_found_by_the_bad_input_table_are_one_line(finished_run, args, fragment,
                                                                capsys):
    args = [a.format(run=finished_run, root=finished_run.parent) for a in args]
    best = (finished_run / rundir.BEST).read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and err[-1].startswith("sparsemeta: error:")
    assert (finished_run / rundir.BEST).read_bytes() == best  # nothing of the run was touched


def test_a_repeated_yaml_section_is_refused_not_silently_merged(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  iterations: 3\ntrain:\n  iterations: 5\n")
    assert main(["config", "show", "--config", str(path)]) == 2
    assert "key 'train' appears twice" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"PK\x03\x04 not a zip"])
def test_a_damaged_checkpoint_is_one_line_naming_it(finished_run, tmp_path, content, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    for name in (rundir.CONFIG, rundir.INIT):
        (run / name).write_bytes((finished_run / name).read_bytes())
    (run / rundir.CHECKPOINT).write_bytes(content)
    assert main(["train", *TINY_CLI, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint.pt' is damaged or not a sparsemeta tensor file" in err


def test_world_size_without_torchrun_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", *TINY_CLI, "--out", str(tmp_path / "r")]) == 2
    assert "launch data-parallel training with torchrun" in capsys.readouterr().err


def test_a_stray_seed_folder_in_an_experiment_is_one_line(tmp_path, capsys):
    stray = tmp_path / "seed_x" / "level_00" / "ticket"
    stray.mkdir(parents=True)
    (stray / rundir.EVAL).write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    assert "is not an experiment's seed_<S>/level_<LL> folder" in capsys.readouterr().err
