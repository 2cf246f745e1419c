"""The one inner-loop core that every MAML-family learner is a configuration of.

A learner is a pure function of an explicit parameter dict: adaptation on the support set
produces fast weights with ``torch.autograd.grad`` (``create_graph`` for second order), and the
outer loss is the query loss of the fast weights. No module is copied per task, the stored
model is never written, and the mask is applied in one place (``sparsity.masks.apply_mask``).
MAML, first-order MAML, MAML++, Meta-SGD and MetaMix are options of this one loop:

* inner learning rate: a scalar (MAML), per layer and step learned (MAML++'s LSLR), or per
  weight learned (Meta-SGD's α) — ``lr_rule``;
* outer loss: last step only, or every step weighted (MAML++'s multi-step loss) —
  ``step_weights``; query mixed with the support set at a random layer (MetaMix) — ``metamix``,
  with classes swapping a channel group at that layer, support and query (Channel Shuffle) —
  ``channel_shuffle``;
* derivative order — ``first_order`` (the trainer anneals it for MAML++).

Batch-norm policy (``meta.bn``), never a side effect of train/eval mode:

* ``transductive`` — support and query are each normalised with their own batch statistics
  (the original MAML). Query predictions depend on the other query examples.
* ``support`` — statistics are computed on the support set only and used for the query (the
  query is forwarded together with the support set, with statistics taken from the support rows),
  so each query prediction depends on the support set and itself alone.
* ``running`` — meta-training normalises with batch statistics and accumulates running
  statistics (per adaptation step if the model has per-step BN, MAML++'s BNRS); evaluation
  normalises support and query with the running statistics of their step.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparsemeta.data.tasks import Task
from sparsemeta.foundations import streams
from sparsemeta.meta.parallel import ordered_map
from sparsemeta.models.conv4 import Mix, Pass, Shuffle
from sparsemeta.sparsity.masks import Mask, apply_mask

Params = dict[str, torch.Tensor]
BN_POLICIES = ("transductive", "support", "running")
LR_RULES = ("scalar", "lslr", "metasgd")
#: a per-iteration schedule: (learner, meta-iteration, outer optimiser) → None
Schedule = Callable[["MetaLearner", int, torch.optim.Optimizer], None]
Item = TypeVar("Item")
R = TypeVar("R")
#: the module copy the current task thread forwards through (``MetaLearner.map_tasks``)
_TASK = threading.local()


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correct predictions; NaN where the logits are not finite (a diverged model
    must not score 1/ways by argmax-ing NaN to class 0)."""
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    return float((logits.argmax(dim=1) == y).float().mean())


def _class_sources(y: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
    """For Channel Shuffle: row i of class c takes from the row of class ``classes[c]`` with the
    same rank within its class (every class has as many rows in a set)."""
    labels = y.cpu().numpy()
    rows = {c: np.flatnonzero(labels == c) for c in range(len(classes))}
    source = np.empty(len(labels), dtype=np.int64)
    for c, r in rows.items():
        source[r] = rows[int(classes[c])]
    return torch.as_tensor(source, device=y.device)


def adapted_names(mode: str, names: list[str]) -> frozenset[str]:
    """The parameters the inner loop adapts under ``meta.adapt`` (the edge runtime's
    ``--update`` modes): all; the head; batch norm and the head; the last K blocks and the head."""
    if mode == "all":
        return frozenset(names)
    head = {k for k in names if k.startswith("head.")}
    if mode == "head":
        return frozenset(head)
    if mode == "bn":
        return frozenset(head | {k for k in names if ".bn." in k})
    k = int(mode.split(":", 1)[1])
    blocks = sorted({n.split(".")[1] for n in names if n.startswith("blocks.")}, key=int)
    last = {f"blocks.{b}." for b in blocks[-k:]}
    return frozenset(head | {n for n in names if any(n.startswith(p) for p in last)})


def _rate_key(name: str) -> str:
    return name.replace(".", "-")  # ParameterDict keys may not contain dots


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with NHWC strides if it is 4-D (differentiable; other tensors pass through).

    A contiguous single-channel tensor is already laid out as NHWC but keeps NCHW strides,
    which makes a convolution fall back to NCHW for that layer and every layer after it; it is
    restrided as a view instead.
    """
    if t.dim() != 4:
        return t
    if t.shape[1] == 1:
        n, _, h, w = t.shape
        return t.contiguous().view(n, h, w, 1).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last)


def _task_channels_last(task: Task) -> Task:
    return Task(channels_last(task.support_x), task.support_y, channels_last(task.query_x),
                task.query_y, index=task.index)


def _grad_inputs(learner: MetaLearner, params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """What a meta-gradient reaches: ``params`` entries that require grad, model parameters
    missing from ``params`` (the forward falls back to them), learned inner rates."""
    found: dict[int, torch.Tensor] = {}
    missing = [p for k, p in learner.model.named_parameters() if k not in params]
    for t in [*params.values(), *missing, *learner.rates.parameters()]:
        if t.requires_grad:
            found.setdefault(id(t), t)
    return list(found.values())


class MetaLearner:
    """MAML-family learners as options of one functional inner loop (see the module doc)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        bn: str = "transductive",
        mask: Mask | None = None,
        lr_rule: str = "scalar",
        eval_inner_steps: int | None = None,
        metamix: tuple[float, float] | None = None,
        metamix_seed: int = 0,
        adapt: str = "all",
        threads: int = 1,
    ) -> None:
        if bn not in BN_POLICIES:
            raise ValueError(f"meta.bn must be one of {BN_POLICIES}, got {bn!r}")
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {LR_RULES}, got {lr_rule!r}")
        self.model = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.bn = bn
        self.mask = mask
        self.lr_rule = lr_rule
        self.metamix = metamix  # MetaMix's Beta(α, β) for the mixing weight; None: no mixing
        self.metamix_seed = metamix_seed
        self.adapted = adapted_names(adapt, [k for k, _ in model.named_parameters()])
        self.step_weights: list[float] | None = None
        self.channel_shuffle = False  # MetaMix's Channel Shuffle (switched on by the trainer)
        self.tracking = False  # update running BN statistics (meta-training forwards only)
        self.evaluating = False  # normalise with running statistics (bn='running')
        # what changes over meta-training (MAML++'s schedules, Channel Shuffle): see learners.py
        self.schedules: list[Schedule] = []
        # CPU tasks computed side by side (train.threads); never changes a result (parallel.py)
        self.threads = threads
        # the arithmetic of the forwards (train.precision, set by the engine): "bf16" runs each
        # task under bfloat16 autocast; "fp32"/"tf32" differ only in CUDA's global TF32 flags
        self.precision = "fp32"
        # NHWC convolutions for float32 on the CPU; None: where measured faster (see _layout)
        self.channels_last: bool | None = None
        self._copies: tuple[nn.Module, list[nn.Module]] | None = None
        steps = max(inner_steps, eval_inner_steps or inner_steps)
        self.rates = nn.ParameterDict()
        for name, p in model.named_parameters():
            if lr_rule == "lslr":
                self.rates[_rate_key(name)] = nn.Parameter(torch.full((steps,), inner_lr))
            elif lr_rule == "metasgd":
                self.rates[_rate_key(name)] = nn.Parameter(torch.full_like(p, inner_lr))

    def begin_iteration(self, iteration: int, optimizer: torch.optim.Optimizer) -> None:
        """Apply the learner's training-time schedules for meta-iteration ``iteration``."""
        for schedule in self.schedules:
            schedule(self, iteration, optimizer)

    # -- learnable state: the model plus learned inner learning rates ----------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) + list(self.rates.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat: the model's entries plus ``inner_lr.<parameter name>`` for learned rates."""
        state = dict(self.model.state_dict())
        state.update({f"inner_lr.{k.replace('-', '.')}": v.detach().clone()
                      for k, v in self.rates.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a flat state; learned rates absent from it (a plain model's θ₀) keep their init."""
        model = {k: v for k, v in state.items() if not k.startswith("inner_lr.")}
        self.model.load_state_dict(model)
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith("inner_lr."):
                    self.rates[_rate_key(k[len("inner_lr."):])].copy_(v)

    def to(self, device: torch.device | str) -> MetaLearner:
        self.model.to(device)
        self.rates.to(device)
        return self

    def lr(self, name: str, step: int) -> torch.Tensor | float:
        if self.lr_rule == "scalar":
            return self.inner_lr
        rate = self.rates[_rate_key(name)]
        return rate[min(step, rate.shape[0] - 1)] if self.lr_rule == "lslr" else rate

    # -- forward ---------------------------------------------------------------------------
    def logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor,
               stats_rows: int | None = None, step: int = 0, mix: Mix | None = None,
               shuffle: Shuffle | None = None) -> torch.Tensor:
        """The functional forward: the mask is applied here and nowhere else.

        On a task thread it runs through that thread's copy of the model (``functional_call``
        swaps module attributes, so threads cannot share one module), with the stored model's
        parameters and buffers filling in whatever ``params`` does not name.
        """
        p = Pass(stats_rows=stats_rows, step=step, mix=mix, shuffle=shuffle,
                 running=self.evaluating and self.bn == "running",
                 track=self.tracking and self.bn == "running")
        tensors = apply_mask(params, self.mask)
        module = self.model
        if getattr(_TASK, "model", None) is self.model:
            module = _TASK.module
            tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers()),
                       **tensors}
        return functional_call(module, tensors, (x,), {"p": p})

    def query_logits(self, params: Mapping[str, torch.Tensor], task: Task,
                     step: int = 0) -> torch.Tensor:
        if self.bn != "support":
            return self.logits(params, task.query_x, step=step)
        n = task.support_x.shape[0]
        both = torch.cat([task.support_x, task.query_x])
        return self.logits(params, both, stats_rows=n, step=step)[n:]

    # -- inner loop ------------------------------------------------------------------------
    def inner_step(self, params: Params, task: Task, step: int, create_graph: bool,
                   shuffle: Shuffle | None = None) -> Params:
        """One SGD step on the support loss; keeps the graph to ``params`` for the outer step."""
        logits = self.logits(params, task.support_x, step=step, shuffle=shuffle)
        loss = F.cross_entropy(logits, task.support_y)
        names = [k for k, v in params.items() if v.requires_grad and k in self.adapted]
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
        fast = dict(params)
        for name, grad in zip(names, grads):
            fast[name] = params[name] - self.lr(name, step) * grad
        return fast

    def adapt(self, params: Params, task: Task, steps: int, create_graph: bool,
              shuffle: Shuffle | None = None) -> list[Params]:
        """Fast weights after 0, 1, …, ``steps`` inner steps."""
        trajectory = [params]
        for step in range(steps):
            trajectory.append(self.inner_step(trajectory[-1], task, step, create_graph, shuffle))
        return trajectory

    # -- outer loss ------------------------------------------------------------------------
    def _shuffle_plan(self, task: Task) -> tuple[int, int, np.ndarray]:
        """(layer, channel group, class map) of this task's Channel Shuffle: the class map is
        one cycle through a random order of the classes, so every class borrows from another."""
        rng = streams.rng(streams.CHANNEL_SHUFFLE_PLAN, self.metamix_seed, task.index)
        order = rng.permutation(int(task.support_y.max()) + 1)
        classes = np.empty_like(order)
        classes[order] = np.roll(order, -1)
        return int(rng.integers(0, 5)), int(rng.integers(0, 6)), classes

    def _query_loss(self, fast: Params, task: Task, step: int,
                    plan: tuple[int, int, np.ndarray] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of the query after ``step`` steps, mixed with the support if MetaMix
        (and channel-shuffled at the mixing layer under ``plan``)."""
        if self.metamix is None:
            logits = self.query_logits(fast, task, step)
            return F.cross_entropy(logits, task.query_y), logits
        if task.query_x.shape[0] != task.support_x.shape[0]:
            raise ValueError("MetaMix needs as many query as support examples per class")
        rng = streams.rng(streams.METAMIX_DRAW, self.metamix_seed, task.index, step)
        lam = float(rng.beta(*self.metamix))
        perm = torch.as_tensor(rng.permutation(task.support_x.shape[0]),
                               device=task.support_x.device)
        layer = int(rng.integers(0, 5))  # the input or the output of one of the 4 blocks
        shuffle = None
        if plan is not None:
            layer, group, classes = plan
            n = task.query_x.shape[0]
            source = torch.cat([_class_sources(task.query_y, classes),
                                _class_sources(task.support_y, classes) + n])
            shuffle = Shuffle(layer=layer, group=group, source=source)
        mix = Mix(layer=layer, lam=lam, n=task.query_x.shape[0], perm=perm)
        logits = self.logits(fast, torch.cat([task.query_x, task.support_x]), step=step, mix=mix,
                             shuffle=shuffle)
        loss = (lam * F.cross_entropy(logits, task.query_y)
                + (1.0 - lam) * F.cross_entropy(logits, task.support_y[perm]))
        return loss, logits

    def _layout(self, params: Mapping[str, torch.Tensor], task: Task,
                second_order: bool) -> tuple[Params, Task]:
        """``params`` and ``task`` in the memory layout the forward runs fastest in.

        NHWC (channels last) for float32 images on the CPU without a second-order graph:
        ATen's NCHW max-pool is ~10× slower than its NHWC one and oneDNN's convolutions prefer
        NHWC (measured 1.5–1.7× per first-order task). Second order stays NCHW: torch's batch
        norm double backward sums over the batch into NCHW tensors, and mixing layouts made it
        0.8–1.0× there. The values are the same and every op agrees to float rounding (where
        rounding breaks an exact tie of a max-pool or ReLU differently, the subgradient taken
        differs). Auto keeps float64 NCHW; ``self.channels_last`` forces it on or off.
        """
        use = self.channels_last
        x = task.support_x
        if use is None:
            use = (not second_order and x.dim() == 4 and x.device.type == "cpu"
                   and x.dtype == torch.float32)
        if not use:
            return dict(params), task
        return {k: channels_last(v) for k, v in params.items()}, _task_channels_last(task)

    def outer_loss(self, params: Params, task: Task) -> tuple[torch.Tensor, float]:
        """Query loss after adaptation (weighted over steps under the multi-step loss);
        differentiable w.r.t. ``params`` and the learned rates (second or first order)."""
        params, task = self._layout(params, task, second_order=not self.first_order)
        plan = self._shuffle_plan(task) if self.channel_shuffle and self.metamix else None
        support_shuffle = None
        if plan is not None:
            support_shuffle = Shuffle(layer=plan[0], group=plan[1],
                                      source=_class_sources(task.support_y, plan[2]))
        trajectory = self.adapt(params, task, self.inner_steps, create_graph=not self.first_order,
                                shuffle=support_shuffle)
        if self.step_weights is None:
            loss, logits = self._query_loss(trajectory[-1], task, self.inner_steps, plan)
        else:
            loss = torch.zeros(())
            for step, weight in enumerate(self.step_weights, start=1):
                step_loss, logits = self._query_loss(trajectory[step], task, step, plan)
                loss = loss + weight * step_loss
        return loss, accuracy(logits, task.query_y)

    # -- tasks side by side ----------------------------------------------------------------
    def _module_copies(self, n: int) -> list[nn.Module]:
        """``n`` structural copies of the model, one per task thread (kept between calls; the
        forward replaces all their tensors, so their own values never matter)."""
        if self._copies is None or self._copies[0] is not self.model:
            self._copies = (self.model, [])
        copies = self._copies[1]
        while len(copies) < n:
            clone = copy.deepcopy(self.model)
            for p in clone.parameters():
                p.requires_grad_(False)
                p.grad = None
            copies.append(clone)
        return copies[:n]

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on the model's device where ``precision`` is "bf16" (autocast is a
        per-thread state: every task thread enters it for its own task)."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        first = next(self.model.parameters(), None)
        return torch.autocast(first.device.type if first is not None else "cpu",
                              dtype=torch.bfloat16)

    def map_tasks(self, fn: Callable[[Item], R], items: Iterable[Item],
                  sequential: bool = False) -> Iterator[R]:
        """``fn`` over ``items``, results in item order, each under ``autocast``.

        On the CPU the items run on ``self.threads`` task threads (one at a time if
        ``sequential``), each forwarding through its own model copy with one intra-op thread;
        on an accelerator, one after another on this thread (no threads are started).
        """
        first = next(self.model.parameters(), None)
        if first is not None and first.device.type != "cpu":
            for item in items:
                with self.autocast():
                    result = fn(item)
                yield result
            return
        free: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
        for module in self._module_copies(self.threads):
            free.put(module)

        def run(item: Item) -> R:
            module = free.get()
            _TASK.model, _TASK.module = self.model, module
            try:
                with self.autocast():
                    return fn(item)
            finally:
                _TASK.model = _TASK.module = None
                free.put(module)

        yield from ordered_map(run, items, self.threads, in_flight=1 if sequential else None)

    def meta_gradient_step(self, params: Params, tasks: list[Task],
                           track_running: bool = True) -> tuple[float, float]:
        """Accumulate the mean meta-gradient of ``tasks`` into ``params[*].grad`` (and into the
        learned rates); returns the mean query loss and accuracy.

        Each task's gradient is taken on its own (``torch.autograd.grad``: one graph alive per
        task thread) and the gradients are summed in task order, so the result is the same bit
        for bit however many threads compute it (``self.threads``). Running BN statistics are
        updated in task order: while they are tracked, tasks run one at a time.
        ``track_running=False``: leave running BN statistics alone (an extra, scoring pass).
        """
        inputs, n = _grad_inputs(self, params), len(tasks)

        def task_gradient(task: Task) -> tuple[tuple[torch.Tensor | None, ...], float, float]:
            loss, acc = self.outer_loss(params, task)
            grads = torch.autograd.grad(loss / n, inputs, allow_unused=True)
            return grads, float(loss.detach()), acc

        total_loss, total_acc = 0.0, 0.0
        sums: list[torch.Tensor | None] = [None] * len(inputs)
        self.tracking = track_running
        results = self.map_tasks(task_gradient, tasks,
                                 sequential=track_running and self.bn == "running")
        try:
            for grads, loss, acc in results:
                total_loss, total_acc = total_loss + loss, total_acc + acc
                for j, g in enumerate(grads):
                    if g is not None:
                        sums[j] = g if sums[j] is None else sums[j] + g
        finally:
            results.close()
            self.tracking = False
        reached = [(t, g) for t, g in zip(inputs, sums) if g is not None]
        if reached:  # into .grad as a backward would (and on through non-leaf params)
            torch.autograd.backward([t for t, _ in reached], [g for _, g in reached])
        return total_loss / n, total_acc / n

    # -- evaluation ------------------------------------------------------------------------
    def _scores(self, params: Mapping[str, torch.Tensor], task: Task,
                steps: int) -> tuple[list[float], list[float]]:
        params, task = self._layout({k: v.detach() for k, v in params.items()}, task, False)
        local = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        accs, losses = [], []
        for step, fast in enumerate(self.adapt(local, task, steps, create_graph=False)):
            with torch.no_grad():
                logits = self.query_logits(fast, task, step)
                losses.append(float(F.cross_entropy(logits, task.query_y)))
                accs.append(accuracy(logits, task.query_y))
        return accs, losses

    def evaluate_task(self, params: Mapping[str, torch.Tensor], task: Task,
                      steps: int) -> tuple[list[float], list[float]]:
        """Query accuracy and loss after each of 0..``steps`` adaptation steps.

        Works on detached copies, so the stored parameters and buffers are never written.
        """
        self.evaluating = True
        try:
            return self._scores(params, task, steps)
        finally:
            self.evaluating = False

    def evaluate_tasks(self, params: Mapping[str, torch.Tensor], task: Callable[[int], Task],
                       indices: Iterable[int], steps: int
                       ) -> Iterator[tuple[int, list[float], list[float]]]:
        """``(i, accuracies, losses)`` of ``evaluate_task`` for each task ``task(i)``, in index
        order; built and adapted on the task threads (identical results for any count)."""
        self.evaluating = True
        results = self.map_tasks(lambda i: (i, *self._scores(params, task(i), steps)), indices)
        try:
            yield from results
        finally:
            results.close()
            self.evaluating = False
