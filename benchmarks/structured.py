"""Structured tickets: fine-tuning step time of a dense Conv4 vs its 50%-filter compaction.

A filter-pruned ticket (``prune.structure=filters``) exports as a physically smaller dense Conv4
(``sparsemeta export``); this measures what that buys on the device. One step = MAML's inner
step on a 5-way K-shot support set (forward, cross-entropy, all gradients, SGD update), in the
NumPy edge runtime and in PyTorch on the CPU, for Conv4-F (the dense model, F filters) and
Conv4-F/2 (the compacted ticket with 50% of the filters of every layer removed). Every
measurement runs in a fresh process pinned to one CPU (``--cpu``, default 0: pick an idle one on
a shared machine) with one BLAS/OpenMP thread, and the ratios compare numbers measured in the
same run. Each pair is measured ``--repeat`` times in alternating order (dense, 50%, 50%, dense,
…) and each variant keeps its fastest median: another process on the core only ever slows a
measurement down, so the minimum is the least disturbed one.

"conv" is the time inside the convolutions, forward and backward: in NumPy the runtime's
``conv_forward`` and ``conv_backward_add`` (im2col, GEMMs, col2im), timed around the calls; in
PyTorch ``aten::conv2d`` + ``aten::convolution_backward`` from the profiler (separate,
profiled steps). Removing half the filters halves a hidden layer's inputs and outputs, so its
convolution does a quarter of the work (the first layer, whose inputs are the image, a half).

    python benchmarks/structured.py            # Conv4-32 84×84×3 and Conv4-64 28×28×1, 1/5-shot
    python benchmarks/structured.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edge import CONFIGS, WAYS, pin, run_child

VARIANTS = {"dense": 1, "50% filters": 2}  # name: divisor of the filter count


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def child_numpy(spec: dict) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # the runtime must not need torch
    import numpy as np

    from sparsemeta_edge import nn
    from sparsemeta_edge.nn import Conv4, param_shapes

    size, channels, filters = CONFIGS[spec["config"]]
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in param_shapes(channels, WAYS, size, filters // spec["divisor"],
                                    "maxpool").items():
        if len(shape) >= 2:
            fan = shape[1] * (9 if len(shape) == 4 else 1)
            params[name] = rng.normal(0, np.sqrt(2.0 / fan), size=shape).astype(np.float32)
        else:
            params[name] = (np.ones if name.endswith("bn.weight") else np.zeros)(shape, np.float32)
    conv_seconds = [0.0]

    def timed(fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            conv_seconds[0] += time.perf_counter() - t
            return out
        return wrapper

    nn.conv_forward = timed(nn.conv_forward)  # the block methods look these names up per call
    nn.conv_backward_add = timed(nn.conv_backward_add)
    net = Conv4(params, {}, "maxpool")
    n = WAYS * spec["shots"]
    x = rng.normal(size=(n, channels, size, size)).astype(np.float32)
    y = np.arange(n) % WAYS
    steps, convs = [], []
    for i in range(spec["steps"] + 2):  # two warm-up steps
        conv_seconds[0] = 0.0
        t = time.perf_counter()
        net.sgd_step(x, y, 0.01)
        if i >= 2:
            steps.append(time.perf_counter() - t)
            convs.append(conv_seconds[0])
    return {"step": _median(steps), "conv": _median(convs)}


def child_torch(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from sparsemeta.meta.core import MetaLearner
    from sparsemeta.models.conv4 import Conv4

    torch.set_num_threads(1)
    size, channels, filters = CONFIGS[spec["config"]]
    torch.manual_seed(0)
    model = Conv4(channels, WAYS, size, filters // spec["divisor"], "maxpool")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    learner = MetaLearner(model, inner_lr=0.01, inner_steps=1)
    n = WAYS * spec["shots"]
    x = torch.randn(n, channels, size, size)
    y = torch.arange(n) % WAYS

    def step() -> None:  # the inner step of MetaLearner.evaluate_task (no second-order graph)
        loss = F.cross_entropy(learner.logits(params, x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p.sub_(0.01 * g)

    steps = []
    for i in range(spec["steps"] + 2):
        t = time.perf_counter()
        step()
        if i >= 2:
            steps.append(time.perf_counter() - t)
    convs = []
    for _ in range(spec["steps"]):  # one profiled step at a time: the median, as for NumPy
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        convs.append(1e-6 * sum(e.cpu_time_total for e in prof.key_averages()
                                if e.key in ("aten::conv2d", "aten::convolution_backward")))
    return {"step": _median(steps), "conv": _median(convs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU to pin measurements to")
    parser.add_argument("--repeat", type=int, default=None,
                        help="measurements per variant, alternating (default 3; --quick 1)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    pin(args.cpu)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps((child_numpy if spec["runtime"] == "numpy" else child_torch)(spec)))
        return 0

    steps = args.steps or (5 if args.quick else 15)
    repeat = args.repeat or (1 if args.quick else 3)
    print(f"one core (CPU {args.cpu}), 1 thread, median of {steps} steps after 2 warm-up, fastest "
          f"of {repeat} alternating measurements; ms per "
          "fine-tuning step (whole) and inside the convolutions (conv); speed-up = dense / 50%")
    head = (f"{'config':<18} {'shots':>5} {'runtime':<7} {'dense ms':>9} {'50% ms':>8} "
            f"{'speed-up':>8} {'conv dense':>10} {'conv 50%':>9} {'conv speed-up':>13}")
    print(head)
    print("-" * len(head))
    rows = []
    for config in CONFIGS:
        for shots in (1, 5):
            for runtime in ("numpy", "torch"):
                spec = {"config": config, "shots": shots, "steps": steps, "runtime": runtime,
                        "cpu": args.cpu}
                runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
                for r in range(repeat):
                    for v in (VARIANTS if r % 2 == 0 else reversed(list(VARIANTS))):
                        runs[v].append(run_child(__file__, {**spec, "divisor": VARIANTS[v]},
                                                 "--cpu", str(spec["cpu"])))
                got = {v: {key: min(m[key] for m in ms) for key in ("step", "conv")}
                       for v, ms in runs.items()}
                dense, half = got["dense"], got["50% filters"]
                row = {**spec, **got, "speedup": dense["step"] / half["step"],
                       "conv_speedup": dense["conv"] / half["conv"]}
                rows.append(row)
                print(f"{config:<18} {shots:>5} {runtime:<7} {1e3 * dense['step']:>9.2f} "
                      f"{1e3 * half['step']:>8.2f} {row['speedup']:>7.2f}× "
                      f"{1e3 * dense['conv']:>10.2f} {1e3 * half['conv']:>9.2f} "
                      f"{row['conv_speedup']:>12.2f}×", flush=True)
    for runtime in ("numpy", "torch"):
        mine = [r for r in rows if r["runtime"] == runtime]
        print(f"{runtime}: whole-step speed-up {min(r['speedup'] for r in mine):.2f}–"
              f"{max(r['speedup'] for r in mine):.2f}×, conv speed-up "
              f"{min(r['conv_speedup'] for r in mine):.2f}–"
              f"{max(r['conv_speedup'] for r in mine):.2f}× (target ≥ 2× for the conv part)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
