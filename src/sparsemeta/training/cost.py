"""The compute a run spends, in MACs (``sparsity.flops``), dense and at its masks' densities.

``ComputeMeter`` is fed by the training loop: every meta-iteration at the mask of that moment
(so a mask that shrinks, as in gradual pruning, is counted step by step), every extra dense
meta-gradient a method takes (RigL's grow scores), and every validation and test evaluation,
kept apart from training. Its state goes into the checkpoint, so a resumed run counts the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsemeta.config import Config
from sparsemeta.meta.core import MetaLearner
from sparsemeta.sparsity.flops import TaskShape, eval_task_macs, forward_macs, train_task_macs
from sparsemeta.sparsity.masks import Mask

KINDS = ("train", "train_dense", "eval", "eval_dense")


@dataclass
class ComputeMeter:
    """Running MAC totals: ``train``/``eval`` at the run's densities, ``*_dense`` as if dense."""

    positions: dict[str, int]
    """Output pixels per weight tensor (``Conv4.positions``)."""
    sizes: dict[str, int]
    """Entries per weight tensor (the dense count)."""
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def _forwards(self, mask: Mask | None) -> tuple[int, int]:
        kept = self.sizes if mask is None else {
            k: int(mask[k].sum()) if k in mask else self.sizes[k] for k in self.positions}
        return forward_macs(self.positions, kept), forward_macs(self.positions, self.sizes)

    def train_step(self, cfg: Config, learner: MetaLearner, mask: Mask | None, tasks: int,
                   dense: bool = False) -> None:
        """One meta-gradient over ``tasks`` tasks (``dense``: computed without the mask)."""
        shape = _task_shape(cfg, learner)
        sparse, full = self._forwards(None if dense else mask)
        self.totals["train"] += tasks * train_task_macs(sparse, shape)
        self.totals["train_dense"] += tasks * train_task_macs(full, shape)

    def evaluation(self, cfg: Config, mask: Mask | None, tasks: int) -> None:
        sparse, full = self._forwards(mask)
        d = cfg.data
        support, query = d.ways * d.shots, d.ways * (cfg.eval.queries or d.queries)
        if cfg.meta.bn == "support":
            query += support
        steps = cfg.meta.eval_inner_steps
        self.totals["eval"] += tasks * eval_task_macs(sparse, support, query, steps)
        self.totals["eval_dense"] += tasks * eval_task_macs(full, support, query, steps)

    def state_dict(self) -> dict[str, int]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        """A checkpoint from before compute was counted restores nothing (counts start at 0)."""
        if state:
            self.totals = {k: int(state.get(k, 0)) for k in KINDS}


def meter_for(learner: MetaLearner) -> ComputeMeter:
    model = learner.model
    params = dict(model.named_parameters())
    return ComputeMeter(dict(model.positions), {k: params[k].numel() for k in model.positions})


def _task_shape(cfg: Config, learner: MetaLearner) -> TaskShape:
    """Rows and passes of one meta-training task under the learner's current schedule."""
    d = cfg.data
    support, query = d.ways * d.shots, d.ways * d.queries
    if cfg.meta.bn == "support" or learner.metamix is not None:
        query += support  # forwarded together with the support rows
    passes = 1 if learner.step_weights is None else len(learner.step_weights)
    return TaskShape(support=support, query=query, inner_steps=learner.inner_steps,
                     query_passes=passes, second_order=not learner.first_order)
