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
import errno
import os
import re
from collections.abc import Mapping, Sequence
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
from sparsemeta.meta.learners import build_learner
from sparsemeta.sparsity.masks import Mask, save_mask

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


#: IMP's branch: its level 0 is the dense model, each level after it a ticket. One name for the
#: whole chain, "ticket", as run directories, summaries and reports have always written it (the
#: report reads level 0 of it as the dense reference); the dense method writes that same run
IMP = "ticket"


def level_dir(root: Path, seed: int, level: int, branch: str = IMP) -> Path:
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
    cpu_seconds: float | None = None
    """CPU time of the training process while it trained this run (all its threads), beside the
    wall time ``train_seconds``: what the run cost a shared machine (absent before 2026-12-04)."""

    @property
    def model(self) -> bool:
        return self.evaluation is not None

    def to_dict(self) -> dict[str, Any]:
        """The ``eval.json`` layout (keys only added since the first version: old runs read
        back, with ``macs`` None)."""
        summary = {k: getattr(self, k) for k in ("iterations", "iterations_run", "meta_batch",
                                                  "meta_tasks", "train_seconds", "density",
                                                  "macs", "cpu_seconds")}
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
class Divergence:
    """``diverged.json``: where a run stopped on a non-finite (or exploding) loss or
    meta-gradient, and what it kept; its presence stops the run from being resumed."""

    iteration: int
    what: str
    """What was not finite, e.g. "the meta-gradient of blocks.1.conv.weight is not finite"."""
    loss: float | str
    """The outer loss (its text where it is not finite: JSON has no NaN)."""
    meta_lr: float
    inner_lr: float
    last_checkpoint: int
    """The iteration of the last good checkpoint (0: θ₀, init.pt)."""

    def save(self, path: Path) -> None:
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> Divergence:
        """A damaged or foreign one is one line saying what to do."""
        d = safeio.read_json(path, what=f"'{path}'")
        try:
            if not isinstance(d, dict) or not isinstance(d.get("loss"), (int, float, str)):
                raise TypeError("not a record of a divergence")
            return cls(**{f.name: d[f.name] if f.name == "loss" else _typed(d, f.name, f.type)
                          for f in dataclasses.fields(cls)})
        except (KeyError, TypeError) as exc:
            raise UserError(f"'{path}' is damaged ({safeio.short(str(exc))}); delete it to "
                            "retry the run") from None


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
    cpu_seconds: float = 0.0
    """CPU time spent so far (absent from checkpoints before 2026-12-04: counted from 0)."""

    def save(self, path: Path) -> None:
        atomic_torch_save({
            "iteration": self.iteration, "elapsed": self.elapsed,
            "best": {k: v for k, v in dataclasses.asdict(self.best).items() if v is not None},
            "model": self.model, "optimizer": self.optimizer, "torch_rng": self.torch_rng,
            "hooks": self.hooks, "mask": self.mask, "stopped": self.stopped,
            "compute": self.compute, "cpu_seconds": self.cpu_seconds}, path)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> Checkpoint:
        obj = load_tensors(path, device)
        try:
            best = Best(**obj["best"])
            return cls(int(obj["iteration"]), float(obj["elapsed"]), best, obj["model"],
                       obj["optimizer"], obj["torch_rng"], obj["hooks"], obj["mask"],
                       bool(obj.get("stopped", False)), obj.get("compute"),
                       float(obj.get("cpu_seconds", 0.0)))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UserError(f"'{path}' is not a sparsemeta checkpoint ({type(exc).__name__}: "
                            f"{exc}); restore it, or delete it to restart the run") from None


# -- whose directory is it ---------------------------------------------------------------------
#: the file that makes a directory one of each kind, most specific first. A marker alone is not
#: enough — a user's own config.yaml or sweep.yaml must not make their project folder one — so
#: the directory must also hold the ``.lock`` its writer took, or files only a run or experiment
#: writes (``_made_here``: a copy without hidden files still counts)
MARKERS = ((EXPERIMENT, "experiment"), (SWEEP, "sweep"), (STUDY_DB, "study"), (CONFIG, "run"))
#: the command that makes each kind of directory
MAKERS = {"run": "sparsemeta train", "experiment": "sparsemeta run",
          "sweep": "sparsemeta sweep", "study": "sparsemeta tune"}
_RUN_FILES = (INIT, CHECKPOINT, BEST, EVAL, METRICS)
#: every name a run, experiment, sweep or study directory writes or reads: report plots are
#: PNGs, SQLite keeps its journal beside study.db, experiments keep their runs in seed_S
_OWNED_NAMES = frozenset({CONFIG, INIT, MASK, CHECKPOINT, BEST, BEST_MASK, METRICS, EVAL,
                          DIVERGED, LOCK, TENSORBOARD, EXPERIMENT, SUMMARY, REPORT, SWEEP,
                          SWEEP_DONE, SWEEP_REPORTS, STUDY_DB, BEST_TRIAL, TRIALS})
_OWNED_PATTERN = re.compile(r"step_\d+\.pt|eval_.+\.json|.+\.png|study\.db-.+|seed_.+")
#: an export's own files: overwriting an earlier export in a run directory is the user's call
EXPORT_SUFFIXES = (".smz", ".onnx")
#: the longest file name (bytes) of the common file systems (ext4, XFS, btrfs, APFS, NTFS)
NAME_MAX = 255


def path_kind(path: str | Path) -> str | None:
    """What is at ``path``, links followed ("a directory", "a file", "a fifo", …); None if
    nothing. Messages name it, so "does not exist" is never said of a directory or a device."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a broken symbolic link" if os.path.islink(path) else None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UserError(f"{safeio.short(str(path))} is a longer name than the file system "
                            f"allows ({NAME_MAX} bytes a name); choose a shorter one") from None
        raise UserError(f"cannot look at '{path}' ({exc.strerror}); check the permissions of "
                        "the directories above it") from None
    except ValueError:  # a NUL character
        raise UserError(f"{safeio.short(str(path))} is not a usable path (it holds a NUL "
                        "character)") from None
    return safeio.mode_kind(mode)


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` if it is a directory, else one line saying what it is instead (``what``: "a run
    directory", …)."""
    kind = path_kind(path)
    if kind is None:
        raise UserError(f"'{path}' does not exist; give {what}")
    if kind != "a directory":
        raise UserError(f"'{path}' is {kind}, not {what}")
    return Path(path)


def kind_of(path: str | Path) -> str | None:
    """"run", "experiment", "sweep" or "study" if ``path`` is such a directory (by the file that
    marks it), else None."""
    for marker, kind in MARKERS:
        if os.path.lexists(os.path.join(path, marker)) and _made_here(Path(path), kind):
            return kind
    return None


def _made_here(path: Path, kind: str) -> bool:
    """Whether ``path``, which holds ``kind``'s marker, was written by this package."""
    evidence = {"run": _RUN_FILES, "experiment": ("seed_*",), "study": (TRIALS,), "sweep": ()}
    return any(any(True for _ in path.glob(name)) for name in (LOCK, *evidence[kind]))


def owner(path: str | Path, *, including: bool = False) -> tuple[str, Path] | None:
    """The nearest run, experiment, sweep or study directory above ``path`` (or ``path``
    itself, ``including``), links resolved, with its kind; None if there is none."""
    real = Path(os.path.realpath(path))
    for directory in ([real] if including else []) + list(real.parents):
        kind = kind_of(directory)
        if kind is not None:
            return kind, directory
    return None


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def check_out_dir(path: str | Path, kind: str | None, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, an output directory that is not ours to write: not a directory,
    inside a run, experiment, sweep or study directory (which would read it as part of itself),
    or a directory of another kind than ``kind`` ("run", …; None for a report, which may
    write into one of its ``inputs`` only). The commands call this, not ``train()`` or
    ``run_experiment()``: those write runs into experiments and experiments into studies."""
    path = Path(path)
    if any(os.path.realpath(p) == os.path.realpath(path) for p in inputs):
        return  # the report checks its inputs
    what = check_dir_path(path)
    found = owner(path)
    if found is not None:
        raise UserError(f"--out '{path}' is inside the {found[0]} directory '{found[1]}', which "
                        "would read it as part of itself; choose a directory outside it")
    own = kind_of(path) if what else None
    if own is None or own == kind:
        return
    made = f"--out '{path}' is {_a(own)} directory (made by '{MAKERS[own]}')"
    if kind is None:
        harm = (f"its {SUMMARY} and {REPORT} would be replaced" if own == "experiment" else
                "the report would be mixed into its files")
        raise UserError(f"{made}, not one of the report's inputs: {harm}; choose another --out")
    raise UserError(f"{made}; '{MAKERS[kind]}' writes {_a(kind)} directory: choose another "
                    "--out")


def check_dir_path(path: str | Path, flag: str = "--out") -> str | None:
    """What is at ``path`` (see ``path_kind``) if it is a directory or one can be made there;
    else one line naming what is in the way (a file, a device, a file above it)."""
    path = Path(path)
    what = path_kind(path)
    if what not in (None, "a directory"):
        raise UserError(f"{flag} '{path}' is {what}, not a directory; choose another {flag}")
    blocked = _not_a_directory_above(path)
    if blocked:
        raise UserError(f"cannot create directory '{path}' of {flag}: {blocked}; choose "
                        f"another {flag}")
    return what


def _not_a_directory_above(path: Path) -> str | None:
    """What blocks creating ``path``: the nearest existing path above it, if that is not a
    directory ("'x' is a file, not a directory")."""
    above = next((p for p in path.parents if path_kind(p) is not None), None)
    kind = path_kind(above) if above is not None else None
    return None if kind in (None, "a directory") else f"'{above}' is {kind}, not a directory"


def _owned_name(name: str) -> bool:
    return name in _OWNED_NAMES or _OWNED_PATTERN.fullmatch(name) is not None


def check_out_file(path: str | Path, example: str) -> Path:
    """``path`` if a file may be written there, checked before any work: not empty, a
    directory or a device, in an existing directory, and not a file that a run, experiment,
    sweep or study directory owns (an existing one, or a name it writes, such as best.pt)."""
    if not str(path):
        raise UserError(f"--out is empty; give a file name such as {example}")
    path = Path(path)
    what = path_kind(path)
    if what == "a directory":
        raise UserError(f"--out '{path}' is a directory; give a file name such as "
                        f"{path / example}")
    if what not in (None, "a file"):
        raise UserError(f"--out '{path}' is {what}, not a regular file; choose a file name")
    there = path_kind(path.parent)
    if there is None:
        raise UserError(f"directory '{path.parent}' of --out does not exist; create it or "
                        "choose another --out")
    if there != "a directory":
        raise UserError(f"'{path.parent}' in --out '{path}' is {there}, not a directory; choose "
                        "another --out")
    found = owner(path.parent, including=True)
    if found is not None and (_owned_name(path.name) or (
            what is not None and path.suffix.lower() not in EXPORT_SUFFIXES)):
        verb = "would overwrite" if what else "is a name used by"
        raise UserError(f"--out '{path}' {verb} a file of the {found[0]} directory "
                        f"'{found[1]}'; write to a file outside it, such as {example}")
    return path


# -- configs -----------------------------------------------------------------------------------
def make_dir(path: str | Path) -> Path:
    path = Path(path)
    check_dir_path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory '{path}': {exc.strerror}; choose "
                        "another --out") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output directory '{path}' is not writable; choose another --out")
    return path


def _diff(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """First difference (key, a's value, b's); keys absent from the old config ``a`` (added by
    a later version of sparsemeta, whose defaults keep the old behaviour) are not differences."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) & set(b)) + sorted(set(a) - set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def _without(config: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


def config_difference(old: dict, new: dict) -> str | None:
    """First differing key of two resolved configs, ignoring ``device`` (runs may move
    between machines); anything else would silently mix two experiments in one directory."""
    d = _diff(_without(old, ("device",)), _without(new, ("device",)))
    return None if d is None else (f"{d[0]}: {safeio.short(d[1])} in the run, "
                                   f"{safeio.short(d[2])} now")


def experiment_difference(a: Path, b: Path) -> str | None:
    """First differing key of two experiments' configs (``experiment.yaml``), ignoring
    ``seed`` (a report averages seeds) and ``device``: other differences are two experiments
    that a report must not average as seeds of one."""
    ignored = ("seed", "device")
    d = _diff(_without(experiment_config(a), ignored), _without(experiment_config(b), ignored))
    return None if d is None else (f"{d[0]}: {safeio.short(d[2])} in '{b}', "
                                   f"{safeio.short(d[1])} in '{a}'")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file this package wrote — or a copied, damaged or hostile one: read with limits
    (``safeio``), anything wrong one line."""
    data = safeio.read_yaml(path, what=f"'{path}'")
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is damaged (not a mapping); restore it or use another --out")
    return data


def check_config(run_dir: str | Path, cfg: Config) -> None:
    """Refuse a run directory that holds a run of another config: the command calls this
    before any work, ``bind_config`` again when the run starts."""
    path = Path(run_dir) / CONFIG
    if os.path.lexists(path):
        d = config_difference(upgrade_saved(read_yaml(path)), cfg.to_dict())
        if d:
            raise UserError(
                f"'{run_dir}' holds a run with a different config ({d}); use another --out"
            )


def bind_config(run_dir: Path, cfg: Config) -> None:
    """Save the resolved config, or check that an existing run was made with the same one."""
    path = run_dir / CONFIG
    if os.path.lexists(path):
        check_config(run_dir, cfg)
        return
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_run_config(run_dir: str | Path) -> Config:
    """The config of a run directory; anything else given in its place is one line saying
    what it is (a file, a device, an experiment or sweep directory, …)."""
    require_dir(run_dir, "a run directory")
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        kind = kind_of(run_dir)
        what = f"is {_a(kind)} directory" if kind else f"has no {CONFIG}"
        raise UserError(f"'{run_dir}' is not a run directory (it {what}); give a directory "
                        f"made by '{MAKERS['run']}' or one of an experiment's "
                        "seed_S/level_LL/<method> directories")
    return _config(read_yaml(path), path)


def _config(data: dict[str, Any], path: Path) -> Config:
    """The config saved in ``path``; a value no config may hold is one line naming the file."""
    try:
        return config_from_dict(data, source=str(path))
    except UserError as exc:
        raise UserError(f"'{path}' is damaged ({exc}); restore it") from None


def experiment_config(root: str | Path) -> dict[str, Any]:
    """The resolved config an experiment directory was run with (its ``experiment.yaml``),
    every key present (older files are upgraded, missing keys take their defaults)."""
    path = Path(root) / EXPERIMENT
    if not path.is_file():
        raise UserError(f"'{root}' has no {EXPERIMENT}: it is not an experiment directory made "
                        f"by '{MAKERS['experiment']}'")
    config = _experiment_record(path, "restore it").get("config")
    if not config:
        raise UserError(f"'{path}' is damaged (no config); restore it")
    return _config(config, path).to_dict()


#: the fields of experiment.yaml and the type each must have
_RECORD = {"config": dict, "methods": list, "seeds": list, "controls": list}


def _experiment_record(path: Path, fix: str = "restore it or use another --out"
                       ) -> dict[str, Any]:
    """``experiment.yaml``, each field checked for its type (a hostile or damaged file is one
    line, never a TypeError deep in a merge); ``fix`` says what to do."""
    record = read_yaml(path)
    items = {"methods": str, "seeds": int, "controls": str}
    for key, kind in _RECORD.items():
        value = record.get(key, kind())
        if not isinstance(value, kind) or (kind is list and not all(
                isinstance(v, items[key]) and not isinstance(v, bool) for v in value)):
            want = "a mapping" if kind is dict else f"a list of {items[key].__name__}"
            raise UserError(f"'{path}' is damaged ({key} is {safeio.short(value)}, not {want}); "
                            f"{fix}")
    return record


def bind_experiment(root: Path, cfg: Config, methods: list[str], seeds: list[int],
                    controls: list[str]) -> None:
    """Record the experiment; refuse to mix a different config into an existing directory.

    Methods, seeds and controls may grow between calls (add a seed later); the config may not.
    """
    record = {"config": cfg.to_dict(), "methods": methods, "seeds": seeds, "controls": controls}
    old = check_experiment(root, cfg)
    if old is not None:
        for key in ("methods", "seeds", "controls"):
            record[key] = list(dict.fromkeys(old.get(key, []) + record[key]))
    atomic_write_text(root / EXPERIMENT, yaml.safe_dump(record, sort_keys=False))


def check_experiment(root: str | Path, cfg: Config) -> dict[str, Any] | None:
    """The record of the experiment in ``root`` (None if there is none yet), refused in one
    line if it is damaged or of another config: the command calls this before any work,
    ``bind_experiment`` again when the experiment starts."""
    path = Path(root) / EXPERIMENT
    if not os.path.lexists(path):
        return None
    old = _experiment_record(path)
    d = config_difference(upgrade_saved(old.get("config") or {}), cfg.to_dict())
    if d:
        raise UserError(
            f"'{root}' holds an experiment with a different config ({d}); use another --out"
        )
    return old


# -- tensor files -------------------------------------------------------------------------------
def _tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    obj = load_tensors(path)
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        found = "other values" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UserError(f"'{path}' is not {what} (layer names mapped to tensors; it holds "
                        f"{found}); restore the run directory's file")
    return obj


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file (``best.pt``, ``init.pt``, ``step_<k>.pt``): names mapped to tensors."""
    return _tensors(path, "a weights file")


def read_mask(path: Path) -> Mask:
    """A mask file (``mask.pt``, ``best_mask.pt``): names mapped to tensors, as booleans."""
    return {k: v.bool() for k, v in _tensors(path, "a sparsity mask").items()}


def _model_state(cfg: Config, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state (names and shapes) of the learner ``cfg`` builds, for the input channels the
    data gave it (read from ``state``: the config does not always say), torch's RNG untouched."""
    first = state.get("blocks.0.conv.weight")
    channels = int(first.shape[1]) if isinstance(first, torch.Tensor) and first.dim() == 4 else 1
    with torch.random.fork_rng(devices=[]):
        return build_learner(cfg, channels).state_dict()


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

    def save_start(self, initial_state: Mapping[str, torch.Tensor], mask: Mask | None) -> None:
        """First use: save the mask and θ₀ that a resume reads back (never overwritten)."""
        if mask is not None and not self.file(MASK).exists():
            save_mask(mask, self.file(MASK))
        if not self.file(INIT).exists():
            atomic_torch_save(dict(initial_state), self.file(INIT))

    def mask(self) -> Mask | None:
        return read_mask(self.file(MASK)) if self.file(MASK).exists() else None

    def checkpoint(self, device: torch.device | str = "cpu") -> Checkpoint:
        return Checkpoint.load(self.file(CHECKPOINT), device)

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """A weights file of the run (``init.pt``, ``step_<k>.pt``, ``best.pt``)."""
        return read_weights(self.file(name))

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The weights where training stopped (the last checkpoint's)."""
        return self.checkpoint().model

    def rewind_target(self, k: int | None) -> dict[str, torch.Tensor]:
        """The weights after k iterations (late rewinding) if saved, else θ₀."""
        if k is not None and self.file(step_file(k)).exists():
            return self.weights(step_file(k))
        return self.weights(INIT)

    def chosen_model(self, cfg: Config | None = None) -> ChosenModel:
        """``best.pt`` with the mask it was scored with, checked in one line against the model
        ``cfg`` (the run's config.yaml) builds — or, without ``cfg``, the mask against the
        weights — so a copied, edited or mixed-up run directory is refused the same way by
        every reader (eval, export, ONNX, report)."""
        if not self.file(BEST).is_file():
            raise UserError(f"'{self.path}' has no {BEST} yet (no validation has run); train it "
                            "further first")
        mask_file = next((self.file(f) for f in (BEST_MASK, MASK) if self.file(f).exists()), None)
        chosen = ChosenModel(read_weights(self.file(BEST)),
                             read_mask(mask_file) if mask_file else None)
        chosen.check(chosen.state if cfg is None else _model_state(cfg, chosen.state), self.path)
        return chosen
