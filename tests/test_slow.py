"""The README's commands at full default scale (minutes each): ``pytest -m slow``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run([sys.executable, "-m", "sparsemeta", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=3600)


def test_default_train_lands_in_the_calibrated_accuracy_band(tmp_path):
    proc = _cli("train", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0.70 <= result["accuracy"] <= 0.95
    assert result["tasks"] == 600 and result["ci95"] < 0.02


def test_default_run_reports_seven_densities_down_to_26_percent(tmp_path):
    proc = _cli("run", "--out", "exp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "exp" / "summary.json").read_text())["rows"]
    for method in ("ticket", "reinit", "random"):
        densities = sorted(r["density"] for r in rows if r["method"] == method)
        assert len(densities) == (7 if method == "ticket" else 6)
        assert densities[0] <= 0.30
    assert all(r["ci95"] > 0 for r in rows)
