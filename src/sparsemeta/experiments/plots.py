"""The report's figures, one function per figure, drawn from the summary's rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparsemeta.experiments.methods import branches

Rows = list[dict]
DENSITY_LABEL = "% of prunable weights remaining (log scale)"


def _color(branch: str) -> str | None:
    b = branches().get(branch)
    return b.color if b else None


def _methods(rows: Rows) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _dense(rows: Rows) -> dict | None:
    return next((r for r in rows if r["level"] == 0 and r["method"] == "ticket"), None)


def _by_density(rows: Rows, method: str) -> Rows:
    return sorted((r for r in rows if r["method"] == method), key=lambda r: -r["density"])


def _density_axis(ax, rows: Rows) -> None:  # noqa: ANN001
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(sorted({round(100 * r["density"], 1) for r in rows}))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_xaxis()


def _dense_line(ax, rows: Rows, band: bool) -> None:  # noqa: ANN001
    dense = _dense(rows)
    if dense:
        ax.axhline(100 * dense["accuracy"], color="gray", ls="--", lw=1, label="dense (level 0)")
        if band:
            ax.axhspan(100 * (dense["accuracy"] - dense["ci95"]),
                       100 * (dense["accuracy"] + dense["ci95"]), color="gray", alpha=0.1)


def accuracy(ax, rows: Rows) -> None:  # noqa: ANN001
    for m in _methods(rows):
        rs = _by_density(rows, m)
        x = [100 * r["density"] for r in rs]
        y, ci = np.array([r["accuracy"] for r in rs]), np.array([r["ci95"] for r in rs])
        ax.plot(x, 100 * y, "o-", label=m, color=_color(m))
        ax.fill_between(x, 100 * (y - ci), 100 * (y + ci), alpha=0.2, color=_color(m))
    _dense_line(ax, rows, band=True)
    _density_axis(ax, rows)


def early_stop(ax, rows: Rows) -> None:  # noqa: ANN001
    for m in _methods(rows):
        rs = _by_density(rows, m)
        err = [r["early_stop_ci95"] or 0.0 for r in rs]
        ax.errorbar([100 * r["density"] for r in rs], [r["early_stop_iteration"] for r in rs],
                    yerr=err if any(err) else None, fmt="o-", label=m, color=_color(m), capsize=3)
    _density_axis(ax, rows)


def compute(ax, rows: Rows) -> None:  # noqa: ANN001
    for m in _methods(rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["compute_tasks"])
        ax.errorbar([r["compute_tasks"] for r in rs], [100 * r["accuracy"] for r in rs],
                    yerr=[100 * r["ci95"] for r in rs], fmt="o", label=m, color=_color(m),
                    capsize=3)
    ax.set_xscale("log")


def size(ax, rows: Rows) -> None:  # noqa: ANN001
    for m in _methods(rows):
        rs = sorted((r for r in rows if r["method"] == m and r["exported_bytes"]),
                    key=lambda r: r["exported_bytes"])
        ax.errorbar([r["exported_bytes"] for r in rs], [100 * r["accuracy"] for r in rs],
                    yerr=[100 * r["ci95"] for r in rs], fmt="o-", label=m, color=_color(m),
                    capsize=3)
    _dense_line(ax, rows, band=False)
    ax.set_xscale("log")


def steps(ax, rows: Rows) -> None:  # noqa: ANN001
    tickets = sorted((r for r in rows if r["method"] == "ticket"), key=lambda r: r["level"])
    for i in sorted({0, len(tickets) // 3, 2 * len(tickets) // 3, len(tickets) - 1}):
        r = tickets[i]
        ax.plot(range(len(r["per_step"])), 100 * np.array(r["per_step"]), "o-",
                label=f"level {r['level']} ({100 * r['density']:.1f}% weights)")


def _figure(path: Path, xlabel: str, ylabel: str, title: str,
            draw: Callable[..., None], rows: Rows) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax, rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows: Rows, out: Path) -> list[Path]:
    """The report's PNG figures (those the rows can fill), written into ``out``."""
    acc = "test accuracy % (95% CI)"
    seed_ci = " (95% CI over seeds)" if any(r["early_stop_ci95"] for r in rows) else ""
    figures = [
        ("accuracy_vs_density.png", DENSITY_LABEL, acc, "Meta-test accuracy vs sparsity",
         accuracy),
        ("early_stop_vs_density.png", DENSITY_LABEL,
         "early-stopping meta-iteration (best validation)", "Learning speed vs sparsity" + seed_ci,
         early_stop),
        ("accuracy_vs_compute.png", "meta-training compute to produce the model (tasks, log scale)",
         acc, "Accuracy vs compute", compute),
    ]
    if any(r["exported_bytes"] for r in rows):
        figures.append(("accuracy_vs_bytes.png",
                        "exported model size (bytes of the .smz file, log scale)", acc,
                        "Accuracy vs exported size", size))
    if any(r["method"] == "ticket" for r in rows):
        figures.append(("accuracy_vs_step.png", "adaptation step", "test accuracy %",
                        "Ticket accuracy vs adaptation step", steps))
    return [_figure(out / name, x, y, title, draw, rows) for name, x, y, title, draw in figures]
