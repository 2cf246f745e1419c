"""What a sparsity method does inside one meta-training run, as a small object with a lifecycle.

``train()`` calls ``regularizer`` before each optimiser step, ``after_step`` after it and
``should_stop`` last; ``state_dict`` goes into every checkpoint so that a resumed run continues
the method exactly. Dense and IMP training use the do-nothing base class.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsemeta.meta.core import MetaLearner, Task
from sparsemeta.sparsity.masks import Mask, hamming, prunable_names
from sparsemeta.sparsity.prune import magnitude_prune
from sparsemeta.sparsity.rigl import RigLUpdater


class TrainHooks:
    """No-op lifecycle: plain (masked or dense) meta-training."""

    moves_mask = False

    def regularizer(self, params: Mapping[str, torch.Tensor], mask: Mask | None) -> torch.Tensor | None:
        return None

    def after_step(self, step: int, params: Mapping[str, torch.Tensor], mask: Mask | None,
                   optimizer: torch.optim.Optimizer, learner: MetaLearner,
                   tasks: list[Task]) -> bool:
        """Called after outer step ``step``; return True if the mask changed."""
        return False

    def should_stop(self, step: int, params: Mapping[str, torch.Tensor], mask: Mask | None) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved (nothing, for stateless methods)."""


class L1Hooks(TrainHooks):
    """λ·Σ|θ| over the prunable weights, added once per outer step to the mean outer loss."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def regularizer(self, params: Mapping[str, torch.Tensor], mask: Mask | None) -> torch.Tensor:
        return self.lam * sum(params[k].abs().sum() for k in prunable_names(params))


class RigLHooks(TrainHooks):
    """Drop/grow on schedule; the grow score is the meta-gradient w.r.t. the effective weight."""

    moves_mask = True

    def __init__(self, f0: float, every: int, end: int) -> None:
        self.f0, self.every, self.end = f0, every, end

    def after_step(self, step: int, params: Mapping[str, torch.Tensor], mask: Mask | None,
                   optimizer: torch.optim.Optimizer, learner: MetaLearner,
                   tasks: list[Task]) -> bool:
        if mask is None:
            raise ValueError("RigL needs a mask")

        def dense_grad() -> dict[str, torch.Tensor]:
            # θ ⊙ m as leaves, forwarded without the mask: ∂L/∂(θ⊙m) is non-zero where θ is pruned
            eff = {k: (v * mask[k] if k in mask else v).detach().requires_grad_(v.requires_grad)
                   for k, v in params.items()}
            kept, learner.mask = learner.mask, None
            try:
                learner.meta_gradient_step(eff, tasks)
            finally:
                learner.mask = kept
            return {k: eff[k].grad for k in mask}

        return RigLUpdater(self.f0, self.every, self.end, dense_grad)(step, params, mask, optimizer)


class EarlyBirdHooks(TrainHooks):
    """Stop once the next level's magnitude mask has stopped changing (You et al., 2020).

    Every ``every`` steps the mask that pruning now would give is compared with the previous
    one; when the last ``window`` normalised Hamming distances are all below ``epsilon`` the
    ticket is drawn and training stops.
    """

    def __init__(self, rate: float, scope: str, output_rate_factor: float, epsilon: float,
                 every: int, window: int) -> None:
        self.rate, self.scope, self.factor = rate, scope, output_rate_factor
        self.epsilon, self.every, self.window = epsilon, every, window
        self.previous: Mask | None = None
        self.distances: list[float] = []

    def fired(self) -> bool:
        recent = self.distances[-self.window:]
        return len(recent) == self.window and all(d < self.epsilon for d in recent)

    def should_stop(self, step: int, params: Mapping[str, torch.Tensor], mask: Mask | None) -> bool:
        if step % self.every:
            return False
        current = mask if mask is not None else {
            k: torch.ones_like(params[k], dtype=torch.bool) for k in prunable_names(params)}
        nxt = magnitude_prune(params, current, self.rate, self.scope, self.factor)
        if self.previous is not None:
            self.distances.append(hamming(self.previous, nxt))
        self.previous = nxt
        return self.fired()

    def state_dict(self) -> dict:
        return {"previous": self.previous, "distances": list(self.distances)}

    def load_state_dict(self, state: dict) -> None:
        self.previous = state["previous"]
        self.distances = list(state["distances"])
