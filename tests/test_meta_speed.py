"""The speed benchmark's correctness part (``benchmarks/meta_speed.py --quick``): every path's
meta-gradient and evaluation equal the per-task loop's in float64, and the core's is
bit-identical for 1 and 2 task threads. ``higher`` is checked where it is installed
(``pip install --no-deps higher``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "meta_speed.py"


@pytest.fixture(scope="module")
def meta_speed():
    spec = importlib.util.spec_from_file_location("meta_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["meta_speed"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("meta_speed", None)


def test_quick_check_every_path_matches_the_loop(meta_speed):
    lines = meta_speed.check_equivalence()
    vs_loop = [line for line in lines if "vs loop" in line and "evaluation" not in line]
    impls = {"core", "core-nhwc", "reference", "grouped", "vmap"} | (
        {"higher"} if meta_speed.HAVE_HIGHER else set())
    assert {line.split()[2] for line in vs_loop} == impls
    assert len(vs_loop) == 2 * len(impls) and all(line.endswith("OK") for line in vs_loop)
    for line in vs_loop:
        assert float(line.split("rel. diff ")[1].split()[0]) <= 1e-10
    threads = [line for line in lines if "threads 1 vs 2" in line]
    assert len(threads) == 4 and all(line.endswith("bit-identical") for line in threads)
    evaluation = [line for line in lines if "evaluation" in line]
    assert {line.split()[2] for line in evaluation} == {"core", "grouped"}
    for line in evaluation:
        assert line.endswith("accuracies equal")
        assert float(line.split("query losses ")[1].split(",")[0]) <= 1e-10


def test_a_wrong_path_is_caught_before_timing(meta_speed, monkeypatch):
    real = meta_speed.reference_meta_gradient_step

    def off_by_a_little(model, tasks, inner_lr, inner_steps, first_order):
        return real(model, tasks, inner_lr * (1 + 1e-6), inner_steps, first_order)

    monkeypatch.setattr(meta_speed, "reference_meta_gradient_step", off_by_a_little)
    with pytest.raises(SystemExit, match=r"reference +vs loop .* MISMATCH"):
        meta_speed.check_equivalence(impls=("core", "reference"))


def test_float32_check_on_a_device_compares_with_the_float64_loop(meta_speed, monkeypatch):
    """The check a GPU run makes before timing (``--device cuda``), here on the CPU: every
    path's float32 meta-gradient within 1e-4 of the float64 loop's — and one off by 1e-3 in
    its inner learning rate is caught."""
    lines = meta_speed.check_device_float32("cpu", meta_speed.TINY)
    impls = {"loop", "core", "grouped"} | ({"higher"} if meta_speed.HAVE_HIGHER else set())
    assert {line.split()[2] for line in lines} == impls and len(lines) == 2 * len(impls)
    for line in lines:
        assert line.endswith("OK") and 0 < float(line.split("rel. diff ")[1].split()[0]) <= 1e-4
    cfg = meta_speed.TINY
    off = type(cfg)(**{**cfg.__dict__, "inner_lr": cfg.inner_lr * (1 + 1e-3)})
    real = meta_speed._grad

    def grad(impl, cfg_, tasks, order, dtype, threads=1, device="cpu"):
        use = off if impl == "grouped" and dtype == torch.float32 else cfg_
        return real(impl, use, tasks, order, dtype, threads, device)

    monkeypatch.setattr(meta_speed, "_grad", grad)
    with pytest.raises(SystemExit, match=r"grouped +float32 on cpu .* MISMATCH"):
        meta_speed.check_device_float32("cpu", cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_device_cuda_without_a_gpu_is_one_clear_line():
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cuda", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--device cuda: torch" in proc.stderr and "sees no CUDA device" in proc.stderr
