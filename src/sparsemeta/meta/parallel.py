"""Tasks of a meta-batch (or of an evaluation) side by side on Python threads.

Why threads and not intra-op parallelism: a Conv4 task's support set is 5–25 images, too small
for torch's OpenMP threads to share well, and OpenMP's barriers stall whenever another process
takes a core. Tasks are independent until the gradient sum, and ATen releases the GIL inside its
kernels and the autograd engine, so whole tasks run concurrently on threads.

Every worker thread computes with exactly one intra-op thread. That also holds for a pool of
one, so a task's arithmetic — and hence every result — is the same whatever the number of
threads; callers combine per-task results in task order, never in completion order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def _forget_pools() -> None:
    _pools.clear()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pools)


def _pin_one_thread(ready: threading.Barrier) -> None:
    """Worker start-up: one intra-op thread for the rest of this thread's life.

    ``torch.set_num_threads`` also sets the process-wide default that a thread adopts when it
    first runs a parallel kernel; ``get_num_threads`` makes this thread adopt it now, while it
    is 1, so the caller can restore its own setting afterwards.
    """
    torch.set_num_threads(1)
    torch.get_num_threads()
    ready.wait()


def pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` workers (created once, reused by every call)."""
    with _lock:
        if threads in _pools:
            return _pools[threads]
        before = torch.get_num_threads()
        executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sparsemeta-task")
        ready = threading.Barrier(threads + 1)
        for _ in range(threads):  # the barrier makes each start-up run on its own worker
            executor.submit(_pin_one_thread, ready)
        ready.wait()
        torch.set_num_threads(before)
        _pools[threads] = executor
        return executor


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int,
                in_flight: int | None = None) -> Iterator[R]:
    """``fn`` over ``items`` on ``threads`` workers; results are yielded in item order.

    At most ``in_flight`` items (default ``2 × threads``) are submitted at once, so a long
    sequence (600 evaluation tasks) never holds more than a few results; ``in_flight=1`` runs
    the items strictly one after another. An exception in ``fn`` is raised here, at its item.
    """
    executor = pool(threads)
    window = in_flight or 2 * threads
    pending: list[Future[R]] = []
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        for future in pending:  # the caller stopped early or an item failed
            future.cancel()
        for future in pending:
            if not future.cancelled():
                future.exception()  # wait: no task may outlive the call using its inputs
