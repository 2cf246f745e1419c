"""Learners built from a config: every algorithm is an option set of the one core
(``meta.core.MetaLearner``), and what changes over meta-training is a schedule on the learner.

The training loop knows none of this: it calls ``learner.begin_iteration(it, optimizer)`` and the
learner applies its own schedules — MAML++'s multi-step loss weights, derivative-order annealing
and cosine meta learning rate; MetaMix's Channel Shuffle on half the meta-batches.
"""

from __future__ import annotations

import torch

from sparsemeta.config import Config
from sparsemeta.foundations import streams
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.mamlpp import schedule as mamlpp_schedule
from sparsemeta.models.conv4 import Conv4, ModelSpec, build_model
from sparsemeta.sparsity.masks import Mask

#: meta.algorithm → the inner learning-rate rule of the core
LR_RULE = {"maml": "scalar", "metasgd": "metasgd", "mamlpp": "lslr"}


def lr_rule(cfg: Config) -> str:
    """The inner learning-rate rule of the learner ``cfg`` describes — decided here only (the
    learner and the exported manifest both take it from here)."""
    if cfg.meta.algorithm == "mamlpp" and not cfg.mamlpp.lslr:
        return "scalar"
    return LR_RULE[cfg.meta.algorithm]


def model_spec(cfg: Config, in_channels: int) -> ModelSpec:
    """The backbone for ``cfg``: ``data``'s input size and ways, ``model``'s widths, and the
    batch-norm slots the learner needs (MAML++'s per-step BN: one per adaptation step of
    meta-training, 0..inner_steps; ``meta.bn=running``: running statistics)."""
    per_step = cfg.meta.algorithm == "mamlpp" and cfg.mamlpp.per_step_bn
    return ModelSpec(in_channels=in_channels, ways=cfg.data.ways,
                     image_size=cfg.data.image_size, filters=cfg.model.filters,
                     downsample=cfg.model.downsample,
                     bn_steps=cfg.meta.inner_steps + 1 if per_step else 1,
                     bn_running=cfg.meta.bn == "running")


def initial_model(cfg: Config, in_channels: int) -> Conv4:
    """θ₀ of ``cfg.seed``: the model initialised right after seeding torch's RNG."""
    torch.manual_seed(cfg.seed)
    return build_model(model_spec(cfg, in_channels))


def build_learner(cfg: Config, in_channels: int, mask: Mask | None = None) -> MetaLearner:
    """The learner ``cfg.meta`` names at θ₀ of ``cfg.seed``, with its training-time schedules
    attached (its loop's CPU task threads are the engine's to set: ``Engine.threads``)."""
    learner = MetaLearner(
        initial_model(cfg, in_channels),
        inner_lr=cfg.meta.inner_lr,
        inner_steps=cfg.meta.inner_steps,
        first_order=cfg.meta.first_order,
        bn=cfg.meta.bn,
        mask=mask,
        lr_rule=lr_rule(cfg),
        eval_inner_steps=cfg.meta.eval_inner_steps,
        metamix=(cfg.metamix.alpha, cfg.metamix.beta) if cfg.meta.mix == "metamix" else None,
        metamix_seed=cfg.seed,
        adapt=cfg.meta.adapt,
    )
    if cfg.metamix.channel_shuffle_from is not None:
        learner.schedules.append(ChannelShuffleSchedule(cfg.seed, cfg.metamix.channel_shuffle_from))
    if cfg.meta.algorithm == "mamlpp":
        learner.schedules.append(MamlppSchedule(cfg))
    return learner


class ChannelShuffleSchedule:
    """MetaMix's Channel Shuffle from iteration ``start`` on, on half the meta-batches (decided
    by (seed, iteration), so a resumed run makes the same choices)."""

    def __init__(self, seed: int, start: int) -> None:
        self.seed, self.start = seed, start

    def __call__(self, learner: MetaLearner, iteration: int, optimizer: torch.optim.Optimizer) -> None:
        learner.channel_shuffle = iteration >= self.start and bool(
            streams.rng(streams.CHANNEL_SHUFFLE_SWITCH, self.seed, iteration).random() < 0.5)


class MamlppSchedule:
    """MAML++: derivative order, multi-step loss weights and meta learning rate by iteration."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self, learner: MetaLearner, iteration: int, optimizer: torch.optim.Optimizer) -> None:
        learner.first_order, learner.step_weights, lr = mamlpp_schedule(self.cfg, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
