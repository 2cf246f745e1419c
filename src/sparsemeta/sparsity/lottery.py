"""Lottery tickets for meta-learners: iterative magnitude pruning with rewinding, plus controls.

Layout of an experiment directory (every leaf is a ``train`` run directory)::

    DIR/experiment.yaml                      resolved config, seeds, controls
    DIR/seed_S/level_00/ticket/              dense meta-training (θ₀ in init.pt)
    DIR/seed_S/level_LL/ticket/              mask pruned from level L-1, rewound weights
    DIR/seed_S/level_LL/reinit/              same mask, fresh initialisation (control)
    DIR/seed_S/level_LL/random/              random mask, same per-layer densities (control)

Every stage is idempotent: a finished run directory is skipped, an interrupted one resumes from
its checkpoint, and every mask and initial weight is a deterministic function of files already
on disk, so re-running after a crash (even SIGKILL) gives the same result as never crashing.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
import yaml

from sparsemeta.config import Config
from sparsemeta.data.base import FewShotData
from sparsemeta.data.registry import load_data
from sparsemeta.errors import UserError
from sparsemeta.experiment import atomic_write_text, config_difference, make_dir
from sparsemeta.models.conv4 import build_model
from sparsemeta.sparsity.masks import Mask, full_mask, load_mask
from sparsemeta.sparsity.prune import magnitude_prune, random_mask_like
from sparsemeta.train import train

CONTROLS = ("reinit", "random")
BRANCHES = ("ticket",) + CONTROLS


def level_dir(root: Path, seed: int, level: int, branch: str = "ticket") -> Path:
    return root / f"seed_{seed}" / f"level_{level:02d}" / branch


def _state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj.get("model", obj)


def _fresh_init(cfg: Config, in_channels: int, seed: int, level: int) -> dict[str, torch.Tensor]:
    """A new random initialisation, different from θ₀ and from every other level's."""
    torch.manual_seed(1_000_003 * (seed + 1) + 7919 * level)
    return build_model(cfg, in_channels).state_dict()


def _seed_generator(seed: int, level: int) -> torch.Generator:
    return torch.Generator().manual_seed(2_000_033 * (seed + 1) + 104_729 * level)


def parse_controls(text: str | None) -> list[str]:
    if not text or text == "none":
        return []
    items = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in items if c not in CONTROLS]
    if bad:
        raise UserError(f"unknown control '{bad[0]}'; --controls takes a comma list of "
                        f"{', '.join(CONTROLS)} (or none)")
    return list(dict.fromkeys(items))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes a comma list of integers, got '{text}'") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"--seeds takes non-negative integers, got '{text}'")
    return list(dict.fromkeys(seeds))


def bind_experiment(root: Path, cfg: Config, seeds: list[int], controls: list[str]) -> None:
    """Record the experiment; refuse to mix a different config into an existing directory.

    Seeds and controls may grow between calls (add a seed later); the config may not change.
    """
    path = root / "experiment.yaml"
    record = {"kind": "lottery", "config": cfg.to_dict(), "seeds": seeds, "controls": controls}
    if path.exists():
        old = yaml.safe_load(path.read_text())
        d = config_difference(old["config"], cfg.to_dict())
        if d:
            raise UserError(
                f"'{root}' holds an experiment with a different config ({d}); use another --out"
            )
        record["seeds"] = list(dict.fromkeys(old["seeds"] + seeds))
        record["controls"] = list(dict.fromkeys(old["controls"] + controls))
    atomic_write_text(path, yaml.safe_dump(record, sort_keys=False))


class RunCounter:
    """Experiment-level progress: runs done out of all runs, elapsed time and ETA."""

    def __init__(self, total: int, progress: bool) -> None:
        self.total, self.done, self.progress = total, 0, progress
        self.start = time.perf_counter()
        self.timed = 0  # runs that did work in this process (finished ones are skipped fast)

    def __call__(self, name: str, result: dict, t0: float) -> None:
        self.done += 1
        took = time.perf_counter() - t0
        if took > 1.0:
            self.timed += 1
        if not self.progress:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.timed * (self.total - self.done) if self.timed else 0.0
        print(f"[{self.done}/{self.total}] {name}: test {100 * result['accuracy']:.2f}% "
              f"± {100 * result['ci95']:.2f}%, density {100 * result['density']:.1f}% "
              f"— elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr)


def run_seed(cfg: Config, root: Path, seed: int, controls: list[str], data: FewShotData,
             counter: RunCounter, progress: bool = True) -> None:
    """All levels of one seed: ticket chain, and the requested controls at every level ≥ 1."""
    cfg = dataclasses.replace(cfg, seed=seed)
    prune = cfg.prune
    levels = prune.num_levels()
    rewind_step = prune.rewind_step()

    def run(name: str, path: Path, **kwargs) -> None:  # noqa: ANN003
        t0 = time.perf_counter()
        counter(name, train(cfg, path, data=data, progress=progress, desc=name, **kwargs), t0)

    dense = level_dir(root, seed, 0)
    run(f"seed {seed} level 0/{levels} dense", dense, snapshot_at=rewind_step)
    theta0 = _state(dense / "init.pt")
    rewind_target = _state(dense / f"step_{rewind_step}.pt") if rewind_step is not None else theta0

    mask: Mask = full_mask(dict(build_model(cfg, data.channels).named_parameters()))
    previous = dense
    for level in range(1, levels + 1):
        ticket_dir = level_dir(root, seed, level)
        if (ticket_dir / "mask.pt").exists():
            mask = load_mask(ticket_dir / "mask.pt")
        else:
            mask = magnitude_prune(_state(previous / "checkpoint.pt"), mask, prune.rate,
                                   prune.scope, prune.output_rate_factor)
        start = _state(previous / "checkpoint.pt") if prune.rewind == "none" else rewind_target
        label = f"seed {seed} level {level}/{levels}"
        run(f"{label} ticket", ticket_dir, init=start, mask=mask)
        if "reinit" in controls:
            run(f"{label} reinit", level_dir(root, seed, level, "reinit"),
                init=_fresh_init(cfg, data.channels, seed, level), mask=mask)
        if "random" in controls:
            rand_dir = level_dir(root, seed, level, "random")
            rand = (load_mask(rand_dir / "mask.pt") if (rand_dir / "mask.pt").exists()
                    else random_mask_like(mask, _seed_generator(seed, level)))
            run(f"{label} random", rand_dir, init=start, mask=rand)
        previous = ticket_dir


def run_lottery(cfg: Config, out: str | Path, seeds: list[int], controls: list[str],
                progress: bool = True, data: FewShotData | None = None) -> Path:
    """Run (or resume, or skip) every seed of a lottery-ticket experiment."""
    root = make_dir(out)
    bind_experiment(root, cfg, seeds, controls)
    data = data if data is not None else load_data(cfg)
    counter = RunCounter(len(seeds) * (1 + cfg.prune.num_levels() * (1 + len(controls))),
                         progress)
    for seed in seeds:
        run_seed(cfg, root, seed, controls, data, counter, progress=progress)
    return root
