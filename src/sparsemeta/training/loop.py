"""Meta-training of one model in one run directory: idempotent, checkpointed, resumable.

``train`` is the loop and nothing else. Setting up or restoring a run is ``_open`` (through the
run-directory contract, ``training.rundir``); what a learner changes over training is the
learner's own schedule (``learner.begin_iteration``); what a sparsity method does is its hooks;
validation, checkpoints and the final evaluation are the helpers below.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sparsemeta.config import Config
from sparsemeta.data.base import FewShotData
from sparsemeta.data.tasks import TaskSampler, sampler_for
from sparsemeta.foundations.atomic import remove_stale_temps
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import atomic_torch_save, load_tensors
from sparsemeta.foundations.lock import exclusive
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.learners import build_learner
from sparsemeta.sparsity.masks import Mask, density, save_mask, zero_pruned_
from sparsemeta.training import rundir
from sparsemeta.training.cost import ComputeMeter, meter_for
from sparsemeta.training.distributed import Group, group
from sparsemeta.training.evaluate import evaluate
from sparsemeta.training.hooks import StepContext, TrainHooks
from sparsemeta.training.metrics import MetricsWriter, open_writers
from sparsemeta.training.rundir import Best, Checkpoint, Divergence, RunDir, RunResult
from sparsemeta.training.setup import Setup, prepare


@dataclass
class Session:
    """One run being trained: its directory, learner, optimiser and progress so far."""

    setup: Setup
    run: RunDir
    data: FewShotData
    g: Group
    learner: MetaLearner
    mask: Mask | None
    optimizer: torch.optim.Optimizer
    hooks: TrainHooks
    meter: ComputeMeter
    start: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # CPU seconds of training so far (this process, all its threads)
    best: Best = field(default_factory=Best)
    writers: list[MetricsWriter] = field(default_factory=list)
    stopped: bool = False  # the method stopped training early (saved: a resume does not go on)
    checkpointed: int = 0  # the iteration of the last checkpoint on disk (0: none, θ₀)
    train_tasks: TaskSampler | None = None  # the meta-training tasks

    @property
    def cfg(self) -> Config:
        return self.setup.cfg

    @property
    def device(self) -> torch.device:
        return self.setup.device

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.learner.model.named_parameters())

    def log(self, record: dict) -> None:
        for writer in self.writers:
            writer.write(record)


def _open(setup: Setup, run: RunDir, data: FewShotData, g: Group, hooks: TrainHooks,
          init: Mapping[str, torch.Tensor] | None, mask: Mask | None) -> Session:
    """The session of a run directory: on first use it saves the mask and θ₀ (``init``, else
    the config's seed's) that a resume reads back; then the learner starts from ``init.pt``,
    or continues from the checkpoint if there is one."""
    cfg, device = setup.cfg, setup.device
    learner = build_learner(cfg, data.channels)
    if g.main and not run.file(rundir.INIT).exists():
        if init is not None:
            learner.load_state_dict(init)
        run.save_start(learner.state_dict(), mask)
    elif g.main and mask is not None:
        run.save_start({}, mask)
    g.barrier()  # the other ranks read what rank 0 wrote
    mask = run.mask()
    learner.mask = {k: v.to(device) for k, v in mask.items()} if mask is not None else None
    learner.load_state_dict(load_tensors(run.file(rundir.INIT)))
    learner.to(device)
    zero_pruned_(dict(learner.model.named_parameters()), learner.mask)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.train.meta_lr)
    s = Session(setup, run, data, g, learner, learner.mask, optimizer, hooks,
                meter_for(learner))
    if run.file(rundir.CHECKPOINT).exists():
        _restore(s)
    return s


def _restore(s: Session) -> None:
    """Continue from the checkpoint: weights, optimiser, RNG, progress, hooks, current mask."""
    ckpt = s.run.checkpoint(s.device)
    s.learner.load_state_dict(ckpt.model)
    s.optimizer.load_state_dict(ckpt.optimizer)
    torch.set_rng_state(ckpt.torch_rng.cpu())
    s.start = s.checkpointed = ckpt.iteration
    s.elapsed, s.cpu, s.best = ckpt.elapsed, ckpt.cpu_seconds, ckpt.best
    s.hooks.load_state_dict(ckpt.hooks)
    s.meter.load_state_dict(ckpt.compute)
    s.stopped = ckpt.stopped
    if s.mask is not None:  # a method may move the mask (RigL): the checkpoint's is current
        for k, m in ckpt.mask.items():
            s.mask[k].copy_(m)


def _checkpoint(s: Session, iteration: int) -> None:
    if s.g.main:
        Checkpoint(iteration=iteration, elapsed=s.elapsed, best=s.best,
                   model=s.learner.state_dict(), optimizer=s.optimizer.state_dict(),
                   torch_rng=torch.get_rng_state(), hooks=s.hooks.state_dict(), mask=s.mask,
                   stopped=s.stopped, compute=s.meter.state_dict(), cpu_seconds=s.cpu
                   ).save(s.run.file(rundir.CHECKPOINT))
    s.checkpointed = iteration


def _validate(s: Session, iteration: int, log: bool = True) -> None:
    """Score on the validation tasks; keep the weights (and their mask) if they are the best."""
    cfg = s.cfg
    res = evaluate(s.setup.engine, s.learner, s.params,
                   sampler_for(cfg.task_spec(), s.data, "val"), cfg.train.val_tasks,
                   cfg.meta.eval_inner_steps)
    s.meter.evaluation(cfg, s.mask, cfg.train.val_tasks)
    if log:
        s.log({"iteration": iteration, "split": "val", "loss": res.per_step[-1]["loss"],
               "accuracy": res.accuracy, "ci95": res.ci95,
               "per_step": [r["accuracy"] for r in res.per_step]})
    if not log or (s.hooks.selectable(iteration) and res.accuracy > s.best.accuracy):
        s.best = Best(accuracy=res.accuracy, ci95=res.ci95, iteration=iteration)
        if s.g.main:
            atomic_torch_save(s.learner.state_dict(), s.run.file(rundir.BEST))
            if s.hooks.moves_mask:
                save_mask(s.mask, s.run.file(rundir.BEST_MASK))


def _sum_meta_gradient(g: Group, learner: MetaLearner, loss: float, acc: float, mine: int,
                       total: int, device: torch.device) -> tuple[float, float]:
    """Turn each rank's mean over its ``mine`` tasks into the mean over all ``total`` tasks:
    gradients, loss and accuracy alike (every rank ends with the same values)."""
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    for grad in grads:
        grad.mul_(mine / total)
    stats = torch.tensor([loss * mine, acc * mine], dtype=torch.float64, device=device)
    g.sum_(grads)
    g.sum_([stats])
    return float(stats[0]) / total, float(stats[1]) / total


def _outer_step(s: Session, it: int, tasks: list) -> tuple[float, float, StepContext]:
    """One meta-iteration: the learner's schedule, the meta-gradient (summed over ranks), the
    method's penalty, the optimiser step."""
    cfg, g = s.cfg, s.g
    s.learner.begin_iteration(it, s.optimizer)
    s.optimizer.zero_grad(set_to_none=True)
    mine = [tasks[b] for b in g.share(cfg.train.meta_batch)]
    params = s.params
    loss, acc = s.setup.engine.meta_gradient_step(s.learner, params, mine)
    s.meter.train_step(cfg, s.learner, s.mask, cfg.train.meta_batch)
    if g.world > 1:
        loss, acc = _sum_meta_gradient(g, s.learner, loss, acc, len(mine), cfg.train.meta_batch,
                                       s.device)
    ctx = StepContext(it + 1, params, s.mask, s.optimizer, s.learner, tasks,
                      draw_task=lambda i: s.train_tasks.task(i).to(s.device))
    penalty = s.hooks.regularizer(ctx)
    if penalty is not None:
        penalty.backward()
    _check_finite(s, it + 1, loss)
    s.optimizer.step()
    return loss, acc, ctx


#: an outer (cross-entropy) loss above this is divergence, not learning: an untrained N-way model
#: starts near ln N (1.6 nats for 5 ways) and a confidently wrong one stays within tens of nats
MAX_LOSS = 1e4


class Diverged(UserError):
    """Training produced a non-finite loss or meta-gradient: the run stops, keeping its last
    good checkpoint, and says where (``diverged.json``)."""


def _check_finite(s: Session, iteration: int, loss: float) -> None:
    """Stop before a non-finite update reaches the weights (Adam would spread it everywhere)."""
    bad = None
    if not math.isfinite(loss) or loss > MAX_LOSS:
        bad = f"the outer loss is {loss:.3g}" + (f" (above {MAX_LOSS:g})" if loss > MAX_LOSS else "")
    if bad is None:
        named = [*s.learner.model.named_parameters(), *(
            (f"inner_lr.{k}", v) for k, v in s.learner.rates.named_parameters())]
        bad = next((f"the meta-gradient of {name} is not finite" for name, p in named
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())), None)
    if bad is None:
        return
    record = Divergence(iteration=iteration, what=bad,
                        loss=loss if math.isfinite(loss) else str(loss),
                        meta_lr=s.optimizer.param_groups[0]["lr"], inner_lr=s.cfg.meta.inner_lr,
                        last_checkpoint=s.checkpointed)
    if s.g.main:
        record.save(s.run.file(rundir.DIVERGED))
    raise Diverged(_diverged_line(s.run, record))


def _diverged_line(run: RunDir, record: Divergence) -> str:
    last = record.last_checkpoint
    kept = f"the checkpoint of iteration {last}" if last else "θ₀ (init.pt)"
    return (f"training diverged at iteration {record.iteration}: {record.what} (meta_lr "
            f"{record.meta_lr:g}, inner_lr {record.inner_lr:g}); the last good state, "
            f"{kept}, is kept in '{run.path}' — lower the learning rates (see {rundir.DIVERGED})")


def _summary(s: Session, total: int, done: int, final_density: float,
             **evaluated) -> RunResult:  # noqa: ANN003
    return RunResult(total, done, s.cfg.train.meta_batch, done * s.cfg.train.meta_batch,
                     s.elapsed, final_density, macs=s.meter.state_dict(), cpu_seconds=s.cpu,
                     **evaluated)


def _finish(s: Session, total: int, done: int, test: bool, progress: bool) -> RunResult:
    """Save the final mask; evaluate the chosen model (best on validation) on ``eval.split``."""
    g = s.g
    final_density = density(s.mask) if s.mask else 1.0
    if s.mask is not None and g.main:
        save_mask(s.mask, s.run.file(rundir.MASK))  # the final mask (a method may have moved it)
    if not test:
        result = _summary(s, total, done, final_density)
    else:
        g.barrier()  # best.pt is rank 0's
        chosen = s.run.chosen_model()
        s.learner.load_state_dict({k: v.to(s.device) for k, v in chosen.state.items()})
        if chosen.mask is not None and s.mask is not None:
            for k, m in chosen.mask.items():
                s.mask[k].copy_(m.to(s.device))
        cfg = s.cfg
        ev = evaluate(s.setup.engine, s.learner, s.params,
                      sampler_for(cfg.task_spec(), s.data, cfg.eval.split), cfg.eval.tasks,
                      cfg.meta.eval_inner_steps, progress=progress and g.main)
        s.meter.evaluation(cfg, s.mask, cfg.eval.tasks)
        result = _summary(s, total, done, final_density, evaluation=ev,
                          val_accuracy=s.best.accuracy, val_ci95=s.best.ci95,
                          best_iteration=s.best.iteration)
    if g.main:
        s.run.write_result(result)
    g.barrier()
    return result


def _begin(cfg: Config, out: str | Path) -> tuple[RunDir, Group]:
    g = group()
    run = RunDir(rundir.make_dir(out))
    if run.file(rundir.DIVERGED).exists() and not run.finished:
        raise Diverged(_diverged_line(run, Divergence.load(run.file(rundir.DIVERGED)))
                       + "; this run "
                       f"is not resumed: use another --out, or delete {rundir.DIVERGED} to retry")
    if g.main:
        remove_stale_temps(run.path)  # half-written files of a killed writer of this run
        rundir.bind_config(run.path, cfg)
    return run, g


def _train(
    setup: Setup,
    out: Path,
    data: FewShotData,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    mask: Mask | None = None,
    snapshot_at: int | None = None,
    hooks: TrainHooks | None = None,
    iterations: int | None = None,
    test: bool = True,
    desc: str = "meta-train",
    progress: bool = True,
) -> RunResult:
    """The loop of ``train`` (its run directory is locked by the caller)."""
    cfg = setup.cfg
    total = cfg.train.iterations if iterations is None else iterations
    run, g = _begin(cfg, out)
    if run.finished:
        g.barrier()
        return run.result()
    s = _open(setup, run, data, g, hooks or TrainHooks(), init, mask)
    s.writers = open_writers(run.path if g.main else None, keep_until=s.start)
    train_tasks = s.train_tasks = sampler_for(cfg.task_spec(), data, "train")
    bar = tqdm(total=total, initial=s.start, desc=desc, unit="it", dynamic_ncols=True,
               disable=not (progress and g.main), leave=False)
    t0, done = time.perf_counter() - s.elapsed, s.start
    cpu0 = time.process_time() - s.cpu
    if test and total == 0:  # evaluate-as-is run: the model is chosen as given
        _validate(s, 0, log=False)
    try:
        for it in range(s.start, s.start if s.stopped else total):
            mb = cfg.train.meta_batch
            tasks = [train_tasks.task(it * mb + b).to(s.device) for b in range(mb)]
            loss, acc, ctx = _outer_step(s, it, tasks)
            done = it + 1
            if s.hooks.after_step(ctx):
                s.log({"iteration": done, "split": "mask", "density": density(s.mask)})
            if ctx.dense_tasks:  # the method's own dense meta-gradients (RigL's grow scores)
                s.meter.train_step(cfg, s.learner, None, ctx.dense_tasks)
            s.stopped = stop = s.hooks.should_stop(ctx)
            s.elapsed, s.cpu = time.perf_counter() - t0, time.process_time() - cpu0
            s.log({"iteration": done, "split": "train", "loss": loss, "accuracy": acc})
            best_val = f"{s.best.accuracy:.3f}" if s.best.found else "n/a"
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", best_val=best_val)
            bar.update(1)
            if snapshot_at is not None and done == snapshot_at and g.main:
                atomic_torch_save(s.learner.state_dict(), run.file(rundir.step_file(done)))
            if test and (done % cfg.train.val_every == 0 or done == total):
                _validate(s, done)
            if stop or done % cfg.train.checkpoint_every == 0 or done == total:
                _checkpoint(s, done)
            if stop:
                break
    finally:
        bar.close()
        for writer in s.writers:
            writer.close()
    return _finish(s, total, done, test, progress)


def train(setup: Setup, out: str | Path, data: FewShotData, **options: Any) -> RunResult:
    """Meta-train into ``out`` (resuming if it holds an unfinished run) and return its result.

    ``setup`` is the config checked against ``data`` (``training.setup.prepare``: nothing here
    checks it again). Options: ``init``/``mask`` (saved on first use) set θ₀ and a fixed
    sparsity pattern; ``snapshot_at=k`` keeps the weights after k iterations (late rewinding);
    ``hooks`` is a sparsity method's part of the loop; ``iterations`` overrides
    ``train.iterations``; ``test=False`` skips the final evaluation (search runs); ``desc`` and
    ``progress`` the progress bar. One process writes a run directory (a second gets a one-line
    error naming the first); under ``torchrun`` each rank takes its share of every meta-batch,
    only rank 0 writes, and the result equals one process's. A run whose loss or meta-gradient
    stops being finite raises ``Diverged`` and keeps its last good checkpoint.
    """
    assert data.name == setup.data_name, "train the data the setup was checked against"
    g = group()
    path = rundir.make_dir(out)
    lock = (exclusive(path / rundir.LOCK, f"run directory '{path}'", wait=False)
            if g.main else contextlib.nullcontext())
    with lock:
        return _train(setup, path, data, **options)


def train_config(cfg: Config, out: str | Path, data: FewShotData | None = None,
                 **options: Any) -> RunResult:
    """``train`` for a caller with a bare config (a library user, a test): loads the data if
    not given and checks the config against it first (``prepare``: the boundary)."""
    from sparsemeta.data.registry import load_data

    data = data if data is not None else load_data(cfg.data_spec())
    return train(prepare(cfg, data), out, data, **options)
