"""One-shot magnitude pruning: the dense meta-model (IMP's level 0) pruned once to each target
density with IMP's per-layer counts, rewound like IMP, and trained as a ticket — one dense
training instead of IMP's chain of levels."""

from __future__ import annotations

from sparsemeta.experiments.methods.base import (
    Branch,
    Method,
    SeedRun,
    dense_level_only,
    planned_levels,
)
from sparsemeta.sparsity.prune import top_magnitude_mask
from sparsemeta.training.rundir import IMP


def run(s: SeedRun) -> None:
    s.dense()
    dense = s.dir(0, IMP)
    trained = s.weights(dense)
    start = trained if s.cfg.prune.rewind == "none" else s.rewind_target(dense)
    for level in s.target_levels():
        path = s.dir(level, "oneshot")
        mask = s.saved_mask(path, lambda lv=level: top_magnitude_mask(trained, s.counts_at(lv)))
        s.run(f"{s.label(level)} one-shot", path, background=True, init=s.start(start, mask),
              mask=mask)


METHOD = Method(
    name="oneshot",
    help="one-shot magnitude pruning of the dense meta-model to each target, rewound",
    branches=(Branch("oneshot", "tab:olive", prior=IMP, prior_levels=dense_level_only),),
    run=run, plan=lambda cfg, controls: 1 + planned_levels(cfg),
    score_branch="oneshot",
)
