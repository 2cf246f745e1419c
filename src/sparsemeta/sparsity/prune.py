"""Magnitude pruning and the controls a lottery-ticket claim needs.

Every function here is pure: it takes weights and a mask and returns a new mask, with exact
counts (``round(rate · remaining)`` weights removed), so tests can check densities exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsemeta.sparsity.masks import Mask


def output_layer(mask: Mask) -> str:
    """The classifier weight: the last prunable tensor (pruned at a reduced rate, as in LTH)."""
    return list(mask)[-1]


def layer_rates(mask: Mask, rate: float, output_rate_factor: float) -> dict[str, float]:
    out = output_layer(mask)
    return {k: rate * output_rate_factor if k == out else rate for k in mask}


def _smallest(scores: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the ``n`` smallest scores among kept entries (ties broken by index)."""
    flat = scores.flatten().double()
    alive = keep.flatten().nonzero().squeeze(1)
    order = torch.argsort(flat[alive], stable=True)
    return alive[order[:n]]


def magnitude_prune(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    rate: float,
    scope: str = "layerwise",
    output_rate_factor: float = 0.5,
) -> Mask:
    """Remove ``rate`` of the remaining weights with the smallest |θ|.

    ``layerwise`` removes that fraction from every layer; ``global`` ranks the hidden layers'
    weights together. The output layer is pruned on its own at ``rate · output_rate_factor``
    in both scopes.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"prune rate must be in [0, 1), got {rate}")
    if scope not in ("layerwise", "global"):
        raise ValueError(f"scope must be 'layerwise' or 'global', got {scope!r}")
    new = {k: m.clone() for k, m in mask.items()}
    rates = layer_rates(mask, rate, output_rate_factor)
    out = output_layer(mask)
    groups = [[k] for k in mask] if scope == "layerwise" else [[k for k in mask if k != out], [out]]
    for names in groups:
        if not names:
            continue
        r = rates[names[0]]
        scores = torch.cat([weights[k].detach().abs().flatten().cpu() for k in names])
        keep = torch.cat([mask[k].flatten().cpu() for k in names])
        n = round(r * int(keep.sum()))
        drop = torch.zeros_like(keep)
        drop[_smallest(scores, keep, n)] = True
        offset = 0
        for k in names:
            size = mask[k].numel()
            new[k] = new[k] & ~drop[offset:offset + size].view_as(mask[k]).to(mask[k].device)
            offset += size
    return new


def random_mask_like(mask: Mask, generator: torch.Generator) -> Mask:
    """A random mask with exactly the same number of kept weights in every layer."""
    out = {}
    for k, m in mask.items():
        kept = int(m.sum())
        perm = torch.randperm(m.numel(), generator=generator)
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[perm[:kept]] = True
        out[k] = flat.view_as(m).to(m.device)
    return out


def density_after(levels: int, rate: float, output_rate_factor: float,
                  sizes: Mapping[str, int], output: str) -> float:
    """Global density after ``levels`` rounds of pruning (up to rounding)."""
    kept = sum(n * (1 - (rate * output_rate_factor if k == output else rate)) ** levels
               for k, n in sizes.items())
    return kept / sum(sizes.values())
