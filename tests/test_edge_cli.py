"""``sparsemeta-edge`` refuses bad input in one line, exit 2, before any work and losing nothing:
output paths, option values (negative ones included), sizes, class folders, and files that are
not regular files. NumPy only (no torch), as on a device."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsemeta_edge import cli, smz
from sparsemeta_edge.budget import MIN_RAM_BYTES, parse_size
from sparsemeta_edge.cli import main as edge_main
from sparsemeta_edge.errors import EdgeError
from sparsemeta_edge.files import read_regular
from tests.edge_images import image_folder
from tests.test_edge_device import make_model

EDGE_SRC = str(Path(__file__).resolve().parents[1] / "edge" / "src")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A 50%-sparse Conv4-8 model and a 3-class folder of 5 images each."""
    man, params, masks, _ = make_model(filters=8, density=0.5)
    smz.save(tmp_path / "m.smz", man, params, masks)
    return tmp_path / "m.smz", image_folder(tmp_path / "data", classes=3, per_class=5)


def refused(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> str:
    """Run the CLI: exit 2, one line on stderr holding ``needle``, nothing on stdout (no work
    was started: fine-tuning prints its first line after the images are read)."""
    assert edge_main(argv) == 2, argv
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "", (argv, captured.out)
    assert err.count("\n") == 1 and err.startswith("sparsemeta-edge"), (argv, err)
    assert needle in err, (argv, err)
    return err


def _tune(model: Path, data: Path, *more: str) -> list[str]:
    return ["finetune", str(model), "--data", str(data), "--epochs", "1", *more]


# -- output paths: checked before the model is trained ----------------------------------------
def test_every_kind_of_bad_output_path_is_refused_before_training(setup, tmp_path, capsys):
    model, data = setup
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo.smz")
    os.link(model, tmp_path / "hard.smz")
    (tmp_path / "link.smz").symlink_to(model)
    cases = {
        str(tmp_path / "outdir"): "is a directory; give a file name such as",
        str(tmp_path / "outdir") + "/": "is a directory",
        str(tmp_path / "nodir" / "t.smz"): "does not exist; create it",
        str(tmp_path / "afile" / "t.smz"): "is not a directory",
        "/dev/null": "is a character device, not a regular file",
        str(tmp_path / "fifo.smz"): "is a fifo, not a regular file",
        str(model): "is the input model",
        str(tmp_path / "hard.smz"): "is the input model",  # the same file by another name
        str(tmp_path / "link.smz"): "is the input model",
        str(tmp_path / "t.png"): "must end in .smz",
        str(tmp_path / ("a" * 300 + ".smz")): "more than the 255 the file system allows",
        "/proc/t.smz": "cannot write in directory '/proc'",
        "": "--out is empty",
        ".": "names a directory",
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, needle in cases.items():
        refused(_tune(model, data, "--out", out), needle, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written or removed
    assert list((tmp_path / "outdir").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_directory_or_read_only_file_is_refused_before_training(setup, tmp_path,
                                                                              capsys):
    model, data = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "ro.smz").write_bytes(b"")
    (tmp_path / "ro.smz").chmod(0o444)
    locked.chmod(0o555)
    try:
        refused(_tune(model, data, "--out", str(locked / "t.smz")), "cannot write in directory",
                capsys)
        refused(_tune(model, data, "--out", str(tmp_path / "ro.smz")), "is read-only", capsys)
    finally:
        locked.chmod(0o755)


def test_a_write_that_fails_after_training_keeps_the_model_elsewhere(setup, tmp_path, capsys,
                                                                     monkeypatch):
    """The disk fills up while the model trains: the save fails after all, in one line, no
    half-written file is left, and the fine-tuned model is written to the temporary directory
    instead (named in that line) — the training is not lost."""
    model, data = setup
    out, rescue_dir = tmp_path / "out" / "t.smz", tmp_path / "rescue"
    out.parent.mkdir()
    rescue_dir.mkdir()
    write = smz._atomic_write

    def full_disk(path: Path, chunks: list[bytes]) -> None:
        if path.parent == out.parent:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, chunks)

    monkeypatch.setattr(smz, "_atomic_write", full_disk)
    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(rescue_dir))
    assert edge_main(_tune(model, data, "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "nothing was written" in err
    assert list(out.parent.iterdir()) == []
    (saved,) = rescue_dir.iterdir()
    assert f"saved as '{saved}' instead" in err
    tuned = smz.load(saved)
    assert tuned.manifest.finetuned.epochs == 1 and tuned.manifest.class_names == (
        "class_a", "class_b", "class_c")
    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(out.parent))  # full as well
    assert edge_main(_tune(model, data, "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be saved elsewhere either" in err
    assert list(out.parent.iterdir()) == []


def test_too_little_free_space_is_refused_before_training(setup, tmp_path, capsys, monkeypatch):
    model, data = setup
    monkeypatch.setattr(cli, "free_bytes", lambda directory: 1000)
    refused(_tune(model, data, "--out", str(tmp_path / "t.smz")),
            "only 1000 bytes are free in", capsys)


def test_other_os_errors_are_one_line(setup, capsys, monkeypatch):
    """Whatever fails between a check and its use (a file removed, an I/O error) is one line
    naming the file, never a traceback."""
    model, _ = setup

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(model))

    monkeypatch.setattr(cli, "load", broken)
    refused(["info", str(model)], f"Input/output error '{model}'", capsys)


# -- option values: all checked before anything is read ----------------------------------------
OPTIONS = [
    (["--epochs", "0"], "--epochs must be an integer from 1"),
    (["--epochs", "-3"], "--epochs must be an integer from 1"),  # a negative value reaches it
    (["--patience", "-2"], "--patience must be"),
    (["--batch", "0"], "--batch must be"),
    (["--holdout", "1"], "--holdout must be a fraction in [0, 1)"),
    (["--holdout", "-0.5"], "--holdout must be"),
    (["--holdout", "nan"], "--holdout must be"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--lr", "0"], "--lr must be"),
    (["--lr", "inf"], "--lr must be"),
    (["--lr", "nan"], "--lr must be"),
    (["--min-delta", "-1"], "--min-delta must be a finite number >= 0"),
    (["--min-delta", "nan"], "--min-delta must be"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
    (["--seed", str(2**40)], "--seed must be"),
    (["--update", "last:5"], "--update must be"),
    (["--epochs", "1e3"], "invalid int value"),
    (["--dtype", "float16"], "invalid choice"),
]


@pytest.mark.parametrize("option,needle", OPTIONS, ids=[" ".join(o) for o, _ in OPTIONS])
def test_finetune_options_are_checked_before_the_model_or_images_are_read(
        option, needle, tmp_path, capsys):
    """Neither the model nor the data exist: the option is what the user hears about."""
    refused(["finetune", str(tmp_path / "no.smz"), "--data", str(tmp_path / "nodata"), *option],
            needle, capsys)


def test_options_are_checked_before_a_bad_image_is_decoded(setup, capsys):
    model, data = setup
    (data / "class_b" / "broken.png").write_bytes(b"not a png")
    refused(_tune(model, data, "--lr", "-1"), "--lr must be", capsys)
    refused(_tune(model, data), "cannot decode image", capsys)


@pytest.mark.parametrize("option,needle", [
    (["--ram", "0"], "0 is 0 bytes"), (["--ram", "0.5"], "0.5 is 0 bytes"),
    (["--ram", "512"], "did you mean 512M?"), (["--ram", "-1M"], "must be a size such as"),
    (["--ram=-1M"], "must be a size such as"), (["--ram", "1e9"], "must be a size such as"),
    (["--ram", "9" * 400], "more memory than any device"), (["--ram", "lots"], "must be a size"),
    (["--images", "0"], "--images must be"), (["--images", "-5"], "--images must be"),
    (["--batch", "-1"], "--batch must be"), (["--update", "most"], "--update must be"),
])
def test_plan_options_are_strict(option, needle, tmp_path, capsys):
    args = {"--ram": "512M", "--images": "10"}
    for flag in ("--ram", "--images"):
        if any(o.startswith(flag) for o in option):
            del args[flag]
    argv = ["plan", str(tmp_path / "no.smz"), *option, *(x for kv in args.items() for x in kv)]
    refused(argv, needle, capsys)


def test_sizes_parse_strictly():
    assert parse_size("1.5G") == 3 << 29 and parse_size("300MiB") == 300 << 20
    assert parse_size("512mb") == parse_size(" 512 M ") == 512 << 20
    assert parse_size("1M") == MIN_RAM_BYTES and parse_size(str(MIN_RAM_BYTES)) == MIN_RAM_BYTES
    for bad in ("0", "0.5", "1023K", "-1M", "1e9", "M", "1.M", "nan", "inf", "1 G B"):
        with pytest.raises(EdgeError, match="--ram"):
            parse_size(bad)


def test_predict_top_and_image_arguments(setup, tmp_path, capsys):
    model, data = setup
    image = str(data / "class_a" / "0.png")
    refused(["predict", str(model), image, "--top", "0"], "--top must be >= 1", capsys)
    refused(["predict", str(model), image, "--top", "-1"], "--top must be >= 1", capsys)
    os.mkfifo(tmp_path / "fifo.png")
    refused(["predict", str(model), image, str(tmp_path / "fifo.png")], "is a fifo", capsys)
    refused(["predict", str(model), image, "/dev/zero"], "is a character device", capsys)
    refused(["predict", str(model), str(tmp_path / "no.png")], "does not exist", capsys)


# -- class folders -----------------------------------------------------------------------------
def test_a_class_folder_without_images_is_refused_not_dropped(setup, capsys):
    """An empty class folder (or one of other files only) would silently change the number of
    classes, and with it the head: refused, naming the folder, before any image is decoded."""
    model, data = setup
    (data / "class_d").mkdir()
    refused(_tune(model, data), f"class folder '{data / 'class_d'}' has no images", capsys)
    (data / "class_d" / "notes.txt").write_text("not an image")
    (data / "class_e").mkdir()
    refused(_tune(model, data), "nor do 1 other(s)", capsys)


def test_bad_files_in_class_folders_are_refused_before_decoding(setup, capsys):
    model, data = setup
    fifo = data / "class_a" / "fifo.png"
    os.mkfifo(fifo)
    refused(_tune(model, data), f"'{fifo}' is a fifo, not a regular file", capsys)
    fifo.unlink()
    (data / "class_a" / "zero.png").symlink_to("/dev/zero")
    refused(_tune(model, data), "is a character device", capsys)
    (data / "class_a" / "zero.png").unlink()
    (data / "class_a" / "gone.png").symlink_to(data / "nothing")
    refused(_tune(model, data), "gone.png' cannot be read (No such file or directory)", capsys)


def test_a_data_path_that_is_a_file_or_missing(setup, capsys):
    model, data = setup
    refused(_tune(model, data / "class_a" / "0.png"), "is not a directory", capsys)
    refused(_tune(model, data.parent / "nodata"), "does not exist", capsys)


# -- files that are not regular files ----------------------------------------------------------
def test_model_paths_that_are_not_regular_files_are_refused_before_reading(tmp_path, capsys):
    """A device, a fifo (whose open would block) or a link to either is refused on its
    descriptor before a byte is read; a regular file larger than any model before it is read;
    a /proc file (size 0, yet content) is read up to the limit only."""
    os.mkfifo(tmp_path / "fifo.smz")
    (tmp_path / "zero.smz").symlink_to("/dev/zero")
    (tmp_path / "dir.smz").mkdir()
    with open(tmp_path / "big.smz", "wb") as fh:
        fh.truncate(smz.MAX_FILE_BYTES + 1)  # sparse: no disk used
    cases = {"/dev/zero": "is a character device, not a regular file; give a model file",
             str(tmp_path / "zero.smz"): "is a character device",
             str(tmp_path / "fifo.smz"): "is a fifo, not a regular file",
             str(tmp_path / "dir.smz"): "is a directory, not a model file",
             str(tmp_path / "big.smz"): "more than any model file (256.0 MiB)",
             str(tmp_path / "none.smz"): "model file '",
             "/proc/self/status": "not a .smz model file (bad magic bytes)"}
    for path, needle in cases.items():
        for command in (["info", path], ["plan", path, "--ram", "1G", "--images", "5"]):
            refused(command, needle, capsys)


def test_reading_stops_at_the_limit_for_files_that_say_they_are_empty(tmp_path):
    with pytest.raises(EdgeError, match="more than 100 bytes"):
        read_regular("/proc/self/maps", 100, "model file")  # declares 0 bytes, holds more
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_regular(tmp_path / "f", 100, "model file") == b"x" * 100


def test_the_command_itself_exits_2_with_one_line_on_a_device(tmp_path):
    """The installed entry point (a process of its own, with a time limit: reading /dev/zero
    to the end would never return)."""
    for argv in (["info", "/dev/zero"], ["plan", "/dev/zero", "--ram", "-1M", "--images", "1"]):
        proc = subprocess.run([sys.executable, "-m", "sparsemeta_edge", *argv],
                              capture_output=True, text=True, timeout=30,
                              env={"PYTHONPATH": EDGE_SRC, "PATH": "/usr/bin"})
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc


def test_control_characters_in_folder_names_are_shown_escaped(setup, tmp_path, capsys):
    model, data = setup
    evil = data / "class_\x1b[2Jx"
    (data / "class_c").rename(evil)
    assert edge_main(_tune(model, data, "--out", str(tmp_path / "t.smz"))) == 0
    tuned = smz.load(tmp_path / "t.smz")
    assert "class_\x1b[2Jx" in tuned.manifest.class_names
    capsys.readouterr()
    assert edge_main(["info", str(tmp_path / "t.smz")]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "class_\\x1b[2Jx" in shown
    assert np.isfinite(tuned.params["head.weight"]).all()
