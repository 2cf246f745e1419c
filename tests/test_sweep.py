"""``sparsemeta sweep``: grid expansion, idempotent re-submission, Ray and local engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sparsemeta.cli import main
from sparsemeta.experiments.sweep import load_sweep
from sparsemeta.foundations.errors import UserError

TINY = {"device": "cpu", "model.filters": 8, "train.iterations": 2, "train.meta_batch": 2,
        "train.val_every": 2, "train.val_tasks": 4, "eval.tasks": 6, "data.queries": 2,
        "prune.levels": 1}


def _sweep_file(tmp_path: Path, grid: dict, **extra) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": "glyphs-quick", "set": TINY, "grid": grid,
                                    "controls": [], "out": str(tmp_path / "out"), **extra}))
    return path


def test_grid_expands_to_one_experiment_per_combination(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, {"seeds": [0, 1], "methods": ["lottery", "dense"],
                                              "prune.rate": [0.2, 0.5]}))
    assert len(sweep.experiments) == 8
    names = {e.name for e in sweep.experiments}
    assert "lottery-seed1-prune.rate=0.5" in names and "dense-seed0-prune.rate=0.2" in names
    assert {e.variant for e in sweep.experiments} == {"prune.rate=0.2", "prune.rate=0.5"}
    exp = next(e for e in sweep.experiments if e.name == "lottery-seed1-prune.rate=0.5")
    assert exp.overrides[-2:] == ("prune.rate=0.5", "seed=1")


@pytest.mark.parametrize("grid, extra, fragment", [
    ({"seeds": [0]}, {"bogus": 1}, "unknown sweep key 'bogus'"),
    ({"seeds": []}, {}, "grid.seeds must be a non-empty list"),
    ({"methods": ["magic"]}, {}, "unknown method 'magic'"),
    ({"meta.inner_steps": [0]}, {}, "meta.inner_steps must be >= 1"),
    ({"nope.key": [1]}, {}, "unknown config key 'nope"),
    ({"seeds": [0, 0]}, {}, "share the directory name 'lottery-seed0'"),
    ({"prune.rate": [0.2, 0.2]}, {}, "share the directory name 'lottery-seed0-prune.rate=0.2'"),
    ({"data.root": ["a b", "a_b"]}, {}, "share the directory name"),
    ({"seeds": [0]}, {"ray": {"cpus_per_task": "two"}}, "ray.cpus_per_task must be a number"),
    ({"seeds": [0]}, {"ray": {"cpus_per_task": 0}}, "ray.cpus_per_task must be a number"),
])
def test_bad_sweep_files_are_refused_before_any_run(tmp_path, grid, extra, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        load_sweep(_sweep_file(tmp_path, grid, **extra))
    assert not (tmp_path / "out").exists()


def _done_times(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}


def test_local_sweep_reports_once_and_a_resubmission_does_no_work(tmp_path, capsys):
    path = _sweep_file(tmp_path, {"seeds": [0, 1], "methods": ["dense"]})
    assert main(["sweep", str(path), "--engine", "local"]) == 0
    out = tmp_path / "out"
    first = _done_times(out)
    assert set(first) == {"dense-seed0", "dense-seed1"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"]["rows"][0]["seeds"] == 2
    assert "## base" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["sweep", str(path), "--engine", "local"]) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().err
    assert _done_times(out) == first


def test_interrupted_experiment_resumes_instead_of_restarting(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [0], "methods": ["dense"]})
    assert main(["sweep", str(path), "--engine", "local"]) == 0
    run = tmp_path / "out" / "dense-seed0"
    (run / "done.json").unlink()  # as if killed after training, before marking done
    eval_json = next(run.glob("seed_0/level_00/*/eval.json"))
    mtime = eval_json.stat().st_mtime_ns
    assert main(["sweep", str(path), "--engine", "local"]) == 0
    assert (run / "done.json").exists() and eval_json.stat().st_mtime_ns == mtime


def test_ray_sweep_of_two_experiments_then_resubmitted_skips_them(tmp_path, capsys):
    pytest.importorskip("ray")
    path = _sweep_file(tmp_path, {"seeds": [0], "methods": ["dense", "random"]},
                       ray={"cpus_per_task": 1})
    assert main(["sweep", str(path), "--engine", "ray"]) == 0
    out = tmp_path / "out"
    first = _done_times(out)
    assert set(first) == {"dense-seed0", "random-seed0"}
    assert "0 already done, 2 to run (ray)" in capsys.readouterr().err
    assert main(["sweep", str(path), "--engine", "ray"]) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().err
    assert _done_times(out) == first
    assert "## base" in (out / "report.md").read_text()


def test_sweep_report_relates_every_method_to_its_seeds_imp_run(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [0], "methods": ["lottery", "random"]})
    assert main(["sweep", str(path), "--engine", "local"]) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["base"]["rows"]
    random = next(r for r in rows if r["method"] == "random")
    ticket = next(r for r in rows if r["method"] == "ticket" and r["level"] == 1)
    # each method has its own experiment directory; IMP's cost comes from the lottery one
    assert ticket["compute_vs_full_imp"] == pytest.approx(1.0)
    assert random["compute_vs_full_imp"] == pytest.approx(0.5)  # 1 run of IMP's 2 equal runs


def test_a_core_that_cannot_run_a_grid_point_is_refused_before_any_run(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("config: glyphs-quick\nset: {train.core: grouped}\n"
                    "grid: {meta.bn: [transductive, running]}\n")
    with pytest.raises(UserError, match="train.core=grouped cannot run this learner: "
                                        "meta.bn=running"):
        load_sweep(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
