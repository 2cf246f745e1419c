"""``sparsemeta-edge``: fine-tune, predict with, inspect and plan for ``.smz`` models on a device.

Needs only NumPy (and Pillow to read images). User mistakes — a corrupt or hostile model file
included — end as one line on stderr, exit 2. Text from files (class names, manifest fields) is
printed with control characters escaped.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from sparsemeta_edge.nn import param_shapes
from sparsemeta_edge.runtime import UPDATE_HELP
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
    """argparse that reports a usage mistake in one line instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _dtype(name: str) -> type:
    return np.float64 if name == "float64" else np.float32


def _meta_trained_shapes(model: SmzModel) -> dict[str, tuple[int, ...]]:
    """Shapes of the uncompacted Conv4 the model was meta-trained as (sizes compare to it)."""
    m = model.manifest
    a = m["architecture"]
    return param_shapes(a["in_channels"], model.params["head.weight"].shape[0], a["image_size"],
                        a["filters"], a["downsample"], m.get("bn_steps", 1), m.get("bn") == "running")


def _dense_bytes(model: SmzModel) -> int:
    """fp32 bytes of the meta-trained Conv4 with its learned rates (Meta-SGD: one per weight)."""
    shapes = _meta_trained_shapes(model)
    rates = {k: r.size for k, r in model.rates.items()}
    if model.manifest.get("lr_rule") == "metasgd":
        rates = {k: math.prod(shapes[k]) for k in rates}
    return 4 * (sum(math.prod(s) for s in shapes.values()) + sum(rates.values()))


def cmd_info(args: argparse.Namespace) -> int:
    model = load(args.model)
    m = model.manifest
    a = m["architecture"]
    size = Path(args.model).stat().st_size
    dense = _dense_bytes(model)
    inp = m.get("input", {})
    covered = "manifest and payload" if m["version"] >= 3 else "payload"
    out(f"{args.model}: checksum of {covered} OK (sha256 {model.checksum[:16]}…), version "
        f"{m['version']}")
    widths = a.get("layer_filters", [a["filters"]] * 4)
    compacted = ("" if widths == [a["filters"]] * 4 else
                 f", filters compacted to {'/'.join(map(str, widths))} (a filter-pruned ticket)")
    out(f"architecture  Conv4-{a['filters']} ({a['downsample']}){compacted}, input "
          f"{a['in_channels']}×{a['image_size']}×{a['image_size']}, {a['ways']} ways")
    prunable = sum(math.prod(s) for k, s in _meta_trained_shapes(model).items()
                   if is_prunable(k, s))
    out(f"density       {m['nonzeros'] / prunable:.4f} ({m['nonzeros']} of {prunable} prunable "
          f"weights), values {m['values_dtype']}")
    out(f"size          {size} bytes vs {dense} dense fp32 ({size / dense:.3f}×); "
          f"bound {size_bound(model)}")
    from sparsemeta_edge.runtime import describe_rates

    slots = m.get("bn_steps", 1)
    per_step = f" with per-step weights ({slots} slots; later steps use the last)" if slots > 1 else ""
    out(f"adaptation    {m.get('algorithm', 'maml')}: {describe_rates(model)}; "
          f"{m['inner_steps']} step(s), batch norm '{m.get('bn')}'{per_step}")
    if m.get("adapted_steps"):
        out(f"adapted       {m['adapted_steps']} SGD step(s) since export (selects rate and slot)")
    norm = ("unknown (the local data's statistics will be used)" if inp.get("mean") is None
            else f"mean {inp['mean']} std {inp['std']}")
    out(f"input         {norm}" + (", inverted" if inp.get("invert") else ""))
    if m.get("class_names"):
        out(f"classes       {', '.join(m['class_names'])}")
    if m.get("finetuned"):
        out(f"fine-tuned    {m['finetuned']}")
    if m.get("source"):
        out(f"source        {m['source']}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from sparsemeta_edge.data import load_folder
    from sparsemeta_edge.runtime import finetune, update_names

    path = Path(args.out) if args.out else Path(args.model).with_name(Path(args.model).stem + "-tuned.smz")
    if not path.parent.is_dir():
        raise EdgeError(f"directory '{path.parent}' does not exist; create it or choose another --out")
    if path.exists() and path.resolve() == Path(args.model).resolve():
        raise EdgeError(f"--out '{path}' is the input model; write the fine-tuned model to another "
                        "file (the meta-trained one is what the next fine-tune starts from)")
    update_names(args.update)  # a bad --update fails before the images are read
    model = load(args.model, _dtype(args.dtype))
    a = model.manifest["architecture"]
    inp = model.manifest.get("input", {})
    images, labels, names = load_folder(args.data, a["image_size"], a["in_channels"],
                                        bool(inp.get("invert")))
    out(f"{len(images)} images in {len(names)} classes from '{args.data}'")
    tuned, _ = finetune(model, images, labels, names, epochs=args.epochs, patience=args.patience,
                        min_delta=args.min_delta, holdout=args.holdout, lr=args.lr,
                        batch=args.batch, seed=args.seed, update=args.update, log=out)
    nbytes = save_model(path, tuned)
    out(f"saved {path} ({nbytes} bytes)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from sparsemeta_edge.data import decode_many
    from sparsemeta_edge.runtime import predict

    model = load(args.model, _dtype(args.dtype))
    a = model.manifest["architecture"]
    for p in args.images:
        if Path(p).is_dir():
            raise EdgeError(f"'{printable(str(p))}' is a directory; give image files "
                            "(e.g. folder/*.png)")
        if not Path(p).is_file():
            raise EdgeError(f"image '{printable(str(p))}' does not exist")
    images = decode_many(args.images, a["image_size"], a["in_channels"],
                         bool(model.manifest.get("input", {}).get("invert")))
    probs, note = predict(model, images, args.bn)
    names = model.manifest.get("class_names") or [f"class_{i}" for i in range(a["ways"])]
    names = [printable(n) for n in names]
    print(f"# {printable(note)}", file=sys.stderr)
    for path, p in zip(args.images, probs):
        top = int(np.argmax(p))
        rest = "  ".join(f"{names[i]}={p[i]:.3f}" for i in np.argsort(-p)[:args.top])
        print(f"{printable(path)}\t{names[top]}\t{p[top]:.4f}\t{rest}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Exit 0 if fine-tuning on ``--images`` images fits ``--ram``, 1 if not."""
    from sparsemeta_edge.budget import estimate, parse_size, report

    ram = parse_size(args.ram)
    model = load(args.model, _dtype(args.dtype))
    budget = estimate(model, args.images, args.update, args.batch, _dtype(args.dtype))
    out(f"fine-tuning {args.model} on {args.images} images (--update {args.update}, batch "
        f"{args.batch}, {args.dtype}): estimated peak memory")
    lines, fits = report(budget, ram)
    for line in lines:
        out(line)
    return 0 if fits else 1


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
    p.add_argument("--ram", required=True, help="memory available, e.g. 512M or 1G")
    p.add_argument("--images", type=int, required=True, help="images to fine-tune on")
    p.add_argument("--update", default="all", metavar=UPDATE_MODES, help=UPDATE_HELP)
    p.add_argument("--batch", type=int, default=25, help="images per SGD step")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgeError as exc:
        print(f"{PROG}: error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
