"""Meta-training of one model in one run directory: idempotent, checkpointed, resumable.

Files in the run directory:

* ``config.yaml`` — the resolved config; with it the directory alone can be resumed/evaluated.
* ``init.pt`` — θ₀, the weights before meta-training (the rewind target of the lottery ticket).
* ``mask.pt`` — the sparsity mask, if any.
* ``checkpoint.pt`` — latest model, optimiser, RNG state, iteration (atomic).
* ``best.pt`` — the weights with the best validation accuracy (the model is chosen on
  validation only, never on test).
* ``metrics.jsonl`` — one line per train iteration and per validation.
* ``eval.json`` — the test result; its presence marks the run finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparsemeta.config import Config
from sparsemeta.data.base import FewShotData
from sparsemeta.data.registry import load_data
from sparsemeta.data.tasks import sampler_for
from sparsemeta.distributed import Group, group
from sparsemeta.evaluate import evaluate
from sparsemeta.experiment import (
    atomic_torch_save,
    bind_config,
    make_dir,
    read_json,
    resolve_device,
    write_json,
)
from sparsemeta.foundations.errors import UserError
from sparsemeta.meta.batched import vmap_meta_gradient_step
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.mamlpp import schedule
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.hooks import TrainHooks
from sparsemeta.sparsity.masks import Mask, density, load_mask, save_mask, zero_pruned_

LR_RULE = {"maml": "scalar", "metasgd": "metasgd", "mamlpp": "lslr"}


def build_learner(cfg: Config, in_channels: int, mask: Mask | None = None) -> MetaLearner:
    """The learner ``cfg.meta`` names: every algorithm is an option set of the one core."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, in_channels)
    lr_rule = LR_RULE[cfg.meta.algorithm]
    if cfg.meta.algorithm == "mamlpp" and not cfg.mamlpp.lslr:
        lr_rule = "scalar"
    return MetaLearner(
        model,
        inner_lr=cfg.meta.inner_lr,
        inner_steps=cfg.meta.inner_steps,
        first_order=cfg.meta.first_order,
        bn=cfg.meta.bn,
        mask=mask,
        lr_rule=lr_rule,
        eval_steps=cfg.meta.eval_inner_steps,
        mix=(cfg.metamix.alpha, cfg.metamix.beta) if cfg.meta.mix == "metamix" else None,
        mix_seed=cfg.seed,
    )


def _load(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=False)


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's iteration are dropped.
    Without a path (ranks other than 0 of a distributed job) it writes nothing."""

    def __init__(self, path: Path | None, keep_until: int) -> None:
        self.fh = None
        if path is None:
            return
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["iteration"] <= keep_until]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.fh = path.open("a")

    def write(self, record: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


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


def _prepare(run: Path, cfg: Config, channels: int, init: Mapping[str, torch.Tensor] | None,
             mask: Mask | None) -> None:
    """First use of a run directory: save the mask and θ₀ that a resume will read back."""
    if mask is not None and not (run / "mask.pt").exists():
        save_mask(mask, run / "mask.pt")
    if not (run / "init.pt").exists():
        learner = build_learner(cfg, channels)
        if init is not None:
            learner.load_state_dict(init)
        atomic_torch_save(learner.state_dict(), run / "init.pt")


def train(
    cfg: Config,
    out: str | Path,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    mask: Mask | None = None,
    data: FewShotData | None = None,
    snapshot_at: int | None = None,
    hooks: TrainHooks | None = None,
    iterations: int | None = None,
    test: bool = True,
    desc: str = "meta-train",
    progress: bool = True,
) -> dict:
    """Meta-train into ``out`` (resuming if it holds an unfinished run) and return ``eval.json``.

    ``init`` replaces the model's initial weights and ``mask`` fixes a sparsity pattern; both are
    saved into the run directory on first use, so that a resume needs nothing else.
    ``snapshot_at=k`` saves the weights after k iterations as ``step_<k>.pt`` (late rewinding).
    ``hooks`` is what a sparsity method does inside the loop (L1 penalty, RigL mask updates,
    early-bird stop); ``iterations`` overrides ``train.iterations`` (short fine-tunes);
    ``test=False`` skips the test evaluation (search runs whose weights are only pruned).

    Under ``torchrun`` (see :mod:`sparsemeta.distributed`) each rank takes its share of every
    meta-batch and only rank 0 writes; the result equals one process's.
    """
    hooks = hooks or TrainHooks()
    total = cfg.train.iterations if iterations is None else iterations
    device = resolve_device(cfg.device)
    data = data if data is not None else load_data(cfg)
    g = group()
    if g.world > cfg.train.meta_batch:
        raise UserError(f"{g.world} processes but train.meta_batch={cfg.train.meta_batch}: every "
                        f"process needs at least one task; raise train.meta_batch or use fewer")
    run = make_dir(out)
    if g.main:
        bind_config(run, cfg)
        if not (run / "eval.json").exists():
            _prepare(run, cfg, data.channels, init, mask)
    g.barrier()  # the other ranks read what rank 0 wrote
    if (run / "eval.json").exists():
        return read_json(run / "eval.json")

    mask = load_mask(run / "mask.pt") if (run / "mask.pt").exists() else None
    mask = {k: v.to(device) for k, v in mask.items()} if mask is not None else None
    learner = build_learner(cfg, data.channels, mask)
    learner.load_state_dict(_load(run / "init.pt", torch.device("cpu")))
    learner.to(device)
    params = dict(learner.model.named_parameters())
    zero_pruned_(params, mask)

    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.train.meta_lr)
    start, elapsed = 0, 0.0
    best = {"accuracy": -1.0, "iteration": 0}
    if (run / "checkpoint.pt").exists():
        ckpt = _load(run / "checkpoint.pt", device)
        learner.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        start, elapsed, best = ckpt["iteration"], ckpt["elapsed"], ckpt["best"]
        hooks.load_state_dict(ckpt["hooks"])
        if mask is not None:  # a method may move the mask (RigL): the checkpoint's is current
            for k, m in ckpt["mask"].items():
                mask[k].copy_(m)

    meta_step = learner.meta_gradient_step
    if cfg.train.vmap:
        meta_step = partial(vmap_meta_gradient_step, learner)
    train_tasks = sampler_for(cfg, data, "train")
    val_tasks = sampler_for(cfg, data, "val")
    log = MetricsLog(run / "metrics.jsonl" if g.main else None, keep_until=start)

    def checkpoint(iteration: int) -> None:
        if not g.main:
            return
        atomic_torch_save({
            "iteration": iteration, "elapsed": elapsed, "best": best,
            "model": learner.state_dict(), "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(), "hooks": hooks.state_dict(),
            "mask": mask,
        }, run / "checkpoint.pt")

    bar = tqdm(total=total, initial=start, desc=desc, unit="it",
               disable=not (progress and g.main), dynamic_ncols=True, leave=False)
    t0 = time.perf_counter() - elapsed
    done = start
    if test and total == 0:  # evaluate-as-is run: the model is chosen as given
        res = evaluate(learner, params, val_tasks, cfg.train.val_tasks, cfg.meta.eval_inner_steps,
                       device)
        best = {"accuracy": res["accuracy"], "ci95": res["ci95"], "iteration": 0}
        if g.main:
            atomic_torch_save(learner.state_dict(), run / "best.pt")
    try:
        for it in range(start, total):
            mb = cfg.train.meta_batch
            tasks = [train_tasks.task(it * mb + b).to(device) for b in range(mb)]
            shuffle_from = cfg.metamix.channel_shuffle_from
            learner.channel_shuffle = (shuffle_from is not None and it >= shuffle_from
                                       and np.random.default_rng([cfg.seed, 7719, it]).random() < 0.5)
            if cfg.meta.algorithm == "mamlpp":
                learner.first_order, learner.step_weights, lr = schedule(cfg, it)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            mine = [tasks[b] for b in g.share(mb)]
            loss, acc = meta_step(params, mine)
            if g.world > 1:
                loss, acc = _sum_meta_gradient(g, learner, loss, acc, len(mine), mb, device)
            penalty = hooks.regularizer(params, mask)
            if penalty is not None:
                penalty.backward()
            optimizer.step()
            done = it + 1
            if hooks.after_step(done, params, mask, optimizer, learner, tasks):
                log.write({"iteration": done, "split": "mask", "density": density(mask)})
            stop = hooks.should_stop(done, params, mask)
            elapsed = time.perf_counter() - t0
            log.write({"iteration": done, "split": "train", "loss": loss, "accuracy": acc})
            best_val = f"{best['accuracy']:.3f}" if best["accuracy"] >= 0 else "n/a"
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", best_val=best_val)
            bar.update(1)
            if snapshot_at is not None and done == snapshot_at and g.main:
                atomic_torch_save(learner.state_dict(), run / f"step_{done}.pt")
            if test and (done % cfg.train.val_every == 0 or done == total):
                res = evaluate(learner, params, val_tasks, cfg.train.val_tasks,
                               cfg.meta.eval_inner_steps, device)
                log.write({"iteration": done, "split": "val", "loss": res["per_step"][-1]["loss"],
                           "accuracy": res["accuracy"], "ci95": res["ci95"],
                           "per_step": [r["accuracy"] for r in res["per_step"]]})
                if res["accuracy"] > best["accuracy"]:
                    best = {"accuracy": res["accuracy"], "ci95": res["ci95"], "iteration": done}
                    if g.main:
                        atomic_torch_save(learner.state_dict(), run / "best.pt")
                    if hooks.moves_mask and g.main:
                        save_mask(mask, run / "best_mask.pt")
            if stop or done % cfg.train.checkpoint_every == 0 or done == total:
                checkpoint(done)
            if stop:
                break
    finally:
        bar.close()
        log.close()

    summary = {
        "iterations": total,
        "iterations_run": done,
        "meta_batch": cfg.train.meta_batch,
        "meta_tasks": done * cfg.train.meta_batch,
        "train_seconds": elapsed,
        "density": density(mask) if mask else 1.0,
    }
    if mask is not None and g.main:
        save_mask(mask, run / "mask.pt")  # the final mask (a method may have moved it)
    if not test:
        result = {"split": None, **summary}
        if g.main:
            write_json(run / "eval.json", result)
        g.barrier()
        return result
    g.barrier()  # best.pt is rank 0's
    learner.load_state_dict(_load(run / "best.pt", device))
    if (run / "best_mask.pt").exists():
        for k, m in load_mask(run / "best_mask.pt").items():
            mask[k].copy_(m.to(device))
    result = evaluate(learner, params, sampler_for(cfg, data, cfg.eval.split), cfg.eval.tasks,
                      cfg.meta.eval_inner_steps, device, progress=progress and g.main)
    result.update({
        "val_accuracy": best["accuracy"],
        "val_ci95": best.get("ci95"),
        "best_iteration": best["iteration"],
        **summary,
    })
    if g.main:
        write_json(run / "eval.json", result)
    g.barrier()
    return result
