"""``sparsemeta tune``: the same hyperparameter search for tickets and baselines, on validation only.

Each Optuna trial is one ``sparsemeta run`` of one method and seed with ``eval.split=val``: the
model is chosen and scored on validation tasks, so no test task is ever seen while tuning. The
score is the validation accuracy of the method's model whose density is nearest the target
(dense: the dense model). The study lives in SQLite and the trials' run directories are named
by their parameters, so re-running the command continues the study: finished trials count,
a trial that was interrupted is run again with the same parameters and resumes from its
checkpoints. One ``tune`` process per study.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from sparsemeta.config import Config, build_config
from sparsemeta.experiments.methods import METHODS
from sparsemeta.experiments.methods.base import Param
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.io import write_json
from sparsemeta.foundations.lock import exclusive
from sparsemeta.foundations.safeio import short
from sparsemeta.meta.engine import check_core
from sparsemeta.training import rundir
from sparsemeta.training.loop import Diverged
from sparsemeta.training.rundir import LOCK, make_dir

#: tuning ranges of the shared keys; each method adds its own settings' (``Method.search``)
PARAMS = {
    "inner_lr": Param("meta.inner_lr", 0.01, 1.0, True),
    "meta_lr": Param("train.meta_lr", 1e-4, 1e-2, True),
    "metamix_alpha": Param("metamix.alpha", 0.2, 5.0, True),
    "metamix_beta": Param("metamix.beta", 0.2, 5.0, True),
    "prune_rate": Param("prune.rate", 0.1, 0.5, False),
}


def own_params(method: str) -> dict[str, Param]:
    """A method's own tuning parameters, named ``<method>_<setting>``."""
    return {f"{method}_{name}": p for name, p in METHODS[method].search.items()}


def params() -> dict[str, Param]:
    """Every tuning parameter: the shared ones and every registered method's own."""
    out = dict(PARAMS)
    for method in METHODS:
        out.update(own_params(method))
    return out


def default_params(cfg: Config, method: str) -> list[str]:
    """What a fair search varies for ``method``: the learning rates always, the shared knobs it
    names (e.g. the prune rate), its own settings' ranges, and MetaMix's Beta parameters when
    MetaMix is on."""
    names = ["inner_lr", "meta_lr", *METHODS[method].tune_params, *own_params(method)]
    if cfg.meta.mix == "metamix":
        names += ["metamix_alpha", "metamix_beta"]
    return names


def parse_params(text: str | None, cfg: Config, method: str) -> list[str]:
    if not text:
        return default_params(cfg, method)
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = params()
    for n in names:
        if n not in known:
            raise UserError(f"unknown tuning parameter {short(n)} (known: {', '.join(known)})")
    return names


def score(rows: list[dict], method: str, target_density: float) -> tuple[float, float]:
    """(validation accuracy, density) of the method's model nearest ``target_density``."""
    name = METHODS[method].score_branch
    candidates = [r for r in rows if r["method"] == name]
    if METHODS[method].score_dense_only:
        candidates = [r for r in candidates if r["level"] == 0]
    if not candidates:
        raise RuntimeError(f"the {method} run produced no '{name}' model")
    best = min(candidates, key=lambda r: abs(r["density"] - target_density))
    return best["accuracy"], best["density"]


def _trial_dir(out: Path, overrides: list[str]) -> Path:
    digest = hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:10]
    return out / rundir.TRIALS / digest


def _requeue_interrupted(study) -> int:  # noqa: ANN001 - optuna.Study
    """Trials left RUNNING by a killed process (or failed by an interrupt) are marked failed and
    their parameters queued again, once; their run directories make the rerun resume."""
    from optuna.trial import TrialState

    done = {json.dumps(t.params, sort_keys=True) for t in study.trials
            if t.state in (TrialState.COMPLETE, TrialState.WAITING)}
    already = {t.user_attrs.get("requeued_from") for t in study.trials}
    requeued = 0
    for t in study.trials:
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        elif t.state != TrialState.FAIL or t.number in already:
            continue
        key = json.dumps(t.params, sort_keys=True)
        if key not in done:
            study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
            done.add(key)
            requeued += 1
    return requeued


def tune(config: str, overrides: list[str], method: str, out: str | Path, trials: int,
         params: str | None, target_density: float, seed: int) -> dict:
    """Run the study until it has ``trials`` finished trials; return the best one."""
    try:
        import optuna
    except ImportError:
        raise UserError('sparsemeta tune needs Optuna: pip install -e ".[tune]"') from None
    if method not in METHODS:
        raise UserError(f"--method takes one of {', '.join(METHODS)}, got '{method}'")
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    if not 0.0 < target_density <= 1.0:
        raise UserError(f"--target-density must be in (0, 1], got {target_density}")
    base = [*overrides, "eval.split=val", f"seed={seed}"]
    cfg = build_config(config, base)  # fail on config mistakes before anything is written
    check_core(cfg)
    names = parse_params(params, cfg, method)
    out = make_dir(out)
    setting = {"config": config, "overrides": overrides, "method": method, "params": names,
               "target_density": target_density, "seed": seed}
    with exclusive(out / LOCK, f"study '{out}'", wait=False):
        study = _open_study(optuna, out, setting, trials)
        finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        if trials > finished:
            study.optimize(_objective(config, base, names, method, out, target_density, seed),
                           n_trials=trials - finished, catch=(RuntimeError, Diverged))
        return _best(optuna, study, out, method, config, overrides)


#: the first bytes of every SQLite database file
SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_database(path: Path) -> None:
    """Refuse, in one line, a ``study.db`` that is not an SQLite file (a directory, a device, a
    fifo, or other bytes): SQLite would fail deep in Optuna, or block on a fifo."""
    kind = rundir.path_kind(path)
    if kind not in (None, "a file"):
        raise UserError(f"'{path}' is {kind}, not an Optuna study database; remove it or use "
                        "another --out")
    if kind and path.stat().st_size:
        with path.open("rb") as fh:
            if fh.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                raise UserError(f"'{path}' is not an SQLite database (an Optuna study); "
                                "restore it or use another --out")


def _open_study(optuna, out: Path, setting: dict, trials: int):  # noqa: ANN001, ANN202 - optuna types
    """The study in ``out`` (created, or continued with the same setting), its interrupted
    trials queued again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = out / rundir.STUDY_DB
    _check_database(db)
    try:
        study = optuna.create_study(study_name="sparsemeta", storage=f"sqlite:///{db.resolve()}",
                                    load_if_exists=True, direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=setting["seed"]))
        old = study.user_attrs.get("setting")
    except Exception as exc:  # SQLAlchemy's and Optuna's own errors: a damaged or foreign db
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"'{db}' cannot be opened as an Optuna study ({type(exc).__name__}: "
                        f"{short(first, 120)}); restore it or use another --out") from None
    if old is not None and not isinstance(old, dict):
        raise UserError(f"'{db}' is damaged (its setting is {short(old)}); restore it or use "
                        "another --out")
    if old is not None and old != setting:
        differ = next((k for k in setting if old.get(k) != setting[k]), None)
        if differ is None:
            raise UserError(f"'{db}' is damaged (its setting has unknown keys); restore it or use "
                            "another --out")
        raise UserError(f"'{out}' holds a study with another {differ} ({short(old.get(differ))}"
                        f", now {short(setting[differ])}); use another --out")
    study.set_user_attr("setting", setting)
    requeued = _requeue_interrupted(study)
    finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    print(f"tune: {setting['method']} on {setting['config']}; parameters "
          f"{', '.join(setting['params'])}; {finished} of {trials} trials done"
          + (f", {requeued} interrupted one(s) queued again" if requeued else "")
          + f"; study {out / rundir.STUDY_DB}", file=sys.stderr)
    return study


def _objective(config: str, base: list[str], names: list[str], method: str, out: Path,
               target_density: float, seed: int):  # noqa: ANN202 - a function of an optuna.Trial
    from sparsemeta.experiments.report import collect, summarize
    from sparsemeta.experiments.runner import run_experiment

    known = params()

    def objective(trial) -> float:  # noqa: ANN001 - optuna.Trial
        values = {n: trial.suggest_float(n, known[n].low, known[n].high, log=known[n].log)
                  for n in names}
        trial_over = base + [f"{known[n].key}={v!r}" for n, v in values.items()]
        run_dir = _trial_dir(out, trial_over)
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            run_experiment(build_config(config, trial_over), run_dir, [method],
                           [seed], [], progress=False)
        except Diverged as exc:  # a failed trial, with its reason; the study goes on
            trial.set_user_attr("failure", str(exc))
            print(f"trial {trial.number}: failed — {exc}", file=sys.stderr)
            raise
        acc, dens = score(summarize(collect([run_dir])), method, target_density)
        trial.set_user_attr("density", dens)
        print(f"trial {trial.number}: " + ", ".join(f"{n}={v:.4g}" for n, v in values.items())
              + f" → validation accuracy {100 * acc:.2f}% at {100 * dens:.1f}% density",
              file=sys.stderr)
        return acc

    return objective


def _best(optuna, study, out: Path, method: str, config: str, overrides: list[str]) -> dict:  # noqa: ANN001
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        reasons = {t.user_attrs.get("failure", "see the messages above") for t in study.trials}
        raise UserError(f"every trial of the study in '{out}' failed ({'; '.join(sorted(reasons))}"
                        "); narrow the search ranges or fix the setting")
    best = study.best_trial
    result = {"method": method, "config": config, "overrides": overrides,
              "trials": len(complete), "best_value": best.value, "best_params": best.params,
              "best_set": [f"{params()[n].key}={v!r}" for n, v in best.params.items()],
              "best_run_dir": best.user_attrs.get("run_dir"),
              "density": best.user_attrs.get("density")}
    write_json(out / rundir.BEST_TRIAL, result)
    return result
