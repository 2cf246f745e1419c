"""``sparsemeta-edge``: fine-tune, predict with, inspect and plan for ``.smz`` models on a device.

Needs only NumPy (and Pillow to read images). User mistakes — a corrupt or hostile model file
included — end as one line on stderr, exit 2. Text from files (class names, manifest fields) is
printed with control characters escaped.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np

from sparsemeta_edge.budget import SIZE_HELP, estimate, parse_size, report
from sparsemeta_edge.files import check_output, free_bytes, not_regular
from sparsemeta_edge.manifest import plain as _plain
from sparsemeta_edge.nn import param_shapes
from sparsemeta_edge.runtime import UPDATE_HELP
from sparsemeta_edge.schema import MAX_COUNT
from sparsemeta_edge.smz import (
    EdgeError,
    SmzModel,
    is_prunable,
    load,
    printable,
    save_model,
    size_bound,
)

PROG = "sparsemeta-edge"
UPDATE_MODES = "head|bn|last:K|all"


def out(line: str) -> None:
    """Print one line of output; anything a file put in it is escaped."""
    print(printable(line), flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line instead of a usage block, and takes
    ``--ram -1M`` or ``--lr -0.1`` as an option's value (to be refused by its check, not as
    "expected one argument"): anything that starts like a negative number is a value. Python
    3.13's argparse does this itself; earlier versions only for plain numbers."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def _dtype(name: str) -> type:
    return np.float64 if name == "float64" else np.float32


def _meta_trained_shapes(model: SmzModel) -> dict[str, tuple[int, ...]]:
    """Shapes of the uncompacted Conv4 the model was meta-trained as (sizes compare to it)."""
    m = model.manifest
    a = m.architecture
    return param_shapes(a.in_channels, model.params["head.weight"].shape[0], a.image_size,
                        a.filters, a.downsample, m.bn_steps, m.bn == "running")


def _dense_bytes(model: SmzModel) -> int:
    """fp32 bytes of the meta-trained Conv4 with its learned rates (Meta-SGD: one per weight)."""
    shapes = _meta_trained_shapes(model)
    rates = {k: r.size for k, r in model.rates.items()}
    if model.manifest.lr_rule == "metasgd":
        rates = {k: math.prod(shapes[k]) for k in rates}
    return 4 * (sum(math.prod(s) for s in shapes.values()) + sum(rates.values()))


def cmd_info(args: argparse.Namespace) -> int:
    model = load(args.model)
    m = model.manifest
    a = m.architecture
    size = Path(args.model).stat().st_size
    dense = _dense_bytes(model)
    covered = "manifest and payload" if m.version >= 3 else "payload"
    out(f"{args.model}: checksum of {covered} OK (sha256 {model.checksum[:16]}…), version "
        f"{m.version}")
    compacted = (f", filters compacted to {'/'.join(map(str, a.layer_filters))} (a "
                 "filter-pruned ticket)" if a.compacted else "")
    out(f"architecture  Conv4-{a.filters} ({a.downsample}){compacted}, input "
        f"{a.in_channels}×{a.image_size}×{a.image_size}, {a.ways} ways")
    prunable = sum(math.prod(s) for k, s in _meta_trained_shapes(model).items()
                   if is_prunable(k, s))
    out(f"density       {m.nonzeros / prunable:.4f} ({m.nonzeros} of {prunable} prunable "
        f"weights), values {m.values_dtype}")
    out(f"size          {size} bytes vs {dense} dense fp32 ({size / dense:.3f}×); "
        f"bound {size_bound(model)}")
    from sparsemeta_edge.runtime import describe_rates

    per_step = (f" with per-step weights ({m.bn_steps} slots; later steps use the last)"
                if m.bn_steps > 1 else "")
    trained = "" if m.inner_steps is None else f", meta-trained with {m.inner_steps}"
    out(f"adaptation    {m.algorithm}: {describe_rates(model)}; {m.eval_inner_steps} step(s)"
        f"{trained}, batch norm '{m.bn}'{per_step}")
    if m.adapted_steps:
        out(f"adapted       {m.adapted_steps} SGD step(s) since export (selects rate and slot)")
    inp = m.input
    norm = ("unknown (the local data's statistics will be used)" if inp.mean is None
            else f"mean {list(inp.mean)} std {list(inp.std)}")
    out(f"input         {norm}" + (", inverted" if inp.invert else ""))
    if m.class_names:
        out(f"classes       {', '.join(m.class_names)}")
    if m.finetuned:
        out(f"fine-tuned    {_plain(m.finetuned)}")
    if m.source:
        out(f"source        {_plain(m.source)}")
    return 0


def _output(args: argparse.Namespace) -> Path:
    """The fine-tuned model's path, checked before any work: a new or replaceable regular
    ``.smz`` file, not the input, in a writable directory."""
    model = Path(args.model)
    if args.out == "":
        raise EdgeError("--out is empty; give a file name such as tuned.smz")
    path = Path(args.out) if args.out is not None else model.with_name(model.stem + "-tuned.smz")
    check_output(path, inputs=(model,), flag="--out")
    if path.suffix.lower() != ".smz":
        raise EdgeError(f"--out '{path}' must end in .smz (the fine-tuned model file): a "
                        "slip must not overwrite an image or another kind of file")
    return path


def _check_room(path: Path, model: SmzModel, names: list[str]) -> None:
    """Refuse before training if ``path``'s file system cannot hold the fine-tuned model: at
    most the input's size bound, plus a re-initialised head (and its Meta-SGD α) and the
    class names."""
    free = free_bytes(path.parent)
    features = model.params["head.weight"].shape[1]
    needed = size_bound(model) + 8 * (len(names) + 1) * (features + 1) + len(repr(names))
    if free is not None and free < needed:
        raise EdgeError(f"only {free} bytes are free in '{path.parent}'; the fine-tuned model "
                        f"needs up to {needed}. Free some space or choose another --out")


def _save_or_rescue(path: Path, model: SmzModel) -> int:
    """Write the fine-tuned model; if that fails after all (the disk filled up while it
    trained), write it to the temporary directory instead so the training is not lost, and
    say where in one line."""
    try:
        return save_model(path, model)
    except OSError as exc:
        reason = f"could not write '{path}' ({exc.strerror})"
    rescue = Path(tempfile.gettempdir()) / f"{path.stem}-{os.getpid()}.smz"
    try:
        save_model(rescue, model)
    except (OSError, EdgeError) as exc:
        raise EdgeError(f"{reason}; nothing was written there, and the fine-tuned model could "
                        f"not be saved elsewhere either ({exc})") from None
    raise EdgeError(f"{reason}; nothing was written there — the fine-tuned model was saved "
                    f"as '{rescue}' instead")


def cmd_finetune(args: argparse.Namespace) -> int:
    from sparsemeta_edge.data import load_classes, scan
    from sparsemeta_edge.runtime import check_options, finetune

    check_options(epochs=args.epochs, patience=args.patience, min_delta=args.min_delta,
                  holdout=args.holdout, lr=args.lr, batch=args.batch, seed=args.seed,
                  update=args.update)
    path = _output(args)
    model = load(args.model, _dtype(args.dtype))
    classes = scan(args.data)
    names = [name for name, _ in classes]
    _check_room(path, model, names)
    a = model.manifest.architecture
    images, labels, names = load_classes(classes, a.image_size, a.in_channels,
                                         model.manifest.input.invert)
    out(f"{len(images)} images in {len(names)} classes from '{args.data}'")
    tuned, _ = finetune(model, images, labels, names, epochs=args.epochs, patience=args.patience,
                        min_delta=args.min_delta, holdout=args.holdout, lr=args.lr,
                        batch=args.batch, seed=args.seed, update=args.update, log=out)
    nbytes = _save_or_rescue(path, tuned)
    out(f"saved {path} ({nbytes} bytes)")
    return 0


def _check_images(paths: list[str]) -> None:
    """Every image argument is an existing regular file (checked before any is decoded)."""
    for p in paths:
        try:
            mode = os.stat(p).st_mode
        except FileNotFoundError:
            raise EdgeError(f"image '{p}' does not exist") from None
        if stat.S_ISDIR(mode):
            raise EdgeError(f"'{p}' is a directory; give image files (e.g. folder/*.png)")
        if not stat.S_ISREG(mode):
            raise EdgeError(not_regular(p, mode, "image file"))


def cmd_predict(args: argparse.Namespace) -> int:
    from sparsemeta_edge.data import decode_many
    from sparsemeta_edge.runtime import predict

    if args.top < 1:
        raise EdgeError(f"--top must be >= 1, got {args.top}")
    _check_images(args.images)
    model = load(args.model, _dtype(args.dtype))
    a = model.manifest.architecture
    images = decode_many(args.images, a.image_size, a.in_channels, model.manifest.input.invert)
    probs, note = predict(model, images, args.bn)
    names = model.manifest.class_names or [f"class_{i}" for i in range(a.ways)]
    names = [printable(n) for n in names]
    print(f"# {printable(note)}", file=sys.stderr)
    for path, p in zip(args.images, probs):
        top = int(np.argmax(p))
        rest = "  ".join(f"{names[i]}={p[i]:.3f}" for i in np.argsort(-p)[:args.top])
        print(f"{printable(path)}\t{names[top]}\t{p[top]:.4f}\t{rest}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Exit 0 if fine-tuning on ``--images`` images fits ``--ram``, 1 if not."""
    from sparsemeta_edge.runtime import update_names

    update_names(args.update)
    for name, value in (("--images", args.images), ("--batch", args.batch)):
        if not 1 <= value <= MAX_COUNT:
            raise EdgeError(f"{name} must be an integer from 1 to {MAX_COUNT}, got {value}")
    model = load(args.model, _dtype(args.dtype))
    budget = estimate(model, args.images, args.update, args.batch, _dtype(args.dtype))
    out(f"fine-tuning {args.model} on {args.images} images (--update {args.update}, batch "
        f"{args.batch}, {args.dtype}): estimated peak memory")
    lines, fits = report(budget, args.ram)
    for line in lines:
        out(line)
    return 0 if fits else 1


def _ram(text: str) -> int:
    """``--ram``'s type: a strict size, refused by argparse in one line."""
    try:
        return parse_size(text)
    except EdgeError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--ram ")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="check a model's checksum and describe it")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("finetune", help="fine-tune on local class folders (ROOT/CLASS/*.png)")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=3,
                   help="stop after this many epochs without holdout-loss improvement")
    p.add_argument("--min-delta", type=float, default=0.0, help="smallest improvement that counts")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of each class held out for early stopping (0: none)")
    p.add_argument("--lr", type=float, default=None, help="SGD step (default: the model's inner lr)")
    p.add_argument("--batch", type=int, default=25, help="images per SGD step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--out", default=None, help="output model (default MODEL-tuned.smz)")
    p.add_argument("--update", default="all", metavar=UPDATE_MODES, help=UPDATE_HELP)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("predict", help="classify images; prints class and probability")
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--bn", choices=("auto", "batch", "stored"), default="auto",
                   help="batch-norm statistics: the images' own (batch), fine-tuning's (stored), "
                        "or by the model's policy (auto)")
    p.add_argument("--top", type=int, default=3, help="probabilities shown per image")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("plan", help="check that fine-tuning fits a device's RAM (exit 0) or not (1)")
    p.add_argument("model")
    p.add_argument("--ram", required=True, type=_ram, help=f"memory available: {SIZE_HELP}")
    p.add_argument("--images", type=int, required=True, help="images to fine-tune on")
    p.add_argument("--update", default="all", metavar=UPDATE_MODES, help=UPDATE_HELP)
    p.add_argument("--batch", type=int, default=25, help="images per SGD step")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage mistake (one line, exit 2) or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except EdgeError as exc:
        print(f"{PROG}: error: {printable(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
    except MemoryError:
        print(f"{PROG}: error: out of memory; check what fits with '{PROG} plan' and use fewer "
              "images, a smaller --batch or a narrower --update", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that vanished or failed between its check and its use
        where = f" '{printable(exc.filename)}'" if exc.filename else ""
        print(f"{PROG}: error: {printable(exc.strerror or exc)}{where}; nothing was written",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
