"""MAML++'s training-time schedules (Antoniou et al., 2019), applied to the one core.

The per-layer-per-step learning rates (LSLR) and per-step batch norm (BNWB/BNRS) are options of
the core and the model; what changes over meta-training lives here: the multi-step loss weights,
derivative-order annealing and the cosine meta learning rate.
"""

from __future__ import annotations

import math

from sparsemeta.config import Config


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """Multi-step loss weights: uniform at epoch 0, annealed towards the last step (non-final
    weights floored at 0.03/steps, as in the MAML++ code); they always sum to 1."""
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


def schedule(cfg: Config, iteration: int) -> tuple[bool, list[float] | None, float]:
    """(first order?, multi-step loss weights or None, meta learning rate) at ``iteration``."""
    m = cfg.mamlpp
    epoch = iteration // m.epoch_iterations
    first_order = cfg.meta.first_order or epoch < m.first_order_epochs
    weights = (msl_weights(cfg.meta.inner_steps, epoch, m.msl_epochs)
               if m.multi_step_loss and epoch < m.msl_epochs else None)
    lr = cfg.train.meta_lr
    if m.cosine_lr:
        lr = m.min_meta_lr + 0.5 * (lr - m.min_meta_lr) * (
            1 + math.cos(math.pi * iteration / cfg.train.iterations))
    return first_order, weights, lr
