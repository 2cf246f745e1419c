"""Compute counted the way the sparse-training literature counts it (RigL; Gao et al., KDD 2022):
multiply-accumulates of the conv and linear layers, sparse-aware.

A layer's forward costs ``positions × kept weights`` MACs per example (``positions``: the output
pixels a conv weight is applied at, 1 for a linear layer), so a layer at density d costs d of its
dense forward. Conventions, the same for every method so that ratios are fair:

* a backward costs twice its forward (one product for the input's gradient, one for the
  weight's), also at the sparse density — pruned weights need neither;
* second order: back-propagating through one inner step (its forward and backward, three
  products per layer) costs two products each, i.e. twice that step's forward and backward;
* biases, batch norm, ReLU, pooling and the optimiser are left out (under 1% of a Conv4's
  MACs), and frozen blocks (``meta.adapt``) are counted as if adapted — an upper bound.

FLOPs are reported as 2 × MACs (a multiply and an add).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

FLOPS_PER_MAC = 2
#: backward MACs per forward MAC (input gradient + weight gradient)
BACKWARD_PER_FORWARD = 2
#: second-order backward through one inner step, per MAC of that step's forward and backward
SECOND_ORDER_PER_STEP_MAC = 2


def forward_macs(positions: Mapping[str, int], kept: Mapping[str, int]) -> int:
    """MACs of one example's forward: Σ over weight tensors of positions × kept weights."""
    missing = set(positions) - set(kept)
    if missing:
        raise ValueError(f"no kept-weight count for {sorted(missing)[0]}")
    return sum(positions[k] * kept[k] for k in positions)


@dataclass(frozen=True)
class TaskShape:
    """What one meta-training task runs: rows forwarded per pass and how often."""

    support: int
    """Rows of an inner step's forward (the support set)."""
    query: int
    """Rows of one query pass (query, plus support rows where they are forwarded together)."""
    inner_steps: int
    query_passes: int = 1
    """Query passes of the outer loss (every step under a multi-step loss)."""
    second_order: bool = True


def train_task_macs(forward: int, t: TaskShape) -> int:
    """MACs of one task's contribution to a meta-gradient, given one example's ``forward``."""
    step = forward * t.support * (1 + BACKWARD_PER_FORWARD)  # inner forward + backward
    inner = t.inner_steps * step
    query = t.query_passes * forward * t.query * (1 + BACKWARD_PER_FORWARD)
    second = t.inner_steps * step * SECOND_ORDER_PER_STEP_MAC if t.second_order else 0
    return inner + query + second


def eval_task_macs(forward: int, support: int, query: int, steps: int) -> int:
    """MACs of adapting to one evaluation task: ``steps`` first-order inner steps and a query
    forward after each of steps 0..``steps`` (the per-step accuracies)."""
    return steps * forward * support * (1 + BACKWARD_PER_FORWARD) + (steps + 1) * forward * query
