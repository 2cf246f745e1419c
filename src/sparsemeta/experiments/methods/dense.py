"""The dense meta-model alone (level 0 of the lottery experiment)."""

from __future__ import annotations

from sparsemeta.experiments.methods.base import Branch, Method, SeedRun


def run(s: SeedRun) -> None:
    s.dense()


METHOD = Method(
    name="dense",
    help="the dense meta-model only",
    branches=(Branch("ticket", "tab:blue", prior="ticket"),),
    run=run, plan=lambda cfg, controls: 1, score_branch="ticket", score_dense_only=True,
    structured=True, covered_by=lambda methods, controls: "lottery" in methods,
)
