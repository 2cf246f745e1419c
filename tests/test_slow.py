"""The README's commands at full default scale (minutes each): ``pytest -m slow``."""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="module")
def default_run_rows(tmp_path_factory) -> list[dict]:
    """The plain ``sparsemeta run`` (7-13 minutes on 2 cores), once for the tests below,
    with the user's thread settings (conftest's OMP_NUM_THREADS=1 removed)."""
    cwd = tmp_path_factory.mktemp("default-run")
    env = os.environ.copy()
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-m", "sparsemeta", "run", "--out", "exp"],
                          capture_output=True, text=True, cwd=cwd, timeout=3600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((cwd / "exp" / "summary.json").read_text())["rows"]


def test_default_run_reports_seven_densities_down_to_26_percent(default_run_rows):
    rows = default_run_rows
    for method in ("ticket", "reinit", "random"):
        densities = sorted(r["density"] for r in rows if r["method"] == method)
        assert len(densities) == (7 if method == "ticket" else 6)
        assert densities[0] <= 0.30
    assert all(r["ci95"] > 0 for r in rows)


def headline_margins(rows: list[dict]) -> dict[float, dict[str, float]]:
    """Per density where the ticket and a control both ran: by how much the ticket's interval
    clears each control's, (ticket acc − its CI) − (control acc + its CI); > 0 means the
    ticket beats that control by more than the CIs."""
    by = {(r["method"], r["level"]): r for r in rows}
    margins: dict[float, dict[str, float]] = {}
    for (method, level), ticket in sorted(by.items(), key=lambda kv: kv[0][1]):
        if method != "ticket":
            continue
        for control in ("reinit", "random"):
            other = by.get((control, level))
            if other is None:
                continue
            assert other["density"] == ticket["density"]  # controls at the level's exact density
            margins.setdefault(ticket["density"], {})[control] = (
                (ticket["accuracy"] - ticket["ci95"]) - (other["accuracy"] + other["ci95"]))
    return margins


def test_default_run_ticket_beats_both_controls_beyond_the_cis(default_run_rows):
    """The README's headline of the default ``sparsemeta run``: at two or more densities the
    ticket beats reinit *and* random by more than the CIs."""
    margins = headline_margins(default_run_rows)
    assert len(margins) == 6  # levels 1..6, each with both controls
    beaten = [d for d, m in margins.items() if m["reinit"] > 0 and m["random"] > 0]
    assert len(beaten) >= 2, f"ticket clears both controls' CIs only at {beaten}: {margins}"
