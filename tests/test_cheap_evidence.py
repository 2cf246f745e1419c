"""The cheap-tickets equivalence claim (issue #23) is the committed run's: the table in
``docs/cheap-tickets.md`` and the numbers in the README's Cheap section are read back from
``docs/cheap/equivalence/summary.json``, and that summary's paired differences and verdicts are
recomputed from its own per-seed runs (t quantile for 7 degrees of freedom written out here, not
taken from the code under test)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "docs" / "cheap" / "equivalence"
PAGE = ROOT / "docs" / "cheap-tickets.md"
README = ROOT / "README.md"
LEVEL = 7  # 21.2% of weights
SEEDS = 8
T975_7DF = 2.364624  # Student's t, 97.5% quantile, 7 degrees of freedom (tables)
MARGIN = 1.5  # points, stated before the run
#: the page's names for the summary's methods
NAMES = {"IMP ticket": "ticket", "rigl": "rigl", "short_imp": "short_imp",
         "eb_continue": "eb_continue", "random (control)": "random"}


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads((EVIDENCE / "summary.json").read_text())


def _row(summary: dict, method: str) -> dict:
    (row,) = [r for r in summary["rows"] if r["method"] == method and r["level"] == LEVEL]
    return row


def _points(x: float) -> str:
    """A fraction as the docs print points: two decimals, a real minus sign."""
    return f"{100 * x:.2f}".replace("-", "−")


def _table(page: str) -> dict[str, list[str]]:
    """The cells of the table under '## Equivalence', by method name."""
    section = page.split("## Equivalence", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[1:]]
    return {c[0]: c[1:] for c in cells}


def test_the_evidence_holds_eight_seeds_of_each_method_at_the_target(summary):
    runs = [r for r in summary["runs"] if r["level"] == LEVEL]
    for method in NAMES.values():
        assert sorted(r["seed"] for r in runs if r["method"] == method) == list(range(SEEDS))
    for name in ("report.md", "pareto_flops.png", "pareto_cpu.png"):
        assert (EVIDENCE / name).is_file(), name


def test_the_summarys_paired_differences_and_verdicts_follow_from_its_runs(summary):
    by = {(r["method"], r["seed"]): r["accuracy"] for r in summary["runs"] if r["level"] == LEVEL}
    for method in ("rigl", "short_imp", "eb_continue", "random"):
        diffs = 100 * np.array([by[method, s] - by["ticket", s] for s in range(SEEDS)])
        mean, half = diffs.mean(), T975_7DF * diffs.std(ddof=1) / np.sqrt(SEEDS)
        row = _row(summary, method)
        assert 100 * row["diff_vs_ticket"] == pytest.approx(mean, abs=1e-6)
        # the code's t table has 3 decimals (2.365): within 2e-4 of the exact quantile
        assert 100 * row["diff_vs_ticket_ci95"] == pytest.approx(half, rel=5e-4)
        low, high = mean - half, mean + half
        verdict = ("worse" if high < -MARGIN else "equivalent" if low > -MARGIN and high < MARGIN
                   else "inconclusive" if low <= -MARGIN else "other")
        assert row["equivalence"] == verdict, method


def test_the_docs_table_is_the_committed_summarys(summary):
    table = _table(PAGE.read_text())
    assert set(table) == set(NAMES)
    for name, method in NAMES.items():
        row = _row(summary, method)
        acc, diff, verdict, flops, wall, cpu = table[name]
        assert acc == f"{_points(row['accuracy'])} ± {_points(row['ci95'])}", name
        if method == "ticket":
            assert (diff, verdict, flops, wall, cpu) == ("—", "—", "1", "1", "1")
            continue
        assert diff == f"{_points(row['diff_vs_ticket'])} ± {_points(row['diff_vs_ticket_ci95'])}"
        assert verdict == row["equivalence"]
        assert float(flops) == pytest.approx(row["flops_vs_imp"], abs=5e-4), name
        assert float(wall) == pytest.approx(row["wall_vs_imp"], abs=5e-3), name
        assert float(cpu) == pytest.approx(row["cpu_vs_imp"], abs=5e-3), name


def test_the_readme_cheap_section_quotes_the_committed_summary(summary):
    text = README.read_text()
    section = text.split("## Cheap tickets", 1)[1].split("\n## ", 1)[0]
    ticket = _row(summary, "ticket")
    assert f"({_points(ticket['accuracy'])}% ± {_points(ticket['ci95'])})" in section
    for method in ("rigl", "short_imp", "eb_continue", "random"):
        row = _row(summary, method)
        quoted = f"{_points(row['diff_vs_ticket'])} ± {_points(row['diff_vs_ticket_ci95'])}"
        assert quoted in section, method
        assert f"{row['flops_vs_imp']:.3f}×" in section, method
    verdicts = re.findall(r"\*(inconclusive|worse|equivalent)\*", section)
    assert verdicts == ["inconclusive", "worse"]  # RigL alone, then the other three together
    assert _row(summary, "rigl")["equivalence"] == "inconclusive"
