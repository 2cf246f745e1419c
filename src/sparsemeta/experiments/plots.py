"""The report's figures, one function per figure, drawn from the summary's rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported when a report is drawn, not with this module
    from matplotlib.axes import Axes

from sparsemeta.experiments.methods import branches
from sparsemeta.training.rundir import IMP

Rows = list[dict]
DENSITY_LABEL = "% of prunable weights remaining (log scale)"


def _color(branch: str) -> str | None:
    b = branches().get(branch)
    return b.color if b else None


def _methods(rows: Rows) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _dense(rows: Rows) -> dict | None:
    return next((r for r in rows if r["level"] == 0 and r["method"] == IMP), None)


def _by_density(rows: Rows, method: str) -> Rows:
    return sorted((r for r in rows if r["method"] == method), key=lambda r: -r["density"])


def _density_axis(ax: Axes, rows: Rows) -> None:
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(sorted({round(100 * r["density"], 1) for r in rows}))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_xaxis()


def _dense_line(ax: Axes, rows: Rows, band: bool) -> None:
    dense = _dense(rows)
    if dense:
        ax.axhline(100 * dense["accuracy"], color="gray", ls="--", lw=1, label="dense (level 0)")
        if band:
            ax.axhspan(100 * (dense["accuracy"] - dense["ci95"]),
                       100 * (dense["accuracy"] + dense["ci95"]), color="gray", alpha=0.1)


def accuracy(ax: Axes, rows: Rows) -> None:
    for m in _methods(rows):
        rs = _by_density(rows, m)
        x = [100 * r["density"] for r in rs]
        y, ci = np.array([r["accuracy"] for r in rs]), np.array([r["ci95"] for r in rs])
        ax.plot(x, 100 * y, "o-", label=m, color=_color(m))
        ax.fill_between(x, 100 * (y - ci), 100 * (y + ci), alpha=0.2, color=_color(m))
    _dense_line(ax, rows, band=True)
    _density_axis(ax, rows)


def early_stop(ax: Axes, rows: Rows) -> None:
    for m in _methods(rows):
        rs = _by_density(rows, m)
        err = [r["early_stop_ci95"] or 0.0 for r in rs]
        ax.errorbar([100 * r["density"] for r in rs], [r["early_stop_iteration"] for r in rs],
                    yerr=err if any(err) else None, fmt="o-", label=m, color=_color(m), capsize=3)
    _density_axis(ax, rows)


def dense_curve(ax: Axes, rows: Rows) -> None:
    """Validation accuracy of the dense meta-model over its training, one line per seed: a
    budget whose curve has levelled off is one where methods are compared converged."""
    dense = _dense(rows)
    for i, curve in enumerate(dense["val_curves"] if dense else []):
        its, accs = zip(*curve)
        ax.plot(its, 100 * np.array(accs), "o-", ms=3, label=f"seed {i + 1} of {dense['seeds']}")


def compared_levels(rows: Rows) -> list[int]:
    """Densities where methods other than IMP have models (``prune.targets``)."""
    return sorted({r["level"] for r in rows if r["method"] != IMP and r["level"] > 0})


#: the costs a Pareto figure is drawn against: row key → (axis label, file name)
COSTS = {"flops_vs_imp": ("FLOPs to produce the model ÷ IMP's (log)", "pareto_flops.png"),
         "cpu_vs_imp": ("CPU seconds to produce the model ÷ IMP's (log)", "pareto_cpu.png")}


def pareto_panel(ax: Axes, rows: Rows, level: int, cost: str = "flops_vs_imp") -> None:
    """Accuracy against a cost relative to IMP at one density, the front drawn through the
    models no other beats in both."""
    here = [r for r in rows if r["level"] == level and r.get(cost) is not None]
    for r in here:
        ax.errorbar([r[cost]], [100 * r["accuracy"]], yerr=[100 * r["ci95"]], fmt="o",
                    label=r["method"], color=_color(r["method"]), capsize=3)
    front, best = [], -1.0
    for r in sorted(here, key=lambda r: (r[cost], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.step([r[cost] for r in front], [100 * r["accuracy"] for r in front],
            where="post", color="black", lw=0.8, alpha=0.6)
    _dense_line(ax, rows, band=True)
    ax.set_xscale("log")
    ax.set_title(f"{100 * here[0]['density']:.1f}% of weights" if here else f"level {level}")
    ax.set_xlabel(COSTS[cost][0])
    ax.grid(alpha=0.3, which="both")


def pareto(rows: Rows, out: Path, cost: str = "flops_vs_imp") -> Path | None:
    """One panel per compared density: accuracy (CI over seeds) vs ``cost`` relative to IMP."""
    levels = [lv for lv in compared_levels(rows)
              if any(r["level"] == lv and r.get(cost) is not None for r in rows)]
    if not levels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4.5), squeeze=False,
                             sharey=True)
    for ax, level in zip(axes[0], levels):
        pareto_panel(ax, rows, level, cost)
    axes[0][0].set_ylabel("test accuracy % (95% CI)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Accuracy vs compute: which way to a ticket is cheapest")
    fig.tight_layout()
    path = out / COSTS[cost][1]
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def size(ax: Axes, rows: Rows) -> None:
    for m in _methods(rows):
        rs = sorted((r for r in rows if r["method"] == m and r["exported_bytes"]),
                    key=lambda r: r["exported_bytes"])
        ax.errorbar([r["exported_bytes"] for r in rs], [100 * r["accuracy"] for r in rs],
                    yerr=[100 * r["ci95"] for r in rs], fmt="o-", label=m, color=_color(m),
                    capsize=3)
    _dense_line(ax, rows, band=False)
    ax.set_xscale("log")


def steps(ax: Axes, rows: Rows) -> None:
    tickets = sorted((r for r in rows if r["method"] == IMP), key=lambda r: r["level"])
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
    ]
    if any(r["exported_bytes"] for r in rows):
        figures.append(("accuracy_vs_bytes.png",
                        "exported model size (bytes of the .smz file, log scale)", acc,
                        "Accuracy vs exported size", size))
    if (_dense(rows) or {}).get("val_curves"):
        figures.append(("dense_validation_curve.png", "meta-iteration",
                        "validation accuracy % (dense model)", "Has the dense model converged?",
                        dense_curve))
    if any(r["method"] == IMP for r in rows):
        figures.append(("accuracy_vs_step.png", "adaptation step", "test accuracy %",
                        "Ticket accuracy vs adaptation step", steps))
    paths = [_figure(out / name, x, y, title, draw, rows) for name, x, y, title, draw in figures]
    fronts = [pareto(rows, out, cost) for cost in COSTS]
    return paths + [f for f in fronts if f]
