"""The meta-gradient of a whole meta-batch in one pass, with ``torch.func.vmap`` over the tasks.

Same contract and same mathematics as ``MetaLearner.meta_gradient_step`` (the per-task loop), so
the two are interchangeable and tested equal in float64. The per-task function reuses the
learner's own functional forward (``learner.logits`` / ``learner.query_logits``), so the mask, the
batch-norm policy and the model are defined in one place only; the inner gradient comes from
``torch.func.grad`` (which keeps the graph for the outer backward unless first order).

Trade-off: all tasks' graphs are alive at once (memory grows with the meta-batch), and on CPU the
loop was measured faster; vmap is meant for accelerators with many small tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from sparsemeta.data.tasks import Task
from sparsemeta.meta.core import MetaLearner, Params
from sparsemeta.models.conv4 import plain_batch_norm

_FIELDS = ("support_x", "support_y", "query_x", "query_y")


def unsupported(adapt_all: bool, multi_step: bool, metamix: bool, bn: str) -> str | None:
    """Why vmap cannot compute a learner exactly (None: it can) — the one statement of it: it
    adapts every parameter, takes the last step's outer loss, no MetaMix, batch statistics."""
    if not adapt_all:
        return "it adapts every parameter (meta.adapt=all)"
    if multi_step:
        return "it computes the last step's outer loss only (mamlpp.multi_step_loss=false)"
    if metamix or bn == "running":
        return "it needs batch statistics without MetaMix"
    return None


def _check_supported(learner: MetaLearner, tasks: list[Task]) -> None:
    """Refuse the combinations whose vmapped result would not equal the loop's (the engine
    refuses them up front, from the config: ``meta.engine.resolve_engine``)."""
    if not tasks:
        raise ValueError("vmap_meta_gradient_step needs at least one task")
    why = unsupported(learner.adapted == frozenset(k for k, _ in learner.model.named_parameters()),
                      learner.step_weights is not None, learner.metamix is not None, learner.bn)
    if why is not None:
        raise ValueError(f"the vmap core cannot run this learner: {why}; use the loop")
    first = tasks[0]
    for i, task in enumerate(tasks[1:], start=1):
        for field in _FIELDS:
            a, b = getattr(first, field), getattr(task, field)
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise ValueError(
                    f"vmap needs tasks of identical shape/dtype/device: task {i}.{field} is "
                    f"{tuple(b.shape)} {b.dtype} {b.device}, task 0 has "
                    f"{tuple(a.shape)} {a.dtype} {a.device}"
                )
    for name, module in learner.model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if not learner.first_order:
            # Measured in torch 2.13: second-order grads through nn.BatchNorm2d under vmap are
            # wrong (rel. error ~1e-1); the plain-op BatchNorm of models.conv4 is exact.
            raise ValueError(
                f"second-order vmap through torch.nn batch norm ({name!r}) is not exact; "
                "use sparsemeta.models.conv4.BatchNorm or the loop (meta_gradient_step)"
            )
        if module.training and module.track_running_stats:
            # The loop updates running buffers once per task; a vmapped forward cannot write
            # an unbatched buffer per task.
            raise ValueError(
                f"batch norm {name!r} updates running statistics in training mode, which vmap "
                "cannot do per task; use track_running_stats=False or the loop"
            )


def _per_task_fn(learner: MetaLearner, params: Params) -> Callable[..., tuple[torch.Tensor, ...]]:
    """(params, support_x, support_y, query_x, query_y) → (query loss, query logits) of one task."""
    order = list(params)
    trainable = [k for k, v in params.items() if v.requires_grad]

    def support_loss(train: Params, frozen: Params, sx: torch.Tensor,
                     sy: torch.Tensor, step: int) -> torch.Tensor:
        merged = {k: train[k] if k in train else frozen[k] for k in order}
        return F.cross_entropy(learner.logits(merged, sx, step=step), sy)

    def task_fn(p: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
                qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fast = dict(p)
        for step in range(learner.inner_steps):
            train = {k: fast[k] for k in trainable}
            frozen = {k: v for k, v in fast.items() if k not in train}
            if learner.first_order:
                # torch.func.grad ignores an enclosing no_grad for its own computation, but the
                # outer autograd records nothing: the inner gradient is a constant, as in the loop.
                with torch.no_grad():
                    g = grad(support_loss)(train, frozen, sx, sy, step)
            else:
                g = grad(support_loss)(train, frozen, sx, sy, step)
            fast = {k: fast[k] - learner.lr(k, step) * g[k] if k in g else fast[k] for k in order}
        logits = learner.query_logits(fast, Task(sx, sy, qx, qy), learner.inner_steps)
        return F.cross_entropy(logits, qy), logits

    return task_fn


def vmap_meta_gradient_step(learner: MetaLearner, params: Params,
                            tasks: list[Task]) -> tuple[float, float]:
    """Accumulate the mean meta-gradient of ``tasks`` into ``params[*].grad`` (vmapped over tasks).

    Drop-in for ``learner.meta_gradient_step``: same gradient (first/second order, both BN
    policies, mask), returns (mean query loss, mean query accuracy). Tasks must share shapes.
    Raises ValueError for combinations that vmap cannot reproduce exactly (see ``_check_supported``).
    """
    _check_supported(learner, tasks)
    stacked = [torch.stack([getattr(t, f) for t in tasks]) for f in _FIELDS]
    task_fn = _per_task_fn(learner, params)
    with plain_batch_norm():
        losses, logits = vmap(task_fn, in_dims=(None, 0, 0, 0, 0))(params, *stacked)
        losses.mean().backward()
    query_y = stacked[3]
    accs = (logits.detach().argmax(dim=-1) == query_y).float().mean(dim=1)
    return float(losses.detach().mean()), float(accs.mean())
