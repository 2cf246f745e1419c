"""Adaptation, fine-tuning and prediction with an exported model, in NumPy only.

The batch-norm policy travels with the model (``bn`` in the manifest), as in
``sparsemeta.meta.core``: under ``transductive`` and ``support`` a training step normalises its
batch with its own statistics; at prediction, ``transductive`` normalises the predicted batch
with its own statistics and ``support`` with the statistics of a reference (support) set.
Fine-tuning stores the statistics of a class-balanced reference sample of its training data in
the model (``bn_stats.*``), so a fine-tuned model can classify a single image under either
policy. Under ``running`` every step and prediction normalises with meta-training's running
statistics of its step, as ``MetaLearner.evaluate_task`` does; they are never updated on the
device (PyTorch's adaptation does not update them either).

The inner learning rate follows the manifest's ``lr_rule`` (see ``Adapter``). A model counts
the SGD steps its weights have taken since export (``adapted_steps``): step k uses the rate and
the per-step batch-norm slot of step k, capped at the last one meta-training learned.
"""

from __future__ import annotations

import copy
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from sparsemeta_edge.data import channel_stats, to_float
from sparsemeta_edge.manifest import Finetuned
from sparsemeta_edge.nn import Conv4, block_names, cross_entropy, init_head, softmax
from sparsemeta_edge.schema import MAX_COUNT
from sparsemeta_edge.smz import EdgeError, SmzModel, printable

Stats = list[tuple[np.ndarray, np.ndarray]]
Rates = float | dict[str, float | np.ndarray]


HEAD = frozenset({"head.weight", "head.bias"})
UPDATE_HELP = ("head: the classifier only; bn: batch-norm weights and biases + head; last:K: the "
               "last K conv blocks (1-4) + head; all: every parameter (default)")


def update_names(mode: str) -> frozenset[str] | None:
    """The parameters ``--update MODE`` fine-tunes (None: all). Every mode trains the head: the
    local classes need their own classifier (a re-initialised head that never moved would
    predict at random), and it is the cheapest layer to train."""
    if mode == "all":
        return None
    if mode == "head":
        return HEAD
    if mode == "bn":
        return HEAD | {n for i in range(4) for n in block_names(i)[2:]}
    k = mode[len("last:"):] if mode.startswith("last:") else ""
    if k.isdigit() and 1 <= int(k) <= 4:
        return HEAD | {n for i in range(4 - int(k), 4) for n in block_names(i)}
    raise EdgeError(f"--update must be head, bn, last:K (K in 1..4) or all; got "
                    f"'{printable(mode)}'")


#: seeds as NumPy's generators take them (non-negative) and as the manifest records them
MAX_SEED = 2**32 - 1


def check_options(*, epochs: int, patience: int, min_delta: float, holdout: float,
                  lr: float | None, batch: int, seed: int, update: str) -> frozenset[str] | None:
    """Every fine-tuning option checked at once, before any image is read or any weight is
    touched (one ``EdgeError`` naming the option); returns ``update_names(update)``."""
    trained = update_names(update)
    for name, value in (("--epochs", epochs), ("--patience", patience), ("--batch", batch)):
        if not 1 <= value <= MAX_COUNT:
            raise EdgeError(f"{name} must be an integer from 1 to {MAX_COUNT}, got {value}")
    if not 0 <= holdout < 1:  # NaN fails too
        raise EdgeError(f"--holdout must be a fraction in [0, 1), got {holdout}")
    if lr is not None and not 0 < lr < math.inf:
        raise EdgeError(f"--lr must be a finite number > 0, got {lr}")
    if not 0 <= min_delta < math.inf:
        raise EdgeError(f"--min-delta must be a finite number >= 0, got {min_delta}")
    if not 0 <= seed <= MAX_SEED:
        raise EdgeError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed}")
    return trained


def network(model: SmzModel) -> Conv4:
    """The NumPy Conv4 over the model's parameters (shared, not copied) and masks."""
    arch = model.manifest.architecture
    if arch.name != "conv4":
        raise EdgeError(f"architecture '{arch.name}' is not supported by this runtime")
    return Conv4(model.params, model.masks, arch.downsample)


class Adapter:
    """``MetaLearner``'s inner loop on an exported model, in place, one SGD step at a time.

    Step k (counted from the model's ``adapted_steps``, 0 for a fresh export) uses, as
    ``MetaLearner.lr`` and ``BatchNorm.forward`` do: the scalar ``inner_lr``; or MAML++'s learned
    rate of each tensor at step min(k, steps − 1); or Meta-SGD's α elementwise — and per-step
    batch norm's slot min(k, bn_steps − 1). So steps beyond meta-training's reuse the last rate
    and slot. ``lr`` replaces every rate by one scalar (plain SGD).
    """

    def __init__(self, model: SmzModel, lr: float | None = None) -> None:
        self.model, self.lr = model, lr
        self.net = network(model)
        self.bn = model.manifest.bn
        self.step = model.manifest.adapted_steps

    def rates(self) -> Rates:
        """The inner learning rate(s) of the current step."""
        rule = self.model.manifest.lr_rule
        if self.lr is not None or rule == "scalar":
            return float(self.model.manifest.inner_lr) if self.lr is None else self.lr
        if rule == "metasgd":
            return self.model.rates
        return {k: r[min(self.step, len(r) - 1)] for k, r in self.model.rates.items()}

    def stats(self) -> Stats | None:
        """Fixed statistics of the current step: the running ones under ``running``, else None
        (the batch's own)."""
        return self.net.running_stats(self.step) if self.bn == "running" else None

    def sgd_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """One masked SGD step (``MetaLearner.inner_step``); loss and accuracy before it."""
        out = self.net.sgd_step(x, y, self.rates(), self.step, self.stats())
        self.step += 1
        return out

    def adapt(self, support_x: np.ndarray, support_y: np.ndarray, steps: int) -> None:
        """``steps`` steps on the whole support set, as ``MetaLearner.adapt``."""
        for _ in range(steps):
            self.sgd_step(support_x, support_y)

    def query_logits(self, support_x: np.ndarray, query_x: np.ndarray) -> np.ndarray:
        """Query logits at the current step under the batch-norm policy
        (``MetaLearner.query_logits`` during ``evaluate_task``)."""
        if self.bn == "support":
            n = support_x.shape[0]
            both = np.concatenate([support_x, query_x])
            return self.net.forward(both, stats_rows=n, step=self.step)[n:]
        return self.net.forward(query_x, stats=self.stats(), step=self.step)


def describe_rates(model: SmzModel) -> str:
    """The inner learning-rate rule in words, for logs and ``info``."""
    rule, rates = model.manifest.lr_rule, model.rates
    if rule == "metasgd":
        kept = np.concatenate([r[model.masks[k]] if k in model.masks else r.ravel()
                               for k, r in rates.items()])
        return (f"Meta-SGD α per weight (mean {kept.mean():.4g}, range {kept.min():.4g}…"
                f"{kept.max():.4g})")
    if rule == "lslr":
        steps = max(len(r) for r in rates.values())
        last = np.mean([r[-1] for r in rates.values()])
        return (f"learned rate per tensor and step (LSLR, {steps} step(s); later steps use the "
                f"last, mean {last:.4g})")
    return f"inner lr {model.manifest.inner_lr}"


def _head_alpha(model: SmzModel, ways: int, features: int, dtype: np.dtype) -> str:
    """Meta-SGD α of a re-initialised head: new classes have no learned α, so every entry gets
    the old head's mean α over its kept weights (and over its bias), which keeps the step size
    meta-learned for that layer. Returns what was done, for the log."""
    old, mask = model.rates["head.weight"], model.masks["head.weight"]
    aw = float(old[mask].mean()) if mask.any() else float(model.manifest.inner_lr)
    ab = float(model.rates["head.bias"].mean())
    model.rates["head.weight"] = np.full((ways, features), aw, dtype=dtype)
    model.rates["head.bias"] = np.full(ways, ab, dtype=dtype)
    return f"; its Meta-SGD α is the old head's mean (weight {aw:.4g}, bias {ab:.4g})"


def stored_stats(model: SmzModel) -> Stats | None:
    """Batch-norm statistics saved by fine-tuning, if any."""
    if "bn_stats.0.mean" not in model.extra:
        return None
    return [(model.extra[f"bn_stats.{i}.mean"], model.extra[f"bn_stats.{i}.var"]) for i in range(4)]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far: ``VmHWM`` on Linux (ru_maxrss there also
    counts the parent's memory when this process was started by fork + exec), else ru_maxrss
    (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def balanced_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``size`` indices, round-robin over classes: a support-set-like reference batch."""
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out: list[int] = []
    depth = 0
    while len(out) < size and any(depth < len(p) for p in per_class):
        out.extend(int(p[depth]) for p in per_class if depth < len(p))
        depth += 1
    return np.array(sorted(out[:size]), dtype=np.int64)


def split_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``fraction`` of each class held out (≥ 1 kept for training; ≥ 1 held
    out where the class has at least 2 images and ``fraction`` > 0)."""
    train, hold = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = 0 if fraction <= 0 else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        hold.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(hold), dtype=np.int64)


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_acc: float
    holdout_loss: float | None
    holdout_acc: float | None
    seconds: float
    peak_rss_mb: float

    def line(self, epochs: int) -> str:
        hold = ("" if self.holdout_loss is None else
                f"  holdout loss {self.holdout_loss:.4f} acc {100 * self.holdout_acc:5.1f}%")
        return (f"epoch {self.epoch:>3}/{epochs}  train loss {self.train_loss:.4f} "
                f"acc {100 * self.train_acc:5.1f}%{hold}  time {self.seconds:.2f}s  "
                f"peak RSS {self.peak_rss_mb:.1f} MB")


def evaluate(net: Conv4, x_u8: np.ndarray, y: np.ndarray, mean: Sequence[float],
             std: Sequence[float],
             stats: Stats | None, batch: int, step: int) -> tuple[float, float]:
    """Mean loss and accuracy of a uint8 set in batches at adaptation step ``step`` (own
    statistics, or ``stats``)."""
    losses, hits = 0.0, 0
    for i in range(0, len(y), batch):
        xb = to_float(x_u8[i:i + batch], mean, std, net.dtype)
        logits = net.forward(xb, stats=stats, step=step)
        loss, _ = cross_entropy(logits, y[i:i + batch])
        losses += loss * len(xb)
        hits += int((logits.argmax(axis=1) == y[i:i + batch]).sum())
    return losses / len(y), hits / len(y)


def _prepare(model: SmzModel, images: np.ndarray, class_names: list[str], seed: int,
             log: Callable[[str], None]) -> tuple[Sequence[float], Sequence[float]]:
    """Fit a model copy to the local data, in place: the input normalisation (the local
    data's where the model has none) and a new head when the number of classes differs.
    Returns the normalisation's mean and std."""
    man = model.manifest
    arch, inp = man.architecture, man.input
    if images.shape[1] != arch.in_channels:
        raise EdgeError(f"images have {images.shape[1]} channel(s), the model expects "
                        f"{arch.in_channels}")
    if inp.mean is None or inp.std is None:
        mean, std = channel_stats(images)
        inp = replace(inp, mean=tuple(mean), std=tuple(std), stats_source="local data")
        log(f"the model has no input normalisation; using the local data's mean {mean} "
            f"and std {std}")
    ways = len(class_names)
    dtype = model.params["head.weight"].dtype
    if ways != arch.ways:
        features = model.params["head.weight"].shape[1]
        rates = ""
        if man.lr_rule == "metasgd":
            rates = _head_alpha(model, ways, features, dtype)
        elif man.lr_rule == "lslr":
            rates = "; its learned per-step rates are kept (they are per tensor, not per class)"
        model.params["head.weight"], model.params["head.bias"] = init_head(ways, features, dtype, seed)
        model.masks["head.weight"] = np.ones((ways, features), bool)
        log(f"the local data has {ways} classes but the exported head has {arch.ways}; "
            f"re-initialised the head for {ways} classes (dense, Xavier-uniform){rates}")
        arch = replace(arch, ways=ways)
    model.manifest = man.replace(architecture=arch, input=inp)
    return inp.mean, inp.std


def _train_epoch(adapter: Adapter, images: np.ndarray, labels: np.ndarray, order: np.ndarray,
                 batch: int, mean: Sequence[float], std: Sequence[float]) -> tuple[float, float]:
    """One pass of SGD steps over ``order`` in batches; mean loss and accuracy before each."""
    loss_sum, acc_sum = 0.0, 0.0
    for i in range(0, len(order), batch):
        idx = np.sort(order[i:i + batch])
        xb = to_float(images[idx], mean, std, adapter.net.dtype)
        loss, acc = adapter.sgd_step(xb, labels[idx])
        loss_sum += loss * len(idx)
        acc_sum += acc * len(idx)
    return loss_sum / len(order), acc_sum / len(order)


def _store_reference_stats(model: SmzModel, reference: np.ndarray) -> None:
    """Batch-norm statistics of a class-balanced reference batch, at the model's step, stored
    so that a single image can be classified later (``bn_stats.*``)."""
    net = network(model)
    for i, (m, v) in enumerate(net.batch_stats(reference, model.manifest.adapted_steps)):
        model.extra[f"bn_stats.{i}.mean"], model.extra[f"bn_stats.{i}.var"] = m, v


def _epochs(adapter: Adapter, model: SmzModel, kept: list[str], images: np.ndarray,
            labels: np.ndarray, split: tuple[np.ndarray, np.ndarray, np.ndarray],
            norm: tuple[Sequence[float], Sequence[float]], *, epochs: int, patience: int,
            min_delta: float, batch: int, rule: str, rng: np.random.Generator,
            log: Callable[[str], None]) -> tuple[list[EpochLog], dict | None, int]:
    """The epochs of ``finetune`` with early stopping on the held-out loss: the log, the best
    weights of the updated tensors (None without a holdout) and the SGD steps they took."""
    logs: list[EpochLog] = []
    train_idx, hold_idx, ref_u8 = split
    mean, std = norm
    net, bn = adapter.net, model.manifest.bn
    dtype = model.params["head.weight"].dtype
    best_loss, best_params, best_steps, bad = np.inf, None, adapter.step, 0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        train_loss, train_acc = _train_epoch(adapter, images, labels,
                                             rng.permutation(train_idx), batch, mean, std)
        hl = ha = None
        if len(hold_idx):
            stats = (net.batch_stats(to_float(ref_u8, mean, std, dtype), adapter.step)
                     if bn == "support" else adapter.stats())
            hl, ha = evaluate(net, images[hold_idx], labels[hold_idx], mean, std, stats, batch,
                              adapter.step)
        if not np.isfinite(train_loss) or (hl is not None and not np.isfinite(hl)):
            raise EdgeError(f"fine-tuning diverged at epoch {epoch} (loss not finite) with "
                            f"{rule}; pass a lower --lr")
        entry = EpochLog(epoch, train_loss, train_acc, hl, ha, time.perf_counter() - start,
                         peak_rss_mb())
        logs.append(entry)
        log(entry.line(epochs))
        if hl is None:
            continue
        if hl < best_loss - min_delta:
            best_loss, best_steps, bad = hl, adapter.step, 0
            best_params = {k: model.params[k].copy() for k in kept}
        else:
            bad += 1
            if bad >= patience:
                log(f"early stop: holdout loss has not improved by more than {min_delta} "
                    f"for {patience} epoch(s)")
                break
    return logs, best_params, best_steps


def finetune(
    model: SmzModel,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    *,
    epochs: int = 20,
    patience: int = 3,
    min_delta: float = 0.0,
    holdout: float = 0.2,
    lr: float | None = None,
    batch: int = 25,
    seed: int = 0,
    update: str = "all",
    log: Callable[[str], None] = print,
) -> tuple[SmzModel, list[EpochLog]]:
    """Fine-tune on a local labelled set (uint8 images) with masked SGD at the model's inner
    learning rate(s) (``Adapter``; ``lr`` replaces them by one scalar) and its batch-norm
    policy; early stopping on the held-out loss. Every mini-batch is one adaptation step, so
    past meta-training's inner steps the last learned rate and batch-norm slot are used.

    Returns a new model (the input is not modified) holding the best weights, the SGD steps
    they took (``adapted_steps``), the local class names, the normalisation used and the
    reference batch-norm statistics. ``update`` selects the parameters trained
    (``update_names``); the others stay bit-identical and backward stops below the lowest
    updated block.
    """
    trained = check_options(epochs=epochs, patience=patience, min_delta=min_delta,
                            holdout=holdout, lr=lr, batch=batch, seed=seed, update=update)
    model = copy.deepcopy(model)
    mean, std = _prepare(model, images, class_names, seed, log)
    man = model.manifest
    bn = man.bn
    ways = len(class_names)
    dtype = model.params["head.weight"].dtype
    adapter = Adapter(model, lr)
    net = adapter.net
    net.trainable = trained
    kept = [k for k in model.params if trained is None or k in trained]
    rng = np.random.default_rng(seed)
    train_idx, hold_idx = split_holdout(labels, holdout, rng)
    ref_idx = balanced_sample(labels[train_idx], batch, rng)
    ref_u8 = images[train_idx[ref_idx]]
    rule = describe_rates(model) if lr is None else f"lr {lr} for every tensor (--lr)"
    slots = f" ({man.bn_steps} per-step slots)" if man.bn_steps > 1 else ""
    log(f"fine-tuning on {len(train_idx)} images of {ways} classes, {len(hold_idx)} held out; "
        f"{rule}, batch {batch}, batch norm '{bn}'{slots}, density {model.density:.3f}; "
        f"updating {update} ({sum(model.params[k].size for k in kept)} parameters)")

    logs, best_params, best_steps = _epochs(
        adapter, model, kept, images, labels, (train_idx, hold_idx, ref_u8), (mean, std),
        epochs=epochs, patience=patience, min_delta=min_delta, batch=batch, rule=rule, rng=rng,
        log=log)
    best = min((e for e in logs if e.holdout_loss is not None), key=lambda e: e.holdout_loss,
               default=None)
    if best_params is not None and best is not None:
        model.params.update(best_params)
        log(f"kept the weights of epoch {best.epoch} (holdout loss {best.holdout_loss:.4f}, "
            f"accuracy {100 * best.holdout_acc:.1f}%)")
    scalar = lr is not None or man.lr_rule == "scalar"
    kept_best = best if best_params is not None else None
    model.manifest = man.replace(
        adapted_steps=best_steps if best_params is not None else adapter.step,
        class_names=tuple(class_names),
        finetuned=Finetuned(
            epochs=len(logs), lr_rule="scalar" if scalar else man.lr_rule,
            lr=adapter.rates() if scalar else None, batch=batch, train_images=int(len(train_idx)),
            holdout_images=int(len(hold_idx)), seed=seed,
            holdout_loss=None if kept_best is None else float(kept_best.holdout_loss),
            holdout_accuracy=None if kept_best is None else float(kept_best.holdout_acc),
            reference_images=int(len(ref_idx)), update=update))
    if bn != "running":  # under 'running' predictions use the running statistics instead
        _store_reference_stats(model, to_float(ref_u8, mean, std, dtype))
    return model, logs


def predict(model: SmzModel, images: np.ndarray, bn_mode: str = "auto", chunk: int = 64
            ) -> tuple[np.ndarray, str]:
    """Class probabilities of uint8 images and a note on which statistics normalised them.

    ``auto``: stored (fine-tuning) statistics under the ``support`` policy, or for a single
    image; otherwise the batch's own statistics (``transductive``). Under ``running``, ``auto``
    and ``stored`` use the running statistics of the model's step. Per-step batch norm uses the
    slot of the steps the weights have taken (``adapted_steps``).
    """
    man = model.manifest
    mean, std = man.input.mean, man.input.std
    note = []
    if mean is None or std is None:
        from sparsemeta_edge.data import channel_stats as stats_of

        mean, std = stats_of(images)
        note.append("no stored input normalisation: used these images' own mean/std")
    bn = man.bn
    net = network(model)
    step = man.adapted_steps
    if bn == "running" and bn_mode != "batch":
        stats: Stats | None = net.running_stats(step)
        note.append(f"batch norm: meta-training's running statistics of step {step}")
    else:
        stats = stored_stats(model)
        use_stored = bn_mode == "stored" or (bn_mode == "auto" and (bn == "support" or len(images) < 2))
        if use_stored and stats is None and bn_mode == "stored":
            raise EdgeError("this model has no stored batch-norm statistics; fine-tune it first "
                            "or use --bn batch")
        stats = stats if use_stored else None
        note.append("batch norm: statistics stored by fine-tuning" if stats is not None
                    else f"batch norm: statistics of these {len(images)} image(s)")
    if stats is None:  # transductive: the whole set is one batch, by definition
        logits = net.forward(to_float(images, mean, std, net.dtype), step=step)
    else:  # fixed statistics: chunks give the same result with bounded memory
        logits = np.concatenate([net.forward(to_float(images[i:i + chunk], mean, std, net.dtype),
                                             stats=stats, step=step)
                                 for i in range(0, len(images), chunk)])
    return softmax(logits.astype(np.float64)), "; ".join(note)
