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

CONTROLS = ("reinit", "random")


def run(s: SeedRun) -> None:
    s.dense()
    rewind = s.rewind_target(s.dir(0, "ticket"))

    targets = s.target_levels()

    def controls(level: int, mask: Mask, start: dict[str, torch.Tensor]) -> Path:
        if level not in targets:
            return s.dir(level, "ticket")
        if "reinit" in s.controls:
            fresh = s.fresh(streams.level_seed(streams.REINIT, s.seed, level))
            s.run(f"{s.label(level)} reinit", s.dir(level, "reinit"), background=True,
                  init=s.start(fresh, mask), mask=mask)
        if "random" in s.controls:
            path = s.dir(level, "random")
            rand = s.saved_mask(path, lambda: s.random_like(mask, level))
            s.run(f"{s.label(level)} random", path, background=True, init=s.start(start, rand),
                  mask=rand)
        return s.dir(level, "ticket")

    s.imp_levels(s.dir(0, "ticket"), "ticket", rewind, controls)


def plan(cfg: Config, controls: list[str]) -> int:
    levels = cfg.prune.num_levels()
    return 1 + levels + planned_levels(cfg) * len(controls)


METHOD = Method(
    name="lottery",
    help="IMP with rewinding, plus the reinit/random controls",
    branches=(Branch("ticket", "tab:blue", prior="ticket"),
              Branch("reinit", "tab:orange", prior="ticket"),
              Branch("random", "tab:green")),
    run=run, plan=plan, score_branch="ticket", tune_params=("prune_rate",), structured=True,
)
