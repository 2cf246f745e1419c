"""Reports: ``summary.json``, a Markdown table and PNG plots from experiment directories.

Everything is read back from the run directories (``eval.json``, ``mask.pt``, ``best.pt``), so a
report can be rebuilt at any time, from any number of experiment directories (e.g. one per seed).
"Exported bytes" is the exact size of the model's ``sparsemeta export`` file (compact ``.smz``,
fp32 values), computed through the export's own code path without writing it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from sparsemeta.experiments.export import export_bytes
from sparsemeta.experiments.methods import branches
from sparsemeta.experiments.plots import plot
from sparsemeta.foundations.atomic import atomic_write_text
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import write_json
from sparsemeta.foundations.stats import EQUIVALENCE_MARGIN, equivalence, mean_ci95
from sparsemeta.sparsity.flops import FLOPS_PER_MAC
from sparsemeta.sparsity.masks import Mask, density, layer_densities, nonzeros
from sparsemeta.training import rundir
from sparsemeta.training.metrics import read_metrics
from sparsemeta.training.rundir import IMP, RunDir

EXPERIMENTS = "an experiment directory made by 'sparsemeta run' or 'sparsemeta lottery'"


def _with_costs(records: list[dict]) -> list[dict]:
    """Meta-training compute it took to produce each model — in tasks and in MACs (sparse-aware,
    ``training.cost``) — and its ratios to IMP.

    Also in wall and CPU seconds of training (``eval.json``), measured where the runs ran: the
    real cost on this machine beside the FLOPs — a mask on dense tensors saves FLOPs on paper
    but no time.

    Each branch says what its models cost besides their own run (``methods.base.Branch``): a
    ticket at level L also IMP levels 0..L-1, L1 models the L1 dense run, a one-shot or
    early-bird-at-target ticket its dense run, a gradual-pruning ticket its pruning run; random
    and RigL models only themselves. IMP at a level = the seed's ticket runs 0..L (the ticket of
    that density, trained); full IMP = all its levels. Both come from the same experiment
    directory or, where each method has its own (a sweep), from the seed's other directory with
    the most ticket levels. Evaluation (validation and test) is not part of the cost.
    """
    for unit, key in (("tasks", "meta_tasks"), ("macs", "train_macs"),
                      ("wall", "train_seconds"), ("cpu", "cpu_seconds")):
        _cost_in(records, unit, key)
    return records


def _cost_in(records: list[dict], unit: str, key: str) -> None:
    """``compute_<unit>``, ``<unit>_vs_imp`` and (tasks) ``compute_vs_full_imp`` per record."""
    own = {(r["root"], r["seed"], r["method"], r["level"]): r[key] for r in records}
    imp: dict[int, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for (root, seed, m, lvl), v in own.items():
        if m == IMP:
            imp[seed][root][lvl] = v
    known = branches()

    def chain(r: dict, method: str, levels: range) -> float | None:
        found = [v for (root, seed, m, lvl), v in own.items()
                 if root == r["root"] and seed == r["seed"] and m == method and lvl in levels]
        return None if None in found else sum(found)

    for r in records:
        branch = known.get(r["method"])
        cost = r[key]
        if cost is not None and branch is not None and branch.prior is not None:
            prior = chain(r, branch.prior, branch.prior_levels(r["level"]))
            cost = None if prior is None else cost + prior
        levels = imp[r["seed"]].get(r["root"]) or max(imp[r["seed"]].values(), key=len,
                                                       default={})
        upto = [levels.get(lvl) for lvl in range(r["level"] + 1)]
        at = None if None in upto else sum(upto)
        r[f"compute_{unit}"] = cost
        r[f"{unit}_vs_imp"] = cost / at if cost is not None and at else None
        if unit == "tasks":
            full = sum(levels.values())
            r["compute_vs_full_imp"] = cost / full if full else None


def _exported_bytes(run: Path) -> int | None:
    """Size of the run's export, or None where it cannot be exported (a run directory whose
    files do not fit its config: ``export`` refuses it in one line)."""
    try:
        return export_bytes(run)
    except UserError:
        return None


def _val_curve(metrics: Path) -> list[list[float]]:
    """(iteration, validation accuracy) of a run's metrics file (none if it has none)."""
    if not metrics.exists():
        return []
    return [[m["iteration"], float(m["accuracy"])] for m in read_metrics(metrics)
            if m.get("split") == "val" and isinstance(m.get("accuracy"), (int, float))
            and not isinstance(m.get("accuracy"), bool)]


def _mask(run: RunDir) -> Mask | None:
    """The run's final mask, refused in one line if it does not fit its ``best.pt`` (a copied
    or edited run directory must not report the density of another model)."""
    mask = run.mask()
    if mask and run.file(rundir.BEST).is_file():
        state = run.weights(rundir.BEST)
        rundir.ChosenModel(state, mask).check(state, run.path)
    return mask


def collect(roots: list[Path]) -> list[dict]:
    """One record per finished run directory ``seed_S/level_LL/<branch>`` under ``roots``
    (search runs that only find masks are counted for compute, not reported as models). A run
    that two inputs hold — the same seed, level and branch of one config — is reported once:
    a copied experiment, or a sweep's methods sharing the dense run, is not a second seed."""
    records = []
    for root in roots:
        for path in rundir.finished_runs(root):
            seed, level, branch = rundir.parse_level_dir(path)
            run = RunDir(path)
            res = run.result()
            macs = res.macs or {}
            record = {"root": str(root), "seed": seed, "level": level, "method": branch,
                      "meta_tasks": res.meta_tasks, "model": res.model,
                      "train_macs": macs.get("train"), "train_macs_dense": macs.get("train_dense"),
                      "eval_macs": macs.get("eval"), "train_seconds": res.train_seconds,
                      "cpu_seconds": res.cpu_seconds}
            if res.model:
                mask, ev = _mask(run), res.evaluation
                record.update({
                    "density": density(mask) if mask else 1.0,
                    "layer_densities": layer_densities(mask) if mask else None,
                    "nonzeros": nonzeros(mask) if mask else None,
                    "accuracy": ev.accuracy,
                    "task_ci95": ev.ci95,
                    "per_step": [r["accuracy"] for r in ev.per_step],
                    "best_step": ev.best_step,
                    "val_accuracy": res.val_accuracy,
                    "early_stop_iteration": res.best_iteration,
                    "exported_bytes": _exported_bytes(path),
                })
                if level == 0:  # how far the dense model got: has the budget converged?
                    record["val_curve"] = _val_curve(path / rundir.METRICS)
            records.append(record)
    seen: set[tuple[int, int, str]] = set()
    models = []
    for r in _with_costs(records):
        key = (r["seed"], r["level"], r["method"])
        if r.pop("model") and key not in seen:
            seen.add(key)
            models.append(r)
    return models


def _mean(rs: list[dict], key: str) -> float | None:
    """Mean of ``key`` over runs, None unless every run has it."""
    values = [r.get(key) for r in rs]
    return None if not values or None in values else float(np.mean(values))


def _pairs(rs: list[dict], ref: dict[tuple[int, int], float], level: int | None = None
           ) -> list[float] | None:
    """Each run's accuracy minus the reference of its seed (and of its level, or of ``level``);
    None unless every run has one to pair with."""
    diffs = [r["accuracy"] - ref[(r["seed"], r["level"] if level is None else level)]
             for r in rs if (r["seed"], r["level"] if level is None else level) in ref]
    return diffs if diffs and len(diffs) == len(rs) else None


def _mean_ci(diffs: list[float] | None) -> tuple[float | None, float | None]:
    """Mean ± 95% CI over seeds (Student's t; no CI with one seed)."""
    if not diffs:
        return None, None
    if len(diffs) < 2:
        return float(diffs[0]), None
    return mean_ci95(np.array(diffs), student=True)


def _comparisons(method: str, level: int, rs: list[dict],
                 imp: dict[tuple[int, int], float]) -> dict:
    """Paired by seed: the difference to IMP's ticket at this level and, below 100%, to the
    dense model (IMP's level 0), each mean ± 95% CI; the equivalence verdict against the
    stated margin; the real cost (wall, CPU) relative to IMP beside the FLOPs."""
    to_ticket = _pairs(rs, imp)
    diff, diff_ci = _mean_ci(to_ticket)
    dense, dense_ci = _mean_ci(_pairs(rs, imp, level=0) if level > 0 else None)
    compared = method != IMP and level > 0 and to_ticket is not None
    return {"diff_vs_ticket": diff, "diff_vs_ticket_ci95": diff_ci,
            "equivalence": equivalence(np.array(to_ticket)) if compared else None,
            "diff_vs_dense": dense, "diff_vs_dense_ci95": dense_ci,
            "wall_vs_imp": _mean(rs, "wall_vs_imp"), "cpu_vs_imp": _mean(rs, "cpu_vs_imp"),
            "cpu_seconds": _mean(rs, "cpu_seconds")}


def summarize(records: list[dict]) -> list[dict]:
    """Rows per (method, level): means over seeds; the CI is over seeds (Student's t) when there
    are ≥ 2, otherwise the single run's CI over test tasks (``ci_over`` says which)."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["level"])].append(r)
    imp = {(r["seed"], r["level"]): r["accuracy"] for r in records if r["method"] == IMP}
    rows = []
    for (method, level), rs in groups.items():
        accs = np.array([r["accuracy"] for r in rs])
        seeds = len(rs)
        mean, ci = (mean_ci95(accs, student=True) if seeds >= 2
                    else (float(accs[0]), rs[0]["task_ci95"]))
        steps = np.array([r["per_step"] for r in rs])
        rows.append({
            "method": method,
            "level": level,
            "density": float(np.mean([r["density"] for r in rs])),
            "seeds": seeds,
            "accuracy": mean,
            "ci95": ci,
            "ci_over": "seeds" if seeds >= 2 else "tasks",
            "task_ci95": float(np.mean([r["task_ci95"] for r in rs])),
            "per_step": steps.mean(axis=0).tolist(),
            "best_step": int(np.argmax(steps.mean(axis=0))),
            "val_accuracy": float(np.mean([r["val_accuracy"] for r in rs])),
            "early_stop_iteration": float(np.mean([r["early_stop_iteration"] for r in rs])),
            "early_stop_ci95": (mean_ci95(np.array([r["early_stop_iteration"] for r in rs]),
                                          student=True)[1]
                                if seeds >= 2 else None),
            "train_seconds": float(np.sum([r["train_seconds"] for r in rs])),
            "compute_tasks": float(np.mean([r["compute_tasks"] for r in rs])),
            "compute_vs_full_imp": _mean(rs, "compute_vs_full_imp"),
            "tasks_vs_imp": _mean(rs, "tasks_vs_imp"),
            "compute_macs": _mean(rs, "compute_macs"),
            "compute_flops": (FLOPS_PER_MAC * _mean(rs, "compute_macs")
                              if _mean(rs, "compute_macs") is not None else None),
            "val_curves": [r["val_curve"] for r in rs if r.get("val_curve")],
            "flops_vs_imp": _mean(rs, "macs_vs_imp"),
            "eval_macs": _mean(rs, "eval_macs"),
            **_comparisons(method, level, rs, imp),
            "nonzeros": rs[0]["nonzeros"],
            "layer_densities": rs[0]["layer_densities"],
            "exported_bytes": (round(float(np.mean([r["exported_bytes"] for r in rs])))
                               if all(r["exported_bytes"] for r in rs) else None),
        })
    order = {m: i for i, m in enumerate(branches())}
    rows.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"], r["level"]))
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """Levels × methods: accuracy ± CI, plus the ticket's early-stopping iteration and the size
    of its export."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    by = {(r["method"], r["level"]): r for r in rows}
    levels = sorted({r["level"] for r in rows})
    head = ["level", "weights remaining %"] + [f"{m} acc % ± CI" for m in methods]
    head += ["ticket early-stop it.", "ticket meta-train s", "ticket exported bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lvl in levels:
        ref = next(by[(m, lvl)] for m in methods if (m, lvl) in by)
        cells = [str(lvl), f"{100 * ref['density']:.1f}"]
        for m in methods:
            r = by.get((m, lvl))
            cells.append(f"{_pct(r['accuracy'])} ± {_pct(r['ci95'])}" if r else "—")
        t = by.get((IMP, lvl))
        cells += [f"{t['early_stop_iteration']:.0f}" if t else "—",
                  f"{t['train_seconds']:.0f}" if t else "—",
                  f"{t['exported_bytes']:,}" if t and t["exported_bytes"] else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seeds"] for r in rows})
    over = "seeds (Student's t)" if min(seeds) >= 2 else "test tasks (one seed)"
    lines.append("")
    lines.append(f"Accuracy: mean test accuracy after the last adaptation step; CI: 95% over {over}. "
                 "Exported bytes: size of the model's compact `sparsemeta export` file (fp32).")
    if len(methods) > 3 or any(m not in (IMP, "reinit", "random") for m in methods):
        lines += ["", cost_table(rows)]
    return "\n".join(lines) + "\n"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if x < 0.1 else f"{x:.2f}")


#: a method's FLOPs saving is called theoretical where its CPU time relative to IMP is more
#: than this many times its FLOPs ratio (masks on dense tensors: the kernels do the dense work)
THEORETICAL = 1.5


def _signed(x: float | None, ci: float | None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.2f}" + (f" ± {_pct(ci)}" if ci is not None else "")


def _cost_row(r: dict) -> str:
    imp = r["method"] == IMP
    ticket = "—" if imp else _signed(r["diff_vs_ticket"], r["diff_vs_ticket_ci95"])
    verdict = "—" if imp else f"{r['equivalence'] or '—'} ({r['seeds']} seeds)"
    theoretical = (r["flops_vs_imp"] and r["cpu_vs_imp"]
                   and r["cpu_vs_imp"] > THEORETICAL * r["flops_vs_imp"])
    cpu = _ratio(r["cpu_vs_imp"]) + (" (FLOPs saving theoretical)" if theoretical else "")
    return (f"| {100 * r['density']:.1f} | {r['method']} | {_pct(r['accuracy'])} ± "
            f"{_pct(r['ci95'])} | {ticket} | {verdict} | "
            f"{_signed(r['diff_vs_dense'], r['diff_vs_dense_ci95'])} | "
            f"{_ratio(r['flops_vs_imp'])} | {_ratio(r['wall_vs_imp'])} | {cpu} |")


def cost_table(rows: list[dict]) -> str:
    """At every density where methods other than IMP have models: method → accuracy ± CI, its
    paired difference to the IMP ticket with the equivalence verdict, its paired difference to
    the dense model, and what producing it cost relative to IMP there — FLOPs, wall, CPU."""
    dense = next((r for r in rows if r["method"] == IMP and r["level"] == 0), None)
    levels = sorted({r["level"] for r in rows if r["method"] != IMP and r["level"] > 0})
    head = ["weights %", "method", "acc % ± CI", "Δ vs IMP ticket ± CI (paired)",
            f"within ±{100 * EQUIVALENCE_MARGIN:g} points?", "Δ vs dense ± CI (paired)",
            "FLOPs ×IMP", "wall ×IMP", "CPU ×IMP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lvl in levels:
        lines += [_cost_row(r) for r in rows if r["level"] == lvl]
    lines.append("")
    ref = (f" The dense model (level 0): {_pct(dense['accuracy'])} ± {_pct(dense['ci95'])}."
           if dense else "")
    lines.append("Compute to produce the model (its own meta-training plus the runs it was derived "
                 "from; evaluation apart) relative to IMP's at the same density (ticket levels "
                 "0..L): FLOPs counted sparse-aware (2 × conv/linear MACs at the layer densities "
                 "of every step); wall and CPU seconds of training as measured in this "
                 "experiment's processes (\"theoretical\": the CPU ratio is more than "
                 f"{THEORETICAL:g}× the FLOPs ratio — masks on dense tensors save no time). Δ: "
                 "accuracy minus the IMP ticket's (or the dense model's) of the same seed, mean ± "
                 "95% CI over seeds. Within the margin stated in advance (foundations/stats.py): "
                 "equivalent = the paired CI inside it, with at least 8 seeds; worse/better = "
                 "the whole CI beyond it; not worse = above −margin only; inconclusive = reaching "
                 "past −margin; too few seeds = none of those with under 8 seeds." + ref)
    return "\n".join(lines)


def check_inputs(roots: list[str | Path]) -> list[Path]:
    """The experiment directories of one report, refused in one line where they cannot be
    summarised together: not an experiment directory, one given twice (also through a link),
    or experiments of different configs (their seeds would be averaged as one method's)."""
    paths = [rundir.require_dir(r, EXPERIMENTS) for r in roots]
    given: dict[str, int] = {}
    for i, (root, path) in enumerate(zip(roots, paths)):
        kind = rundir.kind_of(path)
        if kind not in (None, "experiment"):
            raise UserError(f"'{root}' is a {kind} directory, not {EXPERIMENTS}")
        first = given.setdefault(os.path.realpath(path), i)
        if first != i:
            raise UserError(f"'{roots[first]}' and '{root}' are the same experiment directory; "
                            "give each experiment once (it would count as two seeds)")
    for path in paths[1:]:
        d = rundir.experiment_difference(paths[0], path)
        if d:
            raise UserError(f"'{path}' was run with another config than '{paths[0]}' ({d}); "
                            "report them separately")
    return paths


def write_report(roots: list[str | Path], out: str | Path | None = None) -> dict:
    """Write summary.json, report.md and the plots; return the summary."""
    roots = check_inputs(roots)
    out = Path(out) if out else roots[0]
    kind = rundir.path_kind(out)
    if kind not in (None, "a directory"):
        raise UserError(f"--out '{out}' is {kind}; the report is a directory (summary.json, "
                        "report.md, plots): give a directory")
    records = collect(roots)
    if not records:
        raise UserError(f"no finished runs under {', '.join(map(str, roots))} "
                        "(expected seed_S/level_LL/<method>/eval.json)")
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    table = markdown_table(rows)
    summary = {"experiments": [str(r) for r in roots], "rows": rows, "runs": records}
    write_json(out / rundir.SUMMARY, summary)
    plots = plot(rows, out)
    md = "# sparsemeta report\n\n" + table + "\n" + "".join(
        f"![{p.stem}]({p.name})\n" for p in plots)
    atomic_write_text(out / rundir.REPORT, md)
    summary["table"] = table
    summary["paths"] = [str(out / rundir.SUMMARY), str(out / rundir.REPORT)] + [str(p) for p in plots]
    return summary
