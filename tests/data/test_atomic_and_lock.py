"""foundations/atomic.py (mode, directory fsync, stale temporary files) and foundations/lock.py
(an exclusive lock between processes), which the data cache builds on."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sparsemeta.foundations import atomic
from sparsemeta.foundations.atomic import atomic_write_text, remove_stale_temps, temp_path
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.lock import exclusive, holder

SRC = str(Path(atomic.__file__).parents[2])


def test_atomic_write_gives_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temp left


def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced: list[tuple[bool, bool]] = []  # (is a directory, target already renamed)
    real = os.fsync
    target = tmp_path / "x.txt"

    def spy(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.exists()))
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", spy)
    atomic_write_text(target, "hello")
    assert synced == [(False, False), (True, True)]  # the file before, the directory after
    assert target.read_text() == "hello"


def test_failed_write_leaves_neither_file_nor_temp(tmp_path):
    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic.atomic_write(tmp_path / "x.bin", boom)
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temps_removes_only_dead_writers_files(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".cache.npy.{dead}.0123abcd.tmp"
    stale_side = tmp_path / f".cache.npy.{dead}.0123abcd.tmp.raw"
    live = tmp_path / f".cache.npy.{os.getpid()}.89abcdef.tmp"
    others = [tmp_path / "cache.npy", tmp_path / f".other.{dead}.tmp", tmp_path / ".x.lock"]
    for p in [stale, stale_side, live, *others]:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temps(tmp_path)) == sorted([stale, stale_side])
    assert sorted(tmp_path.iterdir()) == sorted([live, *others])
    assert remove_stale_temps(tmp_path / "missing") == []
    # temp_path's names are the ones recognised
    name = temp_path(tmp_path / "f.json").name
    assert name.startswith(f".f.json.{os.getpid()}.") and atomic._TEMP.match(name)


# --------------------------------------------------------------------------- lock

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sparsemeta.foundations.lock import exclusive
    with exclusive(Path(sys.argv[1]), "the test resource", wait=False):
        print("held", flush=True)
        sys.stdin.readline()   # hold until told to release
    print("released", flush=True)
    sys.stdin.readline()
""")


def _start_holder(lock: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_then_waits_then_takes_over(tmp_path):
    lock = tmp_path / ".lock"
    proc = _start_holder(lock)
    try:
        assert holder(lock) == proc.pid
        with pytest.raises(UserError) as err, exclusive(lock, "the test resource", wait=False):
            pytest.fail("entered a lock held by another process")
        msg = str(err.value)
        assert "\n" not in msg and f"the test resource is in use by process {proc.pid}" in msg
        assert "wait for it" in msg
        # wait=True: one line naming the holder, then in once the holder lets go
        proc.stdin.write("release\n")
        proc.stdin.flush()
        log = io.StringIO()
        with exclusive(lock, "the test resource", wait=True, log=log):
            assert holder(lock) == os.getpid()
        assert proc.stdout.readline().strip() == "released"
        assert holder(lock) is None  # emptied on release
        # (the holder may be releasing at that moment: its pid is then already gone)
        lines = log.getvalue().splitlines()
        assert len(lines) <= 1
        assert all(str(proc.pid) in line or "another process" in line for line in lines)
    finally:
        proc.kill()
        proc.wait()


def test_waiting_process_blocks_until_release(tmp_path):
    lock = tmp_path / ".lock"
    proc = _start_holder(lock)
    try:
        log = io.StringIO()
        released_at = []

        def release_later():
            time.sleep(0.4)
            released_at.append(time.monotonic())
            proc.stdin.write("release\n")
            proc.stdin.flush()

        t = threading.Thread(target=release_later)
        t.start()
        with exclusive(lock, "the test resource", wait=True, log=log):
            entered = time.monotonic()
        t.join()
        assert released_at and entered >= released_at[0]
        assert log.getvalue().count("\n") == 1 and f"process {proc.pid}" in log.getvalue()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    lock = tmp_path / ".lock"
    proc = _start_holder(lock)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with exclusive(lock, "the test resource", wait=False):
        assert holder(lock) == os.getpid()


def test_taking_the_same_lock_twice_in_one_process_is_a_bug_not_a_hang(tmp_path):
    with exclusive(tmp_path / ".lock", "x", wait=True), \
            pytest.raises(RuntimeError, match="already holds"), \
            exclusive(tmp_path / ".lock", "x", wait=True):
        pass
    with exclusive(tmp_path / ".lock", "x", wait=False):  # released properly after all that
        pass
