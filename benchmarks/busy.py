"""Does a run survive a busy machine? Seconds per meta-iteration of a short ``sparsemeta train``
(the default run's model: glyphs, Conv4-32, second-order MAML, meta-batch 8) on an idle machine
and while ``--busy`` other processes spin on the cores — issue #14, deliverable 4.

    python benchmarks/busy.py [--busy N] [--iterations N] [--repeats N] [--tree PATH ...]
                              [--set KEY=VALUE ...]

Every measurement is a fresh ``sparsemeta train`` process; its time is the run's own
``train_seconds`` (eval.json: meta-training and validation, not start-up or the test
evaluation), divided by the iterations. Idle and busy measurements are interleaved, medians over
the repeats. ``--tree`` adds another source tree (e.g. a ``git worktree`` of an older commit),
run with its ``src`` first on PYTHONPATH, so a slowdown before and after a change is measured
the same way in the same session. The busy processes are plain Python loops (one core each),
started before and killed after each busy measurement.

Why it matters: OpenMP's intra-op threads wait for each other at barriers by spinning; when
another process holds a core, every barrier waits for a descheduled thread, and a run that took
0.3 s per iteration was measured at 2 s. sparsemeta computes tasks on task threads with one
intra-op thread each (``train.threads``), which have no barriers to wait at.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def train_seconds(tree: Path, iterations: int, overrides: list[str], out: Path) -> float:
    """Seconds per meta-iteration of one fresh ``sparsemeta train`` from ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    sets = [f"train.iterations={iterations}", f"train.val_every={iterations}",
            f"train.checkpoint_every={iterations}", "eval.tasks=20", *overrides]
    cmd = [sys.executable, "-m", "sparsemeta", "train", "--config", "glyphs-lottery",
           "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "eval.json").read_text())["train_seconds"] / iterations


def measure(tree: Path, busy: int, iterations: int, overrides: list[str]) -> float:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return train_seconds(tree, iterations, overrides, Path(tmp) / "run")
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busy", type=int, default=2, help="spinning processes (default 2)")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree", action="append", default=[],
                    help="another source tree to measure the same way (repeatable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a config override for every run")
    args = ap.parse_args()
    trees = [HERE, *(Path(t).resolve() for t in args.tree)]
    print(f"{os.cpu_count()} CPUs, {args.busy} busy processes, {args.iterations} iterations, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    train_seconds(trees[0], 2, args.overrides, Path(tempfile.mkdtemp()) / "warm")  # data cache
    results: dict[tuple[Path, int], list[float]] = {}
    t0 = time.time()
    for rep in range(args.repeats):
        for tree in trees:
            for busy in ((0, args.busy) if rep % 2 == 0 else (args.busy, 0)):
                s = measure(tree, busy, args.iterations, args.overrides)
                results.setdefault((tree, busy), []).append(s)
                print(f"  [{time.time() - t0:5.0f}s] rep {rep} {tree.name} busy {busy}: "
                      f"{s:.3f} s/iteration", flush=True)
    print(f"\n{'tree':24s} {'idle s/it':>10s} {'busy s/it':>10s} {'busy ÷ idle':>12s}")
    for tree in trees:
        idle = statistics.median(results[(tree, 0)])
        loaded = statistics.median(results[(tree, args.busy)])
        print(f"{str(tree)[-24:]:24s} {idle:10.3f} {loaded:10.3f} {loaded / idle:12.2f}")


if __name__ == "__main__":
    main()
