"""Masks are data: ``dict[name, BoolTensor]`` over the prunable parameters.

``apply_mask`` is the only place a mask touches weights during training and adaptation: the
functional forward uses the effective weight θ ⊙ m, so the gradient of every pruned entry is
exactly zero, in the inner loop (second order included) and in the outer step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import atomic_torch_save, load_tensors

Mask = dict[str, torch.Tensor]


def apply_mask(params: Mapping[str, torch.Tensor], mask: Mask | None) -> dict[str, torch.Tensor]:
    """Effective parameters θ ⊙ m (unmasked entries pass through unchanged)."""
    if not mask:
        return dict(params)
    return {k: (v * mask[k] if k in mask else v) for k, v in params.items()}


def prunable_names(params: Mapping[str, torch.Tensor]) -> list[str]:
    """Conv and linear weights (tensors of rank ≥ 2); biases and batch norm stay dense, also
    MAML++'s per-step batch-norm weights, which are ``[steps, channels]``."""
    return [k for k, v in params.items() if v.dim() >= 2 and ".bn." not in k]


def full_mask(params: Mapping[str, torch.Tensor]) -> Mask:
    return {k: torch.ones_like(params[k], dtype=torch.bool) for k in prunable_names(params)}


def density(mask: Mask) -> float:
    """Fraction of prunable weights kept."""
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    return kept / total if total else 1.0


def layer_densities(mask: Mask) -> dict[str, float]:
    return {k: float(m.float().mean()) for k, m in mask.items()}


def nonzeros(mask: Mask) -> int:
    return sum(int(m.sum()) for m in mask.values())


def hamming(a: Mask, b: Mask) -> float:
    """Normalised Hamming distance: fraction of prunable entries on which two masks differ."""
    if a.keys() != b.keys():
        raise ValueError("masks cover different parameters")
    total = sum(m.numel() for m in a.values())
    diff = sum(int((a[k] ^ b[k]).sum()) for k in a)
    return diff / total if total else 0.0


def zero_pruned_(params: Mapping[str, torch.Tensor], mask: Mask | None) -> None:
    """Set pruned entries of stored weights to zero, so θ itself (not only θ ⊙ m) is sparse."""
    if not mask:
        return
    with torch.no_grad():
        for k, m in mask.items():
            params[k].mul_(m)


def save_mask(mask: Mask, path: str | Path) -> None:
    atomic_torch_save({k: v.cpu() for k, v in mask.items()}, path)


def load_mask(path: str | Path) -> Mask:
    """A mask file (names mapped to tensors, as booleans); a damaged, foreign or non-regular
    file is one line naming it (``load_tensors``), never an AttributeError on resume."""
    obj = load_tensors(path)
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"'{path}' is not a sparsity mask (layer names mapped to tensors); "
                        "restore the run directory's file")
    return {k: v.bool() for k, v in obj.items()}
