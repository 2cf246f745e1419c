"""The edge runtime on an emulated Raspberry Pi Zero CPU (ARMv6, 512 MB): ``pytest -m arm``.

Runs ``benchmarks/arm.sh`` (Debian armel root under ``qemu-arm -cpu arm1176``; the first run
builds and caches the root, ~25 min; later runs ~10-13 min) and asserts its PASS: the same
probabilities as on x86 within 1e-4, one fine-tuning step's gradients within 1e-4 (relative),
fine-tuning with early stopping, every emulated command under a 512 MiB limit.
Skipped where the script's prerequisites are missing (not root, no qemu-user-static or
debootstrap, binfmt_misc not mountable): the script then exits 77 with one line saying what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.arm

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "arm.sh"
SKIP = 77  # the script's exit status for a missing prerequisite


def test_edge_runtime_matches_x86_on_emulated_pi_zero(tmp_path, request):
    if "arm" not in (request.config.getoption("markexpr", "") or ""):
        pytest.skip("emulated ARM run (minutes): select it with -m arm")
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs Linux and root (debootstrap, chroot, cgroups)")
    for tool in ("qemu-arm-static", "debootstrap", "chroot"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install qemu-user-static debootstrap)")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "arm")],
                          capture_output=True, text=True, env=env, timeout=3 * 3600)
    if proc.returncode == SKIP:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    tail = (proc.stdout[-4000:] + proc.stderr[-2000:])
    assert proc.returncode == 0, tail
    assert "\nPASS: " in proc.stdout, tail
    result = json.loads((tmp_path / "arm" / "results.json").read_text())
    assert result["status"] == "PASS" and result["uname_m"] == "armv6l"
    inference = [c for k, c in result["checks"].items() if not k.startswith("fine-tuned on ARM")]
    assert inference and all(c["ok"] and c["max_abs_diff"] <= 1e-4 for c in inference)
    assert result["gradients"]["ok"] and result["gradients"]["max_rel_err_arm_f32"] <= 1e-4
    assert result["finetune"]["epoch_seconds_arm"], "no fine-tuning epoch was logged"
    assert all(m["exit"] == 0 and not m["oom_kills"] for m in result["memory"].values())
