"""The command line as a user meets it: one-line errors with exit 2, runs that resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsemeta.cli import main
from tests.conftest import TIMINGS

TINY = ["--set", "device=cpu", "--set", "model.filters=8", "--set", "train.iterations=4",
        "--set", "train.meta_batch=2", "--set", "train.val_every=2", "--set",
        "train.val_tasks=5", "--set", "eval.tasks=10", "--set", "data.queries=3"]


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsemeta", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy(), cwd=cwd)


@pytest.mark.parametrize("args, fragment", [
    (["train", "--set", "nope=1"], "unknown config key 'nope'"),
    (["train", "--set", "meta.inner_steps=-1"], "meta.inner_steps must be >= 1"),
    (["train", "--config", "omniglot-5w1s"], "data.root is not set for 'omniglot'"),
    (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["train", "--out", "/proc/sparsemeta-test"], "cannot create output directory"),
    (["eval", "/nonexistent-run"], "'/nonexistent-run' does not exist; give a run directory"),
    (["report", "/nonexistent-run"], "'/nonexistent-run' does not exist; give an experiment"),
    (["run", "--controls", "foo"], "unknown control 'foo'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--set", "prune.targets=[0.01]", "--set", "prune.levels=3"],
     "prune.targets has 0.01, below the last level's density"),
    (["run", "--method", "gmp", "--set", "prune.structure=filters"],
     "--method gmp needs prune.structure=unstructured"),
])
def test_user_mistakes_print_one_line_and_exit_2(args, fragment, tmp_path):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a refused command


def test_too_many_ways_for_the_split_is_a_user_error(tmp_path, capsys):
    assert main(["train", *TINY, "--set", "data.ways=400", "--out", str(tmp_path)]) == 2
    assert "data.ways=400 but the val split of 'glyphs' has only 320 classes" in capsys.readouterr().err


def test_train_then_eval_then_rerun_prints_result(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert f"test accuracy {100 * result['accuracy']:.2f}%" in out
    assert result["tasks"] == 10 and len(result["per_step"]) == 4
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt", "init.pt"):
        assert (run / name).exists()
    mtime = (run / "checkpoint.pt").stat().st_mtime_ns
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert (run / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert main(["eval", str(run), "--tasks", "10"]) == 0
    again = json.loads((run / "eval_test_10tasks_3steps.json").read_text())
    assert again["accuracy"] == result["accuracy"]  # same fixed tasks, same model


def test_data_preview_contact_sheet_shows_the_requested_classes_and_examples(tmp_path):
    """Rows are the first --classes classes of the split, columns their first --per-class
    images, each tile exactly the data set's image, on a grey (128) 2-pixel grid."""
    import numpy as np
    from PIL import Image

    from sparsemeta.config import build_config
    from sparsemeta.data.info import preset_for
    from sparsemeta.data.registry import load_data

    out = tmp_path / "sheet.png"
    assert main(["data", "preview", "glyphs", "--out", str(out), "--classes", "3",
                 "--per-class", "4", "--split", "val"]) == 0
    data = load_data(build_config(preset_for("glyphs"), ["data.name=glyphs"]).data_spec())
    c, h, w = data.images.shape[1:]
    assert c == 1
    pad, scale = 2, max(1, 64 // h)
    img = np.asarray(Image.open(out))
    assert img.shape == (scale * (3 * (h + pad) + pad), scale * (4 * (w + pad) + pad))
    # nearest-neighbour upscaling by an integer factor: every scale×scale block is one pixel
    grid = img[::scale, ::scale]
    assert np.array_equal(np.repeat(np.repeat(grid, scale, 0), scale, 1), img)
    background = np.ones(grid.shape, dtype=bool)
    for r, idx in enumerate(data.classes["val"][:3]):
        for j in range(4):
            y, x = pad + r * (h + pad), pad + j * (w + pad)
            assert np.array_equal(grid[y:y + h, x:x + w], data.images[idx[j], 0]), (r, j)
            background[y:y + h, x:x + w] = False
    assert (grid[background] == 128).all()
    # the tiles are not all alike: a sheet of one repeated image would fail above, but so
    # must a sheet of another split's classes
    train_first = data.images[data.classes["train"][0][0], 0]
    assert not np.array_equal(grid[pad:pad + h, pad:pad + w], train_first)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux's /proc; none elsewhere)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_run_killed_with_sigkill_then_rerun_gives_same_summary(tmp_path):
    """Killed while a control trains in the background process (the default preset has 2
    workers): the rerun resumes both processes' runs and ends with the same numbers."""
    args = ["run", *TINY, "--set", "prune.levels=2", "--set", "train.checkpoint_every=1"]
    ref = tmp_path / "ref"
    assert _cli(*args, "--out", str(ref), cwd=tmp_path).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sparsemeta", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    target = killed / "seed_0" / "level_01" / "reinit" / "checkpoint.pt"
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    children = _children(proc.pid)
    assert children or not Path("/proc").is_dir()  # the pool's process is running
    proc.send_signal(signal.SIGKILL)  # the run's own process only, as the OOM killer would
    proc.wait()
    assert not (killed / "summary.json").exists()
    while children and time.time() < deadline:  # the background process ends with its parent
        children = [c for c in children if Path(f"/proc/{c}").exists()]
        time.sleep(0.05)
    assert not children, "a background training process outlived the killed run"
    done = _cli(*args, "--out", str(killed), cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    def rows(root: Path):
        data = json.loads((root / "summary.json").read_text())
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in data["rows"]]

    assert rows(killed) == rows(ref)
    assert "| 2 |" in done.stdout and "report:" in done.stdout
