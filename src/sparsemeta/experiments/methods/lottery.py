"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin), with its two
controls at every level's exact density — the ticket's mask from a fresh initialisation
(``reinit``) and a random mask with the ticket's per-layer counts (``random``)."""

from __future__ import annotations

from pathlib import Path

import torch

from sparsemeta.config import Config
from sparsemeta.experiments.methods.base import Branch, Method, SeedRun, planned_levels
from sparsemeta.foundations import streams
from sparsemeta.sparsity.masks import Mask
from sparsemeta.training.rundir import IMP

CONTROLS = ("reinit", "random")


def run(s: SeedRun) -> None:
    s.dense()
    rewind = s.rewind_target(s.dir(0, IMP))

    targets = s.target_levels()

    def controls(level: int, mask: Mask, start: dict[str, torch.Tensor]) -> Path:
        if level not in targets:
            return s.dir(level, IMP)
        if "reinit" in s.controls:
            fresh = s.fresh(streams.level_seed(streams.REINIT, s.seed, level))
            s.run(f"{s.label(level)} reinit", s.dir(level, "reinit"), background=True,
                  init=s.start(fresh, mask), mask=mask)
        if "random" in s.controls:
            path = s.dir(level, "random")
            rand = s.saved_mask(path, lambda: s.random_like(mask, level))
            s.run(f"{s.label(level)} random", path, background=True, init=s.start(start, rand),
                  mask=rand)
        return s.dir(level, IMP)

    s.imp_levels(s.dir(0, IMP), IMP, rewind, controls)


def plan(cfg: Config, controls: list[str]) -> int:
    levels = cfg.prune.num_levels()
    return 1 + levels + planned_levels(cfg) * len(controls)


METHOD = Method(
    name="lottery",
    help="IMP with rewinding, plus the reinit/random controls",
    branches=(Branch(IMP, "tab:blue", prior=IMP),
              Branch("reinit", "tab:orange", prior=IMP),
              Branch("random", "tab:green")),
    run=run, plan=plan, score_branch=IMP, tune_params=("prune_rate",), structured=True,
)
