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

Every stage is idempotent: a finished run directory is skipped, an interrupted one resumes from
its checkpoint, and every mask and initial weight is a deterministic function of files already
on disk, so re-running after a crash (even SIGKILL) gives the same result as never crashing.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

from sparsemeta.config import Config
from sparsemeta.data.base import FewShotData
from sparsemeta.data.registry import load_data
from sparsemeta.experiment import atomic_write_text, config_difference, make_dir
from sparsemeta.foundations.errors import UserError
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.hooks import EarlyBirdHooks, L1Hooks, RigLHooks
from sparsemeta.sparsity.masks import Mask, full_mask, load_mask
from sparsemeta.sparsity.prune import (
    clear_removed_filters,
    filter_counts,
    filter_prune,
    layer_rates,
    magnitude_prune,
    random_filter_mask,
    random_filter_mask_like,
    random_mask_like,
)
from sparsemeta.sparsity.rigl import layer_counts, random_mask
from sparsemeta.train import train

METHODS = ("lottery", "dense", "random", "l1", "rigl", "earlybird")
STRUCTURED_METHODS = ("lottery", "dense", "random")
CONTROLS = ("reinit", "random")


def level_dir(root: Path, seed: int, level: int, branch: str = "ticket") -> Path:
    return root / f"seed_{seed}" / f"level_{level:02d}" / branch


def _state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj.get("model", obj)


def _stream(kind: int, seed: int, level: int) -> int:
    """Independent, reproducible random streams per (purpose, seed, level)."""
    return 1_000_003 * kind + 7919 * (seed + 1) + 104_729 * level


def _generator(kind: int, seed: int, level: int) -> torch.Generator:
    return torch.Generator().manual_seed(_stream(kind, seed, level))


def _parse_list(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    if not text or text == "none":
        return []
    items = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in items if c not in allowed]
    if bad:
        raise UserError(f"unknown {flag[2:].rstrip('s')} '{bad[0]}'; {flag} takes a comma list of "
                        f"{', '.join(allowed)}" + (" (or none)" if flag == "--controls" else ""))
    return list(dict.fromkeys(items))


def parse_controls(text: str | None) -> list[str]:
    return _parse_list(text or "", CONTROLS, "--controls")


def parse_methods(text: str) -> list[str]:
    methods = _parse_list(text, METHODS, "--method")
    if not methods:
        raise UserError(f"--method needs at least one of {', '.join(METHODS)}")
    return methods


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes a comma list of integers, got '{text}'") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"--seeds takes non-negative integers, got '{text}'")
    return list(dict.fromkeys(seeds))


def bind_experiment(root: Path, cfg: Config, methods: list[str], seeds: list[int],
                    controls: list[str]) -> None:
    """Record the experiment; refuse to mix a different config into an existing directory.

    Methods, seeds and controls may grow between calls (add a seed later); the config may not.
    """
    path = root / "experiment.yaml"
    record = {"config": cfg.to_dict(), "methods": methods, "seeds": seeds, "controls": controls}
    if path.exists():
        old = yaml.safe_load(path.read_text())
        d = config_difference(old["config"], cfg.to_dict())
        if d:
            raise UserError(
                f"'{root}' holds an experiment with a different config ({d}); use another --out"
            )
        for key in ("methods", "seeds", "controls"):
            record[key] = list(dict.fromkeys(old.get(key, []) + record[key]))
    atomic_write_text(path, yaml.safe_dump(record, sort_keys=False))


def imp_counts(mask: Mask, rate: float, output_rate_factor: float, levels: int) -> list[dict[str, int]]:
    """Kept weights per layer after 0..levels rounds of layerwise pruning (IMP's exact counts)."""
    rates = layer_rates(mask, rate, output_rate_factor)
    counts = [{k: m.numel() for k, m in mask.items()}]
    for _ in range(levels):
        counts.append({k: c - round(rates[k] * c) for k, c in counts[-1].items()})
    return counts


def planned_runs(cfg: Config, methods: list[str], controls: list[str]) -> int:
    levels = cfg.prune.num_levels()
    runs = 0
    if "lottery" in methods or "dense" in methods:
        runs += 1
    if "lottery" in methods:
        runs += levels * (1 + len(controls))
    if "random" in methods and not ("lottery" in methods and "random" in controls):
        runs += levels
    if "l1" in methods:
        runs += 1 + levels * (1 + (cfg.l1.finetune_iterations > 0))
    if "rigl" in methods:
        runs += levels
    if "earlybird" in methods:
        runs += 2 * levels
    return runs


class RunCounter:
    """Experiment-level progress: runs done out of all runs, elapsed time and ETA."""

    def __init__(self, total: int, progress: bool) -> None:
        self.total, self.done, self.progress = total, 0, progress
        self.start = time.perf_counter()
        self.timed = 0  # runs that did work in this process (finished ones are skipped fast)

    def __call__(self, name: str, result: dict, seconds: float) -> None:
        self.done += 1
        if seconds > 1.0:
            self.timed += 1
        if not self.progress:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.timed * (self.total - self.done) if self.timed else 0.0
        acc = (f"test {100 * result['accuracy']:.2f}% ± {100 * result['ci95']:.2f}%"
               if result.get("split") else f"stopped at iteration {result['iterations_run']}")
        print(f"[{self.done}/{self.total}] {name}: {acc}, density {100 * result['density']:.1f}% "
              f"— elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr)


class SeedRun:
    """Every method of one seed; each method is a sequence of idempotent train runs."""

    def __init__(self, cfg: Config, root: Path, seed: int, data: FewShotData,
                 counter: RunCounter, progress: bool) -> None:
        self.cfg = dataclasses.replace(cfg, seed=seed)
        self.root, self.seed, self.data = root, seed, data
        self.counter, self.progress = counter, progress
        self.levels = self.cfg.prune.num_levels()
        model = build_model(self.cfg, data.channels)
        self.full = full_mask(dict(model.named_parameters()))
        p = self.cfg.prune
        self.filters = p.structure == "filters"
        # IMP's exact per-layer counts by level: kept weights, or kept filters if structured
        self.counts = (filter_counts(self.full, p.rate, self.levels) if self.filters
                       else imp_counts(self.full, p.rate, p.output_rate_factor, self.levels))

    def run(self, name: str, path: Path, **kwargs) -> dict:  # noqa: ANN003
        t0 = time.perf_counter()
        result = train(self.cfg, path, data=self.data, progress=self.progress,
                       desc=f"seed {self.seed} {name}", **kwargs)
        self.counter(f"seed {self.seed} {name}", result, time.perf_counter() - t0)
        return result

    def dir(self, level: int, branch: str) -> Path:
        return level_dir(self.root, self.seed, level, branch)

    def _mask(self, path: Path, make) -> Mask:  # noqa: ANN001
        """The run's saved mask if it exists (it is authoritative), else a new one."""
        return load_mask(path / "mask.pt") if (path / "mask.pt").exists() else make()

    # -- what prune.structure changes -------------------------------------------------------
    def prune(self, weights: dict[str, torch.Tensor], mask: Mask) -> Mask:
        p = self.cfg.prune
        if self.filters:
            return filter_prune(weights, mask, p.rate)
        return magnitude_prune(weights, mask, p.rate, p.scope, p.output_rate_factor)

    def random_like(self, mask: Mask, level: int) -> Mask:
        generator = _generator(2, self.seed, level)
        return random_filter_mask_like(mask, generator) if self.filters else random_mask_like(
            mask, generator)

    def start(self, state: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
        """Initial weights of a masked run: removed filters' outputs exactly zero (structured)."""
        return clear_removed_filters(state, mask) if self.filters else state

    # -- dense and lottery -------------------------------------------------------------------
    def dense(self) -> dict:
        return self.run("level 0 dense", self.dir(0, "ticket"), snapshot_at=self.cfg.prune.rewind_step())

    def rewind_target(self, source: Path) -> dict[str, torch.Tensor]:
        k = self.cfg.prune.rewind_step()
        if k is not None and (source / f"step_{k}.pt").exists():
            return _state(source / f"step_{k}.pt")
        return _state(source / "init.pt")

    def lottery(self, controls: list[str]) -> None:
        p = self.cfg.prune
        self.dense()
        rewind = self.rewind_target(self.dir(0, "ticket"))
        mask, previous = self.full, self.dir(0, "ticket")
        for level in range(1, self.levels + 1):
            path = self.dir(level, "ticket")
            trained = _state(previous / "checkpoint.pt")
            mask = self._mask(path, lambda m=mask, w=trained: self.prune(w, m))
            start = trained if p.rewind == "none" else rewind
            label = f"level {level}/{self.levels}"
            self.run(f"{label} ticket", path, init=self.start(start, mask), mask=mask)
            if "reinit" in controls:
                torch.manual_seed(_stream(1, self.seed, level))
                fresh = build_model(self.cfg, self.data.channels).state_dict()
                self.run(f"{label} reinit", self.dir(level, "reinit"),
                         init=self.start(fresh, mask), mask=mask)
            if "random" in controls:
                rpath = self.dir(level, "random")
                rand = self._mask(rpath, lambda m=mask, lv=level: self.random_like(m, lv))
                self.run(f"{label} random", rpath, init=self.start(start, rand), mask=rand)
            previous = path

    # -- baselines ---------------------------------------------------------------------------
    def theta0(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(self.cfg.seed)
        return build_model(self.cfg, self.data.channels).state_dict()

    def random(self) -> None:
        """Random masks (random filters if structured) with IMP's per-layer counts, from θ₀."""
        shapes = {k: m.shape for k, m in self.full.items()}
        make = random_filter_mask if self.filters else random_mask
        for level in range(1, self.levels + 1):
            path = self.dir(level, "random")
            mask = self._mask(path, lambda lv=level: make(
                shapes, self.counts[lv], _generator(2, self.seed, lv)))
            self.run(f"level {level}/{self.levels} random", path,
                     init=self.start(self.theta0(), mask), mask=mask)

    def l1(self) -> None:
        """L1-regularised dense meta-training, then its magnitude mask at each level's density,
        evaluated as is and after a short masked meta-fine-tune."""
        p, c = self.cfg.prune, self.cfg.l1
        dense = self.dir(0, "l1")
        self.run("level 0 l1", dense, init=self.theta0(), hooks=L1Hooks(c.lambda_))
        weights = _state(dense / "checkpoint.pt")
        mask = self.full
        for level in range(1, self.levels + 1):
            mask = magnitude_prune(weights, mask, p.rate, p.scope, p.output_rate_factor)
            label = f"level {level}/{self.levels}"
            self.run(f"{label} l1 one-shot", self.dir(level, "l1_oneshot"), init=weights,
                     mask=mask, iterations=0)
            if c.finetune_iterations:
                self.run(f"{label} l1 fine-tuned", self.dir(level, "l1"), init=weights, mask=mask,
                         iterations=c.finetune_iterations)

    def rigl(self) -> None:
        r = self.cfg.rigl
        shapes = {k: m.shape for k, m in self.full.items()}
        total = sum(m.numel() for m in self.full.values())
        end = max(1, math.floor(r.end_fraction * self.cfg.train.iterations))
        for level in range(1, self.levels + 1):
            path = self.dir(level, "rigl")
            target = sum(self.counts[level].values()) / total
            mask = self._mask(path, lambda d=target, lv=level: random_mask(
                shapes, layer_counts(shapes, d, r.distribution), _generator(3, self.seed, lv)))
            self.run(f"level {level}/{self.levels} rigl", path, init=self.theta0(), mask=mask,
                     hooks=RigLHooks(r.drop_fraction, r.update_every, end))

    def earlybird(self) -> None:
        """IMP whose levels stop as soon as the next level's mask has settled; the ticket of
        each level is then trained in full from the rewind point."""
        p, e = self.cfg.prune, self.cfg.earlybird

        def hooks() -> EarlyBirdHooks:
            return EarlyBirdHooks(p.rate, p.scope, p.output_rate_factor, e.epsilon, e.every,
                                  e.window)

        search = self.dir(0, "eb_search")
        self.run(f"level 0/{self.levels} early-bird search", search, init=self.theta0(),
                 hooks=hooks(), test=False, snapshot_at=p.rewind_step())
        rewind = self.rewind_target(search)
        mask = self.full
        for level in range(1, self.levels + 1):
            trained = _state(search / "checkpoint.pt")
            mask = self._mask(self.dir(level, "earlybird"), lambda m=mask, w=trained:
                              magnitude_prune(w, m, p.rate, p.scope, p.output_rate_factor))
            start = trained if p.rewind == "none" else rewind
            label = f"level {level}/{self.levels}"
            self.run(f"{label} early-bird ticket", self.dir(level, "earlybird"), init=start,
                     mask=mask)
            if level < self.levels:
                search = self.dir(level, "eb_search")
                self.run(f"{label} early-bird search", search, init=start, mask=mask,
                         hooks=hooks(), test=False)


def run_seed(cfg: Config, root: Path, seed: int, methods: list[str], controls: list[str],
             data: FewShotData, counter: RunCounter, progress: bool) -> None:
    s = SeedRun(cfg, root, seed, data, counter, progress)
    if "lottery" in methods:
        s.lottery(controls)
    elif "dense" in methods:
        s.dense()
    if "random" in methods and not ("lottery" in methods and "random" in controls):
        s.random()
    if "l1" in methods:
        s.l1()
    if "rigl" in methods:
        s.rigl()
    if "earlybird" in methods:
        s.earlybird()


def _seed_worker(cfg_dict: dict, root: str, seed: int, methods: list[str], controls: list[str],
                 threads: int) -> None:
    """One seed in its own process (spawned): its own data view and thread budget."""
    from sparsemeta.config import config_from_dict

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    counter = RunCounter(planned_runs(cfg, methods, controls), progress=True)
    run_seed(cfg, Path(root), seed, methods, controls, load_data(cfg), counter, progress=False)


def run_experiment(cfg: Config, out: str | Path, methods: list[str], seeds: list[int],
                   controls: list[str], progress: bool = True,
                   data: FewShotData | None = None, workers: int = 1) -> Path:
    """Run (or resume, or skip) every method of every seed.

    ``workers > 1`` runs seeds in parallel processes, each with cores/workers threads: on a
    small CPU two 1-thread processes out-run one 2-thread process (~1.35× measured on 2 cores),
    and on a GPU box small Conv4 runs leave the device mostly idle.
    """
    unsupported = [m for m in methods if m not in STRUCTURED_METHODS]
    if cfg.prune.structure == "filters" and unsupported:
        raise UserError(f"--method {unsupported[0]} needs prune.structure=unstructured; with "
                        f"filters use {', '.join(STRUCTURED_METHODS)}")
    data = data if data is not None else load_data(cfg)
    root = make_dir(out)
    bind_experiment(root, cfg, methods, seeds, controls)
    workers = max(1, min(workers, len(seeds)))
    if workers == 1:
        counter = RunCounter(len(seeds) * planned_runs(cfg, methods, controls), progress)
        for seed in seeds:
            run_seed(cfg, root, seed, methods, controls, data, counter, progress)
        return root
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_seed_worker, cfg.to_dict(), str(root), seed, methods, controls,
                               threads) for seed in seeds]
        for future in futures:
            future.result()
    return root


def run_lottery(cfg: Config, out: str | Path, seeds: list[int], controls: list[str],
                progress: bool = True, data: FewShotData | None = None) -> Path:
    return run_experiment(cfg, out, ["lottery"], seeds, controls, progress, data)
