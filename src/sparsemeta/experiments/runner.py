"""Sparsity experiments: lottery tickets (IMP + rewinding + controls) and the baselines.

Layout of an experiment directory (every leaf is a ``train`` run directory)::

    DIR/experiment.yaml                    resolved config, methods, seeds, controls
    DIR/seed_S/level_00/ticket/            dense meta-training (θ₀ in init.pt)
    DIR/seed_S/level_LL/ticket/            IMP: mask pruned from level L-1, rewound weights
    DIR/seed_S/level_LL/reinit/            control: ticket mask, fresh initialisation
    DIR/seed_S/level_LL/random/            control / method: random mask, same layer densities
    DIR/seed_S/level_00/l1/                L1-regularised dense meta-training
    DIR/seed_S/level_LL/l1_oneshot/        its magnitude mask at level L's density, as is
    DIR/seed_S/level_LL/l1/                … after a short masked meta-fine-tune
    DIR/seed_S/level_LL/rigl/              RigL at level L's density (ERK or uniform)
    DIR/seed_S/level_LL/eb_search/         early-bird search run (stops when the mask settles)
    DIR/seed_S/level_LL/earlybird/         the early-bird ticket of level L, trained in full

Level L always means the density that L rounds of ``prune.rate`` give, so every method is
compared at the same densities. With ``prune.structure=filters`` a level removes whole conv
filters (``sparsity.prune.filter_prune``), the random control and method remove random filters
at the same per-layer counts, and every start point has the removed filters' bias and batch-norm
parameters zeroed (``clear_removed_filters``).

Each method is a module of ``experiments.methods`` (see its registry); this module selects,
plans and runs them, one seed at a time or seeds in parallel processes.

Every stage is idempotent: a finished run directory is skipped, an interrupted one resumes from
its checkpoint, and every mask and initial weight is a deterministic function of files already
on disk, so re-running after a crash (even SIGKILL) gives the same result as never crashing.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsemeta.config import MAX_SEED, Config
from sparsemeta.data.base import FewShotData
from sparsemeta.data.registry import load_data
from sparsemeta.experiments.methods import METHODS
from sparsemeta.experiments.methods.base import ImpPlan, SeedRun, start_background
from sparsemeta.experiments.methods.lottery import CONTROLS
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.lock import exclusive
from sparsemeta.foundations.runtime import cores, start_child
from sparsemeta.foundations.safeio import short
from sparsemeta.training.rundir import LOCK, RunResult, bind_experiment, make_dir
from sparsemeta.training.setup import Setup, prepare


def _check_list(items: list, allowed: tuple[str, ...], flag: str) -> list[str]:
    """``items`` (from a flag or a preset's list) if every one is ``allowed``; duplicates
    dropped, order kept."""
    bad = [c for c in items if c not in allowed]
    if bad:
        raise UserError(f"unknown {flag[2:].rstrip('s')} {short(bad[0])}; {flag} takes a comma "
                        f"list of {', '.join(allowed)}" + (" (or none)" if flag == "--controls"
                                                           else ""))
    return list(dict.fromkeys(items))


def _split(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    """A comma list given on the command line."""
    if text == "none":
        return []
    if not text.strip(",").strip():
        raise UserError(f"{flag} is empty; give a comma list of {', '.join(allowed)}"
                        + (" or none" if flag == "--controls" else ""))
    return [c.strip() for c in text.split(",") if c.strip()]


def check_controls(items: list) -> list[str]:
    return _check_list(items, CONTROLS, "--controls")


def check_methods(items: list) -> list[str]:
    methods = _check_list(items, tuple(METHODS), "--method")
    if not methods:
        raise UserError(f"--method needs at least one of {', '.join(METHODS)}")
    return methods


def check_seeds(items: list, unique: bool = True) -> list[int]:
    """Seeds as torch, NumPy and Optuna take them: integers in [0, 2³² − 1] (``unique``: each
    once, in order)."""
    if not isinstance(items, list) or not items or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in items):
        raise UserError(f"--seeds takes integers from 0 to {MAX_SEED} (32-bit), got "
                        f"{short(items)}")
    return list(dict.fromkeys(items)) if unique else items


def parse_controls(text: str | None) -> list[str]:
    return check_controls(_split("none" if text is None else text, CONTROLS, "--controls"))


def parse_methods(text: str) -> list[str]:
    return check_methods(_split(text, tuple(METHODS), "--method"))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes a comma list of integers, got {short(text)}") from None
    return check_seeds(seeds)


def selected(methods: list[str], controls: list[str]) -> list[str]:
    """The methods that make runs of their own, in registry order (e.g. ``dense`` is part of
    ``lottery``, and ``random`` is lottery's random control when both are asked for)."""
    return [m for m in METHODS if m in methods and not METHODS[m].covered_by(methods, controls)]


def planned_runs(cfg: Config, methods: list[str], controls: list[str]) -> int:
    """Meta-training runs of one seed."""
    return sum(METHODS[m].plan(cfg, controls) for m in selected(methods, controls))


class RunCounter:
    """Experiment-level progress: runs done out of all runs, elapsed time and ETA."""

    def __init__(self, total: int, progress: bool) -> None:
        self.total, self.done, self.progress = total, 0, progress
        self.start = time.perf_counter()
        self.timed = 0  # runs that did work in this process (finished ones are skipped fast)

    def __call__(self, name: str, result: RunResult, seconds: float) -> None:
        self.done += 1
        if seconds > 1.0:
            self.timed += 1
        if not self.progress:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.timed * (self.total - self.done) if self.timed else 0.0
        ev = result.evaluation
        acc = (f"{ev.split} {100 * ev.accuracy:.2f}% ± {100 * ev.ci95:.2f}%" if ev
               else f"stopped at iteration {result.iterations_run}")
        print(f"[{self.done}/{self.total}] {name}: {acc}, density {100 * result.density:.1f}% "
              f"— elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr)


@dataclass(frozen=True)
class Experiment:
    """What one experiment runs: its checked setup and IMP plan, methods, seeds, controls."""

    setup: Setup
    plan: ImpPlan
    methods: list[str]
    seeds: list[int]
    controls: list[str]

    def runs(self) -> int:
        """Meta-training runs of all seeds."""
        return len(self.seeds) * planned_runs(self.setup.cfg, self.methods, self.controls)


def run_seed(exp: Experiment, root: Path, seed: int, data: FewShotData, counter: RunCounter,
             progress: bool, background: int = 0) -> None:
    """Every method of one seed, in this process; ``background`` more processes (with this
    process's thread count) train the runs nothing waits for — each method's are finished
    before the next method starts, so a method may read any earlier method's files."""
    pool = (ProcessPoolExecutor(background, mp_context=multiprocessing.get_context("spawn"),
                                initializer=start_background,
                                initargs=(torch.get_num_threads(), data))
            if background else None)
    try:
        s = SeedRun(exp.setup.in_this_process(), exp.plan, root, seed, data, counter, progress,
                    exp.controls, pool=pool)
        for name in selected(exp.methods, exp.controls):
            METHODS[name].run(s)
            s.join()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _seed_worker(exp: Experiment, root: str, seed: int, threads: int, background: int,
                 data: FewShotData) -> None:
    """One seed in its own process (spawned): the experiment's data set and the start-up of
    every training child (``runtime.start_child``: threads, allocator, ends with its parent)."""
    start_child(threads)
    counter = RunCounter(exp.runs() // len(exp.seeds), progress=True)
    run_seed(exp, Path(root), seed, data, counter, progress=False, background=background)


def check_experiment(setup: Setup, methods: list[str], seeds: list[int], controls: list[str],
                     channels: int) -> Experiment:
    """Refuse what cannot run — before the experiment directory is made, so a corrected
    command can reuse the same --out — and plan it (IMP's counts and target levels, once)."""
    unsupported = [m for m in methods if not METHODS[m].structured]
    if setup.cfg.prune.structure == "filters" and unsupported:
        structured = [m for m in METHODS if METHODS[m].structured]
        raise UserError(f"--method {unsupported[0]} needs prune.structure=unstructured; with "
                        f"filters use {', '.join(structured)}")
    for name in selected(methods, controls):
        if METHODS[name].check is not None:
            METHODS[name].check(setup.cfg)
    return Experiment(setup, ImpPlan.of(setup.cfg, channels), methods, seeds, controls)


def run_experiment(cfg: Config, out: str | Path, methods: list[str], seeds: list[int],
                   controls: list[str], progress: bool = True,
                   data: FewShotData | None = None, workers: int = 1) -> Path:
    """Run (or resume, or skip) every method of every seed of a bare config: the data loaded
    if not given, the config checked against it (the boundary), then ``run_checked``."""
    data = data if data is not None else load_data(cfg.data_spec())
    exp = check_experiment(prepare(cfg, data), methods, seeds, controls, data.channels)
    return run_checked(exp, out, data, progress, workers)


def run_checked(exp: Experiment, out: str | Path, data: FewShotData, progress: bool = True,
                workers: int = 1) -> Path:
    """Run (or resume, or skip) a checked experiment.

    ``workers > 1`` trains in that many processes, each with cores/workers threads: seeds in
    parallel, and within a seed the runs nothing waits for (the lottery controls beside the
    IMP chain, other methods' per-level runs) side by side. On a small CPU two 1-thread
    processes out-run one 2-thread process (1.25× measured on 2 cores, the default preset's
    runs), and on a GPU box small Conv4 runs leave the device mostly idle.
    """
    root = make_dir(out)
    with exclusive(root / LOCK, f"experiment '{root}'", wait=False):
        bind_experiment(root, exp.setup.cfg, exp.methods, exp.seeds, exp.controls)
        _run_seeds(exp, root, progress, data, workers)
    return root


def _run_seeds(exp: Experiment, root: Path, progress: bool, data: FewShotData,
               workers: int) -> None:
    """``workers`` training processes in all: one per seed (up to the number of seeds), the rest
    shared out as background processes of each seed; every process gets cores/workers
    threads (results do not depend on the split)."""
    seed_procs = max(1, min(workers, len(exp.seeds)))
    background = max(1, workers) // seed_procs - 1
    threads = max(1, cores() // max(1, workers))
    if seed_procs == 1:
        counter = RunCounter(exp.runs(), progress)
        kept = torch.get_num_threads()
        if background:
            torch.set_num_threads(threads)
        try:
            for seed in exp.seeds:
                run_seed(exp, root, seed, data, counter, progress, background)
        finally:
            torch.set_num_threads(kept)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=seed_procs, mp_context=ctx) as pool:
        futures = [pool.submit(_seed_worker, exp, str(root), seed, threads, background, data)
                   for seed in exp.seeds]
        for future in futures:
            future.result()


def run_lottery(cfg: Config, out: str | Path, seeds: list[int], controls: list[str],
                progress: bool = True, data: FewShotData | None = None) -> Path:
    return run_experiment(cfg, out, ["lottery"], seeds, controls, progress, data)
