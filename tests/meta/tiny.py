"""Tiny float64 few-shot tasks shared by the tests that compare a batched core with the loop."""

from __future__ import annotations

import torch

from sparsemeta.data.tasks import Task

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 3, 16


def tiny_tasks(n: int, seed: int = 1) -> list[Task]:
    """``n`` 3-way 2-shot tasks of random 16×16 images (shuffled support labels), task i indexed i."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(n):
        sy = torch.arange(WAYS).repeat_interleave(SHOTS)[torch.randperm(WAYS * SHOTS, generator=gen)]
        qy = torch.arange(WAYS).repeat_interleave(QUERIES)
        tasks.append(Task(
            torch.randn(WAYS * SHOTS, 1, SIZE, SIZE, generator=gen, dtype=torch.float64), sy,
            torch.randn(WAYS * QUERIES, 1, SIZE, SIZE, generator=gen, dtype=torch.float64), qy,
            index=i))
    return tasks
