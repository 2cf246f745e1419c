"""The ``sparsemeta`` command line. User mistakes end as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sparsemeta.config import (
    DEFAULT_PRESET,
    MAX_INNER_STEPS,
    MAX_TASKS,
    Config,
    build_config,
    preset_names,
)
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.runtime import tune_allocator
from sparsemeta.training import rundir
from sparsemeta.training.rundir import RunDir, make_dir

LOTTERY_PRESET = "glyphs-lottery"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET) -> None:
    p.add_argument("--config", default=default,
                   help=f"preset name or YAML path (default {default or 'the data set preset'}; presets: "
                        f"{', '.join(preset_names())})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=200 (repeatable)")


def _default_out(kind: str, cfg_dict: dict) -> Path:
    """Same command → same directory, so re-running it resumes or just prints the result."""
    digest = hashlib.sha1(json.dumps(cfg_dict, sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"{kind}-{digest}"


def _out_dir(flag: str | None, default: str | Path | None) -> str | Path | None:
    """``--out`` if given (an empty one is refused, not read as "not given"), else ``default``."""
    if flag == "":
        raise UserError("--out is empty; give a directory, or leave --out out for the default")
    return flag or default


T = TypeVar("T")
D = TypeVar("D")


def _listed(value: str | list, parse: Callable[[str], list], check: Callable[[list], list]
            ) -> list:
    """A flag's comma text (``parse``) or a preset's list (``check``), as the same list."""
    return parse(value) if isinstance(value, str) else check(value)


def _given(flag: T | None, default: D) -> T | D:
    """The flag's value if it was given at all (an empty or zero value is a value, and is
    checked as one), else the default."""
    return default if flag is None else flag


def cmd_train(args: argparse.Namespace) -> int:
    from sparsemeta.data.registry import load_data
    from sparsemeta.foundations.device import resolve_device
    from sparsemeta.training import distributed
    from sparsemeta.training.evaluate import format_result
    from sparsemeta.training.loop import train
    from sparsemeta.training.setup import prepare

    cfg = build_config(args.config, args.overrides)
    out = _out_dir(args.out, _default_out("train", cfg.to_dict()))
    rundir.check_out_dir(out, "run")  # never into an experiment, sweep or study
    rundir.check_config(out, cfg)  # nor into a run of another config
    distributed.init_from_env(resolve_device(cfg.device))  # under torchrun: join the job
    g = distributed.group()
    try:
        if not g.main:
            g.barrier()  # rank 0 loads (and, the first time, generates) the data first
        data = load_data(cfg.data_spec())  # fail on data problems before anything is written
        if g.main:
            g.barrier()
        setup = prepare(cfg, data)  # the one check of the config against its data
        out = make_dir(out)
        finished = RunDir(out).finished
        if g.main:
            print(f"run directory: {out}" + (" (finished; printing its result)" if finished else "")
                  + (f"; {g.world} processes" if g.world > 1 else ""), file=sys.stderr)
        result = train(setup, out, data)
    finally:
        distributed.shutdown()
    if g.main:
        print(format_result(result.evaluation))
        print(f"best validation accuracy {100 * result.val_accuracy:.2f}% at iteration "
              f"{result.best_iteration}; results in {RunDir(out).file(rundir.EVAL)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sparsemeta.config import experiment_defaults
    from sparsemeta.data.registry import load_data
    from sparsemeta.experiments.report import write_report
    from sparsemeta.experiments.runner import (
        check_controls,
        check_experiment,
        check_methods,
        check_seeds,
        parse_controls,
        parse_methods,
        parse_seeds,
        run_checked,
    )
    from sparsemeta.training.setup import prepare

    cfg = build_config(args.config, args.overrides)
    preset = experiment_defaults(args.config)
    methods = _listed(_given(args.method, preset.get("methods", ["lottery"])), parse_methods,
                      check_methods)
    seeds = _listed(_given(args.seeds, preset.get("seeds", [0])), parse_seeds, check_seeds)
    controls = _listed(_given(args.controls, preset.get("controls", ["reinit", "random"])),
                       parse_controls, check_controls)
    workers = _given(args.workers, preset.get("workers", 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers must be an integer >= 1, got {workers!r}")
    out = _out_dir(args.out, _default_out("-".join(methods), cfg.to_dict()))
    rundir.check_out_dir(out, "experiment")  # never into a run, a sweep or a study
    rundir.check_experiment(out, cfg)  # nor into an experiment of another config
    data = load_data(cfg.data_spec())  # fail on data problems before anything is written
    exp = check_experiment(prepare(cfg, data), methods, seeds, controls, data.channels)
    out = make_dir(out)
    print(f"experiment directory: {out} — methods {', '.join(methods)}; "
          f"{cfg.prune.num_levels()} pruning levels; seeds {seeds}; "
          f"controls {', '.join(controls) or 'none'}; {exp.runs()} meta-training runs",
          file=sys.stderr)
    run_checked(exp, out, data, workers=workers)
    summary = write_report([out])
    print(summary["table"])
    print(f"report: {out / rundir.REPORT} (plots and {rundir.SUMMARY} beside it)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from sparsemeta.experiments.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.file, _out_dir(args.out, None))
    rundir.check_out_dir(sweep.out, "sweep")
    print(run_sweep(sweep, args.engine, args.address))
    print(f"report: {sweep.out / 'report.md'} (per-variant reports and plots under "
          f"{sweep.out / 'reports'})")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from sparsemeta.experiments.tune import tune

    cfg = build_config(args.config, args.overrides)
    out = _out_dir(args.out, _default_out(f"tune-{args.method}", {**cfg.to_dict(), "tune": [
        args.params, args.target_density]}))
    rundir.check_out_dir(out, "study")
    result = tune(args.config, args.overrides, args.method, out, args.trials, args.params,
                  args.target_density, args.seed)
    print(f"best of {result['trials']} trials: validation accuracy "
          f"{100 * result['best_value']:.2f}% with " + " ".join(
              f"--set {s}" for s in result["best_set"]))
    print(f"study: {Path(out) / rundir.STUDY_DB}; best: {Path(out) / rundir.BEST_TRIAL}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sparsemeta.experiments.report import write_report

    rundir.check_out_dir(_out_dir(args.out, args.dirs[0]), None, inputs=args.dirs)
    summary = write_report(args.dirs, args.out)
    print(summary["table"])
    print("wrote " + ", ".join(summary["paths"]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sparsemeta.experiments.export import export_command

    rundir.require_dir(args.path, "a run directory (with config.yaml) or a lottery experiment "
                                  "directory")
    print(export_command(args.path, args.out, level=args.level, fp16=args.fp16, int8=args.int8,
                         fmt=args.format,
                         seed=args.seed, as_json=args.json))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsemeta.data.registry import load_data
    from sparsemeta.data.tasks import sampler_for
    from sparsemeta.foundations.io import write_json
    from sparsemeta.meta.learners import build_learner
    from sparsemeta.training.evaluate import evaluate, format_result
    from sparsemeta.training.setup import prepare

    run = RunDir(args.run_dir)
    cfg = rundir.load_run_config(run.path)
    tasks = _given(args.tasks, cfg.eval.tasks)
    steps = cfg.meta.eval_inner_steps if args.steps is None else args.steps
    if not 1 <= tasks <= MAX_TASKS:
        raise UserError(f"--tasks must be >= 1 and <= {MAX_TASKS:,}, got {tasks}")
    if not 0 <= steps <= MAX_INNER_STEPS:
        raise UserError(f"--steps must be >= 0 and <= {MAX_INNER_STEPS:,}, got {steps}")
    chosen = run.chosen_model(cfg)  # best-on-validation weights with the mask they were scored
    data = load_data(cfg.data_spec())
    setup = prepare(cfg, data, splits=(args.split,))
    mask = ({k: v.to(setup.device) for k, v in chosen.mask.items()} if chosen.mask else None)
    learner = build_learner(cfg, data.channels, mask)
    chosen.check(learner.state_dict(), run.path)  # and the data's channels
    learner.load_state_dict(chosen.state)
    learner.to(setup.device)
    result = evaluate(setup.engine, learner, dict(learner.model.named_parameters()),
                      sampler_for(cfg.task_spec(), data, args.split), tasks, steps,
                      progress=True)
    path = run.file(f"eval_{args.split}_{tasks}tasks_{steps}steps.json")
    write_json(path, result.to_dict())
    print(format_result(result))
    for r in result.per_step:
        print(f"  step {r['step']:>2}: {100 * r['accuracy']:6.2f}% ± {100 * r['ci95']:.2f}%")
    print(f"written to {path}")
    return 0


def _data_config(args: argparse.Namespace) -> Config:
    """The config of a ``data`` command: the data set's own preset unless --config is given."""
    from sparsemeta.data.info import preset_for

    overrides = [f"data.name={args.name}"] + args.overrides
    if args.root:
        overrides.append(f"data.root={args.root}")
    return build_config(args.config or preset_for(args.name), overrides)


def cmd_data_info(args: argparse.Namespace) -> int:
    from sparsemeta.data.info import DO_NOT_FIT, info

    cfg = _data_config(args)
    report = info(cfg.data_spec(), cfg.task_spec())
    print(report)
    return 1 if DO_NOT_FIT in report else 0  # a check: scripts can test that tasks fit


def cmd_data_download(args: argparse.Namespace) -> int:
    from sparsemeta.data.download import download

    if not args.root:
        raise UserError("--root is empty; give the directory to download into")
    rundir.check_dir_path(args.root, "--root")
    print(download(args.name, args.root))
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from sparsemeta.data.preview import check_out, contact_sheet
    from sparsemeta.data.registry import load_data

    check_out(args.out)  # an unwritable format is refused before the data is loaded
    out = rundir.check_out_file(args.out, "sheet.png")
    data = load_data(_data_config(args).data_spec())
    contact_sheet(data, args.split, out, classes=args.classes, per_class=args.per_class)
    print(f"wrote {out} ({args.classes} {args.split} classes × up to {args.per_class} examples)")
    return 0


def _add_train_and_run(sub: argparse._SubParsersAction) -> None:
    from sparsemeta.experiments.methods import METHODS

    p = sub.add_parser("train", help="meta-train one model (resumes an unfinished --out)")
    _config_args(p)
    p.add_argument("--out", help="run directory (default: runs/train-<config hash>)")
    p.set_defaults(func=cmd_train)

    for name, helptext in (
        ("run", "the main job: a sparsity experiment (default: lottery tickets with controls on "
                "the quick glyph preset) and its report"),
        ("lottery", "iterative magnitude pruning with rewinding, controls, several seeds, "
                    "and the report"),
    ):
        p = sub.add_parser(name, help=helptext)
        _config_args(p, LOTTERY_PRESET)
        if name == "run":
            p.add_argument("--method", help=f"comma list of {', '.join(METHODS)} (default: the "
                                            "preset's, else lottery)")
        p.add_argument("--seeds", help="comma list of seeds (default: the preset's, else 0)")
        p.add_argument("--controls", help="lottery controls at each level: reinit,random or none "
                                          "(default: the preset's, else both)")
        p.add_argument("--workers", type=int, help="training processes: seeds side by side, the "
                       "rest train the runs nothing waits for (the lottery controls, per-level "
                       "runs) beside the IMP chain (default: the preset's, else 1)")
        p.add_argument("--out", help="experiment directory (default: runs/<methods>-<config hash>)")
        p.set_defaults(func=cmd_run, **({} if name == "run" else {"method": "lottery"}))


def _add_sweep_and_tune(sub: argparse._SubParsersAction) -> None:
    from sparsemeta.experiments.methods import METHODS
    from sparsemeta.experiments.tune import params

    p = sub.add_parser("sweep", help="a grid of experiments (seeds × methods × config values) "
                                     "as Ray tasks or one after another, then one report")
    p.add_argument("file", help="sweep YAML (config, set, grid, controls, out, ray)")
    p.add_argument("--out", help="sweep directory (default: the file's 'out', else "
                                 "runs/sweep-<file name>)")
    p.add_argument("--engine", choices=["auto", "ray", "local"], default="auto",
                   help="auto: Ray if installed (pip install -e \".[ray]\"), else local")
    p.add_argument("--address", help="an existing Ray cluster, e.g. ray://head:10001 "
                                     "(default: start Ray on this machine)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("tune", help="Optuna search of a method's hyperparameters on validation "
                                    "accuracy only (resumable SQLite study)")
    _config_args(p, "glyphs-quick")
    p.add_argument("--method", default="dense", help=f"one of {', '.join(METHODS)} (default dense)")
    p.add_argument("--trials", type=int, default=20,
                   help="finished trials the study should have (default 20); re-run to resume")
    p.add_argument("--params", help=f"comma list of {', '.join(params())} (default: the method's)")
    p.add_argument("--target-density", type=float, default=0.2,
                   help="score the method's model nearest this density (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial (default 0)")
    p.add_argument("--out", help="study directory (default: runs/tune-<method>-<config hash>)")
    p.set_defaults(func=cmd_tune)


def _add_results(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="summary.json, Markdown table and plots of experiments")
    p.add_argument("dirs", nargs="+", help="experiment directories (e.g. one per seed)")
    p.add_argument("--out", help="where to write the report (default: the first directory)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="re-evaluate a run directory's best model")
    p.add_argument("run_dir")
    p.add_argument("--tasks", type=int, help="number of fixed tasks (default: the run's eval.tasks)")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--steps", type=int, help="adaptation steps (default: meta.eval_inner_steps)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run's model (or a lottery experiment's chosen "
                                      "ticket) as a compact .smz file for sparsemeta-edge")
    p.add_argument("path", help="run directory (has config.yaml) or lottery experiment directory")
    p.add_argument("--out", required=True, help="output file, e.g. model.smz")
    p.add_argument("--level", type=int, default=None,
                   help="experiment only: ticket level (default: the sparsest whose validation "
                        "accuracy is within the dense model's CI)")
    p.add_argument("--seed", type=int, default=None,
                   help="experiment only: which seed's ticket (default: the first)")
    p.add_argument("--fp16", action="store_true", help="store kept weights in half precision")
    p.add_argument("--int8", action="store_true",
                   help="store kept conv/linear weights as int8, one scale per output channel")
    p.add_argument("--format", choices=["smz", "onnx"], default="smz",
                   help="smz: compact file for sparsemeta-edge (default); onnx: the model for "
                        "ONNX Runtime (pip install -e \".[onnx]\" for its tests)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data set tools")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    from sparsemeta.data.registry import NAMES

    names = list(NAMES)
    q = dsub.add_parser("preview", help="write a contact sheet (rows = classes, columns = examples)")
    q.add_argument("name", choices=names)
    q.add_argument("--out", default="sheet.png")
    q.add_argument("--root", help="data root (or cache directory for glyphs)")
    q.add_argument("--split", choices=["train", "val", "test"], default="train")
    q.add_argument("--classes", type=int, default=12)
    q.add_argument("--per-class", type=int, default=20)
    _config_args(q, None)
    q.set_defaults(func=cmd_data_preview)
    q = dsub.add_parser("info", help="check a data set's layout; classes and images per split")
    q.add_argument("name", choices=names)
    q.add_argument("--root", help="data root (or cache directory for glyphs)")
    _config_args(q, None)
    q.set_defaults(func=cmd_data_info)
    q = dsub.add_parser("download", help="fetch, verify (checksums) and unpack a data set")
    q.add_argument("name", choices=["omniglot", "miniimagenet"])
    q.add_argument("--root", required=True, help="directory to download into")
    q.set_defaults(func=cmd_data_download)


def cmd_config_keys(args: argparse.Namespace) -> int:
    import shutil

    from sparsemeta.config import config_keys, format_keys

    print(format_keys(config_keys(), width=max(80, shutil.get_terminal_size().columns)))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(build_config(args.config, args.overrides).to_dict(), sort_keys=False),
          end="")
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="configuration: every key with its doc, or a resolved config")
    csub = p.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    q = csub.add_parser("keys", help="every config key with its type, default and meaning")
    q.set_defaults(func=cmd_config_keys)
    q = csub.add_parser("show", help="the resolved config of a preset and --set overrides")
    _config_args(q)
    q.set_defaults(func=cmd_config_show)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsemeta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train_and_run, _add_sweep_and_tune, _add_results, _add_data, _add_config):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every user mistake or file-system failure ends in one line, exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_allocator()  # the package's allocator settings, not the user's environment
    try:
        if _world_size() > 1 and args.command != "train":
            raise UserError(f"'sparsemeta {args.command}' runs in one process; under torchrun "
                            f"only 'sparsemeta train' is data-parallel (spread experiments "
                            f"with 'sparsemeta sweep' instead)")
        return args.func(args)
    except UserError as exc:
        print(f"sparsemeta: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsemeta: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except MemoryError:  # a size the config bounds allow but this machine cannot hold
        print("sparsemeta: error: out of memory; lower data.image_size, train.meta_batch, "
              "model.filters or the task shape (finished work is kept)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
    except OSError as exc:  # permission denied, disk full, …: say which file, keep what is saved
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"sparsemeta: error: {exc.strerror or exc}{where}; fix that and run the same "
              "command again (finished work is kept)", file=sys.stderr)
        return 2


def _world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise UserError(f"WORLD_SIZE={text!r} is not a number; unset it or launch with "
                        "torchrun") from None


if __name__ == "__main__":
    raise SystemExit(main())
