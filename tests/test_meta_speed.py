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


def test_the_device_check_judges_float32_against_the_cpus_float32_and_never_refuses(
        meta_speed, monkeypatch):
    """The check a GPU run makes (``--device cuda``), here on the CPU: every path's float32
    meta-gradient deviation from the float64 loop, OK within 3× the CPU's own float32 deviation,
    with the TF32 and bf16 deviations of the package's paths beside it — and a path 3× worse
    than the CPU is flagged, not refused."""
    lines, ok = meta_speed.check_device_float32("cpu", meta_speed.TINY)
    impls = {"loop", "core", "grouped"} | ({"higher"} if meta_speed.HAVE_HIGHER else set())
    assert ok and {line.split()[2] for line in lines} == impls and len(lines) == 2 * len(impls)
    for line in lines:
        assert line.endswith("OK") and 0 < float(line.split("rel. diff ")[1].split()[0]) < 1e-4
        if line.split()[2] in ("loop", "core", "grouped"):
            bf16 = float(line.split("bf16 ")[1].split(")")[0])
            assert bf16 > 100 * float(line.split("cpu float32 ")[1].split(",")[0])
    real = meta_speed._deviation

    def worse_on_the_device(impl, cfg, tasks, order, truth, device, precision="fp32"):
        scale = 4.0 if impl == "grouped" and device == "gpu" and precision == "fp32" else 1.0
        return scale * real(impl, cfg, tasks, order, truth, "cpu", precision)

    monkeypatch.setattr(meta_speed, "_deviation", worse_on_the_device)
    lines, ok = meta_speed.check_device_float32("gpu", meta_speed.TINY, impls=("loop", "grouped"))
    flagged = [line for line in lines if line.endswith("MORE THAN 3x THE CPU")]
    assert not ok and {line.split()[2] for line in flagged} == {"grouped"} and len(flagged) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_device_cuda_without_a_gpu_is_one_clear_line():
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cuda", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--device cuda: torch" in proc.stderr and "sees no CUDA device" in proc.stderr
