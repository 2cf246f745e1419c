"""The boundary of a run: a config checked once against its data, and what is resolved from it
once — the device and the engine.

Why one place: a config is checked field by field when it is built (``config``), but whether its
tasks can be drawn from *this* data set, and which core computes them on *this* device, can only
be known once the data is loaded. ``prepare`` checks all of it before anything is written, and
``train`` and the experiment runner take the resulting ``Setup`` rather than a bare config, so
no layer below checks or resolves it again (they assert).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sparsemeta.config import Config
from sparsemeta.data.base import FewShotData
from sparsemeta.data.tasks import check_tasks
from sparsemeta.foundations.device import resolve_device
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.runtime import resolve_threads
from sparsemeta.meta.engine import Engine, resolve_engine
from sparsemeta.training.distributed import group


@dataclass(frozen=True)
class Setup:
    """A config that passed the boundary check, with its device and engine."""

    cfg: Config
    engine: Engine
    data_name: str
    """The data set the config was checked against (``train`` asserts it is given that one)."""

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def with_seed(self, seed: int) -> Setup:
        """The same setup for another seed (θ₀, tasks): nothing checked depends on it."""
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, seed=seed))

    def in_this_process(self) -> Setup:
        """The setup in a training process a runner gave a share of the cores (with
        ``torch.set_num_threads``): the engine's CPU task threads resolved again here."""
        threads = resolve_threads(self.cfg.train.threads)
        return dataclasses.replace(self, engine=dataclasses.replace(self.engine, threads=threads))

    def splits(self) -> tuple[str, ...]:
        """The splits a run draws tasks from: meta-train, validation and ``eval.split``."""
        return tuple(dict.fromkeys(("train", "val", self.cfg.eval.split)))


def prepare(cfg: Config, data: FewShotData, splits: tuple[str, ...] | None = None) -> Setup:
    """The one check of ``cfg`` against ``data`` and this process: the tasks fit every split
    the run uses (``splits``, default ``Setup.splits``), each process of a distributed job gets
    a task, and the engine can compute the learner; then the device and engine, resolved once."""
    setup = Setup(cfg, resolve_engine(cfg, resolve_device(cfg.device)), data.name)
    check_tasks(data, cfg.task_spec(), splits or setup.splits())
    world = group().world
    if world > cfg.train.meta_batch:
        raise UserError(f"{world} processes but train.meta_batch={cfg.train.meta_batch}: every "
                        f"process needs at least one task; raise train.meta_batch or use fewer")
    return setup
