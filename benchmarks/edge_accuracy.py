"""Accuracy of an exported ticket adapted on the edge runtime, over the run's own test tasks.

    python benchmarks/edge_accuracy.py RUN_DIR [--tasks 600] [--int8] [--modes all,head,last:1]

Exports the run's chosen model (fp32, and int8 with ``--int8``) and, for every test task
``0..tasks-1`` of the run's config (the tasks ``eval.json`` was scored on), adapts a fresh copy
with ``sparsemeta-edge``'s NumPy ``Adapter`` for ``meta.eval_inner_steps`` steps on the support
set, updating only what ``--update MODE`` updates, then scores the query. Prints one row per
variant: accuracy ± 95% CI over tasks, the paired difference to fp32/all, and the file size
relative to the dense fp32 model; PyTorch's ``eval.json`` accuracy is printed beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sparsemeta.data.registry import load_data
from sparsemeta.data.tasks import sampler_for
from sparsemeta.experiments.export import export_run
from sparsemeta.foundations.stats import mean_ci95
from sparsemeta.training.rundir import RunDir, load_run_config
from sparsemeta_edge import smz
from sparsemeta_edge.runtime import Adapter, update_names


def task_accuracies(model: smz.SmzModel, sampler, tasks: int, steps: int, mode: str) -> np.ndarray:  # noqa: ANN001
    """Query accuracy of each task after ``steps`` edge adaptation steps under ``mode``."""
    trained = update_names(mode)
    accs = np.zeros(tasks)
    for i in range(tasks):
        task = sampler.task(i)
        adapter = Adapter(copy.deepcopy(model))
        adapter.net.trainable = trained
        sx, sy = task.support_x.numpy(), task.support_y.numpy()
        adapter.adapt(sx, sy, steps)
        logits = adapter.query_logits(sx, task.query_x.numpy())
        accs[i] = float((logits.argmax(1) == task.query_y.numpy()).mean())
    return accs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--tasks", type=int, default=600)
    ap.add_argument("--modes", default="all", help="comma list of all, head, bn, last:K")
    ap.add_argument("--int8", action="store_true", help="also the int8 export (mode all)")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()
    cfg = load_run_config(args.run_dir)
    sampler = sampler_for(cfg.task_spec(), load_data(cfg.data_spec()), cfg.eval.split)
    steps = cfg.meta.eval_inner_steps
    variants = [("fp32", m) for m in args.modes.split(",")] + ([("int8", "all")] if args.int8 else [])
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for values, mode in variants:
            path = Path(tmp) / f"{values}.smz"
            facts = export_run(args.run_dir, path, int8=values == "int8")
            t0 = time.perf_counter()
            accs = task_accuracies(smz.load(path), sampler, args.tasks, steps, mode)
            mean, ci = mean_ci95(accs)
            base = accs if base is None else base
            diff, dci = mean_ci95(accs - base)
            rows.append({"values": values, "update": mode, "accuracy": mean, "ci95": ci,
                         "paired_diff": diff, "paired_ci95": dci, "bytes": facts["bytes"],
                         "ratio_to_dense_fp32": facts["ratio"], "density": facts["density"],
                         "seconds": time.perf_counter() - t0})
    torch_acc = RunDir(args.run_dir).result().evaluation
    print(f"{args.run_dir}: {args.tasks} {cfg.eval.split} tasks, {steps} adaptation steps; "
          f"PyTorch eval.json: {100 * torch_acc.accuracy:.2f}% ± {100 * torch_acc.ci95:.2f}")
    print("| values | update | accuracy % ± CI | paired diff to first row | bytes | × dense fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['values']} | {r['update']} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} "
              f"| {100 * r['paired_diff']:+.2f} ± {100 * (r['paired_ci95'] or 0):.2f} | "
              f"{r['bytes']:,} | {r['ratio_to_dense_fp32']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
