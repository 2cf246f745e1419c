"""What a sparsity method is to the rest of sparsemeta: a ``Method`` record, and the ``SeedRun``
context its runs are made in.

A method names the run-directory branches it writes (and how the compute of each is counted),
how many runs it plans per seed, how it runs them, what ``tune`` scores and searches for it, and
whether it works with filter pruning. The runner, the report, ``tune`` and the CLI read only
these records, so a new method is one file plus one line in the registry (``methods/__init__``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from sparsemeta.config import Config, config_from_dict
from sparsemeta.data.base import FewShotData
from sparsemeta.foundations import streams
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.runtime import start_child
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.masks import Mask, full_mask, load_mask
from sparsemeta.sparsity.prune import (
    clear_removed_filters,
    filter_counts,
    filter_prune,
    layer_rates,
    magnitude_prune,
    random_filter_mask_like,
    random_mask_like,
)
from sparsemeta.training import rundir
from sparsemeta.training.loop import train
from sparsemeta.training.rundir import RunDir, RunResult


def all_levels(level: int) -> range:
    """Compute rule of a chain of levels: a model at level L also cost levels 0..L-1."""
    return range(level)


def dense_level_only(level: int) -> range:
    """Compute rule of a model derived from one dense run: level 0 (for L ≥ 1)."""
    return range(min(level, 1))


def planned_levels(cfg: Config) -> int:
    """Levels a non-IMP method makes runs at: one per ``prune.targets`` entry, or every level."""
    return len(cfg.prune.targets or range(cfg.prune.num_levels()))


def same_level(level: int) -> range:
    """Compute rule of a model derived from a run at its own level (a gradual-pruning run)."""
    return range(level, level + 1)


@dataclass(frozen=True)
class Branch:
    """A branch (``seed_S/level_LL/<name>``) a method writes. ``model=False``: search runs,
    counted for compute but not reported as models. A model's compute is its own meta-tasks plus
    those of branch ``prior`` at the levels ``prior_levels(level)``."""

    name: str
    color: str
    model: bool = True
    prior: str | None = None
    prior_levels: Callable[[int], range] = all_levels


class RunCounter(Protocol):
    def __call__(self, name: str, result: RunResult, seconds: float) -> None: ...


#: the data set of a background training process (given once, when the process starts)
_DATA: list[FewShotData] = []


def start_background(threads: int, data: FewShotData) -> None:
    """A spawned background training process: the experiment's data set, and the start-up of
    every training child (``runtime.start_child``)."""
    _DATA[:] = [data]
    start_child(threads)


def background_train(cfg_dict: dict, path: str, kwargs: dict) -> tuple[RunResult, float]:
    """One meta-training in a background process: (its result, its seconds)."""
    t0 = time.perf_counter()
    result = train(config_from_dict(cfg_dict), path, data=_DATA[0], progress=False, **kwargs)
    return result, time.perf_counter() - t0


@dataclass
class Background:
    """A run handed to the pool: what it trains, and its (result, seconds) to come."""

    name: str
    path: Path
    kwargs: dict
    future: Future


class SeedRun:
    """Everything a method needs to make the runs of one seed: the config with that seed, the
    experiment's directory layout, IMP's per-layer counts, pruning as ``prune.structure`` says.

    ``pool``: processes for the runs that nothing of the method waits for (``background``,
    e.g. the lottery controls), so they train beside the IMP chain; ``join`` ends them."""

    def __init__(self, cfg: Config, root: Path, seed: int, data: FewShotData,
                 counter: RunCounter, progress: bool, controls: list[str],
                 pool: Executor | None = None) -> None:
        self.cfg = dataclasses.replace(cfg, seed=seed)
        self.root, self.seed, self.data = root, seed, data
        self.counter, self.progress, self.controls = counter, progress, controls
        self.pool = pool
        self.pending: list[Background] = []
        self.levels = self.cfg.prune.num_levels()
        self.full = full_mask(dict(build_model(self.cfg, data.channels).named_parameters()))
        p = self.cfg.prune
        self.filters = p.structure == "filters"
        # IMP's exact per-layer counts by level: kept weights, or kept filters if structured
        self.counts = (filter_counts(self.full, p.rate, self.levels) if self.filters
                       else imp_counts(self.full, p.rate, p.output_rate_factor, self.levels))

    def counts_at(self, level: int) -> dict[str, int]:
        """Kept weights (filters if structured) per layer at ``level``, as IMP has them: known in
        advance for layerwise pruning; with ``prune.scope=global`` they depend on the trained
        weights, so they are read from the ticket's mask of that level."""
        if self.cfg.prune.scope != "global" or self.filters or level == 0:
            return self.counts[level]
        ticket = self.dir(level, "ticket") / rundir.MASK
        if not ticket.exists():
            raise UserError("prune.scope=global: the methods other than lottery take IMP's "
                            "per-layer counts from its ticket masks; run them together with "
                            "--method lottery")
        return {k: int(m.sum()) for k, m in load_mask(ticket).items()}

    def target_levels(self) -> list[int]:
        return target_levels(self.cfg, self.counts)

    def run(self, name: str, path: Path, background: bool = False,
            **kwargs) -> RunResult | None:  # noqa: ANN003
        """Train ``path``; a ``background`` run goes to the pool (if any) and returns None —
        only for a run whose files nothing later in the method reads."""
        if background and self.pool is not None:
            future = self.pool.submit(background_train, self.cfg.to_dict(), str(path), kwargs)
            self.pending.append(Background(name, path, kwargs, future))
            return None
        result, seconds = self._train(name, path, kwargs)
        self.counter(f"seed {self.seed} {name}", result, seconds)
        self._report(lambda job: job.future.done())
        return result

    def _train(self, name: str, path: Path, kwargs: dict) -> tuple[RunResult, float]:
        t0 = time.perf_counter()
        result = train(self.cfg, path, data=self.data, progress=self.progress,
                       desc=f"seed {self.seed} {name}", **kwargs)
        return result, time.perf_counter() - t0

    def _report(self, ready: Callable[[Background], bool]) -> None:
        """Count the background runs that ``ready`` selects, in submission order (raising the
        error of one that failed), and forget them."""
        for job in [job for job in self.pending if ready(job)]:
            result, seconds = job.future.result()
            self.counter(f"seed {self.seed} {job.name}", result, seconds)
            self.pending.remove(job)

    def join(self) -> None:
        """Finish the background runs: this process takes the not yet started ones from the
        end of the queue while the pool works from its front, so both end together."""
        for job in reversed(self.pending):
            if job.future.cancel():
                job.future = Future()
                job.future.set_result(self._train(job.name, job.path, job.kwargs))
        self._report(lambda job: True)

    def dir(self, level: int, branch: str) -> Path:
        return rundir.level_dir(self.root, self.seed, level, branch)

    def label(self, level: int) -> str:
        return f"level {level}/{self.levels}"

    def saved_mask(self, path: Path, make: Callable[[], Mask]) -> Mask:
        """The run's saved mask if it exists (it is authoritative), else a new one."""
        return load_mask(path / rundir.MASK) if (path / rundir.MASK).exists() else make()

    def weights(self, path: Path) -> dict[str, torch.Tensor]:
        """The trained weights of a run (its last checkpoint)."""
        return RunDir(path).weights()

    def rewind_target(self, source: Path) -> dict[str, torch.Tensor]:
        return RunDir(source).rewind_target(self.cfg.prune.rewind_step())

    def theta0(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(self.cfg.seed)
        return build_model(self.cfg, self.data.channels).state_dict()

    # -- what prune.structure changes -------------------------------------------------------
    def prune(self, weights: dict[str, torch.Tensor], mask: Mask) -> Mask:
        p = self.cfg.prune
        if self.filters:
            return filter_prune(weights, mask, p.rate)
        return magnitude_prune(weights, mask, p.rate, p.scope, p.output_rate_factor)

    def random_like(self, mask: Mask, level: int) -> Mask:
        gen = streams.level_generator(streams.RANDOM_MASK, self.seed, level)
        return random_filter_mask_like(mask, gen) if self.filters else random_mask_like(mask, gen)

    def start(self, state: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
        """Initial weights of a masked run: removed filters' outputs exactly zero (structured)."""
        return clear_removed_filters(state, mask) if self.filters else state

    # -- the shared parts of IMP-like methods ---------------------------------------------------
    def dense(self) -> RunResult:
        return self.run("level 0 dense", self.dir(0, "ticket"),
                        snapshot_at=self.cfg.prune.rewind_step())

    def imp_levels(self, source: Path, branch: str, rewind: dict[str, torch.Tensor],
                   after: Callable[[int, Mask, dict[str, torch.Tensor]], Path]) -> None:
        """Iterative magnitude pruning: at each level, prune the weights trained at the level
        below (``source``, then what ``after`` returns), train the ticket from the rewind point
        into ``branch``, and let ``after(level, mask, start)`` run what the method adds."""
        mask = self.full
        for level in range(1, self.levels + 1):
            trained = self.weights(source)
            path = self.dir(level, branch)
            mask = self.saved_mask(path, lambda m=mask, w=trained: self.prune(w, m))
            start = trained if self.cfg.prune.rewind == "none" else rewind
            self.run(f"{self.label(level)} {branch}", path, init=self.start(start, mask),
                     mask=mask)
            source = after(level, mask, start)


def target_levels(cfg: Config, counts: list[dict[str, int]]) -> list[int]:
    """The IMP levels the non-IMP runs are made at: nearest each of ``prune.targets`` by IMP's
    density (``counts``: kept weights per layer by level), or every level."""
    p = cfg.prune
    every = list(range(1, len(counts)))
    if not p.targets:
        return every
    total = [sum(c.values()) for c in counts]
    dens = {lv: total[lv] / total[0] for lv in every}
    lowest = dens[every[-1]] if every else 1.0
    for t in p.targets:
        if t < lowest * (1.0 - p.rate) ** 0.5:  # nearer a level past the last one
            raise UserError(f"prune.targets has {t}, below the last level's density ({lowest:.3f}"
                            f" at level {len(every)}); raise prune.levels")
    return sorted({min(every, key=lambda lv, t=t: abs(dens[lv] - t)) for t in p.targets})


def check_targets(cfg: Config, channels: int) -> None:
    """Refuse ``prune.targets`` the levels cannot reach, before anything is written."""
    full = full_mask(dict(build_model(cfg, channels).named_parameters()))
    p = cfg.prune
    counts = (filter_counts(full, p.rate, p.num_levels()) if p.structure == "filters"
              else imp_counts(full, p.rate, p.output_rate_factor, p.num_levels()))
    target_levels(cfg, counts)


def imp_counts(mask: Mask, rate: float, output_rate_factor: float, levels: int) -> list[dict[str, int]]:
    """Kept weights per layer after 0..levels rounds of layerwise pruning (IMP's exact counts)."""
    rates = layer_rates(mask, rate, output_rate_factor)
    counts = [{k: m.numel() for k, m in mask.items()}]
    for _ in range(levels):
        counts.append({k: c - round(rates[k] * c) for k, c in counts[-1].items()})
    return counts


def never(methods: list[str], controls: list[str]) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """One sparsity method (see the module doc)."""

    name: str
    help: str
    branches: tuple[Branch, ...]
    run: Callable[[SeedRun], None]
    plan: Callable[[Config, list[str]], int]
    """Runs per seed, given the config and the lottery controls."""
    score_branch: str
    """The branch whose model ``tune`` scores (nearest the target density)."""
    score_dense_only: bool = False
    """``tune`` scores the dense (level 0) model only."""
    tune_params: tuple[str, ...] = ()
    """The method's own knobs that ``tune`` searches besides the learning rates."""
    structured: bool = False
    """Also runs with ``prune.structure=filters``."""
    covered_by: Callable[[list[str], list[str]], bool] = never
    """True where other selected methods/controls already make this method's runs."""
