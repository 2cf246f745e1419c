"""Main-CLI inputs of issue #24 (item 9) that failed before: every one is a single line on
stderr, exit 2, before any work, and nothing of anyone's directory is changed.

Kinds: output directories and files that belong to a run, experiment, sweep or study; reports
that would merge different experiments or count one twice; sizes the config did not bound;
decompression bombs; path messages that named the wrong kind of thing; hostile files inside a
copied directory. The runs here train on a tiny synthetic data set (``conftest.make_data``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sparsemeta.cli import main
from sparsemeta.foundations.safeio import short
from sparsemeta.training import rundir
from tests.conftest import make_data

TINY = ["--set", "data.image_size=16", "--set", "model.filters=8", "--set", "train.iterations=2",
        "--set", "train.val_every=2", "--set", "train.val_tasks=4", "--set", "eval.tasks=4",
        "--set", "train.meta_batch=2", "--set", "data.queries=2"]
EXPERIMENT = ["--set", "prune.levels=1", "--controls", "none", "--workers", "1"]


def _fake_data(spec):  # noqa: ANN001, ANN202 - the registry's loader signature
    return make_data()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished run, a one-level lottery experiment, and directories marked as a sweep and a
    study (their marker files are what makes them one)."""
    root = tmp_path_factory.mktemp("inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sparsemeta.data.registry.load_data", _fake_data)
        assert main(["train", *TINY, "--out", str(root / "run")]) == 0
        assert main(["run", *TINY, *EXPERIMENT, "--out", str(root / "exp")]) == 0
    sweep = root / "sweep"
    (sweep / "point").mkdir(parents=True)
    (sweep / rundir.SWEEP).write_text("experiments: [point]\n")
    (sweep / rundir.LOCK).touch()  # what its writer leaves: a user's sweep.yaml is not one
    shutil.copytree(root / "exp", sweep / "point", dirs_exist_ok=True)
    study = root / "study"
    (study / rundir.TRIALS).mkdir(parents=True)
    (study / rundir.STUDY_DB).write_bytes(b"SQLite format 3\x00")
    (root / "afile").write_text("not a directory\n")
    os.symlink(root / "exp", root / "explink")
    return root


def _copy(src: Path, dst: Path) -> Path:
    """A copy of one of the module's made directories, for a test to damage."""
    shutil.copytree(src, dst)
    return dst


def _snapshot(*dirs: Path) -> dict[str, bytes]:
    """Every file under ``dirs`` with its bytes: what a refusal must leave as it was."""
    return {str(p): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def refused(args: list, capsys) -> str:  # noqa: ANN001 - pytest's capsys
    """The one error line (without its prefix) of a command that must exit 2."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sparsemeta: error: ")
    return err[0].removeprefix("sparsemeta: error: ")


def _real(path: Path) -> str:
    return os.path.realpath(path)


# -- directories that belong to someone else ---------------------------------------------------
COMMANDS = [(["train", *TINY], "a run", "sparsemeta train"),
            (["run", *TINY, *EXPERIMENT], "an experiment", "sparsemeta run")]
TARGETS = [("exp", "an experiment", "sparsemeta run"), ("explink", "an experiment", "sparsemeta run"),
           ("run", "a run", "sparsemeta train"), ("sweep", "a sweep", "sparsemeta sweep"),
           ("study", "a study", "sparsemeta tune")]


@pytest.mark.parametrize("command, kind, made_by, target, own, own_by", [
    (*c, *t) for c in COMMANDS for t in TARGETS if c[1] != t[1]])  # its own kind: resumed
def test_train_and_run_never_write_into_a_directory_of_another_kind(
        made, command, kind, made_by, target, own, own_by, capsys):
    before = _snapshot(made / target)
    out = made / target
    assert refused([*command, "--out", out], capsys) == (
        f"--out '{out}' is {own} directory (made by '{own_by}'); '{made_by}' writes {kind} "
        "directory: choose another --out")
    assert _snapshot(made / target) == before


@pytest.mark.parametrize("command", [["train", *TINY], ["run", *TINY, *EXPERIMENT]])
@pytest.mark.parametrize("inside, owner, kind", [
    ("exp/seed_0/level_01/ticket", "exp", "experiment"),
    ("exp/seed_0/level_01/reinit", "exp", "experiment"),
    ("exp/seed_0", "exp", "experiment"), ("sweep/point", "sweep", "sweep"),
    ("study/trials/abc", "study", "study"), ("run/sub", "run", "run"),
])
def test_train_and_run_never_write_inside_an_experiment_sweep_study_or_run(
        made, command, inside, owner, kind, capsys):
    before = _snapshot(made / owner)
    out = made / inside
    assert refused([*command, "--out", out], capsys) == (
        f"--out '{out}' is inside the {kind} directory '{_real(made / owner)}', which would "
        "read it as part of itself; choose a directory outside it")
    assert _snapshot(made / owner) == before


def test_sweep_and_tune_never_write_into_an_experiment(made, tmp_path, capsys):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("grid: {seeds: [0]}\n")
    before = _snapshot(made / "exp")
    exp = made / "exp"
    assert refused(["sweep", sweep_file, "--engine", "local", "--out", exp], capsys) == (
        f"--out '{exp}' is an experiment directory (made by 'sparsemeta run'); 'sparsemeta "
        "sweep' writes a sweep directory: choose another --out")
    sweep_file.write_text(f"grid: {{seeds: [0]}}\nout: {made / 'run'}\n")
    assert refused(["sweep", sweep_file, "--engine", "local"], capsys) == (
        f"--out '{made / 'run'}' is a run directory (made by 'sparsemeta train'); 'sparsemeta "
        "sweep' writes a sweep directory: choose another --out")
    assert refused(["tune", *TINY, "--trials", "1", "--out", exp], capsys) == (
        f"--out '{exp}' is an experiment directory (made by 'sparsemeta run'); 'sparsemeta "
        "tune' writes a study directory: choose another --out")
    assert _snapshot(made / "exp") == before


@pytest.mark.parametrize("target, owner, kind", [
    ("run/best.pt", "run", "run"), ("run/config.yaml", "run", "run"),
    ("run/init.pt", "run", "run"), ("run/checkpoint.pt", "run", "run"),
    ("exp/summary.json", "exp", "experiment"), ("exp/experiment.yaml", "exp", "experiment"),
    ("exp/seed_0/level_01/ticket/eval.json", "exp/seed_0/level_01/ticket", "run"),
    ("sweep/sweep.yaml", "sweep", "sweep"), ("study/study.db", "study", "study"),
])
@pytest.mark.parametrize("fmt", ["smz", "onnx"])
def test_export_never_overwrites_a_file_a_directory_owns(made, target, owner, kind, fmt, capsys):
    before = _snapshot(made / owner.split("/")[0])
    out = made / target
    assert refused(["export", made / "exp/seed_0/level_01/ticket", "--format", fmt, "--out", out],
                   capsys) == (f"--out '{out}' would overwrite a file of the {kind} directory "
                               f"'{_real(made / owner)}'; write to a file outside it, such as "
                               f"model.{fmt}")
    assert _snapshot(made / owner.split("/")[0]) == before


def test_export_refuses_a_new_file_with_a_name_a_run_reads(made, capsys):
    run = made / "exp/seed_0/level_01/ticket"
    out = run / "step_5.pt"  # a late-rewinding target a resumed experiment would read
    assert refused(["export", made / "run", "--out", out], capsys) == (
        f"--out '{out}' is a name used by a file of the run directory '{_real(run)}'; write to "
        "a file outside it, such as model.smz")
    assert not out.exists()


def test_report_never_replaces_another_directorys_files(made, capsys):
    for target, own, own_by, harm in (
            ("run", "a run", "sparsemeta train", "the report would be mixed into its files"),
            ("sweep", "a sweep", "sparsemeta sweep", "the report would be mixed into its files")):
        before = _snapshot(made / target)
        out = made / target
        assert refused(["report", made / "exp", "--out", out], capsys) == (
            f"--out '{out}' is {own} directory (made by '{own_by}'), not one of the report's "
            f"inputs: {harm}; choose another --out")
        assert _snapshot(made / target) == before


def test_report_out_onto_another_experiment_keeps_its_summary(made, tmp_path, capsys):
    other = _copy(made / "exp", tmp_path / "other")
    before = _snapshot(other)
    assert refused(["report", made / "exp", "--out", other], capsys) == (
        f"--out '{other}' is an experiment directory (made by 'sparsemeta run'), not one of the "
        "report's inputs: its summary.json and report.md would be replaced; choose another --out")
    assert _snapshot(other) == before


def _with_config(src: Path, dst: Path, section: str, key: str, value: object) -> Path:
    _copy(src, dst)
    record = yaml.safe_load((dst / rundir.EXPERIMENT).read_text())
    record["config"][section][key] = value
    (dst / rundir.EXPERIMENT).write_text(yaml.safe_dump(record))
    return dst


def test_report_refuses_to_average_experiments_of_different_configs(made, tmp_path, capsys):
    other = _with_config(made / "exp", tmp_path / "ways3", "data", "ways", 3)
    assert refused(["report", made / "exp", other, "--out", tmp_path / "r"], capsys) == (
        f"'{other}' was run with another config than '{made / 'exp'}' (data.ways: 3 in "
        f"'{other}', 5 in '{made / 'exp'}'); report them separately")
    assert not (tmp_path / "r").exists()


def test_report_takes_experiments_that_differ_in_seed_and_device_only(made, tmp_path, capsys):
    other = _copy(made / "exp", tmp_path / "seed1")
    record = yaml.safe_load((other / rundir.EXPERIMENT).read_text())
    record["config"].update(seed=1, device="cpu")
    (other / rundir.EXPERIMENT).write_text(yaml.safe_dump(record))
    assert main([str(a) for a in ("report", made / "exp", other, "--out", tmp_path / "r")]) == 0


@pytest.mark.parametrize("second", ["{exp}", "{exp}/", "{root}/explink", "{root}/exp/../exp"])
def test_report_refuses_one_experiment_given_twice(made, tmp_path, second, capsys):
    exp = str(made / "exp")
    second = second.format(exp=exp, root=made)
    assert refused(["report", exp, second, "--out", tmp_path / "r"], capsys) == (
        f"'{exp}' and '{second}' are the same experiment directory; give each experiment "
        "once (it would count as two seeds)")


def test_a_copied_experiment_counts_as_one_seed_not_two(made, tmp_path):
    copy = _copy(made / "exp", tmp_path / "copy")
    assert main([str(a) for a in ("report", made / "exp", copy, "--out", tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / rundir.SUMMARY).read_text())["rows"]
    assert {r["seeds"] for r in rows} == {1}
    assert all(r["ci_over"] == "tasks" and r["ci95"] > 0 for r in rows)


def test_data_preview_never_overwrites_an_experiments_plot(made, capsys):
    plot = next((made / "exp").glob("*.png"))
    before = plot.read_bytes()
    assert refused(["data", "preview", "glyphs", "--out", plot], capsys) == (
        f"--out '{plot}' would overwrite a file of the experiment directory "
        f"'{_real(made / 'exp')}'; write to a file outside it, such as sheet.png")
    assert plot.read_bytes() == before


# -- bounds the config did not state ----------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ("data.image_size=100000", "data.image_size must be <= 512, got 100000"),
    ("data.shift=100000", "data.shift must be <= 14 (half the image side), got 100000"),
    ("eval.tasks=1000000000000", "eval.tasks must be <= 100000, got 1000000000000"),
    ("train.val_tasks=1000000000000", "train.val_tasks must be <= 100000, got 1000000000000"),
    ("meta.eval_inner_steps=1000000000", "meta.eval_inner_steps must be <= 1000, got 1000000000"),
    ("meta.inner_steps=1000000000", "meta.inner_steps must be <= 1000, got 1000000000"),
    ("train.threads=1000000", "train.threads must be <= 1024, got 1000000"),
    ("train.meta_batch=100000000",
     "train.meta_batch × data.ways × (data.shots + data.queries) × data.image_size² = "
     "6,272,000,000,000 pixels in one meta-batch, more than 4,294,967,296 (16 GiB of float32); "
     "lower one of them"),
])
def test_a_size_that_drives_an_allocation_is_bounded_by_the_config(tmp_path, setting, message,
                                                                    capsys):
    assert refused(["config", "show", "--set", setting], capsys) == message
    assert refused(["train", "--set", setting, "--out", tmp_path / "r"], capsys) == message
    assert not (tmp_path / "r").exists()


def test_the_bounds_leave_the_presets_and_imagenet_size_work_alone(capsys):
    for preset in ("glyphs-quick", "glyphs-lottery", "omniglot-20w1s", "miniimagenet-5w5s"):
        assert main(["config", "show", "--config", preset]) == 0
    assert main(["config", "show", "--set", "data.image_size=224", "--set", "data.shift=8"]) == 0


@pytest.mark.parametrize("flag, value, message", [
    ("--tasks", "1000000000000", "--tasks must be >= 1 and <= 100,000, got 1000000000000"),
    ("--steps", "1000000000000", "--steps must be >= 0 and <= 1,000, got 1000000000000"),
    ("--steps", "-1", "--steps must be >= 0 and <= 1,000, got -1"),
])
def test_eval_bounds_its_tasks_and_steps(made, flag, value, message, capsys):
    assert refused(["eval", made / "run", flag, value], capsys) == message


def _folder(root: Path, big: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(
                root / f"class{c:02d}" / f"img{i}.png")
    Image.new("L", big).save(root / "class03" / "big.png")
    return root / "class03" / "big.png"


@pytest.mark.parametrize("size", [(40, 40), (50, 50)])  # Pillow's warning zone, its error zone
@pytest.mark.parametrize("channels", [[], ["--set", "data.channels=1"]])
def test_a_decompression_bomb_is_refused_by_every_image_reader(tmp_path, monkeypatch, size,
                                                               channels, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40×40 warns, 50×50 errs in Pillow
    big = _folder(tmp_path / "data", size)
    out = tmp_path / "sheet.png"
    assert refused(["data", "preview", "folder", "--root", tmp_path / "data", "--out", out,
                    "--set", "data.image_size=16", *channels], capsys) == (
        f"image '{_real(big)}' has more than 1,000 pixels (a decompression bomb?); replace or "
        "delete that file")
    assert not out.exists()


# -- messages that named the wrong kind of thing ----------------------------------------------
@pytest.mark.parametrize("command, what", [
    (["eval"], "a run directory"),
    (["export", "--out", "m.smz"],
     "a run directory (with config.yaml) or a lottery experiment directory"),
    (["report"], "an experiment directory made by 'sparsemeta run' or 'sparsemeta lottery'"),
])
@pytest.mark.parametrize("path, kind", [("afile", "a file"), ("/dev/null", "a character device"),
                                        ("nothing", None)])
def test_a_directory_argument_says_what_the_path_is(made, command, what, path, kind, capsys):
    path = path if path.startswith("/") else str(made / path)
    message = refused([command[0], path, *command[1:]], capsys)
    assert message == (f"'{path}' does not exist; give {what}" if kind is None
                       else f"'{path}' is {kind}, not {what}")


def test_eval_and_report_name_the_kind_of_directory_given(made, capsys):
    exp, run, sweep = made / "exp", made / "run", made / "sweep"
    assert refused(["eval", exp], capsys) == (
        f"'{exp}' is not a run directory (it is an experiment directory); give a directory made "
        "by 'sparsemeta train' or one of an experiment's seed_S/level_LL/<method> directories")
    for path, kind in ((run, "run"), (sweep, "sweep")):
        assert refused(["report", path], capsys) == (
            f"'{path}' is a {kind} directory, not an experiment directory made by "
            "'sparsemeta run' or 'sparsemeta lottery'")


@pytest.mark.parametrize("command", [["train", *TINY], ["run", *TINY, *EXPERIMENT],
                                     ["tune", *TINY], ["report", "{exp}"]])
@pytest.mark.parametrize("out, kind", [("{root}/afile", "a file"),
                                       ("/dev/null", "a character device")])
def test_an_output_directory_that_is_a_file_or_device_says_so(made, command, out, kind, capsys):
    command = [a.format(exp=made / "exp") for a in command]
    out = out.format(root=made)
    assert refused([*command, "--out", out], capsys) == (
        f"--out '{out}' is {kind}, not a directory; choose another --out")


def test_an_output_directory_below_a_file_names_that_file(made, capsys):
    out = made / "afile" / "run"
    assert refused(["train", *TINY, "--out", out], capsys) == (
        f"cannot create directory '{out}' of --out: '{made / 'afile'}' is a file, not a "
        "directory; choose another --out")


@pytest.mark.parametrize("command", [["train"], ["run"], ["tune"], ["report", "{exp}"],
                                     ["sweep", "{root}/sweep/sweep.yaml"]])
def test_an_empty_out_is_refused_not_read_as_the_default(made, command, capsys):
    command = [a.format(exp=made / "exp", root=made) for a in command]
    assert refused([*command, "--out", ""], capsys) == (
        "--out is empty; give a directory, or leave --out out for the default")


FILE_CASES = [
    ("", "--out is empty; give a file name such as {example}"),
    ("{tmp}/dir{sfx}", "--out '{tmp}/dir{sfx}' is a directory; give a file name such as "
                       "{tmp}/dir{sfx}/{example}"),
    ("{tmp}/fifo{sfx}", "--out '{tmp}/fifo{sfx}' is a fifo, not a regular file; choose a file "
                        "name"),
    ("{tmp}/nodir/m{sfx}", "directory '{tmp}/nodir' of --out does not exist; create it or "
                           "choose another --out"),
    ("{root}/afile/m{sfx}", "'{root}/afile' in --out '{root}/afile/m{sfx}' is a file, not a "
                            "directory; choose another --out"),
    ("{tmp}/" + "a" * 300 + "{sfx}", "{short} is a longer name than the file system allows "
                                     "(255 bytes a name); choose a shorter one"),
]


@pytest.mark.parametrize("command, example, sfx, name, message", [
    (*c, *f) for c in ((["export", "{root}/run"], "model.smz", ""),
                       (["export", "{root}/run", "--format", "onnx"], "model.onnx", ""),
                       (["data", "preview", "glyphs"], "sheet.png", ".png"))
    for f in FILE_CASES if f[0] or not c[2]])  # a sheet's --out first needs an image suffix
def test_an_output_file_that_cannot_be_one_says_why(made, tmp_path, name, message, command,
                                                    example, sfx, capsys):
    (tmp_path / f"dir{sfx}").mkdir()
    os.mkfifo(tmp_path / f"fifo{sfx}")
    fill = {"tmp": tmp_path, "root": made, "example": example, "sfx": sfx}
    out = name.format(**fill, short="")
    command = [a.format(root=made) for a in command]
    assert refused([*command, "--out", out], capsys) == message.format(**fill, short=short(out))


def test_data_download_and_info_name_a_device_root(capsys):
    assert refused(["data", "download", "omniglot", "--root", "/dev/null"], capsys) == (
        "--root '/dev/null' is a character device, not a directory; choose another --root")
    assert refused(["data", "download", "omniglot", "--root", ""], capsys) == (
        "--root is empty; give the directory to download into")
    assert refused(["data", "download", "omniglot", "--root", "/dev/null/omniglot"], capsys) == (
        "cannot create directory '/dev/null/omniglot' of --root: '/dev/null' is a character "
        "device, not a directory; choose another --root")
    assert refused(["data", "info", "folder", "--root", "/dev/null"], capsys) == (
        "data root '/dev/null' is a character device, not a directory; set data.root to a "
        "directory with one folder per class: ROOT/CLASS_NAME/*.png|jpg|jpeg")


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    def exhausted(*args: object, **kwargs: object) -> str:
        raise MemoryError

    monkeypatch.setattr("sparsemeta.config.format_keys", exhausted)
    assert refused(["config", "keys"], capsys) == (
        "out of memory; lower data.image_size, train.meta_batch, model.filters or the task "
        "shape (finished work is kept)")


# -- hostile files in a copied directory -------------------------------------------------------
@pytest.mark.parametrize("field, value, want", [
    ("methods", 5, "a list of str"), ("seeds", "x", "a list of int"),
    ("seeds", [True], "a list of int"), ("controls", [{"a": 1}], "a list of str"),
    ("config", [1], "a mapping"),
])
def test_a_damaged_experiment_yaml_is_one_line_before_anything_starts(made, tmp_path, field,
                                                                       value, want, capsys):
    exp = _copy(made / "exp", tmp_path / "exp")
    record = yaml.safe_load((exp / rundir.EXPERIMENT).read_text())
    record[field] = value
    (exp / rundir.EXPERIMENT).write_text(yaml.safe_dump(record))
    before = _snapshot(exp)
    message = (f"'{exp / rundir.EXPERIMENT}' is damaged ({field} is {short(value)}, not "
               f"{want}); restore it")
    assert refused(["run", *TINY, *EXPERIMENT, "--out", exp], capsys) == (
        f"{message} or use another --out")
    assert refused(["report", made / "exp", exp, "--out", tmp_path / "r"], capsys) == message
    assert _snapshot(exp) == before


def test_a_run_of_another_config_is_refused_before_the_start_line(made, tmp_path, capsys):
    run = _copy(made / "run", tmp_path / "run")
    assert refused(["train", *TINY, "--set", "data.ways=3", "--out", run], capsys) == (
        f"'{run}' holds a run with a different config (data.ways: 5 in the run, 3 now); use "
        "another --out")
    assert refused(["run", *TINY, *EXPERIMENT, "--set", "data.ways=3", "--out", made / "exp"],
                   capsys) == (f"'{made / 'exp'}' holds an experiment with a different config "
                               "(data.ways: 5 in the run, 3 now); use another --out")


@pytest.mark.parametrize("content, message", [
    ([1, 2], "is not a sparsity mask (layer names mapped to tensors; it holds a list)"),
    ({"blocks.0.conv.weight": 5},
     "is not a sparsity mask (layer names mapped to tensors; it holds other values)"),
])
def test_a_mask_file_that_is_not_a_mask_is_one_line(made, tmp_path, content, message, capsys):
    import torch

    exp = _copy(made / "exp", tmp_path / "exp")
    run = exp / "seed_0/level_01/ticket"
    torch.save(content, run / rundir.MASK)
    line = f"'{run / rundir.MASK}' {message}; restore the run directory's file"
    assert refused(["report", exp], capsys) == line
    assert refused(["eval", run], capsys) == line
    assert refused(["export", run, "--out", tmp_path / "m.smz"], capsys) == line


def test_a_mask_of_other_layers_is_not_reported_as_a_density(made, tmp_path, capsys):
    import torch

    exp = _copy(made / "exp", tmp_path / "exp")
    run = exp / "seed_0/level_01/ticket"
    torch.save({"x": torch.zeros(3)}, run / rundir.MASK)
    assert refused(["report", exp], capsys) == (
        f"the mask of '{run}' names 'x', which the model its config.yaml describes does not "
        "have in that shape; is the run intact?")


def test_a_weights_file_that_is_not_weights_is_one_line(made, tmp_path, capsys):
    import torch

    run = _copy(made / "run", tmp_path / "run")
    torch.save([1, 2], run / rundir.BEST)
    assert refused(["eval", run], capsys) == (
        f"'{run / rundir.BEST}' is not a weights file (layer names mapped to tensors; it holds "
        "a list); restore the run directory's file")


def test_a_config_yaml_no_config_may_hold_names_the_file(made, tmp_path, capsys):
    run = _copy(made / "run", tmp_path / "run")
    config = yaml.safe_load((run / rundir.CONFIG).read_text())
    config["train"] = 5
    (run / rundir.CONFIG).write_text(yaml.safe_dump(config))
    assert refused(["eval", run], capsys) == (
        f"'{run / rundir.CONFIG}' is damaged (train must be a mapping, got 5); restore it")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("garbage"), "is not an SQLite database (an Optuna study); restore "
                                        "it or use another --out"),
    (lambda p: p.mkdir(), "is a directory, not an Optuna study database; remove it or use "
                          "another --out"),
    (lambda p: os.mkfifo(p), "is a fifo, not an Optuna study database; remove it or use "
                             "another --out"),
])
def test_a_study_database_that_is_not_one_is_one_line(tmp_path, make, message, capsys):
    pytest.importorskip("optuna")
    study = tmp_path / "study"
    study.mkdir()
    make(study / rundir.STUDY_DB)
    assert refused(["tune", *TINY, "--trials", "1", "--out", study], capsys) == (
        f"'{study / rundir.STUDY_DB}' {message}")
    assert not (study / rundir.TRIALS).exists()


@pytest.mark.parametrize("line, message", [
    ("out: 5", "'out' in '{file}' must be a directory path, got 5"),
    ("out: ''", "'out' in '{file}' must be a directory path, got ''"),
    ("ray: {cpus_per_task: .inf}", "ray.cpus_per_task must be a number (cpus > 0, gpus >= 0), "
                                   "got inf"),
])
def test_a_hostile_sweep_file_is_one_line(tmp_path, line, message, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"grid: {{seeds: [0]}}\n{line}\n")
    assert refused(["sweep", path, "--engine", "local"], capsys) == message.format(file=path)


def test_a_users_own_files_of_those_names_do_not_make_a_directory_someone_elses(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in (rundir.CONFIG, rundir.SWEEP, rundir.EXPERIMENT, rundir.STUDY_DB):
        (project / name).write_text("train: {iterations: 10}\n")  # e.g. a config to --config
    assert rundir.kind_of(project) is None
    rundir.check_out_dir(project / "runs" / "a", "run")  # no refusal: the folder is the user's
    rundir.check_out_file(project / "model.smz", "model.smz")
