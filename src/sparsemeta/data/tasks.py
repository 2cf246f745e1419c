"""Episodic N-way K-shot tasks. Task *i* of a split is a pure function of (seed, split, i).

No sampler state is carried between tasks, so a resumed run, any number of loader workers and
every evaluation see exactly the same tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sparsemeta.data.base import SPLITS, FewShotData
from sparsemeta.data.spec import TaskSpec
from sparsemeta.foundations.errors import UserError


@dataclass
class Task:
    """One N-way K-shot episode; labels are 0..N-1 in a per-task shuffled order.

    ``index`` is the task's number in its split; it seeds per-task randomness (MetaMix)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    index: int = 0

    def to(self, device: torch.device | str) -> Task:
        return Task(*(t.to(device, non_blocking=True) for t in (
            self.support_x, self.support_y, self.query_x, self.query_y)), index=self.index)


class TaskSampler:
    """Draws task ``i`` of ``split``; augmentation (rotations as new classes, shifts) is optional."""

    def __init__(
        self,
        data: FewShotData,
        split: str,
        ways: int,
        shots: int,
        queries: int,
        seed: int,
        rotations: bool = False,
        shift: int = 0,
        augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data = data
        self.split = split
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed = seed
        self.rotations = 4 if rotations else 1
        self.shift = shift
        self.augment = augment
        self.per_class = data.classes[split]
        # checked at the boundary (``check_tasks``); an inner layer only asserts
        assert ways <= len(self.per_class) * self.rotations, f"{ways} ways from {split}"
        assert shots + queries <= min(len(idx) for idx in self.per_class), f"{split} too small"
        self._mean = torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(self.split), i])

    def task(self, i: int) -> Task:
        rng = self.rng(i)
        n = self.shots + self.queries
        picks = rng.choice(len(self.per_class) * self.rotations, size=self.ways, replace=False)
        batch = np.empty((self.ways, n) + self.data.images.shape[1:], dtype=np.uint8)
        for label, pick in enumerate(picks):  # rng.choice order = a per-task label shuffle
            cls, rot = divmod(int(pick), self.rotations)
            idx = self.per_class[cls]
            chosen = np.sort(idx[rng.choice(len(idx), size=n, replace=False)])
            images = self.data.images[chosen]
            if rot:
                images = np.rot90(images, k=rot, axes=(2, 3))
            batch[label] = images
        if self.shift:
            batch = self._shift(batch, rng)
        if self.augment is not None:
            batch = self.augment(batch.reshape(-1, *batch.shape[2:]), rng).reshape(batch.shape)
        x = torch.from_numpy(batch).float().div_(255.0)
        x = (x.flatten(0, 1) - self._mean) / self._std
        x = x.view(self.ways, n, *x.shape[1:])
        y = torch.arange(self.ways).unsqueeze(1).expand(self.ways, n)
        s, _q = self.shots, self.queries
        return Task(
            support_x=x[:, :s].reshape(-1, *x.shape[2:]),
            support_y=y[:, :s].reshape(-1),
            query_x=x[:, s:].reshape(-1, *x.shape[2:]),
            query_y=y[:, s:].reshape(-1),
            index=i,
        )

    def _shift(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Shift each image by up to ``shift`` pixels, filling with background (0)."""
        k = self.shift
        ways, n, c, h, w = batch.shape
        padded = np.zeros((ways, n, c, h + 2 * k, w + 2 * k), dtype=batch.dtype)
        padded[..., k:k + h, k:k + w] = batch
        offsets = rng.integers(0, 2 * k + 1, size=(ways, n, 2))
        out = np.empty_like(batch)
        for a in range(ways):
            for b in range(n):
                dy, dx = offsets[a, b]
                out[a, b] = padded[a, b, :, dy:dy + h, dx:dx + w]
        return out


def sampler_for(spec: TaskSpec, data: FewShotData, split: str) -> TaskSampler:
    """The sampler of ``split``: augmentation only on meta-train, never on val/test."""
    train = split == "train"
    return TaskSampler(
        data,
        split,
        ways=spec.ways,
        shots=spec.shots,
        queries=spec.queries_in(split),
        seed=spec.seed,
        rotations=spec.rotations and train,
        shift=spec.shift if train else 0,
        augment=data.augment if train else None,
    )


def check_tasks(data: FewShotData, spec: TaskSpec, splits: tuple[str, ...] = SPLITS) -> None:
    """The one check that ``spec``'s tasks can be drawn from each of ``splits``: enough classes
    for the ways, enough images in every class for shots + queries. A one-line UserError
    naming the split, the class and the keys to change."""
    for split in splits:
        per_class = data.classes.get(split, [])
        rotations = spec.rotations_in(split)
        n = len(per_class) * rotations
        if n < spec.ways:
            extra = " (counting rotations as classes)" if rotations > 1 else ""
            raise UserError(
                f"data.ways={spec.ways} but the {split} split of '{data.name}' has only {n} "
                f"classes{extra}; lower data.ways or use a data set with more classes")
        need = spec.shots + spec.queries_in(split)
        counts = [len(idx) for idx in per_class]
        j = int(np.argmin(counts))
        if counts[j] < need:
            names = data.class_names.get(split) or []
            which = f"class '{names[j]}'" if j < len(names) else "a class"
            key = spec.queries_key(split)
            raise UserError(
                f"data.shots + {key} = {need} but {which} of the {split} split of "
                f"'{data.name}' has only {counts[j]} images; lower data.shots or {key} "
                f"(or add images)")
