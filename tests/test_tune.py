"""``sparsemeta tune``: validation-only Optuna studies that resume after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsemeta.cli import main

optuna = pytest.importorskip("optuna")

TINY = ["--set", "device=cpu", "--set", "model.filters=8", "--set", "train.iterations=4",
        "--set", "train.meta_batch=2", "--set", "train.val_every=2", "--set",
        "train.val_tasks=4", "--set", "eval.tasks=6", "--set", "data.queries=2"]


def _trials(out: Path) -> list:
    study = optuna.load_study(study_name="sparsemeta", storage=f"sqlite:///{out / 'study.db'}")
    return study.trials


def test_tuning_scores_on_validation_and_continues_the_same_study(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["tune", *TINY, "--method", "lottery", "--set", "prune.levels=1",
                 "--trials", "2", "--out", str(out)]) == 0
    assert len(_trials(out)) == 2
    evals = list(out.glob("trials/*/seed_0/level_*/*/eval.json"))
    assert evals and {json.loads(p.read_text())["split"] for p in evals} == {"val"}
    best = json.loads((out / "best.json").read_text())
    assert set(best["best_params"]) == {"inner_lr", "meta_lr", "prune_rate"}
    assert best["best_value"] == max(t.value for t in _trials(out))
    assert "validation accuracy" in capsys.readouterr().out
    # the same command with a larger budget adds trials to the same study
    assert main(["tune", *TINY, "--method", "lottery", "--set", "prune.levels=1",
                 "--trials", "3", "--out", str(out)]) == 0
    assert "2 of 3 trials done" in capsys.readouterr().err
    assert len(_trials(out)) == 3
    # another setting in the same study directory is refused, not mixed in
    assert main(["tune", *TINY, "--set", "prune.levels=1", "--method", "dense", "--trials", "3",
                 "--out", str(out)]) == 2
    assert "holds a study with another method ('lottery', now 'dense')" in capsys.readouterr().err


def test_killed_study_resumes_and_reruns_the_interrupted_trial_in_place(tmp_path):
    out = tmp_path / "study"
    slow = [a.replace("train.iterations=4", "train.iterations=120") for a in TINY]
    slow += ["--set", "train.checkpoint_every=10"]
    cmd = [sys.executable, "-m", "sparsemeta", "tune", *slow, "--trials", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("trials/*/seed_0/level_00/*/checkpoint.pt")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _trials(out)
    assert [t.state.name for t in killed] == ["RUNNING"]
    run_dir = killed[0].user_attrs["run_dir"]
    ckpt = next(Path(run_dir).glob("seed_0/level_00/*/checkpoint.pt"))
    stop = ckpt.stat().st_mtime_ns
    # the same command again: the interrupted parameters run again in the same directory
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 interrupted one(s) queued again" in done.stderr
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["run_dir"] == run_dir
    metrics = (next(Path(run_dir).glob("seed_0/level_00/*/metrics.jsonl"))).read_text()
    assert ckpt.stat().st_mtime_ns > stop and metrics.count('"split": "train"') == 120


@pytest.mark.parametrize("args, fragment", [
    (["--params", "bogus"], "unknown tuning parameter 'bogus'"),
    (["--method", "magic"], "--method takes one of"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--target-density", "2"], "--target-density must be in (0, 1]"),
])
def test_bad_tune_arguments_are_one_line_errors(tmp_path, capsys, args, fragment):
    assert main(["tune", *TINY, *args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
