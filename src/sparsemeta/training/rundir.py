"""The run-directory contract: every file name of a run and of an experiment, preparing and
restoring a run, and "the chosen model" — all in this one module.

A run directory (one meta-training) holds::

    config.yaml      the resolved config; with it the directory alone resumes, evaluates, exports
    init.pt          θ₀, the weights before meta-training (the rewind target of a ticket)
    mask.pt          the sparsity mask (final: a method such as RigL may move it)
    step_<k>.pt      the weights after k iterations (late rewinding)
    checkpoint.pt    model, optimiser, RNG, iteration, hooks' state, current mask (atomic)
    best.pt          the weights with the best validation accuracy
    best_mask.pt     the mask ``best.pt`` was evaluated with, where a method moves the mask
    metrics.jsonl    one line per train iteration, validation and mask change
    tensorboard/     the same scalars as TensorBoard events (when ``tensorboard`` is installed)
    eval.json        the result (``RunResult``); its presence marks the run finished
    diverged.json    where a run stopped on a non-finite loss or meta-gradient (it is not resumed)
    .lock            held by the one process writing the directory

An experiment directory holds ``experiment.yaml`` and runs at ``seed_S/level_LL/<branch>``, and
its report writes ``summary.json`` and ``report.md`` beside them. Every write is atomic.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sparsemeta.config import Config, config_from_dict, upgrade_saved
from sparsemeta.foundations import safeio
from sparsemeta.foundations.atomic import atomic_write_text
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import atomic_torch_save, load_tensors, write_json
from sparsemeta.sparsity.masks import Mask, load_mask, save_mask

CONFIG = "config.yaml"
INIT = "init.pt"
MASK = "mask.pt"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
BEST_MASK = "best_mask.pt"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
DIVERGED = "diverged.json"
LOCK = ".lock"
TENSORBOARD = "tensorboard"
EXPERIMENT = "experiment.yaml"
SUMMARY = "summary.json"
REPORT = "report.md"
# a sweep directory: one experiment directory per grid point, each marked done when finished
SWEEP = "sweep.yaml"
SWEEP_DONE = "done.json"
SWEEP_REPORTS = "reports"
# a study directory (``tune``): the Optuna database, the best trial, one experiment per trial
STUDY_DB = "study.db"
BEST_TRIAL = "best.json"
TRIALS = "trials"


def step_file(k: int) -> str:
    return f"step_{k}.pt"


def level_dir(root: Path, seed: int, level: int, branch: str = "ticket") -> Path:
    """Where an experiment keeps the run of ``branch`` at pruning level ``level``."""
    return root / f"seed_{seed}" / f"level_{level:02d}" / branch


def parse_level_dir(run: Path) -> tuple[int, int, str]:
    """(seed, level, branch) of ``.../seed_S/level_LL/<branch>`` (``level_dir``'s inverse); a
    folder that only looks like one is a one-line error naming it."""
    seed, level = run.parent.parent.name, run.parent.name
    if not (re.fullmatch(r"seed_\d+", seed) and re.fullmatch(r"level_\d+", level)):
        raise UserError(f"'{run.parent.parent}' is not an experiment's seed_<S>/level_<LL> folder; "
                        "move it out of the experiment directory")
    return int(seed.split("_")[1]), int(level.split("_")[1]), run.name


def finished_runs(root: Path) -> list[Path]:
    """Every finished run of an experiment directory, in a stable order."""
    return sorted(ev.parent for ev in Path(root).glob(f"seed_*/level_*/*/{EVAL}"))


# -- typed results -----------------------------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: a field's annotation → the check of a value read back from a file
_CHECKS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool), "float": _number,
           "str": lambda v: isinstance(v, str), "list[dict[str, float]]": lambda v:
           isinstance(v, list), "dict[str, int]": lambda v: isinstance(v, dict)}


def _typed(d: Mapping[str, Any], name: str, annotation: str) -> Any:
    """``d[name]`` if it has the type ``annotation`` names (``X | None``: may be absent or
    null); else a KeyError or TypeError naming the field."""
    optional = annotation.endswith(" | None")
    if optional and d.get(name) is None:
        return None
    value = d[name]
    if not _CHECKS[annotation.removesuffix(" | None")](value):
        raise TypeError(f"{name} is {safeio.short(value)}, not {annotation}")
    return value


@dataclass(frozen=True)
class Evaluation:
    """Accuracy after each adaptation step over fixed tasks of one split (mean, 95% CI)."""

    split: str
    tasks: int
    steps: int
    accuracy: float
    ci95: float
    best_step: int
    per_step: list[dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Evaluation:
        """Read back ``to_dict``'s layout, every field checked for its type (a TypeError or
        KeyError for a file that is not one)."""
        out = cls(**{f.name: _typed(d, f.name, f.type) for f in dataclasses.fields(cls)})
        rows = out.per_step
        if len(rows) != out.steps + 1 or not all(
                isinstance(r, dict) and all(_number(r.get(k)) for k in ("accuracy", "ci95", "loss"))
                for r in rows):
            raise TypeError("per_step must hold a row of numbers for every step")
        return out


@dataclass(frozen=True)
class RunResult:
    """What a finished run reports (``eval.json``): the chosen model's evaluation (None for a
    search run that only finds a mask), its validation score and the training it took."""

    iterations: int
    iterations_run: int
    meta_batch: int
    meta_tasks: int
    train_seconds: float
    density: float
    evaluation: Evaluation | None = None
    val_accuracy: float | None = None
    val_ci95: float | None = None
    best_iteration: int | None = None
    macs: dict[str, int] | None = None
    """Multiply-accumulates spent (``training.cost``): train/eval, sparse-aware and dense."""

    @property
    def model(self) -> bool:
        return self.evaluation is not None

    def to_dict(self) -> dict[str, Any]:
        """The ``eval.json`` layout (keys only added since the first version: old runs read
        back, with ``macs`` None)."""
        summary = {k: getattr(self, k) for k in ("iterations", "iterations_run", "meta_batch",
                                                  "meta_tasks", "train_seconds", "density",
                                                  "macs")}
        if self.evaluation is None:
            return {"split": None, **summary}
        return {**self.evaluation.to_dict(), "val_accuracy": self.val_accuracy,
                "val_ci95": self.val_ci95, "best_iteration": self.best_iteration, **summary}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResult:
        """Read back ``to_dict``'s layout (keys added later may be absent: None), every field
        checked for its type."""
        evaluation = Evaluation.from_dict(d) if d.get("split") else None
        values = {f.name: _typed(d, f.name, f.type) for f in dataclasses.fields(cls)
                  if f.name != "evaluation"}
        macs = values["macs"]
        if macs is not None and not (isinstance(macs, dict) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in macs.values())):
            raise TypeError("macs must map names to integers")
        return cls(evaluation=evaluation, **values)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> RunResult:
        """``eval.json``; a damaged one is one line saying how to redo it."""
        try:
            return cls.from_dict(safeio.read_json(path, what=f"'{path}'"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError too
            raise UserError(f"'{path}' is damaged ({type(exc).__name__}: {safeio.short(str(exc))})"
                            "; delete it to re-run the final evaluation") from None


@dataclass(frozen=True)
class Best:
    """The best validation so far: the weights of ``iteration`` are ``best.pt``."""

    accuracy: float = -1.0
    ci95: float | None = None
    iteration: int = 0

    @property
    def found(self) -> bool:
        return self.accuracy >= 0


@dataclass(frozen=True)
class Checkpoint:
    """``checkpoint.pt``: everything a resumed run continues from — weights, optimiser, torch's
    RNG, progress, the best validation, the sparsity method's state and the current mask.
    Written atomically; stored as a plain dict of tensors and numbers (read with
    ``weights_only=True``: a copied run directory can never run code)."""

    iteration: int
    elapsed: float
    best: Best
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    torch_rng: torch.Tensor
    hooks: dict[str, Any]
    mask: Mask | None
    stopped: bool = False
    """The method stopped training early (a resume does not go on)."""
    compute: dict[str, int] | None = None
    """``training.cost`` totals (absent from checkpoints written before compute was counted)."""

    def save(self, path: Path) -> None:
        atomic_torch_save({
            "iteration": self.iteration, "elapsed": self.elapsed,
            "best": {k: v for k, v in dataclasses.asdict(self.best).items() if v is not None},
            "model": self.model, "optimizer": self.optimizer, "torch_rng": self.torch_rng,
            "hooks": self.hooks, "mask": self.mask, "stopped": self.stopped,
            "compute": self.compute}, path)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> Checkpoint:
        obj = load_tensors(path, device)
        try:
            best = Best(**obj["best"])
            return cls(int(obj["iteration"]), float(obj["elapsed"]), best, obj["model"],
                       obj["optimizer"], obj["torch_rng"], obj["hooks"], obj["mask"],
                       bool(obj.get("stopped", False)), obj.get("compute"))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UserError(f"'{path}' is not a sparsemeta checkpoint ({type(exc).__name__}: "
                            f"{exc}); restore it, or delete it to restart the run") from None


# -- configs -----------------------------------------------------------------------------------
def make_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory '{path}': {exc.strerror}; choose another --out") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output directory '{path}' is not writable; choose another --out")
    return path


def _diff(a: Any, b: Any, prefix: str = "") -> str | None:
    """First difference; keys absent from the old config ``a`` (added by a later version of
    sparsemeta, whose defaults keep the old behaviour) are not differences."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) & set(b)) + sorted(set(a) - set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} in the run, {b!r} now"


def config_difference(old: dict, new: dict) -> str | None:
    """First differing key of two resolved configs, ignoring ``device`` (runs may move
    between machines); anything else would silently mix two experiments in one directory."""
    a, b = dict(old), dict(new)
    a.pop("device", None)
    b.pop("device", None)
    return _diff(a, b)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file this package wrote — or a copied, damaged or hostile one: read with limits
    (``safeio``), anything wrong one line."""
    data = safeio.read_yaml(path, what=f"'{path}'")
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is damaged (not a mapping); restore it or use another --out")
    return data


def bind_config(run_dir: Path, cfg: Config) -> None:
    """Save the resolved config, or check that an existing run was made with the same one."""
    path = run_dir / CONFIG
    new = cfg.to_dict()
    if path.exists():
        d = config_difference(upgrade_saved(read_yaml(path)), new)
        if d:
            raise UserError(
                f"'{run_dir}' holds a run with a different config ({d}); use another --out"
            )
        return
    atomic_write_text(path, yaml.safe_dump(new, sort_keys=False))


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no {CONFIG})")
    return config_from_dict(read_yaml(path), source=str(path))


def bind_experiment(root: Path, cfg: Config, methods: list[str], seeds: list[int],
                    controls: list[str]) -> None:
    """Record the experiment; refuse to mix a different config into an existing directory.

    Methods, seeds and controls may grow between calls (add a seed later); the config may not.
    """
    path = root / EXPERIMENT
    record = {"config": cfg.to_dict(), "methods": methods, "seeds": seeds, "controls": controls}
    if path.exists():
        old = read_yaml(path)
        d = config_difference(upgrade_saved(old.get("config") or {}), cfg.to_dict())
        if d:
            raise UserError(
                f"'{root}' holds an experiment with a different config ({d}); use another --out"
            )
        for key in ("methods", "seeds", "controls"):
            record[key] = list(dict.fromkeys(old.get(key, []) + record[key]))
    atomic_write_text(path, yaml.safe_dump(record, sort_keys=False))


# -- one run directory ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ChosenModel:
    """The model a run reports: best-on-validation weights with the mask they were evaluated
    with (``best_mask.pt`` where the method moved the mask afterwards, else ``mask.pt``)."""

    state: dict[str, torch.Tensor]
    mask: Mask | None

    def check(self, expected: Mapping[str, torch.Tensor], run: Path) -> None:
        """Refuse, in one line, weights or a mask that do not fit the model ``expected`` (the
        state the run's ``config.yaml`` builds): a copied, edited or mixed-up run directory
        must not crash, nor be evaluated without its mask."""
        want = {k: tuple(v.shape) for k, v in expected.items()}
        got = {k: tuple(v.shape) for k, v in self.state.items()
               if isinstance(v, torch.Tensor)}
        if got != want:
            key = next(k for k in [*want, *got] if want.get(k) != got.get(k))
            raise UserError(f"'{run}/{BEST}' does not fit the model its {CONFIG} describes "
                            f"({key}: {got.get(key, 'missing')} in the file, "
                            f"{want.get(key, 'absent')} in the model); is the run intact?")
        for key, m in (self.mask or {}).items():
            if want.get(key) != tuple(m.shape) or m.dtype != torch.bool:
                raise UserError(f"the mask of '{run}' names {safeio.short(key)}, which the "
                                f"model its {CONFIG} describes does not have in that shape; "
                                "is the run intact?")


class RunDir:
    """One run directory: its files by role, never by a name spelled elsewhere."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return self.file(EVAL).exists()

    def result(self) -> RunResult:
        return RunResult.load(self.file(EVAL))

    def write_result(self, result: RunResult) -> None:
        result.save(self.file(EVAL))

    def prepare(self, initial_state: Mapping[str, torch.Tensor], mask: Mask | None) -> None:
        """First use: save the mask and θ₀ that a resume reads back (never overwritten)."""
        if mask is not None and not self.file(MASK).exists():
            save_mask(mask, self.file(MASK))
        if not self.file(INIT).exists():
            atomic_torch_save(dict(initial_state), self.file(INIT))

    def mask(self) -> Mask | None:
        return load_mask(self.file(MASK)) if self.file(MASK).exists() else None

    def checkpoint(self, device: torch.device | str = "cpu") -> Checkpoint:
        return Checkpoint.load(self.file(CHECKPOINT), device)

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """A weights file of the run (``init.pt``, ``step_<k>.pt``, ``best.pt``)."""
        return load_tensors(self.file(name))

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The weights where training stopped (the last checkpoint's)."""
        return self.checkpoint().model

    def rewind_target(self, k: int | None) -> dict[str, torch.Tensor]:
        """The weights after k iterations (late rewinding) if saved, else θ₀."""
        if k is not None and self.file(step_file(k)).exists():
            return self.weights(step_file(k))
        return self.weights(INIT)

    def chosen_model(self) -> ChosenModel:
        if not self.file(BEST).is_file():
            raise UserError(f"'{self.path}' has no {BEST} yet (no validation has run); train it "
                            "further first")
        mask_file = next((self.file(f) for f in (BEST_MASK, MASK) if self.file(f).exists()), None)
        return ChosenModel(load_tensors(self.file(BEST)),
                           load_mask(mask_file) if mask_file else None)
