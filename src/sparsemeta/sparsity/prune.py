"""Magnitude pruning and the controls a lottery-ticket claim needs.

Every function here is pure: it takes weights and a mask and returns a new mask, with exact
counts (``round(rate · remaining)`` weights removed), so tests can check densities exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class MagnitudeRule:
    """One round of magnitude pruning as ``prune.{rate,scope,output_rate_factor}`` set it —
    one value for the three numbers every magnitude-pruning method passes together."""

    rate: float
    scope: str = "layerwise"
    output_rate_factor: float = 0.5

    def apply(self, weights: Mapping[str, torch.Tensor], mask: Mask) -> Mask:
        """``mask`` with one more round of pruning by the magnitudes of ``weights``."""
        return magnitude_prune(weights, mask, self.rate, self.scope, self.output_rate_factor)

    def counts(self, mask: Mask, levels: int) -> list[dict[str, int]]:
        """Kept weights per layer after 0..``levels`` layerwise rounds from ``mask`` (exact:
        what ``apply`` keeps with ``scope=layerwise``, whatever the weights)."""
        rates = layer_rates(mask, self.rate, self.output_rate_factor)
        counts = [{k: int(m.sum()) for k, m in mask.items()}]
        for _ in range(levels):
            counts.append({k: c - round(rates[k] * c) for k, c in counts[-1].items()})
        return counts


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


# -- structured tickets: whole conv filters ---------------------------------------------------
# A removed filter is an all-False [in, kh, kw] slice of its layer's mask; the next conv layer's
# input channel from it and the output layer's columns it feeds are all-False as well. Nothing
# downstream then reads the filter, so the network is exactly a smaller dense one (see
# ``sparsemeta.experiments.export.compact``), and every parameter of the filter gets exactly zero gradient.


def conv_layers(mask: Mask) -> list[str]:
    """The conv weights (rank 4) in forward order; each feeds the next, the last feeds the
    output layer (Conv4's chain)."""
    return [k for k, m in mask.items() if m.dim() == 4]


def kept_filters(mask: Mask) -> dict[str, torch.Tensor]:
    """Per conv layer, which output filters survive: a filter is removed when its whole slice is
    pruned."""
    return {k: mask[k].flatten(1).any(1) for k in conv_layers(mask)}


def filter_mask(shapes: Mapping[str, torch.Size], keep: Mapping[str, torch.Tensor]) -> Mask:
    """The weight mask of a network whose conv layers keep the filters ``keep[layer]``.

    A conv entry survives when both its output filter and its input channel (the previous
    layer's filter; the image channels always) survive; the output layer keeps its rows and
    loses the columns fed by removed filters of the last conv layer (flattened C, H, W order).
    """
    mask: Mask = {}
    previous = None
    for name, shape in shapes.items():
        if len(shape) == 4:
            cin = torch.ones(shape[1], dtype=torch.bool) if previous is None else previous
            out = keep[name].cpu()
            mask[name] = (out[:, None, None, None] & cin[None, :, None, None]).expand(shape).clone()
            previous = out
        else:
            if previous is None or shape[1] % previous.numel():
                raise ValueError(f"'{name}' {tuple(shape)} is not fed by a conv layer's filters")
            mask[name] = previous.repeat_interleave(shape[1] // previous.numel()).expand(shape).clone()
    return mask


def filter_counts(mask: Mask, rate: float, levels: int) -> list[dict[str, int]]:
    """Kept filters per conv layer after 0..levels rounds of ``filter_prune`` (its exact counts)."""
    counts = [{k: int(v.sum()) for k, v in kept_filters(mask).items()}]
    for _ in range(levels):
        counts.append({k: c - _filters_to_remove(rate, c) for k, c in counts[-1].items()})
    return counts


def _filters_to_remove(rate: float, alive: int) -> int:
    """``round(rate · alive)``, but never a layer's last filter (the network must stay connected)."""
    return min(round(rate * alive), alive - 1)


def filter_prune(weights: Mapping[str, torch.Tensor], mask: Mask, rate: float) -> Mask:
    """Remove ``rate`` of the remaining filters of every conv layer with the smallest L2 norm
    of the effective filter θ ⊙ m (the whole [in, kh, kw] slice).

    Layerwise only: filter norms of layers with different fan-in are not comparable. The output
    layer is not pruned by magnitude; it only loses the columns of removed filters.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"prune rate must be in [0, 1), got {rate}")
    keep = {}
    for name, alive in kept_filters(mask).items():
        norms = (weights[name].detach().cpu() * mask[name].cpu()).flatten(1).norm(dim=1)
        drop = _smallest(norms, alive, _filters_to_remove(rate, int(alive.sum())))
        keep[name] = alive.clone()
        keep[name][drop] = False
    new = filter_mask({k: m.shape for k, m in mask.items()}, keep)
    return {k: m.to(mask[k].device) for k, m in new.items()}


def random_filter_mask(shapes: Mapping[str, torch.Size], counts: Mapping[str, int],
                       generator: torch.Generator) -> Mask:
    """Random filters with exactly ``counts[layer]`` kept per conv layer (the structured
    control: the same per-layer filter, hence weight, counts as the ticket)."""
    keep = {}
    for name, shape in shapes.items():
        if len(shape) == 4:
            keep[name] = torch.zeros(shape[0], dtype=torch.bool)
            keep[name][torch.randperm(shape[0], generator=generator)[:counts[name]]] = True
    return filter_mask(shapes, keep)


def random_filter_mask_like(mask: Mask, generator: torch.Generator) -> Mask:
    """A random structured mask with the same number of filters in every conv layer."""
    counts = {k: int(v.sum()) for k, v in kept_filters(mask).items()}
    new = random_filter_mask({k: m.shape for k, m in mask.items()}, counts, generator)
    return {k: m.to(mask[k].device) for k, m in new.items()}


def clear_removed_filters(state: Mapping[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose removed filters have zero conv bias and batch-norm weight and
    bias, so their output is exactly zero (not the constant ReLU(β) that batch norm of an
    all-zero channel gives): they get exactly zero gradient, so it stays zero while training."""
    out = dict(state)
    for name, keep in kept_filters(mask).items():
        if keep.all():
            continue
        prefix = name[: -len("conv.weight")]
        for key in (f"{prefix}conv.bias", f"{prefix}bn.weight", f"{prefix}bn.bias"):
            if key in out:
                value = out[key].clone()
                value[..., ~keep.to(value.device)] = 0  # per-step BN (steps, C) included
                out[key] = value
    return out


def top_magnitude_mask(weights: Mapping[str, torch.Tensor], counts: Mapping[str, int],
                       within: Mask | None = None) -> Mask:
    """Keep the ``counts[k]`` weights of largest |θ| in each layer ``k`` (among ``within``'s
    kept entries if given; ties broken by index): one-shot pruning to exact per-layer counts."""
    out = {}
    for k, n in counts.items():
        w = weights[k].detach().cpu()
        keep = torch.ones_like(w, dtype=torch.bool) if within is None else within[k].cpu()
        if n > int(keep.sum()):
            raise ValueError(f"{k}: cannot keep {n} of {int(keep.sum())} weights")
        drop = _smallest(w.abs(), keep, int(keep.sum()) - n)
        flat = keep.flatten().clone()
        flat[drop] = False
        out[k] = flat.view_as(w).to(weights[k].device)
    return out


def cubic_counts(total: Mapping[str, int], final: Mapping[str, int], progress: float) -> dict[str, int]:
    """Gradual pruning's per-layer counts at ``progress`` ∈ [0, 1] of the schedule (Zhu & Gupta):
    kept = final + (total − final)(1 − progress)³ — fast pruning first, slow near the target."""
    p = min(max(progress, 0.0), 1.0)
    return {k: final[k] + round((total[k] - final[k]) * (1.0 - p) ** 3) for k in total}
