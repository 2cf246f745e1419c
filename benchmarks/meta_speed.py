"""Meta-training speed and peak memory: sparsemeta's loop vs. a "common way" reference vs. vmap.

    python benchmarks/meta_speed.py [--quick] [--repeats N] [--device cpu|cuda]

Implementations, all doing one meta-update (meta-batch of tasks → mean meta-gradient → Adam):

* ``loop``      sparsemeta's ``MetaLearner.meta_gradient_step`` (functional, one backward per task);
* ``reference`` the way many MAML repositories do it: per task ``copy.deepcopy`` of a plain
  ``nn.Module`` Conv4 (``nn.BatchNorm2d`` in training mode), its parameters substituted by
  differentiable clones of the meta-parameters, inner SGD via ``torch.autograd.grad``
  (``create_graph`` for second order) written back into ``module._parameters``;
* ``vmap``      ``sparsemeta.meta.batched.vmap_meta_gradient_step`` (all tasks at once).

Every measurement runs in a fresh subprocess (so peak RSS — ``ru_maxrss`` — is that run's own),
interleaved across implementations with a rotating order, and medians over the repeats are
reported. Peak memory is the peak RSS minus the RSS after setup (imports, model, data), i.e. what
the meta-updates themselves add. All subprocesses get the same allocator environment (see
``--malloc``; default: raised mmap/trim thresholds) and the same number of torch threads (default
1: on 2 shared cores, 2 OpenMP threads collapse whenever another process runs). Before timing, the meta-gradients of the three
implementations are checked equal in float64 on a tiny configuration.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsemeta.data.tasks import Task
from sparsemeta.meta.batched import vmap_meta_gradient_step
from sparsemeta.meta.core import MetaLearner
from sparsemeta.models.conv4 import Conv4

IMPLS = ("loop", "reference", "vmap")
ORDERS = ("second", "first")
# Allocator settings applied identically to every subprocess. glibc (2.36) rejects an mmap
# threshold above 32 MiB; a huge trim threshold stops returning the heap top every iteration.
MALLOC_ENVS = {
    "tuned": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**34)},
    "default": {},
}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    channels: int
    image_size: int
    filters: int
    inner_lr: float
    ways: int = 5
    shots: int = 1
    queries: int = 15
    inner_steps: int = 5


CONFIGS = {
    "omniglot-c64-28": BenchConfig("omniglot-c64-28", channels=1, image_size=28, filters=64,
                                   inner_lr=0.4),
    "mini-c32-84": BenchConfig("mini-c32-84", channels=3, image_size=84, filters=32,
                               inner_lr=0.01),
}


# -- the reference: the common deepcopy + substitute-parameters MAML ------------------------------
class RefConv4(nn.Module):
    """Plain Conv4 (conv → nn.BatchNorm2d → ReLU → max-pool) ×4 + linear, as in MAML repos."""

    def __init__(self, in_channels: int, ways: int, image_size: int, filters: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [in_channels] + [filters] * 4
        for i in range(4):
            layers += [nn.Conv2d(channels[i], channels[i + 1], 3, padding=1),
                       nn.BatchNorm2d(channels[i + 1]), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(filters * (image_size // 16) ** 2, ways)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, k) for m in module.modules() for k, p in m._parameters.items() if p is not None]


def reference_clone(model: nn.Module) -> nn.Module:
    """deepcopy for the structure, then differentiable clones of the meta-parameters."""
    clone = copy.deepcopy(model)
    for (m_clone, k), (m_orig, _) in zip(_slots(clone), _slots(model), strict=True):
        m_clone._parameters[k] = m_orig._parameters[k].clone()
    return clone


def reference_meta_gradient_step(model: nn.Module, tasks: list[Task], inner_lr: float,
                                 inner_steps: int, first_order: bool) -> float:
    """Per task: deepcopy, manual SGD steps written back into the clone, query loss backward."""
    total = 0.0
    for task in tasks:
        learner = reference_clone(model)
        for _ in range(inner_steps):
            slots = _slots(learner)
            loss = F.cross_entropy(learner(task.support_x), task.support_y)
            grads = torch.autograd.grad(loss, [m._parameters[k] for m, k in slots],
                                        create_graph=not first_order)
            for (m, k), g in zip(slots, grads, strict=True):
                m._parameters[k] = m._parameters[k] - inner_lr * g
        query_loss = F.cross_entropy(learner(task.query_x), task.query_y)
        (query_loss / len(tasks)).backward()
        total += float(query_loss.detach())
    return total / len(tasks)


# -- data ----------------------------------------------------------------------------------------
def make_tasks(cfg: BenchConfig, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32,
               image_size: int | None = None) -> list[Task]:
    size = image_size or cfg.image_size
    shape = (cfg.channels, size, size)
    tasks = []
    for _ in range(n):
        perm = torch.randperm(cfg.ways, generator=gen)
        tasks.append(Task(
            torch.randn(cfg.ways * cfg.shots, *shape, generator=gen, dtype=dtype),
            perm.repeat_interleave(cfg.shots),
            torch.randn(cfg.ways * cfg.queries, *shape, generator=gen, dtype=dtype),
            perm.repeat_interleave(cfg.queries)))
    return tasks


# -- correctness check (float64, tiny) -----------------------------------------------------------
def check_equivalence() -> list[str]:
    """Loop, vmap and reference meta-gradients on the same weights and tasks, float64."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = BenchConfig("tiny", channels=1, image_size=16, filters=4, inner_lr=0.3, ways=3,
                      queries=3, inner_steps=2)
    torch.manual_seed(0)
    model = Conv4(cfg.channels, cfg.ways, cfg.image_size, filters=cfg.filters).double()
    ref = RefConv4(cfg.channels, cfg.ways, cfg.image_size, cfg.filters).double()
    with torch.no_grad():
        for p_ref, p in zip(ref.parameters(), model.parameters(), strict=True):
            p_ref.copy_(p)
    tasks = make_tasks(cfg, 3, torch.Generator().manual_seed(1), dtype=torch.float64)
    params = dict(model.named_parameters())

    def flat(ps) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in ps])

    lines = []
    for order in ORDERS:
        learner = MetaLearner(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                              first_order=order == "first", bn="transductive")
        grads = {}
        for impl in IMPLS:
            model.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            if impl == "loop":
                learner.meta_gradient_step(params, tasks)
                grads[impl] = flat(params.values())
            elif impl == "vmap":
                vmap_meta_gradient_step(learner, params, tasks)
                grads[impl] = flat(params.values())
            else:
                reference_meta_gradient_step(ref, tasks, cfg.inner_lr, cfg.inner_steps,
                                             first_order=order == "first")
                grads[impl] = flat(ref.parameters())
        base = grads["loop"]
        for impl in ("vmap", "reference"):
            rel = float((grads[impl] - base).norm() / base.norm())
            ok = rel < 1e-9
            lines.append(f"  {order}-order  {impl:9s} vs loop: rel. diff {rel:.1e}  "
                         f"{'OK' if ok else 'MISMATCH'}")
            if not ok:
                raise SystemExit("\n".join(lines) + "\nmeta-gradients differ; not timing")
    torch.set_num_threads(threads)
    return lines


# -- one measurement (runs in its own subprocess) ------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = CONFIGS[spec["config"]]
    device = torch.device(spec["device"])
    first_order = spec["order"] == "first"
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batches = [[t.to(device) for t in make_tasks(cfg, spec["meta_batch"], gen)]
               for _ in range(2)]
    if spec["impl"] == "reference":
        model = RefConv4(cfg.channels, cfg.ways, cfg.image_size, cfg.filters).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def meta_update(tasks: list[Task]) -> None:
            opt.zero_grad(set_to_none=True)
            reference_meta_gradient_step(model, tasks, cfg.inner_lr, cfg.inner_steps, first_order)
            opt.step()
    else:
        model = Conv4(cfg.channels, cfg.ways, cfg.image_size, filters=cfg.filters).to(device)
        params = dict(model.named_parameters())
        learner = MetaLearner(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                              first_order=first_order, bn="transductive")
        opt = torch.optim.Adam(params.values(), lr=1e-3)
        step = (learner.meta_gradient_step if spec["impl"] == "loop"
                else lambda p, t: vmap_meta_gradient_step(learner, p, t))

        def meta_update(tasks: list[Task]) -> None:
            opt.zero_grad(set_to_none=True)
            step(params, tasks)
            opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_setup = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    for i in range(spec["warmup"]):
        meta_update(batches[i % 2])
    sync()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i in range(spec["iters"]):
        meta_update(batches[i % 2])
    sync()
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    peak = usage1.ru_maxrss / 1024  # kB on Linux
    out = {
        "tasks_per_s": spec["iters"] * spec["meta_batch"] / wall,
        "peak_mb": peak - rss_setup,
        "cpu_per_wall": cpu / wall,
        "minflt_per_iter": (usage1.ru_minflt - usage0.ru_minflt) / spec["iters"],
    }
    if device.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    return out


# -- driver --------------------------------------------------------------------------------------
def run_one(spec: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="meta-batch 2, fewer meta-updates per measurement, no warm-up at "
                         "84x84 (< 3 minutes; a smoke test, not for conclusions)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--meta-batch", type=int, default=0, help="tasks per meta-update (default 4)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per subprocess (0: torch default). Default 1: with 2 "
                         "threads, any other process on the cores stalls torch's OpenMP "
                         "barriers (measured 5-20x slower), which swamps the comparison")
    ap.add_argument("--malloc", default="tuned", choices=sorted(MALLOC_ENVS),
                    help="allocator env for every subprocess (default: tuned)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(MALLOC_ENVS[args.malloc])
    args.meta_batch = args.meta_batch or (2 if args.quick else 4)
    # (warm-up, timed) meta-updates per measurement; mini-ImageNet size is ~5x slower per task.
    iters = ({"omniglot-c64-28": (1, 1), "mini-c32-84": (0, 1)} if args.quick
             else {"omniglot-c64-28": (1, 4), "mini-c32-84": (1, 2)})
    configs = args.configs.split(",")
    print(f"torch {torch.__version__}, device {args.device}, torch threads "
          f"{args.threads or torch.get_num_threads()}, meta-batch {args.meta_batch}, "
          f"allocator '{args.malloc}' {MALLOC_ENVS[args.malloc] or '(glibc defaults)'} "
          f"for every subprocess, load avg {os.getloadavg()[0]:.2f}")
    print("equivalence check (float64, Conv4-4 16x16, 3-way, 2 inner steps, 3 tasks):")
    for line in check_equivalence():
        print(line)

    results: dict[tuple[str, str, str], list[dict]] = {}
    t_start = time.time()
    for rep in range(args.repeats):
        for cname in configs:
            warmup, n = iters[cname]
            for order in ORDERS:
                rot = rep % len(IMPLS)
                for impl in IMPLS[rot:] + IMPLS[:rot]:
                    spec = {"config": cname, "order": order, "impl": impl, "warmup": warmup,
                            "iters": n, "meta_batch": args.meta_batch, "device": args.device,
                            "threads": args.threads}
                    r = run_one(spec, env)
                    results.setdefault((cname, order, impl), []).append(r)
                    print(f"  [{time.time() - t_start:6.0f}s] rep {rep} {cname} {order} {impl}: "
                          f"{r['tasks_per_s']:.2f} tasks/s, {r['peak_mb']:.0f} MB, "
                          f"cpu/wall {r['cpu_per_wall']:.2f}, "
                          f"minflt/iter {r['minflt_per_iter']:.0f}", flush=True)

    def med(key: tuple[str, str, str], field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    print(f"\nload avg at end {os.getloadavg()[0]:.2f}; medians over {args.repeats} repeats "
          f"(peak MB = peak RSS minus RSS after setup{'; CUDA: max allocated' if args.device == 'cuda' else ''})")
    head = (f"{'config':16s} {'order':6s} {'impl':9s} {'tasks/s':>8s} {'range':>13s} "
            f"{'peak MB':>8s} {'speed ratio':>22s} {'mem ratio':>10s}")
    print(head)
    print("-" * len(head))
    for cname in configs:
        for order in ORDERS:
            for impl in IMPLS:
                key = (cname, order, impl)
                speeds = [r["tasks_per_s"] for r in results[key]]
                ratio, mem_ratio = "", ""
                if impl in ("loop", "vmap"):
                    base = (cname, order, "reference" if impl == "loop" else "loop")
                    label = "sparsemeta/ref" if impl == "loop" else "vmap/loop"
                    ratio = f"{label} {med(key, 'tasks_per_s') / med(base, 'tasks_per_s'):.2f}"
                    mem_ratio = f"{med(key, 'peak_mb') / max(med(base, 'peak_mb'), 1e-9):.2f}"
                print(f"{cname:16s} {order:6s} {impl:9s} {med(key, 'tasks_per_s'):8.2f} "
                      f"{min(speeds):6.2f}-{max(speeds):6.2f} {med(key, 'peak_mb'):8.0f} "
                      f"{ratio:>22s} {mem_ratio:>10s}")


if __name__ == "__main__":
    main()
