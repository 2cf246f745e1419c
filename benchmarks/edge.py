"""NumPy edge runtime vs PyTorch CPU: time per fine-tuning step and peak memory, on one core.

One step = MAML's inner step on a 5-way K-shot support set: forward, cross-entropy, gradients of
all parameters, masked SGD update. Conv4-32 on 84×84×3 (mini-ImageNet) and Conv4-64 on 28×28×1
(Omniglot), 1 and 5 shots, densities 100/50/20/10%. Every measurement runs in a fresh process
pinned to CPU 0 with one BLAS/OpenMP thread, so peak RSS (``ru_maxrss``) is that runtime's own;
the NumPy process makes ``import torch`` fail, so it cannot lean on torch by accident.

Targets: NumPy ≤ 1.5× PyTorch's time per step, ≤ 100 MB peak RSS.

Sparsity: the NumPy runtime computes dense (pruned weights are zeros). With NumPy only, the one
way to save work on unstructured sparsity is to drop im2col columns (input channel × tap) whose
weights are pruned in every filter; the benchmark reports the share of GEMM columns that would
save (``skip%``) so the decision is measured, not guessed.

    python benchmarks/edge.py            # full grid (~3-4 min on one core)
    python benchmarks/edge.py --quick    # fewer steps, densities 100% and 10%

``--finetune MODEL.smz`` measures ``sparsemeta-edge finetune`` itself instead, once per
``--update`` mode, each in a fresh process (torch unimportable) on a synthetic class folder:
the interpreter's baseline RSS (after imports), the peak RSS, the runtime's own share (peak −
baseline), seconds per epoch, and ``sparsemeta-edge plan``'s estimate against the measured
peak (target: within 6%). ``--finetune synthetic:SIZExCHANNELS`` (e.g. ``synthetic:84x3``)
writes a random 20%-density Conv4-32 ticket of that input size first.

    python benchmarks/edge.py --finetune model.smz --images 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {  # name: (image size, channels, filters)
    "conv4-32@84x84x3": (84, 3, 32),
    "conv4-64@28x28x1": (28, 1, 64),
}
WAYS = 5
SRC = Path(__file__).resolve().parents[1] / "src"
EDGE_SRC = Path(__file__).resolve().parents[1] / "edge" / "src"
ENV_THREADS = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def pin(cpu: int = 0) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _peak_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _timed(step, steps: int) -> float:  # noqa: ANN001
    """Median seconds per step after two warm-up steps (robust to a busy machine)."""
    step()
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def child_numpy(spec: dict) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # the runtime must not need torch
    import numpy as np

    from sparsemeta_edge.nn import Conv4, param_shapes

    size, channels, filters = CONFIGS[spec["config"]]
    rng = np.random.default_rng(0)
    params, masks = {}, {}
    for name, shape in param_shapes(channels, WAYS, size, filters, "maxpool").items():
        if len(shape) >= 2:
            fan = shape[1] * (9 if len(shape) == 4 else 1)
            w = rng.normal(0, np.sqrt(2.0 / fan), size=shape).astype(np.float32)
            m = rng.random(shape) < spec["density"]
            params[name], masks[name] = w * m, m
        else:
            params[name] = (np.ones if name.endswith("bn.weight") else np.zeros)(shape, np.float32)
    net = Conv4(params, masks, "maxpool")
    n = WAYS * spec["shots"]
    x = rng.normal(size=(n, channels, size, size)).astype(np.float32)
    y = np.arange(n) % WAYS
    seconds = _timed(lambda: net.sgd_step(x, y, 0.01), spec["steps"])
    dead = total = 0
    for i in range(4):  # im2col columns (c, kh, kw) pruned in every filter
        m = masks[f"blocks.{i}.conv.weight"]
        dead += int((~m.any(axis=0)).sum())
        total += m[0].size
    return {"seconds": seconds, "peak_mb": _peak_mb(), "skip_fraction": dead / total}


def child_torch(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from sparsemeta.meta.core import MetaLearner
    from sparsemeta.models.conv4 import Conv4
    from sparsemeta.sparsity.masks import prunable_names

    torch.set_num_threads(1)
    size, channels, filters = CONFIGS[spec["config"]]
    torch.manual_seed(0)
    model = Conv4(channels, WAYS, size, filters, "maxpool")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    mask = {k: torch.rand(params[k].shape) < spec["density"] for k in prunable_names(params)}
    learner = MetaLearner(model, inner_lr=0.01, inner_steps=1, mask=mask)
    n = WAYS * spec["shots"]
    x = torch.randn(n, channels, size, size)
    y = torch.arange(n) % WAYS

    def step() -> None:  # the inner step of MetaLearner.evaluate_task (no second-order graph)
        loss = F.cross_entropy(learner.logits(params, x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p.sub_(0.01 * g)

    return {"seconds": _timed(step, spec["steps"]), "peak_mb": _peak_mb()}


def run_child(script: str, spec: dict, *args: str) -> dict:
    """Run one measurement of ``script --child SPEC`` in a fresh, single-threaded process (it
    pins itself); its last output line is the JSON result."""
    env = {**os.environ, **ENV_THREADS, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(SRC), str(EDGE_SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, script, *args, "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


UPDATE_MODES = ("head", "bn", "last:1", "last:2", "all")
FINETUNE_TARGETS_MB = {"head": 40, "all": 64}  # the runtime's own peak (above the baseline)
PLAN_TOLERANCE = 0.06  # plan/peak measured within 4% at batch 25 (edge/README.md)


def child_finetune(spec: dict) -> dict:
    """One ``sparsemeta-edge finetune`` run through its CLI: baseline, peak, time per epoch."""
    import contextlib
    import io
    import re

    sys.modules["torch"] = None  # type: ignore[assignment]
    import numpy as np  # noqa: F401  (the baseline includes what the CLI imports)
    import PIL.Image  # noqa: F401

    from sparsemeta_edge import cli, data, runtime  # noqa: F401
    from sparsemeta_edge.budget import estimate
    from sparsemeta_edge.smz import load

    baseline = runtime.peak_rss_mb()
    out = io.StringIO()
    argv = ["finetune", spec["model"], "--data", spec["data"], "--epochs", str(spec["epochs"]),
            "--patience", str(spec["epochs"]), "--batch", str(spec["batch"]), "--update",
            spec["update"], "--out", spec["out"]]
    with contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    if rc:
        raise RuntimeError(f"finetune failed ({rc}): {out.getvalue()[-500:]}")
    peak = runtime.peak_rss_mb()
    times = [float(t) for t in re.findall(r"time (\d+\.\d+)s", out.getvalue())]
    plan = estimate(load(spec["model"]), spec["images"], spec["update"], spec["batch"])
    return {"baseline_mb": baseline, "peak_mb": peak, "epoch_s": sorted(times)[len(times) // 2],
            "estimate_mb": plan.total / 2**20, "parts": plan.parts}


def _synthetic_ticket(spec: str, path: Path) -> str:
    """A random 20%-density Conv4-32 ticket for SIZExCHANNELS inputs (e.g. 84x3)."""
    import numpy as np

    from sparsemeta_edge import smz
    from sparsemeta_edge.manifest import Architecture, InputSpec, Manifest
    from sparsemeta_edge.nn import is_prunable, param_shapes

    size, channels = (int(v) for v in spec.split(":", 1)[1].split("x"))
    rng = np.random.default_rng(0)
    params, masks = {}, {}
    for name, shape in param_shapes(channels, WAYS, size, 32, "maxpool").items():
        params[name] = (rng.normal(0, 0.1, shape) + (name.endswith("bn.weight"))).astype(np.float32)
        if is_prunable(name, shape):
            masks[name] = rng.random(shape) < 0.2
            params[name] *= masks[name]
    man = Manifest(Architecture(in_channels=channels, image_size=size, filters=32,
                                downsample="maxpool", ways=WAYS),
                   inner_lr=0.01, eval_inner_steps=5, bn="transductive",
                   input=InputSpec(mean=(0.5,) * channels, std=(0.25,) * channels))
    smz.save(path, man, params, masks)
    return str(path)


def _image_folder(root: Path, images: int, size: int, channels: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class_{i % WAYS}"
        folder.mkdir(parents=True, exist_ok=True)
        shape = (size, size) if channels == 1 else (size, size, channels)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")


def finetune_table(model: str, images: int, batch: int, epochs: int) -> bool:
    """Measure every update mode; print the table; True if every target is met."""
    import tempfile

    from sparsemeta_edge.smz import load

    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    if model.startswith("synthetic:"):
        model = _synthetic_ticket(model, work / "synthetic.smz")
    arch = load(model).manifest.architecture
    _image_folder(work / "data", images, arch.image_size, arch.in_channels)
    print(f"{model}: {images} images {arch.in_channels}×{arch.image_size}², batch {batch}, "
          f"{epochs} epochs; one core; MB = MiB")
    head = (f"{'update':<7} {'baseline':>8} {'peak':>7} {'own':>7} {'target':>6} {'s/epoch':>8} "
            f"{'plan':>7} {'plan/peak':>9}  ok")
    print(head + "\n" + "-" * len(head))
    ok_all = True
    for mode in UPDATE_MODES:
        spec = {"runtime": "finetune", "model": model, "data": str(work / "data"),
                "update": mode, "images": images, "batch": batch, "epochs": epochs,
                "out": str(work / "tuned.smz")}
        r = run_child(__file__, spec)
        own = r["peak_mb"] - r["baseline_mb"]
        ratio = r["estimate_mb"] / r["peak_mb"]
        target = FINETUNE_TARGETS_MB.get(mode)
        ok = abs(ratio - 1) <= PLAN_TOLERANCE and (target is None or own <= target)
        ok_all &= ok
        print(f"{mode:<7} {r['baseline_mb']:>8.1f} {r['peak_mb']:>7.1f} {own:>7.1f} "
              f"{'' if target is None else target:>6} {r['epoch_s']:>8.3f} "
              f"{r['estimate_mb']:>7.1f} {ratio:>9.2f}  {'yes' if ok else 'NO'}", flush=True)
    return ok_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps; densities 100%% and 10%%")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--finetune", default=None, metavar="MODEL",
                        help="measure sparsemeta-edge finetune per --update mode on MODEL.smz "
                             "(or synthetic:84x3)")
    parser.add_argument("--images", type=int, default=100, help="images for --finetune")
    parser.add_argument("--batch", type=int, default=25, help="batch for --finetune")
    parser.add_argument("--epochs", type=int, default=3, help="epochs for --finetune")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    pin()
    if args.child:
        spec = json.loads(args.child)
        children = {"numpy": child_numpy, "torch": child_torch, "finetune": child_finetune}
        print(json.dumps(children[spec["runtime"]](spec)))
        return 0
    if args.finetune:
        return 0 if finetune_table(args.finetune, args.images, args.batch, args.epochs) else 1

    densities = (1.0, 0.1) if args.quick else (1.0, 0.5, 0.2, 0.1)
    steps = args.steps or (5 if args.quick else 15)
    print(f"one core (CPU 0), 1 thread, median of {steps} steps after 2 warm-up; "
          f"targets: time ratio ≤ 1.5, NumPy peak RSS ≤ 100 MB")
    head = (f"{'config':<18} {'shots':>5} {'density':>7} {'numpy ms':>9} {'torch ms':>9} "
            f"{'ratio':>6} {'numpy MB':>9} {'torch MB':>9} {'skip%':>6}  ok")
    print(head)
    print("-" * len(head))
    rows = []
    for config in CONFIGS:
        for shots in (1, 5):
            for density in densities:
                spec = {"config": config, "shots": shots, "density": density, "steps": steps}
                npy = run_child(__file__, {**spec, "runtime": "numpy"})
                tor = run_child(__file__, {**spec, "runtime": "torch"})
                ratio = npy["seconds"] / tor["seconds"]
                ok = ratio <= 1.5 and npy["peak_mb"] <= 100
                rows.append({**spec, "numpy": npy, "torch": tor, "ratio": ratio, "ok": ok})
                print(f"{config:<18} {shots:>5} {density:>7.0%} {1e3 * npy['seconds']:>9.2f} "
                      f"{1e3 * tor['seconds']:>9.2f} {ratio:>6.2f} {npy['peak_mb']:>9.1f} "
                      f"{tor['peak_mb']:>9.1f} {100 * npy['skip_fraction']:>6.1f}  "
                      f"{'yes' if ok else 'NO'}", flush=True)
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"worst ratio {worst['ratio']:.2f} ({worst['config']}, {worst['shots']}-shot, "
          f"{worst['density']:.0%}); max NumPy peak RSS "
          f"{max(r['numpy']['peak_mb'] for r in rows):.1f} MB; all targets met: "
          f"{all(r['ok'] for r in rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
