"""The dense meta-model alone: level 0 of IMP's branch (``rundir.IMP``), the same run the
lottery method starts its chain with — one run, so a report of both counts it once."""

from __future__ import annotations

from sparsemeta.experiments.methods.base import Branch, Method, SeedRun
from sparsemeta.training.rundir import IMP


def run(s: SeedRun) -> None:
    s.dense()


METHOD = Method(
    name="dense",
    help="the dense meta-model only",
    branches=(Branch(IMP, "tab:blue", prior=IMP),),
    run=run, plan=lambda cfg, controls: 1, score_branch=IMP, score_dense_only=True,
    structured=True, covered_by=lambda methods, controls: "lottery" in methods,
)
