"""Short-level IMP: iterative magnitude pruning whose search levels are short. To each target
density, two pruning steps instead of IMP's many (100% → √d → d, per layer, ending at exactly
IMP's counts), each chosen from weights trained only ``short_imp.iterations`` meta-iterations
and rewound like IMP; only the ticket at the target is trained the full budget.

Why (issue #23, Gao et al. 2022's early detection): on the cheap preset a mask taken once from
trained weights beat random by ~1.5 points while IMP's iterated, rewound mask beat it by ~5.5 —
iterating seemed to matter more than the length of each level's training, so this spends the
search budget on iterations of pruning rather than on training."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparsemeta.config import Config, at_least
from sparsemeta.experiments.methods.base import (
    Branch,
    Method,
    Param,
    SeedRun,
    planned_levels,
)
from sparsemeta.foundations.errors import UserError
from sparsemeta.sparsity.prune import top_magnitude_mask


@dataclass
class ShortImpSettings:
    """Short-level IMP: two pruning steps to each target, each from a short search run."""

    iterations: int = 100
    """Meta-iterations of each search run (the dense one and the one at the intermediate
    density); the ticket at the target is trained train.iterations."""

    def validate(self, at: str = "short_imp") -> None:
        at_least(f"{at}.iterations", self.iterations, 1)


def settings(cfg: Config) -> ShortImpSettings:
    return cfg.section("short_imp")


def check(cfg: Config) -> None:
    """Late rewinding reads the dense search run's weights after K steps: it must reach K."""
    k = cfg.prune.rewind_step()
    if k is not None and k > settings(cfg).iterations:
        raise UserError(f"prune.rewind={cfg.prune.rewind} is past short_imp.iterations="
                        f"{settings(cfg).iterations}: the search runs never reach step {k}")


def halfway(total: dict[str, int], target: dict[str, int]) -> dict[str, int]:
    """Per layer, the geometric mean of the full and the target count: the intermediate step."""
    return {k: max(target[k], round(math.sqrt(total[k] * target[k]))) for k in target}


def run(s: SeedRun) -> None:
    p, k = s.cfg.prune, settings(s.cfg).iterations
    dense = s.dir(0, "short_imp_search")
    s.run(f"level 0/{s.levels} short search", dense, init=s.theta0(), iterations=k, test=False,
          snapshot_at=p.rewind_step())
    rewind = s.rewind_target(dense)
    total = {name: m.numel() for name, m in s.full.items()}
    for level in s.target_levels():
        target = s.counts_at(level)
        search = s.dir(level, "short_imp_search")
        first = s.saved_mask(search, lambda t=target: top_magnitude_mask(
            s.weights(dense), halfway(total, t)))
        start = s.weights(dense) if p.rewind == "none" else rewind
        s.run(f"{s.label(level)} short search", search, init=s.start(start, first), mask=first,
              iterations=k, test=False)
        path = s.dir(level, "short_imp")
        mask = s.saved_mask(path, lambda f=first, t=target, q=search: top_magnitude_mask(
            s.weights(q), t, within=f))
        start = s.weights(search) if p.rewind == "none" else rewind
        s.run(f"{s.label(level)} short-level ticket", path, background=True,
              init=s.start(start, mask), mask=mask)


METHOD = Method(
    name="short_imp",
    help="IMP in two short-search pruning steps to each target, then the ticket in full",
    branches=(Branch("short_imp", "crimson", prior="short_imp_search",
                     prior_levels=lambda level: (0, level)),
              Branch("short_imp_search", "tab:gray", model=False)),
    run=run, plan=lambda cfg, controls: 1 + 2 * planned_levels(cfg),
    score_branch="short_imp", settings=ShortImpSettings, check=check,
    search={"iterations": Param("short_imp.iterations", 20, 400, log=True, integer=True)},
)
