"""Process-wide CPU settings: glibc's allocator and how many threads a run uses.

Why: a meta-learning step allocates and frees the same large activation buffers on every task.
With glibc's defaults, buffers above the mmap threshold (at most 32 MiB; one 84×84 query
activation is 68 MB) are mapped and unmapped each time, the heap top is trimmed back to the OS,
and a thread's own arena cannot hold a chunk above 64 MB at all — so every task page-faults its
activations in afresh: ~140,000 minor faults per Conv4-32 84×84 task, measured 1.3–1.7× slower
than with the settings here (issue #14). ``tune_allocator`` serves every allocation from the
main heap (one arena, no mmap) and never trims it, so after the first task the pages stay in
the process and are reused. The price is a higher peak RSS (the heap keeps its high-water mark;
measured +10–30%). ``configure`` is called once at start-up, before any task thread exists (the
CLI does); elsewhere (no glibc, not Linux) the allocator part is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import signal

import torch

#: glibc's mallopt parameters (malloc.h) and the values set: the largest trim threshold a C int
#: holds, the largest mmap threshold glibc takes on 64-bit (for when mmap is used after all: a
#: failed heap extension), no mmap'ed chunks, one arena (threads share the main heap)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
MALLOPT = ((M_TRIM_THRESHOLD, 2**31 - 1), (M_MMAP_THRESHOLD, 32 * 2**20), (M_MMAP_MAX, 0),
           (M_ARENA_MAX, 1))
#: the same settings as environment variables (for a process started with them)
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
              "MALLOC_MMAP_MAX_": "0", "MALLOC_ARENA_MAX": "1"}
#: task threads when none are asked for: more rarely pay on small Conv4 tasks, and every
#: concurrent task holds its own autograd graph (memory grows with the count)
MAX_AUTO_THREADS = 8
#: Linux prctl option: a signal for this process when its parent dies
PR_SET_PDEATHSIG = 1

_tuned = False


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """``train.threads``: the number asked for, or (None) the usable cores, capped — and no
    more than torch's own thread count, which a runner of several processes lowers to share
    the cores (torch defaults to the physical cores)."""
    if threads is None:
        return max(1, min(cores(), torch.get_num_threads(), MAX_AUTO_THREADS))
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


def tune_allocator() -> bool:
    """Keep large buffers in the process (see the module doc); True if glibc took the settings.

    Idempotent. A no-op off glibc Linux (musl, macOS, Windows), where it returns False.
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in MALLOPT)
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok


def configure(threads: int | None = None) -> int:
    """Start-up settings of a training or evaluation process; returns its task threads.

    Tunes the allocator, and gives torch ``threads`` intra-op threads for the work done
    outside the task threads (the optimiser step, sequential fallbacks). The meta-learning
    core's task threads use one intra-op thread each, whatever this sets.
    """
    n = resolve_threads(threads)
    tune_allocator()
    torch.set_num_threads(n)
    return n


def start_child(threads: int) -> None:
    """Start-up of a spawned training process (a seed's or a background run's): ``configure``
    (a spawned process starts with glibc's defaults and torch's own thread count), and on Linux
    it ends with its parent — an orphan would go on holding a run directory's lock against the
    resumed experiment."""
    configure(threads)
    if platform.system() == "Linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
