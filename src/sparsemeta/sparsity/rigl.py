"""RigL for meta-learning: a fixed-density mask whose connections move during meta-training.

Every ΔT outer steps (until T_end) each layer drops the fraction f(t) of its active weights with
the smallest magnitude and grows as many inactive ones with the largest magnitude of the
meta-gradient with respect to the *effective* weight θ ⊙ m (the gradient with respect to a
pruned θ is zero through the mask, so it is taken where it is not). Grown weights start at zero
with fresh Adam moments; per-layer counts, hence the density, never change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from sparsemeta.sparsity.masks import Mask


def erk_densities(shapes: Mapping[str, torch.Size], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel layer densities whose weighted mean is exactly ``density``.

    A layer's density is proportional to (sum of its dimensions) / (product of them); a layer
    whose share would exceed 1 is made dense and the rest rescaled, until none exceeds 1.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[k] for k in dense)
        free = [k for k in shapes if k not in dense]
        scale = budget / sum(raw[k] * sizes[k] for k in free)
        over = [k for k in free if scale * raw[k] > 1.0]
        if not over:
            out = {k: 1.0 for k in dense}
            out.update({k: scale * raw[k] for k in free})
            return {k: out[k] for k in shapes}
        dense.update(over)


def layer_counts(shapes: Mapping[str, torch.Size], density: float, distribution: str) -> dict[str, int]:
    """Kept weights per layer for a target global density (``erk`` or ``uniform``)."""
    if distribution == "uniform":
        dens = {k: density for k in shapes}
    elif distribution == "erk":
        dens = erk_densities(shapes, density)
    else:
        raise ValueError(f"distribution must be 'erk' or 'uniform', got {distribution!r}")
    return {k: max(1, min(math.prod(s), round(dens[k] * math.prod(s)))) for k, s in shapes.items()}


def random_mask(shapes: Mapping[str, torch.Size], counts: Mapping[str, int],
                generator: torch.Generator) -> Mask:
    """Random initial mask with exactly ``counts[k]`` kept entries in layer ``k``."""
    out = {}
    for k, shape in shapes.items():
        n = math.prod(shape)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:counts[k]]] = True
        out[k] = flat.view(shape)
    return out


def drop_fraction(step: int, f0: float, end: int) -> float:
    """f(t) = f₀/2 · (1 + cos(π t / T_end)), zero from T_end on."""
    return 0.0 if step >= end else f0 / 2 * (1 + math.cos(math.pi * step / end))


def drop_and_grow(weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                  mask: Mask, fraction: float) -> tuple[Mask, dict[str, torch.Tensor]]:
    """New mask and, per layer, the bool tensor of grown entries (to zero and reset).

    Drops the ``round(fraction · active)`` active weights of smallest |θ| and grows as many
    inactive ones (those just dropped included, as in RigL) of largest |∂L/∂(θ⊙m)|.
    """
    new, grown = {}, {}
    for k, m in mask.items():
        flat_m = m.flatten()
        active = int(flat_m.sum())
        n = min(round(fraction * active), int((~flat_m).sum()) + active)
        if n == 0:
            new[k], grown[k] = m.clone(), torch.zeros_like(m)
            continue
        mag = weights[k].detach().abs().flatten().double()
        mag[~flat_m] = math.inf
        drop = torch.argsort(mag, stable=True)[:n]
        after = flat_m.clone()
        after[drop] = False
        score = grads[k].detach().abs().flatten().double()
        score[after] = -math.inf
        grow = torch.argsort(score, descending=True, stable=True)[:n]
        after[grow] = True
        g = torch.zeros_like(flat_m)
        g[grow] = True
        new[k], grown[k] = after.view_as(m), g.view_as(m)
    return new, grown


class RigLUpdater:
    """The train-loop hook: mask updates on schedule, weights and Adam state kept consistent."""

    def __init__(self, f0: float, every: int, end: int,
                 dense_grad: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.f0, self.every, self.end = f0, every, end
        self.dense_grad = dense_grad

    def __call__(self, step: int, params: Mapping[str, torch.Tensor], mask: Mask,
                 optimizer: torch.optim.Optimizer) -> bool:
        """Update ``mask`` in place after outer step ``step``; return whether it changed."""
        if step % self.every or step >= self.end:
            return False
        fraction = drop_fraction(step, self.f0, self.end)
        new, grown = drop_and_grow(params, self.dense_grad(), mask, fraction)
        with torch.no_grad():
            for k, m in new.items():
                p = params[k]
                p.mul_(m & ~grown[k])  # dropped and grown entries start from zero
                state = optimizer.state.get(p, {})
                for name in ("exp_avg", "exp_avg_sq"):
                    if name in state:
                        state[name].mul_(m & ~grown[k])
                mask[k].copy_(m)
        return True
