"""Data-parallel meta-training on the gloo backend equals one process with the same meta-batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sparsemeta.config import build_config
from sparsemeta.training.distributed import init_from_env, shutdown
from sparsemeta.training.loop import train_config as train
from tests.conftest import make_data

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=4",
             "train.meta_batch=4", "train.val_every=2", "train.val_tasks=6", "eval.tasks=7",
             "train.checkpoint_every=2", "data.queries=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads() -> list[str]:
    """The names of this process's native threads (Linux; empty elsewhere)."""
    tasks = Path("/proc/self/task")
    return [(d / "comm").read_text().strip() for d in tasks.iterdir()] if tasks.is_dir() else []


def _rank(rank: int, world: int, port: int, out: str, extra: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"))
    try:
        train(build_config(overrides=OVERRIDES + extra), out, data=make_data(), progress=False)
    finally:
        shutdown()
    # what is still running when the rank exits (the gloo threads must be gone by now)
    (Path(out).parent / f"threads_{Path(out).name}_{rank}.txt").write_text("\n".join(_threads()))


def _two_ranks(out: Path, extra: list[str]) -> None:
    mp.spawn(_rank, args=(2, _free_port(), str(out), extra), nprocs=2, join=True)


@pytest.mark.parametrize("extra", [[], ["meta.algorithm=mamlpp", "mamlpp.epoch_iterations=2"]])
def test_two_gloo_processes_give_the_single_process_result(tmp_path, extra):
    single = train(build_config(overrides=OVERRIDES + extra), tmp_path / "one", data=make_data(),
                   progress=False)
    _two_ranks(tmp_path / "two", extra)
    both = json.loads((tmp_path / "two" / "eval.json").read_text())
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:  # the same updates; only the order of the gradient sum differs …
        if k.endswith("conv.bias"):
            # … which matters only for a conv bias followed by batch norm: its true gradient is
            # 0, so it gets rounding noise that Adam scales to ±lr steps (one process too, when
            # the tasks are summed in another order), and batch norm removes it from the output
            continue
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert both["meta_tasks"] == single.meta_tasks == 16
    assert both["tasks"] == single.evaluation.tasks == 7  # every test task once, from both ranks
    assert both["accuracy"] == pytest.approx(single.evaluation.accuracy, abs=1e-9)
    assert both["val_accuracy"] == pytest.approx(single.val_accuracy, abs=1e-9)
    # only rank 0 wrote: one metrics line per iteration, with the whole meta-batch's loss
    lines = [json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(ln) for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["split"] == "train"]
    assert [r["iteration"] for r in train_lines] == [1, 2, 3, 4]
    for r, s in zip(train_lines, [r for r in one if r["split"] == "train"]):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_shutdown_ends_the_gloo_threads_before_the_rank_exits(tmp_path):
    # a group captured by a module torch imports lazily (creating an optimiser imports
    # torch.distributed.nn, whose defaults are group=WORLD) outlived destroy_process_group; its
    # threads then met interpreter shutdown and aborted a rank now and then (SIGABRT in CI)
    _two_ranks(tmp_path / "two", [])
    for rank in (0, 1):
        names = (tmp_path / f"threads_two_{rank}.txt").read_text().split()
        assert names and not [n for n in names if "gloo" in n], names


def test_distributed_run_resumes_from_a_checkpoint(tmp_path):
    _two_ranks(tmp_path / "two", [])
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    final = ckpt["model"]
    # roll back to the iteration-2 checkpoint state by re-running from scratch to 2 …
    _two_ranks(tmp_path / "half", ["train.iterations=2"])
    # … then resuming the same directory to 4 iterations under a config that only differs there
    half_cfg = tmp_path / "half" / "config.yaml"
    half_cfg.write_text(half_cfg.read_text().replace("iterations: 2", "iterations: 4"))
    (tmp_path / "half" / "eval.json").unlink()
    _two_ranks(tmp_path / "half", [])
    resumed = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=False)["model"]
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], rtol=0, atol=0)


def test_more_processes_than_tasks_is_refused(tmp_path):
    script = (
        "import os, torch\n"
        "from sparsemeta.config import build_config\n"
        "from sparsemeta.training.distributed import init_from_env, shutdown\n"
        "from sparsemeta.foundations.errors import UserError\n"
        "from sparsemeta.training.loop import train_config as train\n"
        "from tests.conftest import make_data\n"
        "init_from_env(torch.device('cpu'))\n"
        "try:\n"
        f"    train(build_config(overrides={OVERRIDES + ['train.meta_batch=1']!r}), "
        f"{str(tmp_path / 'r')!r}, data=make_data(), progress=False)\n"
        "except UserError as e:\n"
        "    print('refused:', e)\n"
        "finally:\n"
        "    shutdown()\n"
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1]) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("2 processes but train.meta_batch=1" in o for o in outs)
    assert not (tmp_path / "r").exists()
