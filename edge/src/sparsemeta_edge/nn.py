"""Conv4 forward and backward in NumPy: the same function as ``sparsemeta.models.conv4.Conv4``.

Parameters keep PyTorch's names and layouts (``blocks.{i}.conv.weight`` is (F, C, 3, 3), the head
flattens the last feature map in (C, H, W) order), so a ``.smz`` file maps onto it one to one.
Activations are channels-last internally: a 3×3 convolution is then one matrix product of the
im2col matrix (rows = output pixels, columns = (kh, kw, C)) with the weight, and batch norm is a
reduction over rows.

Memory, not FLOPs, is what an edge device runs out of, so:

* im2col is built per group of images (at most ``COL_BYTES`` at a time), never for the whole
  batch, and rebuilt in the backward pass instead of being kept;
* the backward pass keeps only the normalised activations (needed by batch norm's gradient),
  a one-byte argmax per pooled value, and each block's (padded) input;
* batch-norm backward works in place on those cached arrays.

Batch norm: statistics from the first ``stats_rows`` examples (all if None) — or given
``stats`` — biased variance, eps 1e-5, exactly as ``sparsemeta.models.conv4.batch_norm``.
MAML++'s per-step batch norm (weights and biases of shape (steps, C), optional running
statistics ``blocks.{i}.bn.running_mean|var`` of the same shape) uses the slot of the pass's
``step``, ``min(step, steps − 1)``, as ``sparsemeta.models.conv4.BatchNorm`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

BN_EPS = 1e-5
COL_BYTES = 2 << 20
DEAD = 4  # argmax code of a pooled value whose ReLU output is 0: no gradient flows


def block_names(i: int) -> tuple[str, str, str, str]:
    return (f"blocks.{i}.conv.weight", f"blocks.{i}.conv.bias",
            f"blocks.{i}.bn.weight", f"blocks.{i}.bn.bias")


def running_names(i: int) -> tuple[str, str]:
    """Block ``i``'s running batch-norm statistics (``meta.bn=running``), (steps, C) each."""
    return f"blocks.{i}.bn.running_mean", f"blocks.{i}.bn.running_var"


def slot(array: np.ndarray, step: int) -> np.ndarray:
    """Row ``min(step, steps − 1)`` of a per-step (steps, C) tensor; a (C,) tensor as it is."""
    return array if array.ndim == 1 else array[min(step, array.shape[0] - 1)]


def param_shapes(in_channels: int, ways: int, image_size: int, filters: int, downsample: str,
                 bn_steps: int = 1, running: bool = False,
                 layer_filters: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of Conv4's ``state_dict`` entries, in order: parameters, with per-step
    batch norm if ``bn_steps > 1``, and running statistics if ``running``. ``layer_filters``
    gives a compacted (filter-pruned) network's width per block (default ``filters`` each)."""
    widths = list(layer_filters) if layer_filters is not None else [filters] * 4
    shapes: dict[str, tuple[int, ...]] = {}
    c = in_channels
    for i, width in enumerate(widths):
        bn = (width,) if bn_steps == 1 else (bn_steps, width)
        w, b, g, beta = block_names(i)
        shapes[w], shapes[b], shapes[g], shapes[beta] = (width, c, 3, 3), (width,), bn, bn
        if running:
            for name in running_names(i):
                shapes[name] = (bn_steps, width)
        c = width
    size = feature_size(image_size, downsample)
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for four downsampling blocks")
    shapes["head.weight"], shapes["head.bias"] = (ways, c * size * size), (ways,)
    return shapes


def feature_size(image_size: int, downsample: str) -> int:
    """Side of the last feature map: four halvings (ceil for stride 2, floor for max-pool)."""
    size = image_size
    for _ in range(4):
        size = (size + 1) // 2 if downsample == "stride" else size // 2
    return size


def is_prunable(name: str, shape: tuple[int, ...]) -> bool:
    """Conv and linear weights: rank ≥ 2 (``sparsemeta.sparsity.masks.prunable_names``), but not
    batch norm's (steps, C) per-step weights and running statistics."""
    return len(shape) >= 2 and ".bn." not in name


def init_head(ways: int, features: int, dtype: np.dtype | type, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fresh head like Conv4's (Xavier-uniform weight, zero bias), for a new set of classes."""
    bound = np.sqrt(6.0 / (ways + features))
    rng = np.random.default_rng(seed)
    return (rng.uniform(-bound, bound, size=(ways, features)).astype(dtype),
            np.zeros(ways, dtype=dtype))


# -- convolution ---------------------------------------------------------------------------
def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # 3×3 kernel, padding 1


def _group(n: int, per_image_bytes: int) -> int:
    """Images per im2col group so that one group's columns stay under ``COL_BYTES``."""
    return max(1, min(n, COL_BYTES // max(per_image_bytes, 1)))


def _im2col(xp: np.ndarray, stride: int, ho: int, wo: int, nchw: bool) -> np.ndarray:
    """(n·ho·wo, 9·C) columns of a padded batch.

    NHWC input: (kh, kw, C) column order, contiguous. NCHW input (the image, with 1 or 3
    channels, where copying 3-float runs would be slow): built as a contiguous (C, kh, kw) × rows
    array of whole image rows and returned transposed, which BLAS reads without a copy.
    """
    if nchw:
        n, c = xp.shape[:2]
        colt = np.empty((c, 3, 3, n, ho, wo), dtype=xp.dtype)
        for kh in range(3):
            for kw in range(3):
                colt[:, kh, kw] = xp[:, :, kh:kh + stride * ho:stride,
                                     kw:kw + stride * wo:stride].transpose(1, 0, 2, 3)
        return colt.reshape(9 * c, n * ho * wo).T
    n, _, _, c = xp.shape
    cols = np.empty((n, ho, wo, 3, 3, c), dtype=xp.dtype)
    for kh in range(3):
        for kw in range(3):
            cols[:, :, :, kh, kw, :] = xp[:, kh:kh + stride * ho:stride, kw:kw + stride * wo:stride, :]
    return cols.reshape(n * ho * wo, 9 * c)


def _col2im_add(dxp: np.ndarray, dcols: np.ndarray, stride: int, ho: int, wo: int) -> None:
    """Scatter-add column gradients back onto a padded NHWC gradient (the adjoint of im2col)."""
    n, _, _, c = dxp.shape
    d = dcols.reshape(n, ho, wo, 3, 3, c)
    for kh in range(3):
        for kw in range(3):
            dxp[:, kh:kh + stride * ho:stride, kw:kw + stride * wo:stride, :] += d[:, :, :, kh, kw, :]


def _weight_matrix(w: np.ndarray, nchw: bool) -> np.ndarray:
    """(F, C, 3, 3) → (9·C, F) in the im2col column order."""
    f = w.shape[0]
    if nchw:
        return w.reshape(f, -1).T
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(-1, f)


def _geometry(xp: np.ndarray, stride: int, nchw: bool) -> tuple[int, int, int, int]:
    n, c, hp, wp = xp.shape if nchw else (xp.shape[0], xp.shape[3], xp.shape[1], xp.shape[2])
    return n, c, _out_size(hp - 2, stride), _out_size(wp - 2, stride)


def conv_forward(xp: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int,
                 nchw: bool = False) -> np.ndarray:
    """3×3 convolution of a padded batch (NHWC, or NCHW for the image): (n·ho·wo, F) rows.
    ``b=None`` leaves the bias out (batch norm cancels it; see ``Conv4._block_forward``)."""
    n, c, ho, wo = _geometry(xp, stride, nchw)
    wm = _weight_matrix(w, nchw)
    per = ho * wo
    z = np.empty((n * per, w.shape[0]), dtype=xp.dtype)
    g = _group(n, per * 9 * c * xp.itemsize)
    for n0 in range(0, n, g):
        n1 = min(n, n0 + g)
        np.matmul(_im2col(xp[n0:n1], stride, ho, wo, nchw), wm, out=z[n0 * per:n1 * per])
    if b is not None:
        z += b
    return z


def conv_backward_add(xp: np.ndarray | None, dz: np.ndarray, wm: np.ndarray,
                      dwm: np.ndarray | None, dxp: np.ndarray | None, stride: int,
                      nchw: bool = False) -> None:
    """The adjoint of ``conv_forward`` for one group of images: adds the gradient of the
    (9·C, F) weight matrix into ``dwm`` (unless None: a frozen conv, whose input ``xp`` was not
    kept) and, unless None (the image, or the first updated block), of the padded input into
    ``dxp``. im2col is rebuilt here rather than kept from the forward pass (memory)."""
    ref = xp if xp is not None else dxp
    if ref is None:
        return
    _, _, ho, wo = _geometry(ref, stride, nchw and xp is not None)
    if dwm is not None and xp is not None:
        cols = _im2col(xp, stride, ho, wo, nchw)
        dwm += cols.T @ dz
        del cols
    if dxp is not None:
        _col2im_add(dxp, dz @ wm.T, stride, ho, wo)


# -- batch norm, ReLU, pooling -------------------------------------------------------------
def rowsum(a: np.ndarray, b: np.ndarray | None = None, block: int = 256) -> np.ndarray:
    """Σ over the rows of ``a`` (or of ``a·b``) in float64.

    Batch-norm sums run over up to n·84·84 rows and feed gradients that cancel (Σdz = 0), so a
    float32 running sum (what ``ndarray.sum(axis=0)`` and a plain einsum do) was measured to give
    1e-3 relative gradient errors; PyTorch accumulates in double. Float32 partial sums over
    blocks of ``block`` rows (a batched BLAS product, ~5× faster than ``sum(axis=0)``) added in
    float64 are as accurate as needed.
    """
    m, f = a.shape
    full = m - m % block
    total = np.zeros(f, dtype=np.float64)
    if full:
        a3 = a[:full].reshape(-1, block, f)
        if b is None:
            part = np.ones(block, dtype=a.dtype) @ a3
        else:
            part = np.einsum("nij,nij->nj", a3, b[:full].reshape(-1, block, f))
        total += part.sum(axis=0, dtype=np.float64)
    if full < m:
        tail = a[full:] if b is None else a[full:] * b[full:]
        total += tail.sum(axis=0, dtype=np.float64)
    return total


def _pad(a: np.ndarray, nchw: bool) -> np.ndarray:
    """Zero padding of 1 pixel (the convolution's padding)."""
    pad = ((0, 0), (0, 0), (1, 1), (1, 1)) if nchw else ((0, 0), (1, 1), (1, 1), (0, 0))
    return np.pad(a, pad)


def _pool_forward(y: np.ndarray, keep: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """2×2 max-pool (floor, like F.max_pool2d) of NHWC; with ``keep``, the argmax code per output
    (0..3 in PyTorch's first-max order, ``DEAD`` where the ReLU output is 0)."""
    n, h, w, f = y.shape
    h2, w2 = h // 2, w // 2
    v = y[:, :2 * h2, :2 * w2, :].reshape(n, h2, 2, w2, 2, f)
    q = (v[:, :, 0, :, 0], v[:, :, 0, :, 1], v[:, :, 1, :, 0], v[:, :, 1, :, 1])
    out = np.maximum(q[0], q[1])
    np.maximum(out, q[2], out=out)
    np.maximum(out, q[3], out=out)
    if not keep:
        return out, None
    # first maximum wins ties, as in PyTorch: code = 3 − [≤0 wins] − [≤1 wins] − [≤2 wins]
    won = (q[0] == out).view(np.uint8)
    idx = np.uint8(3) - won
    won |= (q[1] == out).view(np.uint8)
    idx -= won
    won |= (q[2] == out).view(np.uint8)
    idx -= won
    idx |= (out <= 0).view(np.uint8) << np.uint8(2)  # DEAD bit: codes ≥ 4 match no position
    return out, idx


def _pool_backward(dout: np.ndarray, idx: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Gradient w.r.t. the pre-ReLU activations, routed to each window's first maximum."""
    n, h, w, f = shape
    h2, w2 = h // 2, w // 2
    # every position of an even-sized map is written below; odd sizes leave a cropped edge
    dy = (np.empty if h % 2 == 0 and w % 2 == 0 else np.zeros)(shape, dtype=dout.dtype)
    v = dy[:, :2 * h2, :2 * w2, :].reshape(n, h2, 2, w2, 2, f)
    for k, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        np.multiply(dout, idx == k, out=v[:, :, i, :, j])
    return dy


@dataclass
class _Block:
    """What one block keeps for the backward pass."""

    xp: np.ndarray | None  # padded input, kept only where the conv weight is updated
    in_shape: tuple[int, ...]  # shape of the padded input
    xhat: np.ndarray  # normalised conv output (n·h·w, F)
    inv: np.ndarray  # 1 / sqrt(var + eps)
    shape: tuple[int, int, int, int]  # (n, h, w, F) of the conv output
    route: np.ndarray  # pooling argmax codes, or the ReLU's positive mask (stride mode)


@dataclass
class Conv4:
    """NumPy Conv4 over a ``state_dict`` in PyTorch layout; ``masks`` zero pruned gradients.

    Pruned weights must be stored as zeros (θ ⊙ m, as ``.smz`` files hold them): the forward
    uses the weights as they are, and masked gradients keep the zeros exact through SGD.
    The dtype of ``head.weight`` (float32 or float64) is the compute dtype. Running statistics,
    if any, live in ``params`` too (as in the state_dict) but are never trained.
    """

    params: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    downsample: str = "maxpool"
    _cache: list[_Block] | None = None
    _feat: np.ndarray | None = None
    _rows: int | None = None
    _step: int = 0
    trainable: frozenset[str] | None = None  # parameters backward computes gradients of; all if None

    def trains(self, name: str) -> bool:
        return self.trainable is None or name in self.trainable

    @property
    def first_block(self) -> int:
        """The lowest block with an updated parameter (4: the head only). Backward stops there:
        blocks below keep no activations and no input gradient is computed for it."""
        return next((i for i in range(4) if any(map(self.trains, block_names(i)))), 4)

    @property
    def stride(self) -> int:
        return 2 if self.downsample == "stride" else 1

    @property
    def dtype(self) -> np.dtype:
        return self.params["head.weight"].dtype

    def _block_forward(self, i: int, a: np.ndarray, rows: int,
                       stats: tuple[np.ndarray, np.ndarray] | None, keep: bool, step: int
                       ) -> tuple[np.ndarray, _Block | None, tuple[np.ndarray, np.ndarray]]:
        """conv → batch norm → ReLU → pool of one block; normalisation, ReLU and pooling run
        per group of images so that no second full-size activation is ever allocated."""
        p = self.params
        wname, bname, gname, betaname = block_names(i)
        nchw = i == 0
        xp = _pad(a, nchw)
        n, _, ho, wo = _geometry(xp, self.stride, nchw)
        per = ho * wo
        # The conv bias shifts every row and so the batch mean by the same amount: batch norm
        # cancels it. It is only added back to the statistics (so stored statistics mean what
        # PyTorch's would), which saves a pass over the largest activation.
        z = conv_forward(xp, p[wname], None, self.stride, nchw)
        f = z.shape[1]
        if stats is None:  # centre in place, then the variance needs no temporary
            ref = z[:rows * per]
            mean = rowsum(ref) / ref.shape[0]
            z -= mean.astype(z.dtype)
            var = rowsum(ref, ref) / ref.shape[0]
            mean = mean + p[bname]
        else:
            mean, var = stats
            z -= (mean - p[bname]).astype(z.dtype)
        inv = (1.0 / np.sqrt(var + BN_EPS)).astype(z.dtype)
        gamma, beta = slot(p[gname], step), slot(p[betaname], step)
        pool = self.downsample == "maxpool"
        oh, ow = (ho // 2, wo // 2) if pool else (ho, wo)
        out = np.empty((n, oh, ow, f), dtype=z.dtype)
        route = None
        if keep:
            route = np.empty(out.shape if pool else (n, ho, wo, f), dtype=np.uint8 if pool else bool)
        g = _group(n, per * f * z.itemsize * 4)
        for n0 in range(0, n, g):
            n1 = min(n, n0 + g)
            zc = z[n0 * per:n1 * per]
            zc *= inv  # z becomes x̂ in place
            y = zc * gamma
            y += beta
            np.maximum(y, 0, out=y)
            y4 = y.reshape(n1 - n0, ho, wo, f)
            if pool:
                out[n0:n1], r = _pool_forward(y4, keep)
            else:
                out[n0:n1], r = y4, (y4 > 0 if keep else None)
            if route is not None:
                route[n0:n1] = r
        blk = None
        if keep and route is not None:
            blk = _Block(xp if self.trains(wname) else None, xp.shape, z, inv, (n, ho, wo, f), route)
        return out, blk, (mean, var)

    def forward(self, x: np.ndarray, stats_rows: int | None = None,
                stats: list[tuple[np.ndarray, np.ndarray]] | None = None,
                keep: bool = False, step: int = 0) -> np.ndarray:
        """Logits of an NCHW batch at adaptation step ``step`` (per-step batch norm's slot).
        Batch-norm statistics come from ``stats`` when given (fixed: no gradient through them,
        as PyTorch's running statistics), else from the first ``stats_rows`` examples (all if
        None). ``keep`` caches for ``backward``."""
        n = x.shape[0]
        rows = n if stats_rows is None else min(stats_rows, n)
        if rows < 1:
            raise ValueError(f"batch-norm statistics need at least one row, got {stats_rows}")
        a = np.asarray(x, dtype=self.dtype)
        cache: list[_Block] = []
        first = self.first_block
        for i in range(4):
            a, blk, _ = self._block_forward(i, a, rows, None if stats is None else stats[i],
                                            keep and i >= first, step)
            if blk is not None:
                cache.append(blk)
        feat = np.ascontiguousarray(a.transpose(0, 3, 1, 2)).reshape(n, -1)
        logits = feat @ self.params["head.weight"].T + self.params["head.bias"]
        if keep:  # no reference rows under fixed statistics: nothing flows through them
            self._cache, self._feat = cache, feat
            self._rows, self._step = (rows if stats is None else 0), step
        return logits

    def batch_stats(self, x: np.ndarray, step: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each block's batch-norm mean and variance on ``x`` at ``step`` (to store and reuse,
        e.g. the support-set statistics of ``meta.bn=support``)."""
        stats = []
        a = np.asarray(x, dtype=self.dtype)
        for i in range(4):
            a, _, (mean, var) = self._block_forward(i, a, x.shape[0], None, False, step)
            stats.append((mean.astype(np.float64), var.astype(np.float64)))
        return stats

    def running_stats(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The running statistics of ``step``'s slot (``meta.bn=running``), as ``stats``."""
        if running_names(0)[0] not in self.params:
            raise ValueError("this model has no running batch-norm statistics")
        return [tuple(slot(self.params[n], step).astype(np.float64) for n in running_names(i))
                for i in range(4)]

    def backward(self, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of the updated parameters (``trainable``; all if None) from the last
        ``forward(..., keep=True)``; pruned entries of masked weights get exactly zero. The
        pass stops at ``first_block``."""
        if self._cache is None or self._feat is None or self._rows is None:
            raise RuntimeError("backward() needs a forward(..., keep=True) first")
        p = self.params
        cache, feat, rows = self._cache, self._feat, self._rows
        self._cache = self._feat = None
        grads: dict[str, np.ndarray] = {}
        if self.trains("head.weight"):
            grads["head.weight"] = dlogits.T @ feat
        if self.trains("head.bias"):
            grads["head.bias"] = dlogits.sum(axis=0)
        del feat
        first = self.first_block
        if first < 4:
            n = dlogits.shape[0]
            shape = cache[-1].shape
            oh, ow = (shape[1] // 2, shape[2] // 2) if self.downsample == "maxpool" else shape[1:3]
            da = (dlogits @ p["head.weight"]).reshape(n, shape[3], oh, ow).transpose(0, 2, 3, 1)
            for i in range(3, first - 1, -1):
                blk = cache.pop()
                da = self._block_backward(i, blk, da, rows, grads, need_input=i > first)
                del blk
        for name, m in self.masks.items():
            if name in grads and not m.all():
                grads[name] *= m
        return grads

    def _dy(self, blk: _Block, da: np.ndarray, n0: int, n1: int,
            scale: np.ndarray | None = None) -> np.ndarray:
        """Gradient w.r.t. the batch-norm output of images n0:n1 (through pool and ReLU),
        times a per-channel ``scale`` applied on the (4× smaller) pooled gradient."""
        _, h, w, f = blk.shape
        d = da[n0:n1] if scale is None else da[n0:n1] * scale
        if self.downsample == "maxpool":
            dy = _pool_backward(d, blk.route[n0:n1], (n1 - n0, h, w, f))
        else:
            dy = np.multiply(d, blk.route[n0:n1])
        return dy.reshape(-1, f)

    def _bn_sums(self, blk: _Block, da: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Σdy and Σdy·x̂ over the batch (batch norm's β and γ gradients), per group of images."""
        n, h, w, f = blk.shape
        per = h * w
        dbeta = np.zeros(f, dtype=np.float64)
        dgamma = np.zeros(f, dtype=np.float64)
        for n0 in range(0, n, g):
            n1 = min(n, n0 + g)
            dy = self._dy(blk, da, n0, n1)
            dbeta += rowsum(dy)
            dgamma += rowsum(dy, blk.xhat[n0 * per:n1 * per])
        dtype = blk.xhat.dtype
        return dbeta.astype(dtype), dgamma.astype(dtype)

    def _block_backward(self, i: int, blk: _Block, da: np.ndarray, rows: int,
                        grads: dict[str, np.ndarray], need_input: bool = True) -> np.ndarray | None:
        """Batch-norm and conv gradients of one block, per group of images, in two passes (the
        batch-norm gradient needs Σdy and Σdy·x̂ over the batch before any dz is known):
        dz = γ·inv·(dy − [reference rows]·(Σdy + x̂·Σdy·x̂)/n_ref). The conv weight's gradient
        only where it is updated; the input's only if ``need_input`` (a block below updates)."""
        p = self.params
        wname, bname, gname, betaname = block_names(i)
        nchw = i == 0
        n, h, w, f = blk.shape
        per = h * w
        c = blk.in_shape[1] if nchw else blk.in_shape[3]
        g = _group(n, per * (9 * c + 2 * f) * blk.xhat.itemsize)
        dbeta, dgamma = self._bn_sums(blk, da, g)
        ref = rows * per
        scale = slot(p[gname], self._step) * blk.inv
        wm = _weight_matrix(p[wname], nchw)
        dwm = None if blk.xp is None else np.zeros(wm.shape, dtype=wm.dtype)
        dxp = np.zeros(blk.in_shape, dtype=blk.xhat.dtype) if need_input and not nchw else None
        for n0 in range(0, n, g):
            n1 = min(n, n0 + g)
            r0, r1 = n0 * per, n1 * per
            dz = self._dy(blk, da, n0, n1, scale)
            if r0 < ref:
                xr = blk.xhat[r0:min(r1, ref)]
                xr *= scale * dgamma / ref
                xr += scale * dbeta / ref
                dz[:len(xr)] -= xr
            conv_backward_add(None if blk.xp is None else blk.xp[n0:n1], dz, wm, dwm,
                              None if dxp is None else dxp[n0:n1], self.stride, nchw)
        if dwm is not None:
            grads[wname] = np.ascontiguousarray(
                dwm.T.reshape(f, c, 3, 3) if nchw else dwm.reshape(3, 3, c, f).transpose(3, 2, 0, 1))
        if self.trains(bname):  # batch statistics cancel the conv bias (gradient exactly 0)
            grads[bname] = scale * dbeta if rows == 0 else np.zeros(f, dtype=wm.dtype)
        if self.trains(gname):
            grads[gname] = self._per_step(gname, dgamma)
        if self.trains(betaname):
            grads[betaname] = self._per_step(betaname, dbeta)
        return None if dxp is None else dxp[:, 1:-1, 1:-1, :]

    def _per_step(self, name: str, grad: np.ndarray) -> np.ndarray:
        """A slot's gradient as the gradient of the whole (steps, C) tensor: other rows get 0."""
        value = self.params[name]
        if value.ndim == 1:
            return grad
        full = np.zeros_like(value)
        full[min(self._step, value.shape[0] - 1)] = grad
        return full

    def sgd_step(self, x: np.ndarray, y: np.ndarray, lr: float | Mapping[str, float | np.ndarray],
                 step: int = 0, stats: list[tuple[np.ndarray, np.ndarray]] | None = None
                 ) -> tuple[float, float]:
        """One masked SGD step on cross-entropy, exactly ``MetaLearner.inner_step``: batch
        statistics of ``x`` unless ``stats``; ``lr`` one rate or one per parameter (a scalar,
        or Meta-SGD's α elementwise). Returns loss and accuracy before the step."""
        logits = self.forward(x, stats=stats, keep=True, step=step)
        loss, dlogits = cross_entropy(logits, y)
        acc = float((logits.argmax(axis=1) == y).mean())
        grads = self.backward(dlogits)
        for name, grad in grads.items():
            grad *= lr[name] if isinstance(lr, Mapping) else lr
            self.params[name] -= grad
        return loss, acc


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    logp = shifted - logz
    n = logits.shape[0]
    loss = -float(logp[np.arange(n), y].mean())
    grad = np.exp(logp)
    grad[np.arange(n), y] -= 1.0
    grad /= n
    return loss, grad


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
