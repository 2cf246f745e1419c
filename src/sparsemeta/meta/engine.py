"""The engine: how the tasks of a meta-batch and of an evaluation are computed — resolved once,
from ``train.engine``, the device and what the learner does, and used by training and
evaluation alike.

* ``loop`` — the learner's own loop (``MetaLearner``): one task after another, on the CPU on
  ``threads`` task threads (results bit-identical for any count: ``meta.parallel``);
* ``grouped`` — every task of a meta-batch (evaluation: ``EVAL_GROUP`` at a time) in one pass of
  grouped convolutions (``meta.grouped``);
* ``vmap`` — a meta-batch through ``torch.func.vmap`` (``meta.batched``); evaluation on the loop.

``auto`` is a fixed rule, not a timing: grouped on CUDA where the learner allows it, else the
loop — a timed choice could differ between two identical runs and break bit-exact resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from sparsemeta.config import Config
from sparsemeta.data.tasks import Task
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.runtime import resolve_threads
from sparsemeta.meta import grouped
from sparsemeta.meta.batched import vmap_meta_gradient_step
from sparsemeta.meta.core import MetaLearner, Params

CORES = ("loop", "grouped", "vmap")


@dataclass(frozen=True)
class Engine:
    """What computes the tasks (``core``), where (``device``), and on how many CPU task threads
    the loop spreads them (``threads``; the learner's own loop reads it)."""

    core: str = "loop"
    device: torch.device = torch.device("cpu")
    threads: int = 1

    def meta_gradient_step(self, learner: MetaLearner, params: Params,
                           tasks: list[Task]) -> tuple[float, float]:
        """The mean meta-gradient of ``tasks`` into ``params[*].grad`` (and the learned rates);
        (mean query loss, mean query accuracy)."""
        if self.core == "grouped":
            return grouped.Grouped(learner).meta_gradient_step(params, tasks)
        if self.core == "vmap":
            return vmap_meta_gradient_step(learner, params, tasks)
        return learner.meta_gradient_step(params, tasks)

    def evaluate_tasks(self, learner: MetaLearner, params: Mapping[str, torch.Tensor],
                       task: Callable[[int], Task], indices: Iterable[int], steps: int
                       ) -> Iterator[tuple[int, list[float], list[float]]]:
        """``(i, accuracies, losses)`` after 0..``steps`` adaptation steps, in index order."""
        core = grouped.Grouped(learner) if self.core == "grouped" else learner
        return core.evaluate_tasks(params, task, indices, steps)


def _vmap_unsupported(cfg: Config) -> str | None:
    """Why ``torch.func.vmap`` cannot compute this learner exactly (None: it can)."""
    m = cfg.meta
    if m.adapt != "all":
        return f"it adapts every parameter (meta.adapt=all), not meta.adapt={m.adapt}"
    if m.mix == "metamix" or m.bn == "running":
        return "it needs batch statistics without MetaMix"
    if m.algorithm == "mamlpp" and cfg.mamlpp.multi_step_loss:
        return "it computes the last step's outer loss only (mamlpp.multi_step_loss=false)"
    return None


def resolve_engine(cfg: Config, device: torch.device) -> Engine:
    """The engine ``train.engine`` asks for on ``device`` — refused in one line where the chosen
    core would not compute what the loop computes."""
    setting = cfg.train.engine
    threads = resolve_threads(cfg.train.threads)
    why_not = grouped.unsupported(cfg.meta.bn, cfg.meta.mix == "metamix")
    if setting == "auto":
        core = "grouped" if device.type == "cuda" and why_not is None else "loop"
        return Engine(core, device, threads)
    if setting == "vmap":
        why_not = _vmap_unsupported(cfg)
    if setting != "loop" and why_not is not None:
        raise UserError(f"train.engine={setting} cannot run this learner: {why_not}; use "
                        "train.engine=auto or loop")
    return Engine(setting, device, threads)
