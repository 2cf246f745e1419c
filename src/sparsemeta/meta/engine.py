"""The engine: how the tasks of a meta-batch and of an evaluation are computed — resolved once,
from ``train.core``, the device and what the learner does, and used by training and
evaluation alike.

* ``loop`` — the learner's own loop (``MetaLearner``): one task after another, on the CPU on
  ``threads`` task threads (results bit-identical for any count: ``meta.parallel``);
* ``grouped`` — every task of a meta-batch (evaluation: ``EVAL_GROUP`` at a time) in one pass of
  grouped convolutions (``meta.grouped``);
* ``vmap`` — a meta-batch through ``torch.func.vmap`` (``meta.batched``); evaluation as ``auto``
  would evaluate (there is no vmapped evaluation).

``auto`` is a fixed rule, not a timing: grouped on CUDA where the learner allows it, else the
loop — a timed choice could differ between two identical runs and break bit-exact resume.

The engine also holds the arithmetic (``train.precision``): ``fp32`` — true float32, CUDA's
TF32 switched *off* (PyTorch turns cuDNN's on by default, which moved a float32 MAML
meta-gradient by 1.2 relative on an H200); ``tf32`` — TF32 matrix products and convolutions on
CUDA (no effect on a CPU); ``bf16`` — every task's forward under bfloat16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from sparsemeta.config import Config
from sparsemeta.data.tasks import Task
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.runtime import resolve_threads
from sparsemeta.meta import batched, grouped
from sparsemeta.meta.core import MetaLearner, Params


@dataclass(frozen=True)
class Engine:
    """What computes the tasks of a meta-batch (``core``) and of an evaluation (``eval_core``),
    where (``device``), and on how many CPU task threads the loop spreads them (``threads``: the
    engine sets them on the learner it computes for — the one owner of that number)."""

    core: str = "loop"
    eval_core: str = "loop"
    device: torch.device = torch.device("cpu")
    threads: int = 1
    precision: str = "fp32"

    def _bind(self, learner: MetaLearner) -> None:
        """The learner computes with this engine's threads and precision (its one owner)."""
        learner.threads, learner.precision = self.threads, self.precision
        tf32 = self.precision == "tf32"  # process-wide switches, set before every computation
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

    def meta_gradient_step(self, learner: MetaLearner, params: Params,
                           tasks: list[Task]) -> tuple[float, float]:
        """The mean meta-gradient of ``tasks`` into ``params[*].grad`` (and the learned rates);
        (mean query loss, mean query accuracy)."""
        self._bind(learner)
        if self.core == "loop":  # the learner's loop enters autocast on each task's thread
            return learner.meta_gradient_step(params, tasks)
        with learner.autocast():
            if self.core == "grouped":
                return grouped.Grouped(learner).meta_gradient_step(params, tasks)
            return batched.vmap_meta_gradient_step(learner, params, tasks)

    def evaluate_tasks(self, learner: MetaLearner, params: Mapping[str, torch.Tensor],
                       task: Callable[[int], Task], indices: Iterable[int], steps: int
                       ) -> Iterator[tuple[int, list[float], list[float]]]:
        """``(i, accuracies, losses)`` after 0..``steps`` adaptation steps, in index order."""
        self._bind(learner)
        if self.eval_core != "grouped":
            yield from learner.evaluate_tasks(params, task, indices, steps)
            return
        rows = grouped.Grouped(learner).evaluate_tasks(params, task, indices, steps)
        while True:
            with learner.autocast():  # not held across a yield: the consumer runs outside it
                row = next(rows, None)
            if row is None:
                return
            yield row


def core_problem(cfg: Config) -> str | None:
    """Why ``train.core`` cannot compute this config's learner (None: it can) — whatever the
    device, so a sweep or a study can refuse it before its first run."""
    setting, m = cfg.train.core, cfg.meta
    if setting == "grouped":
        why = grouped.unsupported(m.bn, m.mix == "metamix")
    elif setting == "vmap":
        multi_step = m.algorithm == "mamlpp" and cfg.mamlpp.multi_step_loss
        why = batched.unsupported(m.adapt == "all", multi_step, m.mix == "metamix", m.bn)
    else:
        return None
    return None if why is None else (f"train.core={setting} cannot run this learner: {why}; "
                                     "use train.core=auto or loop")


def check_core(cfg: Config) -> None:
    """Refuse, in one line, a ``train.core`` that cannot compute the config's learner."""
    problem = core_problem(cfg)
    if problem is not None:
        raise UserError(problem)


def resolve_engine(cfg: Config, device: torch.device) -> Engine:
    """The engine ``train.core`` asks for on ``device`` — refused in one line where the chosen
    core would not compute what the loop computes."""
    check_core(cfg)
    can_group = grouped.unsupported(cfg.meta.bn, cfg.meta.mix == "metamix") is None
    auto = "grouped" if device.type == "cuda" and can_group else "loop"
    core = auto if cfg.train.core == "auto" else cfg.train.core
    return Engine(core=core, eval_core=auto if core == "vmap" else core, device=device,
                  threads=resolve_threads(cfg.train.threads), precision=cfg.train.precision)
