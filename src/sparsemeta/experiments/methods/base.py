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
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sparsemeta.config import Config
from sparsemeta.data.base import FewShotData
from sparsemeta.foundations import streams
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.runtime import start_child
from sparsemeta.meta.learners import initial_model, model_spec
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.masks import Mask, full_mask, load_mask
from sparsemeta.sparsity.prune import (
    clear_removed_filters,
    filter_counts,
    filter_prune,
    random_filter_mask_like,
    random_mask_like,
)
from sparsemeta.training import rundir
from sparsemeta.training.loop import train
from sparsemeta.training.rundir import IMP, RunDir, RunResult
from sparsemeta.training.setup import Setup


def all_levels(level: int) -> range:
    """Compute rule of a chain of levels: a model at level L also cost levels 0..L-1."""
    return range(level)


def dense_level_only(level: int) -> range:
    """Compute rule of a model derived from one dense run: level 0 (for L ≥ 1)."""
    return range(min(level, 1))


@dataclass(frozen=True)
class Param:
    """A tuning range of one config key (``sparsemeta tune``): uniform, or log-uniform;
    integers for an integer key."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class ImpPlan:
    """IMP's pruning plan for a config, the same for every seed (it depends on the shapes only):
    the full mask of the model, the levels, and the exact kept weights (kept filters with
    ``prune.structure=filters``) per layer at every level. Computed once per experiment."""

    full: Mask
    levels: int
    counts: list[dict[str, int]]
    filters: bool
    targets: list[int]
    """The levels the non-IMP runs are made at (``target_levels``)."""

    @classmethod
    def of(cls, cfg: Config, channels: int) -> ImpPlan:
        """The plan, or a one-line UserError where ``prune.targets`` cannot be met."""
        p = cfg.prune
        with torch.random.fork_rng(devices=[]):  # shapes only: torch's RNG is left as it was
            model = build_model(model_spec(cfg, channels))
        full = full_mask(dict(model.named_parameters()))
        filters, levels = p.structure == "filters", p.num_levels()
        counts = (filter_counts(full, p.rate, levels) if filters
                  else p.rule().counts(full, levels))
        return cls(full, levels, counts, filters, target_levels(cfg, counts))


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
    prior_levels: Callable[[int], Iterable[int]] = all_levels


class RunCounter(Protocol):
    def __call__(self, name: str, result: RunResult, seconds: float) -> None: ...


#: the data set of a background training process (given once, when the process starts)
_DATA: list[FewShotData] = []


def start_background(threads: int, data: FewShotData) -> None:
    """A spawned background training process: the experiment's data set, and the start-up of
    every training child (``runtime.start_child``)."""
    _DATA[:] = [data]
    start_child(threads)


def background_train(setup: Setup, path: str, kwargs: dict) -> tuple[RunResult, float]:
    """One meta-training in a background process: (its result, its seconds)."""
    t0 = time.perf_counter()
    result = train(setup.in_this_process(), path, _DATA[0], progress=False, **kwargs)
    return result, time.perf_counter() - t0


@dataclass
class Background:
    """A run handed to the pool: what it trains, and its (result, seconds) to come."""

    name: str
    path: Path
    setup: Setup
    kwargs: dict
    future: Future


class SeedRun:
    """Everything a method needs to make the runs of one seed: the setup (config, device,
    engine) with that seed, the experiment's directory layout, IMP's plan (per-layer counts),
    pruning as ``prune.structure`` says.

    ``pool``: processes for the runs that nothing of the method waits for (``background``,
    e.g. the lottery controls), so they train beside the IMP chain; ``join`` ends them."""

    def __init__(self, setup: Setup, plan: ImpPlan, root: Path, seed: int, data: FewShotData,
                 counter: RunCounter, progress: bool, controls: list[str],
                 pool: Executor | None = None) -> None:
        self.setup = setup.with_seed(seed)
        self.cfg = self.setup.cfg
        self.root, self.seed, self.data = root, seed, data
        self.counter, self.progress, self.controls = counter, progress, controls
        self.pool = pool
        self.pending: list[Background] = []
        self.levels, self.full, self.filters = plan.levels, plan.full, plan.filters
        self.counts, self.targets = plan.counts, plan.targets

    def counts_at(self, level: int) -> dict[str, int]:
        """Kept weights (filters if structured) per layer at ``level``, as IMP has them: known in
        advance for layerwise pruning; with ``prune.scope=global`` they depend on the trained
        weights, so they are read from the ticket's mask of that level."""
        if self.cfg.prune.scope != "global" or self.filters or level == 0:
            return self.counts[level]
        ticket = self.dir(level, IMP) / rundir.MASK
        if not ticket.exists():
            raise UserError("prune.scope=global: the methods other than lottery take IMP's "
                            "per-layer counts from its ticket masks; run them together with "
                            "--method lottery")
        return {k: int(m.sum()) for k, m in load_mask(ticket).items()}

    def target_levels(self) -> list[int]:
        return self.targets

    def run(self, name: str, path: Path, background: bool = False, setup: Setup | None = None,
            **kwargs) -> RunResult | None:  # noqa: ANN003
        """Train ``path`` (with ``setup``: another config for this run, e.g. a search at
        another learning rate; see ``with_config``); a ``background`` run goes to the pool (if
        any) and returns None — only for a run whose files nothing later in the method reads."""
        setup = setup or self.setup
        if background and self.pool is not None:
            future = self.pool.submit(background_train, setup, str(path), kwargs)
            self.pending.append(Background(name, path, setup, kwargs, future))
            return None
        result, seconds = self._train(name, path, setup, kwargs)
        self.counter(f"seed {self.seed} {name}", result, seconds)
        self._report(lambda job: job.future.done())
        return result

    def with_config(self, **sections: Any) -> Setup:
        """This seed's setup with some config sections replaced (``train=…``): the run's own
        config.yaml records them. Only what the boundary check does not depend on may change
        (learning rates, iterations), so the setup stays checked."""
        return dataclasses.replace(self.setup, cfg=dataclasses.replace(self.cfg, **sections))

    def _train(self, name: str, path: Path, setup: Setup, kwargs: dict
               ) -> tuple[RunResult, float]:
        t0 = time.perf_counter()
        result = train(setup, path, self.data, progress=self.progress,
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
                job.future.set_result(self._train(job.name, job.path, job.setup, job.kwargs))
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
        return RunDir(path).trained_weights()

    def rewind_target(self, source: Path) -> dict[str, torch.Tensor]:
        return RunDir(source).rewind_target(self.cfg.prune.rewind_step())

    def theta0(self) -> dict[str, torch.Tensor]:
        return initial_model(self.cfg, self.data.channels).state_dict()

    def fresh(self, seed: int) -> dict[str, torch.Tensor]:
        """Another initialisation of the same model (a reinit control), seeded by ``seed``."""
        torch.manual_seed(seed)
        return build_model(model_spec(self.cfg, self.data.channels)).state_dict()

    # -- what prune.structure changes -------------------------------------------------------
    def prune(self, weights: dict[str, torch.Tensor], mask: Mask) -> Mask:
        if self.filters:
            return filter_prune(weights, mask, self.cfg.prune.rate)
        return self.cfg.prune.rule().apply(weights, mask)

    def random_like(self, mask: Mask, level: int) -> Mask:
        gen = streams.level_generator(streams.RANDOM_MASK, self.seed, level)
        return random_filter_mask_like(mask, gen) if self.filters else random_mask_like(mask, gen)

    def start(self, state: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
        """Initial weights of a masked run: removed filters' outputs exactly zero (structured)."""
        return clear_removed_filters(state, mask) if self.filters else state

    # -- the shared parts of IMP-like methods ---------------------------------------------------
    def dense(self) -> RunResult:
        return self.run("level 0 dense", self.dir(0, IMP),
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
    density (``counts``: kept weights per layer by level), or every level. Targets the levels
    cannot reach, or two targets at one level (the runs would be announced twice), are one
    UserError line."""
    p = cfg.prune
    every = list(range(1, len(counts)))
    if not p.targets:
        return every
    total = [sum(c.values()) for c in counts]
    dens = {lv: total[lv] / total[0] for lv in every}
    lowest = dens[every[-1]] if every else 1.0
    chosen: dict[int, float] = {}
    for t in p.targets:
        if not every or t < lowest * (1.0 - p.rate) ** 0.5:  # nearer a level past the last one
            raise UserError(f"prune.targets has {t}, below the last level's density ({lowest:.3f}"
                            f" at level {len(every)}); raise prune.levels")
        level = min(every, key=lambda lv, t=t: abs(dens[lv] - t))
        if level in chosen:
            raise UserError(f"prune.targets {chosen[level]} and {t} both map to IMP level {level} "
                            f"(density {dens[level]:.3f}); give one target per level")
        chosen[level] = t
    return sorted(chosen)


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
    settings: type | None = None
    """The method's own settings: a dataclass of typed fields with defaults, docstrings and
    ``validate(at)``; registering the method gives every config a section named after it
    (``--set NAME.FIELD=…``, ``sparsemeta config keys``)."""
    search: dict[str, Param] = dataclasses.field(default_factory=dict)
    """Tuning ranges of its own settings by field: ``tune`` searches them as ``NAME_FIELD``."""
    tune_params: tuple[str, ...] = ()
    """Shared knobs (``experiments.tune.PARAMS``, e.g. ``prune_rate``) ``tune`` also searches
    for this method, besides the learning rates and its own ``search``."""
    structured: bool = False
    """Also runs with ``prune.structure=filters``."""
    check: Callable[[Config], None] | None = None
    """Refuses (UserError) a config the method cannot run, across sections (e.g. a rewind
    step its search runs do not reach): called with the experiment's other checks, before
    anything is written."""
    covered_by: Callable[[list[str], list[str]], bool] = never
    """True where other selected methods/controls already make this method's runs."""
