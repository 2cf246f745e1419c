"""``sparsemeta sweep``: a grid of experiments run as Ray tasks (or one after another), one report.

A sweep file names a base config, fixed overrides and a grid; every combination is one
experiment directory under the sweep's ``out``, run by the same code as ``sparsemeta run``::

    config: glyphs-lottery            # preset or YAML path
    set: {train.iterations: 300}      # overrides for every experiment (optional)
    grid:                             # seeds × methods × any config keys
      seeds: [0, 1]
      methods: [lottery, dense]
      prune.rate: [0.2, 0.3]
      meta.algorithm: [maml, mamlpp]
    controls: [reinit, random]        # lottery controls (optional)
    out: runs/my-sweep                # optional (--out wins)
    ray: {cpus_per_task: 1, gpus_per_task: 0}   # optional; --address for an existing cluster

Each experiment is idempotent: a finished one has ``done.json`` and is skipped, an interrupted
one resumes from its checkpoints. The report groups experiments by their grid point without
seed and method (a *variant*), one table each, in ``report.md`` and ``summary.json`` at ``out``.
On a Ray cluster, every node needs sparsemeta installed and ``out`` on a shared file system.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparsemeta.config import build_config
from sparsemeta.foundations.atomic import atomic_write_text
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import write_json
from sparsemeta.foundations.lock import exclusive
from sparsemeta.foundations.safeio import read_yaml, short
from sparsemeta.meta.engine import check_core
from sparsemeta.training import rundir
from sparsemeta.training.rundir import LOCK, make_dir

SWEEP_KEYS = {"config", "set", "grid", "controls", "out", "ray"}
RAY_KEYS = {"cpus_per_task", "gpus_per_task"}


@dataclass(frozen=True)
class GridPoint:
    """One grid point: a ``sparsemeta run`` of one method and one seed."""

    name: str
    variant: str
    method: str
    seed: int
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Sweep:
    config: str
    out: Path
    controls: list[str]
    experiments: list[GridPoint]
    cpus_per_task: float
    gpus_per_task: float


def _value_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read and validate a sweep file, building every experiment's config before any runs."""
    from sparsemeta.experiments.runner import (
        check_controls,
        check_methods,
        check_seeds,
        parse_controls,
    )

    path = Path(path)
    spec = read_yaml(path, what=f"sweep file '{path}'") or {}
    if not isinstance(spec, dict):
        raise UserError(f"sweep file '{path}' must be a mapping with a 'grid'")
    unknown = sorted(map(str, set(spec) - SWEEP_KEYS))
    if unknown:
        raise UserError(f"unknown sweep key {short(unknown[0])} in '{path}' (known: "
                        f"{', '.join(sorted(SWEEP_KEYS))})")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"sweep file '{path}' needs a 'grid' mapping, e.g. grid: {{seeds: [0, 1]}}")
    for key, values in grid.items():
        if not isinstance(key, str) or not isinstance(values, list) or not values:
            name = key if isinstance(key, str) else short(key)
            raise UserError(f"grid.{name} must be a non-empty list, got {short(values)}")
    fixed = spec.get("set") or {}
    if not isinstance(fixed, dict) or not all(isinstance(k, str) for k in fixed):
        raise UserError(f"'set' must be a mapping of config keys to values, got {short(fixed)}")
    ray = spec.get("ray") or {}
    if not isinstance(ray, dict) or set(ray) - RAY_KEYS:
        raise UserError(f"'ray' takes only {', '.join(sorted(RAY_KEYS))}, got {short(ray)}")
    for key, value in ray.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 <= value < math.inf) or (key == "cpus_per_task" and value == 0):
            raise UserError(f"ray.{key} must be a number (cpus > 0, gpus >= 0), got {short(value)}")
    controls = spec.get("controls", ["reinit", "random"])
    if not isinstance(controls, (str, list, type(None))):
        raise UserError(f"'controls' must be a list like [reinit, random] or none, got "
                        f"{short(controls)}")
    controls = (parse_controls(controls) if isinstance(controls, str)
                else check_controls(controls or []))
    methods = check_methods(grid.get("methods", ["lottery"]))
    seeds = check_seeds(grid.get("seeds", [0]), unique=False)  # a repeat is refused below
    config = spec.get("config", "glyphs-lottery")
    if not isinstance(config, str):
        raise UserError(f"'config' must be a preset name or a YAML path, got {short(config)}")
    if Path(config).is_file():  # a YAML path: absolute, so Ray workers anywhere find it
        config = str(Path(config).resolve())
    base = [f"{k}={_value_text(v)}" for k, v in fixed.items()]
    keys = [k for k in grid if k not in ("seeds", "methods")]
    experiments = []
    for point in itertools.product(*(grid[k] for k in keys)):
        variant_over = [f"{k}={_value_text(v)}" for k, v in zip(keys, point)]
        variant = _slug("-".join(variant_over)) or "base"
        for method in methods:
            for seed in seeds:
                overrides = (*base, *variant_over, f"seed={seed}")
                check_core(build_config(config, list(overrides)))  # all valid before any run
                name = _slug("-".join([method, f"seed{seed}", *variant_over]))
                experiments.append(GridPoint(name, variant, method, seed, overrides))
    _check_unique(experiments, path)
    out_dir = next((o for o in (out, spec.get("out")) if o is not None),
                   Path("runs") / f"sweep-{path.stem}")
    if not isinstance(out_dir, (str, Path)) or not str(out_dir):
        raise UserError(f"'out' in '{path}' must be a directory path, got {short(out_dir)}")
    return Sweep(config, Path(out_dir), controls, experiments,
                 float(ray.get("cpus_per_task", 1)), float(ray.get("gpus_per_task", 0)))


def _check_unique(experiments: list[GridPoint], path: Path) -> None:
    """Two grid points with one directory name (a repeated value, or names equal once made
    file-safe) would share a directory: refused before anything runs."""
    seen: dict[str, GridPoint] = {}
    for exp in experiments:
        other = seen.setdefault(exp.name, exp)
        if other is not exp:
            a = " ".join(other.overrides[:-1]) or "base"
            b = " ".join(exp.overrides[:-1]) or "base"
            raise UserError(f"sweep file '{path}': grid points '{a}' and '{b}' share the "
                            f"directory name '{exp.name}'; remove repeated or look-alike values")


def run_one(config: str, out: str, exp: GridPoint, controls: list[str], threads: int,
            progress: bool) -> dict:
    """Run (or resume) one experiment and mark it done; a done one returns at once."""
    import torch

    from sparsemeta.experiments.runner import run_experiment

    root = Path(out) / exp.name
    done = root / rundir.SWEEP_DONE
    if done.exists():
        return {"name": exp.name, "skipped": True}
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = build_config(config, list(exp.overrides))
    run_experiment(cfg, root, [exp.method], [exp.seed], controls, progress=progress)
    record = {"name": exp.name, "skipped": False, "seconds": time.perf_counter() - t0}
    write_json(done, record)
    return record


def _report(sweep: Sweep) -> str:
    """One report per variant (seeds and methods side by side), and the sweep's report.md."""
    from sparsemeta.experiments.report import write_report

    parts, summary = [f"# Sweep report ({len(sweep.experiments)} experiments)\n"], {}
    variants: dict[str, list[GridPoint]] = {}
    for exp in sweep.experiments:
        variants.setdefault(exp.variant, []).append(exp)
    for variant, exps in variants.items():
        # a dense run is a lottery run's level 0 (same config and seed): count it once
        lottery_seeds = {e.seed for e in exps if e.method == "lottery"}
        exps = [e for e in exps if not (e.method == "dense" and e.seed in lottery_seeds)]
        roots = [sweep.out / e.name for e in exps if (sweep.out / e.name / rundir.SWEEP_DONE).exists()]
        if not roots:
            continue
        result = write_report(roots, sweep.out / rundir.SWEEP_REPORTS / variant)
        summary[variant] = {"experiments": [e.name for e in exps],
                            "overrides": list(exps[0].overrides[:-1]), "rows": result["rows"]}
        parts.append(f"## {variant}\n\n{result['table']}\n")
    text = "\n".join(parts)
    atomic_write_text(sweep.out / rundir.REPORT, text)
    write_json(sweep.out / rundir.SUMMARY, summary)
    return text


def _result(ray, ref, exp: GridPoint) -> dict:  # noqa: ANN001 - Ray's module and ObjectRef
    """A Ray task's record; its failure as one line (the remote traceback stays in Ray's log)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None) or exc
        text = str(cause).strip().splitlines()
        what = str(cause) if isinstance(cause, UserError) else (
            f"{type(cause).__name__}: {text[-1] if text else ''}")
        raise UserError(f"experiment '{exp.name}' failed: {what}; re-run the sweep to resume "
                        "(finished experiments are kept)") from None


def _prepare_data(sweep: Sweep) -> None:
    """Build each data set's cache once, here, before tasks are dispatched: otherwise every
    task of a cold cache would decode the whole data set at the same time."""
    from sparsemeta.data.registry import load_data

    done = set()
    for exp in sweep.experiments:
        cfg = build_config(sweep.config, list(exp.overrides))
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in done:
            load_data(cfg.data_spec())
            done.add(key)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def run_sweep(sweep: Sweep, engine: str = "auto", address: str | None = None) -> str:
    """Run every experiment not yet done (Ray tasks, or locally one after another), then
    write the aggregated report; returns its Markdown. One sweep process per directory."""
    out = make_dir(sweep.out)
    with exclusive(out / LOCK, f"sweep '{out}'", wait=False):
        return _run_sweep(sweep, out, engine, address)


def _run_sweep(sweep: Sweep, out: Path, engine: str, address: str | None) -> str:
    atomic_write_text(out / rundir.SWEEP, yaml.safe_dump(
        {"config": sweep.config, "controls": sweep.controls,
         "experiments": [e.name for e in sweep.experiments]}, sort_keys=False))
    if engine == "auto":
        engine = "ray" if ray_available() else "local"
    if engine == "ray" and not ray_available():
        raise UserError("--engine ray needs Ray: pip install -e \".[ray]\" (or use --engine local)")
    if engine == "local" and address:
        raise UserError("--address needs the Ray engine")
    todo = [e for e in sweep.experiments if not (out / e.name / rundir.SWEEP_DONE).exists()]
    _prepare_data(sweep)
    total = len(sweep.experiments)
    print(f"sweep: {total} experiments in {out}; {total - len(todo)} already done, "
          f"{len(todo)} to run ({engine})", file=sys.stderr)
    t0 = time.perf_counter()

    def finished(i: int, record: dict) -> None:
        spent = time.perf_counter() - t0
        eta = spent / i * (len(todo) - i)
        print(f"[{i}/{len(todo)}] {record['name']} done in {record['seconds'] / 60:.1f} min — "
              f"elapsed {spent / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr)

    if engine == "local":
        for i, exp in enumerate(todo, 1):
            finished(i, run_one(sweep.config, str(out), exp, sweep.controls, 0, True))
    elif todo:
        _run_on_ray(sweep, todo, address, finished)
    return _report(sweep)


def _run_on_ray(sweep: Sweep, todo: list[GridPoint], address: str | None,
                finished: Callable[[int, dict], None]) -> None:
    import ray

    started = not ray.is_initialized()  # a caller's own Ray session is left running
    if started:  # never attach silently to whatever RAY_ADDRESS or `ray start` names
        context = ray.init(address=address or "local", include_dashboard=False,
                           log_to_driver=False)
        print(f"ray: {'cluster ' + address if address else 'a new local Ray instance'} "
              f"(gcs {context.address_info.get('gcs_address', '?')})", file=sys.stderr)
    try:
        task = ray.remote(num_cpus=sweep.cpus_per_task, num_gpus=sweep.gpus_per_task)(run_one)
        threads = max(1, int(sweep.cpus_per_task))
        pending = {task.remote(sweep.config, str(sweep.out.resolve()), exp, sweep.controls,
                               threads, False): exp for exp in todo}
        i = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                exp = pending.pop(ref)
                i += 1
                finished(i, _result(ray, ref, exp))
    finally:
        if started:
            ray.shutdown()
