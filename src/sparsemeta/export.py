"""Compact export of a trained (sparse) model for the NumPy edge runtime (``sparsemeta_edge``).

``export_run`` writes one run directory's ``best.pt`` (+ ``mask.pt``) as a ``.smz`` file: packed
bitmasks plus only the kept values of each pruned tensor, small tensors dense, and a manifest
with everything the runtime needs to adapt the model as meta-training did (architecture,
batch-norm policy, inner learning rate and steps, input size, channels and normalisation).
The format itself lives in ``sparsemeta_edge.smz`` so that writer and reader cannot drift apart.

A filter-pruned ticket (``prune.structure=filters``) is exported *compacted*: its removed
filters, the next layer's input channels from them and the head columns they feed are cut out,
so the file holds a smaller dense Conv4 (``architecture.layer_filters`` in the manifest) that
both runtimes fine-tune faster. Nothing downstream reads a removed filter, so the compacted
network computes exactly what the masked one does (tested). ``export_bytes`` gives a run's
exported size through the same code path without writing a file (the report's bytes column).

``export_experiment`` picks the model of a lottery experiment: without ``level``, the sparsest
ticket level whose test accuracy lies within the dense model's 95% CI.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsemeta.errors import UserError
from sparsemeta.experiment import load_run_config, read_json
from sparsemeta.models.conv4 import BatchNorm, Conv4
from sparsemeta.sparsity.masks import load_mask
from sparsemeta_edge import smz
from sparsemeta_edge.nn import block_names, param_shapes

#: data sets whose loaders do not normalise (mean 0, std 1 on images / 255)
_UNNORMALISED = ("glyphs", "omniglot")

Stats = tuple[list[float] | None, list[float] | None, str]
#: statistics per data config: a report sizes every run of an experiment, loading data once
_STATS: dict[str, Stats] = {}


def _input_stats(cfg, channels: int) -> Stats:  # noqa: ANN001
    """The per-channel normalisation meta-training used, so the device feeds the same inputs."""
    if cfg.data.name in _UNNORMALISED:
        return [0.0] * channels, [1.0] * channels, cfg.data.name
    key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
    if key not in _STATS:
        try:  # folder / mini-ImageNet: statistics come from the (cached) data set
            from sparsemeta.data.registry import load_data

            data = load_data(cfg)
            _STATS[key] = ([float(m) for m in data.mean], [float(s) for s in data.std],
                           cfg.data.name)
        except Exception:  # data not on this machine: the runtime falls back to local statistics
            return None, None, "unknown"
    return _STATS[key]


def _check_supported(cfg, state: dict[str, torch.Tensor], run: Path) -> None:  # noqa: ANN001
    """Refuse, by name, what the edge runtime cannot reproduce yet (format v1): learned inner
    rates (MAML++'s LSLR, Meta-SGD's α), per-step batch-norm weights, running statistics."""
    found = []
    if any(k.startswith("inner_lr.") for k in state):
        found.append("learned inner learning rates")
    if any(k.endswith("bn.weight") and v.dim() > 1 for k, v in state.items()):
        found.append("per-step batch-norm weights")
    if cfg.meta.bn == "running" or any("running_" in k for k in state):
        found.append("running batch-norm statistics (meta.bn=running)")
    if found:
        raise UserError(
            f"'{run}' uses {', '.join(found)} (meta.algorithm={cfg.meta.algorithm}, "
            f"meta.bn={cfg.meta.bn}); the edge runtime (.smz v1) runs MAML with one scalar inner "
            "learning rate and 'transductive' or 'support' batch norm — export a run trained "
            "that way (e.g. meta.algorithm=maml, or mamlpp with mamlpp.lslr=false and "
            "mamlpp.per_step_bn=false)")


def _numpy_state(run: Path, cfg) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # noqa: ANN001
    """Weights (pruned entries zeroed: the effective θ ⊙ m) and masks of a run directory."""
    best = run / "best.pt"
    if not best.is_file():
        raise UserError(f"'{run}' has no best.pt yet (no validation has run); train it further first")
    state = torch.load(best, map_location="cpu", weights_only=True)
    _check_supported(cfg, state, run)
    mask = load_mask(run / "mask.pt") if (run / "mask.pt").is_file() else {}
    params, masks = {}, {}
    for name, value in state.items():
        arr = value.detach().to(torch.float32).numpy().copy()
        if name in mask:
            m = mask[name].numpy().astype(bool)
            arr[~m] = 0.0
            masks[name] = m
        params[name] = arr
    return params, masks


def compact(params: dict[str, np.ndarray], masks: dict[str, np.ndarray]
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cut the removed filters (all-pruned slices) out of a filter-pruned Conv4.

    Each conv layer keeps its surviving filters (rows, with their bias and batch norm) and the
    input channels of the previous layer's survivors; the head keeps the columns of the last
    layer's survivors. Exact only if nothing reads a removed filter — its batch-norm output is
    the constant ReLU(β), not 0 — so a mask where something does is refused.
    """
    params, masks = dict(params), dict(masks)
    previous = None  # surviving filters of the layer before (None: the image channels)
    for i in range(4):
        names = block_names(i)
        mask = masks[names[0]]
        keep = mask.reshape(mask.shape[0], -1).any(axis=1)
        if previous is not None:
            if mask[:, ~previous].any():
                raise ValueError(f"'{names[0]}' reads removed filters of the layer before; "
                                 "the mask is not filter-structured")
            for d in (params, masks):
                d[names[0]] = d[names[0]][:, previous]
        for d in (params, masks):
            d[names[0]] = d[names[0]][keep]
        for name in names[1:]:
            params[name] = params[name][..., keep]
        previous = keep
    head = masks["head.weight"]
    columns = np.repeat(previous, head.shape[1] // previous.size)
    if head[:, ~columns].any():
        raise ValueError("'head.weight' reads removed filters; the mask is not filter-structured")
    for d in (params, masks):
        d["head.weight"] = d["head.weight"][:, columns]
    return params, masks


def _export_parts(run: Path) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                  dict[str, np.ndarray], dict[str, Any]]:
    """Manifest, parameters and masks of a run's ``.smz`` (what ``smz.encode`` takes), plus
    facts for the caller: the dense fp32 size and prunable weights of the meta-trained Conv4."""
    cfg = load_run_config(run)
    params, masks = _numpy_state(run, cfg)
    w0 = params["blocks.0.conv.weight"]
    filters, channels = int(w0.shape[0]), int(w0.shape[1])
    ways = int(params["head.weight"].shape[0])
    expected = param_shapes(channels, ways, cfg.data.image_size, filters, cfg.model.downsample)
    got = {k: tuple(v.shape) for k, v in params.items()}
    if got != expected:
        raise UserError(f"'{run}/best.pt' does not match its config.yaml's Conv4 "
                        f"({cfg.model.filters} filters, {cfg.data.image_size} px); is the run intact?")
    facts = {"dense_fp32_bytes": 4 * sum(v.size for v in params.values()),
             "prunable": sum(v.size for v in params.values() if smz.is_prunable(v))}
    if cfg.prune.structure == "filters" and masks:
        try:
            params, masks = compact(params, masks)
        except ValueError as exc:
            raise UserError(f"'{run}': {exc}; was mask.pt changed after training?") from None
    layer_filters = [int(params[block_names(i)[0]].shape[0]) for i in range(4)]
    mean, std, stats_source = _input_stats(cfg, channels)
    ev = run / "eval.json"
    result = read_json(ev) if ev.is_file() else {}
    manifest = {
        "architecture": {"name": cfg.model.name, "in_channels": channels,
                         "image_size": cfg.data.image_size, "filters": filters,
                         "layer_filters": layer_filters, "downsample": cfg.model.downsample,
                         "ways": ways},
        "algorithm": cfg.meta.algorithm,
        "first_order": cfg.meta.first_order,
        "bn": cfg.meta.bn,
        "inner_lr": cfg.meta.inner_lr,
        "inner_steps": cfg.meta.eval_inner_steps,
        "train_inner_steps": cfg.meta.inner_steps,
        "shots": cfg.data.shots,
        "input": {"size": cfg.data.image_size, "channels": channels, "mean": mean, "std": std,
                  "invert": cfg.data.name == "omniglot", "stats_source": stats_source},
        "class_names": None,
        # the run's last path components only: the manifest must stay small (size bound)
        "source": {"run": "/".join(run.resolve().parts[-4:]), "data": cfg.data.name,
                   "test_accuracy": result.get("accuracy"), "test_ci95": result.get("ci95")},
    }
    return manifest, params, masks, {**facts, "normalisation": stats_source}


def export_bytes(run_dir: str | Path, fp16: bool = False) -> int:
    """The exact size of ``export_run``'s file for this run, computed without writing it."""
    manifest, params, masks, _ = _export_parts(Path(run_dir))
    return sum(len(chunk) for chunk in smz.encode(manifest, params, masks, fp16=fp16))


def export_run(run_dir: str | Path, out_path: str | Path, fp16: bool = False) -> dict[str, Any]:
    """Write ``run_dir``'s chosen model as ``out_path`` (.smz); returns sizes and density.

    ``fp16`` stores the kept weight values in half precision (biases and batch norm stay fp32).
    ``density`` counts the file's weights against the meta-trained (uncompacted) Conv4.
    """
    run = Path(run_dir)
    manifest, params, masks, facts = _export_parts(run)
    out = Path(out_path)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; give a file name such as model.smz")
    if not out.parent.is_dir():
        raise UserError(f"directory '{out.parent}' does not exist; create it or choose another --out")
    nbytes = smz.save(out, manifest, params, masks, fp16=fp16)
    model = smz.load(out)
    dense = facts["dense_fp32_bytes"]
    arch = manifest["architecture"]
    return {
        "path": str(out), "bytes": nbytes, "dense_fp32_bytes": dense, "ratio": nbytes / dense,
        "bound_bytes": smz.size_bound(model),
        "density": model.manifest["nonzeros"] / facts["prunable"],
        "nonzeros": model.manifest["nonzeros"], "values_dtype": model.manifest["values_dtype"],
        "layer_filters": arch["layer_filters"],
        "compacted": arch["layer_filters"] != [arch["filters"]] * 4,
        "normalisation": facts["normalisation"], "run": str(run),
    }


def torch_model(model: smz.SmzModel) -> tuple[Conv4, dict[str, torch.Tensor]]:
    """The PyTorch Conv4 of a loaded ``.smz`` (at the file's, possibly compacted, widths and in
    its dtype) and its mask: to adapt or time an export with ``MetaLearner``."""
    a, p = model.manifest["architecture"], model.params
    net = Conv4(a["in_channels"], p["head.weight"].shape[0], a["image_size"], a["filters"],
                a["downsample"])
    channels = a["in_channels"]
    for i, block in enumerate(net.blocks):  # a compacted file's widths, per layer
        width = p[block_names(i)[0]].shape[0]
        block.conv = nn.Conv2d(channels, width, 3, stride=block.conv.stride, padding=1)
        block.bn = BatchNorm(width)
        channels = width
    net.head = nn.Linear(p["head.weight"].shape[1], p["head.weight"].shape[0])
    net = net.to(torch.float64 if p["head.weight"].dtype == np.float64 else torch.float32)
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in p.items()})
    return net, {k: torch.from_numpy(m.copy()) for k, m in model.masks.items()}


def _ticket_rows(exp: Path) -> list[dict]:
    """(level, density, accuracy, ci95) of the ticket branch: summary.json, else eval.json files."""
    summary = exp / "summary.json"
    if summary.is_file():
        rows = [r for r in read_json(summary).get("rows", []) if r.get("method") == "ticket"]
        if rows:
            return rows
    rows = []
    for ev in sorted(exp.glob("seed_*/level_*/ticket/eval.json")):
        r = read_json(ev)
        rows.append({"level": int(ev.parent.parent.name.split("_")[1]), "density": r.get("density", 1.0),
                     "accuracy": r["accuracy"], "ci95": r.get("ci95", 0.0)})
    if not rows:
        raise UserError(f"'{exp}' has no finished ticket runs (no summary.json with ticket rows and "
                        "no seed_*/level_*/ticket/eval.json); run the lottery experiment first")
    # several seeds: one row per level, mean accuracy (the CI of the first seed's run)
    by_level: dict[int, list[dict]] = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r)
    return [{"level": lv, "density": float(np.mean([r["density"] for r in rs])),
             "accuracy": float(np.mean([r["accuracy"] for r in rs])), "ci95": rs[0]["ci95"]}
            for lv, rs in sorted(by_level.items())]


def choose_level(rows: list[dict]) -> tuple[int, str]:
    """The sparsest ticket level whose accuracy ≥ dense accuracy − dense CI, and why."""
    dense = next((r for r in rows if r["level"] == 0), None)
    if dense is None:
        raise UserError("no dense (level 0) ticket result to compare against")
    floor = dense["accuracy"] - (dense["ci95"] or 0.0)
    ok = [r for r in rows if r["accuracy"] >= floor]
    pick = min(ok, key=lambda r: (r["density"], -r["level"]))
    why = (f"level {pick['level']} (density {pick['density']:.3f}, accuracy "
           f"{100 * pick['accuracy']:.2f}%) is the sparsest ticket within the dense model's CI "
           f"({100 * dense['accuracy']:.2f}% ± {100 * (dense['ci95'] or 0.0):.2f})")
    return int(pick["level"]), why


def export_experiment(exp_dir: str | Path, out: str | Path, level: int | None = None,
                      fp16: bool = False, seed: int | None = None) -> dict[str, Any]:
    """Export one ticket of a lottery experiment (``level`` or the automatic choice)."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise UserError(f"experiment directory '{exp}' does not exist")
    if level is None:
        level, why = choose_level(_ticket_rows(exp))
    else:
        why = f"level {level} as requested"
    seeds = sorted(exp.glob("seed_*"), key=lambda p: int(p.name.split("_")[1]))
    if seed is not None:
        seeds = [s for s in seeds if s.name == f"seed_{seed}"]
    runs = [s / f"level_{level:02d}" / "ticket" for s in seeds]
    runs = [r for r in runs if (r / "best.pt").is_file()]
    if not runs:
        raise UserError(f"no trained ticket at level {level} under '{exp}'"
                        + (f" for seed {seed}" if seed is not None else ""))
    result = export_run(runs[0], out, fp16=fp16)
    seed_name = runs[0].parent.parent.name
    result.update({"level": level, "seed": int(seed_name.split("_")[1]),
                   "choice": f"{why}; exported {seed_name}'s ticket"})
    return result


def format_export(result: dict[str, Any]) -> str:
    """One human line per fact: where, how big against dense fp32, how sparse."""
    lines = []
    if "choice" in result:
        lines.append(f"chose {result['choice']}")
    compacted = (f" (compacted to {'/'.join(map(str, result['layer_filters']))} filters)"
                 if result.get("compacted") else "")
    lines.append(f"wrote {result['path']}: {result['bytes']} bytes vs {result['dense_fp32_bytes']} "
                 f"dense fp32 ({result['ratio']:.3f}×; bound {result['bound_bytes']}), density "
                 f"{result['density']:.4f}{compacted}, values {result['values_dtype']}")
    if result.get("normalisation") == "unknown":
        lines.append("note: the data set's normalisation was not available here; the edge runtime "
                     "will normalise with the local data's statistics")
    return "\n".join(lines)


def export_command(path: str | Path, out: str | Path, level: int | None = None,
                   fp16: bool = False, seed: int | None = None, as_json: bool = False) -> str:
    """``sparsemeta export``: a run directory (has config.yaml) or a lottery experiment."""
    p = Path(path)
    if (p / "config.yaml").is_file():
        if level is not None:
            raise UserError("--level applies to a lottery experiment directory, not a run directory")
        result = export_run(p, out, fp16=fp16)
    else:
        result = export_experiment(p, out, level=level, fp16=fp16, seed=seed)
    return json.dumps(result, indent=2) if as_json else format_export(result)
