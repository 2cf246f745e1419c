"""Will fine-tuning fit? The memory ``sparsemeta-edge finetune`` needs, from shapes alone.

The estimate follows what the code allocates (``runtime.finetune`` and ``nn.Conv4``), term by
term, so that a device can be checked before a long run is started:

* weights — the loaded model (values, masks, learned rates, statistics), the working copy
  ``finetune`` makes, and the best epoch's copy of the updated parameters;
* gradients — one per updated parameter (plain SGD keeps no other optimiser state);
* activations kept for backward — per block from the lowest updated one up: the normalised conv
  output x̂, the pooling route (one byte per pooled value), and the padded input where the conv
  weight is updated; the head's input features;
* working buffers — the largest moment of one block, forward (its output, the input it reads,
  one im2col group, and x̂ and the padded input where they are not kept) or backward (input
  gradient, output gradient, one group's dy/dz and im2col/col2im columns);
* image buffer — every image as uint8 (``load_folder``), plus one batch as uint8 and as floats;
* overhead — BLAS workspace and allocator slack, a measured constant (``OVERHEAD_BYTES``);
* the interpreter baseline — CPython with NumPy, Pillow and this package imported, a measured
  constant (``BASELINE_BYTES``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from sparsemeta_edge.errors import EdgeError, printable
from sparsemeta_edge.nn import _group, _out_size, block_names
from sparsemeta_edge.smz import SmzModel

#: peak RSS right after ``import numpy, PIL.Image, sparsemeta_edge.cli`` (what ``finetune``
#: holds before its first array): 38.6–38.8 MiB, median 39,732 KiB of five runs of
#: ``/usr/bin/time -f %M`` with OMP_NUM_THREADS=1 — CPython 3.11.7, NumPy 2.4.6 (scipy-openblas
#: 0.3.31), Pillow 13.0.0, x86-64 Linux (AMD EPYC), measured 2026-12-04 on the development
#: machine. NumPy alone is 30 MiB of it; 32-bit ARM builds need less
BASELINE_BYTES = 39_732 << 10
#: what fine-tuning adds beyond its arrays: OpenBLAS's packing buffers, glibc's slack between
#: freed and reused blocks, modules loaded on first use. Measured (same machine and date, real
#: ``sparsemeta-edge finetune`` peak − baseline − the arrays of the estimate, Conv4-32 at
#: 28×28×1 and 84×84×3, 100 images, batch 25): 5.7–7.4 MiB under ``all`` and ``bn``,
#: 8.8–9.9 MiB under ``head`` and ``last:1``; the middle keeps every case within 5%
OVERHEAD_BYTES = 8 << 20
MiB = 1 << 20
#: the smallest --ram taken: below a MiB a size is a forgotten unit ("--ram 512"), not a device
MIN_RAM_BYTES = MiB
MAX_RAM_BYTES = 1 << 60  # 1024 TiB: beyond any device, and an int64
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
SIZE_HELP = "a size such as 512M, 1.5G or 300MiB (K, M, G, T = 1024^n bytes)"


def parse_size(text: str) -> int:
    """'512M', '1.5G', '300MiB', '1048576' → bytes (K, M, G, T are powers of 1024). Zero,
    negative, fractional-byte and sub-MiB sizes are refused (``EdgeError``, one line)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise EdgeError(f"--ram must be {SIZE_HELP}; got '{printable(text[:40])}'")
    number, unit = match.group(1), match.group(2).lower()
    value = float(number) * _UNITS[unit]
    if value > MAX_RAM_BYTES:  # also a number too long for a float (inf)
        raise EdgeError(f"--ram {printable(text.strip()[:40])} is more memory than any device "
                        f"has (at most {MAX_RAM_BYTES >> 40}T)")
    size = int(value)
    if size < MIN_RAM_BYTES:
        hint = f"; did you mean {number}M?" if not unit and float(number) >= 1 else ""
        raise EdgeError(f"--ram {text.strip()} is {size} bytes, less than the smallest device "
                        f"this plans for ({MIN_RAM_BYTES >> 20} MiB){hint}")
    return size


@dataclass(frozen=True)
class Layer:
    """One conv block's geometry at batch size 1: input channels and side, filters, conv output
    side, block output side."""

    cin: int
    side: int
    filters: int
    conv_side: int
    out_side: int


def layers(model: SmzModel) -> list[Layer]:
    """The blocks' geometry, from the model's own (possibly compacted) tensors."""
    arch = model.manifest.architecture
    stride = 2 if arch.downsample == "stride" else 1
    side, cin, out = arch.image_size, arch.in_channels, []
    for i in range(4):
        f = model.params[block_names(i)[0]].shape[0]
        conv = _out_size(side, stride)
        pooled = conv // 2 if stride == 1 else conv
        out.append(Layer(cin, side, f, conv, pooled))
        side, cin = pooled, f
    return out


@dataclass
class Budget:
    """Estimated peak memory of fine-tuning, by part (bytes)."""

    parts: dict[str, int]
    notes: dict[str, str]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _activation_terms(model: SmzModel, trainable: frozenset[str] | None, batch: int,
                      item: int) -> tuple[int, int, str]:
    """(bytes kept for backward, peak working bytes, note) of one training step."""
    def trains(name: str) -> bool:
        return trainable is None or name in trainable

    geo = layers(model)
    first = next((i for i in range(4) if any(map(trains, block_names(i)))), 4)
    pool = model.manifest.architecture.downsample == "maxpool"
    kept = batch * geo[3].filters * geo[3].out_side ** 2 * item  # the head's features
    working = previous_out = 0
    for i, g in enumerate(geo):
        xp = batch * (g.side + 2) ** 2 * g.cin * item
        z = batch * g.conv_side ** 2 * g.filters * item
        out = batch * g.out_side ** 2 * g.filters * item
        route = batch * (g.out_side if pool else g.conv_side) ** 2 * g.filters
        group = _group(batch, g.conv_side ** 2 * 9 * g.cin * item)
        cols = group * g.conv_side ** 2 * 9 * g.cin * item
        rows = group * g.conv_side ** 2 * g.filters * item
        keep_x = i >= first
        keep_xp = keep_x and trains(block_names(i)[0])
        kept += (z + route if keep_x else 0) + (xp if keep_xp else 0)
        # forward: this block's output, the input it reads, one im2col group, and x̂ and the
        # padded input while they exist (kept ones are already counted)
        forward = out + previous_out + cols + (0 if keep_x else z) + (0 if keep_xp else xp)
        need_input = keep_x and i > first
        backward = 0
        if keep_x:
            backward = out + 2 * rows + (cols if keep_xp else 0) + \
                ((xp + cols) if need_input else 0)
        working = max(working, forward, backward)
        previous_out = out
    note = ("none (head only)" if first == 4 else
            f"blocks {first}-3" + ("" if first == 0 else f"; blocks 0-{first - 1} frozen, none kept"))
    return kept, working, note


def estimate(model: SmzModel, images: int, update: str = "all", batch: int = 25,
             dtype: np.dtype | type = np.float32) -> Budget:
    """Peak memory of ``finetune(model, <images>, update=update, batch=batch)`` in ``dtype``."""
    from sparsemeta_edge.runtime import update_names

    if images < 1 or batch < 1:
        raise EdgeError("--images and --batch must be >= 1")
    trainable = update_names(update)
    item = np.dtype(dtype).itemsize
    arrays = [*model.params.values(), *model.rates.values(), *model.extra.values()]
    values = sum(a.size for a in arrays) * item
    mask_bytes = sum(m.size for m in model.masks.values())
    updated = sum(v.size for k, v in model.params.items() if trainable is None or k in trainable)
    step = min(batch, images)
    kept, working, where = _activation_terms(model, trainable, step, item)
    arch = model.manifest.architecture
    pixels = arch.in_channels * arch.image_size ** 2
    parts = {
        "weights": 2 * (values + mask_bytes) + updated * item,
        "gradients": updated * item,
        "activations": kept,
        "working": working,
        "images": images * pixels + step * pixels * (1 + item),
        "overhead": OVERHEAD_BYTES,
        "baseline": BASELINE_BYTES,
    }
    notes = {
        "weights": f"model {(values + mask_bytes) / MiB:.2f} MB loaded + working copy, "
                   f"+ best-epoch copy of {updated} updated values",
        "gradients": f"{updated} updated values (plain SGD: no other optimiser state)",
        "activations": f"kept for backward at batch {step}: {where}",
        "working": "largest block's transient buffers (output, im2col group, gradients)",
        "images": f"{images} × {arch.in_channels}×{arch.image_size}×{arch.image_size} uint8 "
                  f"+ one batch of {step} as floats",
        "overhead": "BLAS workspace, allocator slack (measured constant)",
        "baseline": "CPython + NumPy + Pillow imported (measured constant)",
    }
    return Budget(parts, notes)


def report(budget: Budget, ram: int) -> tuple[list[str], bool]:
    """The plan as printed lines and whether it fits in ``ram`` bytes."""
    lines = [f"  {name:<12} {size / MiB:>9.2f} MB  {budget.notes[name]}"
             for name, size in budget.parts.items()]
    fits = budget.total <= ram
    lines.append(f"  {'total':<12} {budget.total / MiB:>9.2f} MB  of {ram / MiB:.0f} MB RAM: "
                 + ("fits" if fits else f"does NOT fit (short by "
                                        f"{math.ceil((budget.total - ram) / MiB)} MB)"))
    return lines, fits
