"""Conv4, the backbone of the MAML paper, with batch norm whose statistics are chosen explicitly.

The forward takes ``stats_rows``: batch-norm statistics are computed on the first ``stats_rows``
examples of the batch and applied to all of them. That one argument expresses every batch-norm
policy of the meta-learning core (see ``sparsemeta.meta.core``) without ever depending on
``train()``/``eval()`` mode, and without running buffers that a forward could overwrite.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5


_PLAIN_BN: ContextVar[bool] = ContextVar("plain_batch_norm", default=False)


@contextmanager
def plain_batch_norm() -> Iterator[None]:
    """Use the plain-op batch norm inside this block.

    Needed under ``torch.func`` transforms (vmap): second-order gradients through the fused
    kernel under vmap were measured wrong in torch 2.13, while plain ops are exact.
    """
    token = _PLAIN_BN.set(True)
    try:
        yield
    finally:
        _PLAIN_BN.reset(token)


def batch_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stats_rows: int | None = None
) -> torch.Tensor:
    """Batch norm over (N, H, W) with statistics from ``x[:stats_rows]`` (all rows if None).

    Whole-batch statistics use the fused kernel (measured ~1.4× faster per meta-update and half
    the memory of plain ops); statistics from a subset of rows (``meta.bn=support``) and code
    under ``plain_batch_norm()`` use plain tensor ops, which the fused kernel cannot express.
    """
    if stats_rows is None and not _PLAIN_BN.get():
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=BN_EPS)
    ref = x if stats_rows is None else x[:stats_rows]
    var, mean = torch.var_mean(ref, dim=(0, 2, 3), correction=0, keepdim=True)
    scale = weight.view(1, -1, 1, 1) * torch.rsqrt(var + BN_EPS)
    return torch.addcmul(bias.view(1, -1, 1, 1) - mean * scale, x, scale)


@dataclass(frozen=True)
class Mix:
    """MetaMix inside the forward: rows ``[:n]`` and ``[n:]`` (permuted by ``perm``) are mixed
    as λ·a + (1−λ)·b at ``layer`` (0 = the input, k = the output of block k)."""

    layer: int
    lam: float
    n: int
    perm: torch.Tensor


@dataclass(frozen=True)
class Shuffle:
    """MetaMix's Channel Shuffle inside the forward: at ``layer`` the channels are split into
    ``groups`` contiguous near-equal groups (fewer if there are fewer channels) and group
    ``group`` of every row is replaced by that of row ``source[row]`` (a row of another class),
    before any mixing at the same layer."""

    layer: int
    group: int
    source: torch.Tensor
    groups: int = 6

    def bounds(self, channels: int) -> tuple[int, int]:
        k = min(self.groups, channels)
        g = self.group % k
        return g * channels // k, (g + 1) * channels // k


@dataclass(frozen=True)
class Pass:
    """How one forward pass treats batch norm, so the policy is explicit, never a mode flag.

    ``stats_rows``: statistics from the first rows only (None: the whole batch). ``step``: the
    adaptation step, selecting per-step BN weights and running statistics where the model has
    them. ``running``: normalise with the step's running statistics instead of the batch's.
    ``track``: update the step's running statistics from this batch (meta-training only).
    """

    stats_rows: int | None = None
    step: int = 0
    running: bool = False
    track: bool = False
    mix: Mix | None = None
    shuffle: Shuffle | None = None


class BatchNorm(nn.Module):
    """Affine batch norm; optionally per-step weights/biases (BNWB) and per-step running
    statistics (BNRS), as in MAML++. Without running statistics it has no buffers at all."""

    def __init__(self, channels: int, steps: int = 1, running: bool = False,
                 momentum: float = 0.1) -> None:
        super().__init__()
        self.steps = steps
        shape = (channels,) if steps == 1 else (steps, channels)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.momentum = momentum
        if running:
            self.register_buffer("running_mean", torch.zeros(steps, channels))
            self.register_buffer("running_var", torch.ones(steps, channels))
        else:
            self.running_mean = self.running_var = None

    def forward(self, x: torch.Tensor, p: Pass = Pass()) -> torch.Tensor:
        slot = min(p.step, self.steps - 1)  # steps past meta-training's share the last slot
        weight = self.weight if self.steps == 1 else self.weight[slot]
        bias = self.bias if self.steps == 1 else self.bias[slot]
        if self.running_mean is None:
            if p.running or p.track:
                raise ValueError("this model has no running batch-norm statistics")
            return batch_norm(x, weight, bias, p.stats_rows)
        if p.track:
            with torch.no_grad():
                ref = x if p.stats_rows is None else x[:p.stats_rows]
                var, mean = torch.var_mean(ref, dim=(0, 2, 3), correction=1)
                self.running_mean[slot].lerp_(mean, self.momentum)
                self.running_var[slot].lerp_(var, self.momentum)
        if p.running:
            return F.batch_norm(x, self.running_mean[slot], self.running_var[slot], weight, bias,
                                training=False, eps=BN_EPS)
        return batch_norm(x, weight, bias, p.stats_rows)


class ConvBlock(nn.Module):
    """3×3 conv → batch norm → ReLU → 2×2 max-pool (or a stride-2 conv instead of the pool)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: str, bn_steps: int = 1,
                 bn_running: bool = False) -> None:
        super().__init__()
        stride = 2 if downsample == "stride" else 1
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn = BatchNorm(out_channels, bn_steps, bn_running)
        self.pool = downsample == "maxpool"

    def forward(self, x: torch.Tensor, p: Pass = Pass()) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x), p))
        return F.max_pool2d(x, 2) if self.pool else x


def _mix(x: torch.Tensor, mix: Mix) -> torch.Tensor:
    return mix.lam * x[:mix.n] + (1.0 - mix.lam) * x[mix.n:][mix.perm]


def _augment(x: torch.Tensor, p: Pass, layer: int) -> torch.Tensor:
    """Channel Shuffle, then MetaMix, where either is set for this layer."""
    s = p.shuffle
    if s is not None and s.layer == layer:
        start, end = s.bounds(x.shape[1])
        x = torch.cat([x[:, :start], x[s.source, start:end], x[:, end:]], dim=1)
    if p.mix is not None and p.mix.layer == layer:
        x = _mix(x, p.mix)
    return x


class Conv4(nn.Module):
    """Four conv blocks and a linear head (MAML: Omniglot 64 filters, mini-ImageNet 32).

    ``bn_steps > 1`` gives every adaptation step its own BN weights and biases (and running
    statistics if ``bn_running``), MAML++'s BNWB/BNRS.
    """

    def __init__(
        self,
        in_channels: int,
        ways: int,
        image_size: int,
        filters: int = 64,
        downsample: str = "maxpool",
        bn_steps: int = 1,
        bn_running: bool = False,
    ) -> None:
        super().__init__()
        if downsample not in ("maxpool", "stride"):
            raise ValueError(f"downsample must be 'maxpool' or 'stride', got {downsample!r}")
        channels = [in_channels] + [filters] * 4
        self.blocks = nn.ModuleList(
            ConvBlock(channels[i], channels[i + 1], downsample, bn_steps, bn_running)
            for i in range(4)
        )
        size = image_size
        for _ in range(4):
            size = (size + 1) // 2 if downsample == "stride" else size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for four downsampling blocks")
        self.head = nn.Linear(filters * size * size, ways)
        self.positions = self._positions(image_size, downsample)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.conv.weight)
            nn.init.zeros_(block.conv.bias)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _positions(self, size: int, downsample: str) -> dict[str, int]:
        """Output pixels each conv weight is applied at (1 for the head): a weight tensor's
        forward costs positions × its kept weights MACs per example (``sparsity.flops``)."""
        out = {}
        for i in range(len(self.blocks)):
            if downsample == "stride":
                size = (size + 1) // 2
                out[f"blocks.{i}.conv.weight"] = size * size
            else:
                out[f"blocks.{i}.conv.weight"] = size * size
                size //= 2
        out["head.weight"] = 1
        return out

    def forward(self, x: torch.Tensor, p: Pass = Pass()) -> torch.Tensor:
        """Logits; with ``p.mix``, rows [:n] and permuted rows [n:] are mixed at one layer and
        the result has n rows; ``p.shuffle`` swaps a channel group between classes first."""
        for i, block in enumerate(self.blocks):
            x = block(_augment(x, p, i), p)
        return self.head(_augment(x, p, len(self.blocks)).flatten(1))


def forward_tasks(model: Conv4, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                  p: Pass = Pass()) -> torch.Tensor:
    """Logits ``(T, N, ways)`` of ``T`` tasks in one pass: ``params[k]`` is ``(T, *shape)``
    (task t's weights) and ``x`` is ``(T, N, C, H, W)``; equal to ``model`` forwarded task by
    task with those weights.

    Why: one small task does not fill an accelerator. The tasks' channels are laid side by
    side — ``(N, T·C, H, W)`` — so each convolution is one grouped convolution (groups = T), and
    batch norm over that tensor takes every (task, channel)'s own statistics, which is exactly
    per-task batch norm; the head is a batched matrix product. MetaMix and running statistics
    are not expressible here (``meta.engine`` refuses them up front; ``meta.grouped`` asserts).
    """
    if p.mix is not None or p.shuffle is not None or p.running or p.track:
        raise ValueError("forward_tasks supports batch statistics without MetaMix only")
    tasks, rows = x.shape[:2]
    h = x.transpose(0, 1).reshape(rows, tasks * x.shape[2], *x.shape[3:])
    for i, block in enumerate(model.blocks):
        at = f"blocks.{i}."
        w = params[at + "conv.weight"]
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), params[at + "conv.bias"].reshape(-1),
                     stride=block.conv.stride, padding=block.conv.padding, groups=tasks)
        weight, bias = params[at + "bn.weight"], params[at + "bn.bias"]
        if block.bn.steps > 1:
            slot = min(p.step, block.bn.steps - 1)
            weight, bias = weight[:, slot], bias[:, slot]
        h = F.relu(batch_norm(h, weight.reshape(-1), bias.reshape(-1), p.stats_rows))
        if block.pool:
            h = F.max_pool2d(h, 2)
    features = h.reshape(rows, tasks, -1).transpose(0, 1)
    return torch.baddbmm(params["head.bias"].unsqueeze(1), features,
                         params["head.weight"].transpose(1, 2))


@dataclass(frozen=True)
class ModelSpec:
    """Everything the model layer needs to build a Conv4 — its own typed view, built from the
    config in one place (``meta.learners.model_spec``: the learner decides the per-step slots)."""

    in_channels: int
    ways: int
    image_size: int
    filters: int = 64
    downsample: str = "maxpool"
    bn_steps: int = 1
    """Batch-norm weight slots: 1, or one per adaptation step (MAML++'s per-step BN)."""
    bn_running: bool = False
    """Keep running batch-norm statistics (``meta.bn=running``)."""


def build_model(spec: ModelSpec) -> Conv4:
    """The Conv4 ``spec`` describes, freshly initialised from torch's global RNG."""
    return Conv4(in_channels=spec.in_channels, ways=spec.ways, image_size=spec.image_size,
                 filters=spec.filters, downsample=spec.downsample, bn_steps=spec.bn_steps,
                 bn_running=spec.bn_running)
