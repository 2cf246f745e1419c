"""Compact export of a trained (sparse) model for the NumPy edge runtime (``sparsemeta_edge``).

``export_run`` writes one run directory's chosen model (``best.pt`` with the mask it was
evaluated with) as a ``.smz`` file: packed bitmasks plus only the kept values of each pruned tensor, small tensors dense, and a manifest
with everything the runtime needs to adapt the model as meta-training did (architecture,
algorithm, batch-norm policy, inner learning rate rule and steps, input size, channels and
normalisation). Every learner exports: Meta-SGD's α travels with its weight (kept entries only:
a pruned weight's α has no effect), MAML++'s per-layer-per-step rates, per-step batch-norm
weights and (``meta.bn=running``) per-step running statistics as they are in ``best.pt``.
The format itself lives in ``sparsemeta_edge.smz`` so that writer and reader cannot drift apart.

A filter-pruned ticket (``prune.structure=filters``) is exported *compacted*: its removed
filters, the next layer's input channels from them and the head columns they feed are cut out,
so the file holds a smaller dense Conv4 (``architecture.layer_filters`` in the manifest) that
both runtimes fine-tune faster; Meta-SGD's α and per-step batch norm are cut the same way.
Nothing downstream reads a removed filter, so the compacted network computes exactly what the
masked one does (tested). ``export_bytes`` gives a run's exported size through the same code
path without writing a file (the report's bytes column).

``export_experiment`` picks the model of a lottery experiment: without ``level``, the sparsest
ticket level whose *validation* accuracy lies within the dense model's 95% CI — chosen on
validation, like every model choice in sparsemeta, never on test.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsemeta.config import Config
from sparsemeta.data.spec import DataSpec
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.stats import mean_ci95
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.learners import lr_rule
from sparsemeta.models.conv4 import BatchNorm, Conv4
from sparsemeta.training import rundir
from sparsemeta.training.rundir import IMP, RunDir, load_run_config
from sparsemeta_edge import smz
from sparsemeta_edge.manifest import Architecture, InputSpec, Manifest, Source
from sparsemeta_edge.nn import block_names, running_names

#: data sets whose loaders do not normalise (mean 0, std 1 on images / 255)
_UNNORMALISED = ("glyphs", "omniglot")

Stats = tuple[list[float] | None, list[float] | None, str]
#: statistics per data config: a report sizes every run of an experiment, loading data once
_STATS: dict[str, Stats] = {}


def _input_stats(spec: DataSpec, channels: int) -> Stats:
    """The per-channel normalisation meta-training used, so the device feeds the same inputs."""
    if spec.name in _UNNORMALISED:
        return [0.0] * channels, [1.0] * channels, spec.name
    key = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if key not in _STATS:
        try:  # folder / mini-ImageNet: statistics come from the (cached) data set
            from sparsemeta.data.registry import load_data

            data = load_data(spec)
            _STATS[key] = ([float(m) for m in data.mean], [float(s) for s in data.std],
                           spec.name)
        except Exception:  # data not on this machine: the runtime falls back to local statistics
            return None, None, "unknown"
    return _STATS[key]


Arrays = dict[str, np.ndarray]
_RATES = "inner_lr."  # MetaLearner.state_dict's prefix of learned inner learning rates


def _lr_rule(cfg: Config, params: Arrays, rates: Arrays, run: Path) -> str:
    """The inner learning-rate rule of the run's learner — as the learner decided it
    (``meta.learners.lr_rule``) — checked against the learned rates ``best.pt`` holds: none
    for ``scalar``; Meta-SGD's α shaped like each parameter; MAML++'s LSLR one rate per inner
    step of each parameter."""
    rule = lr_rule(cfg)
    trained = {k: v for k, v in params.items() if not k.endswith(("running_mean", "running_var"))}
    ok = (not rates if rule == "scalar" else rates.keys() == trained.keys() and all(
        rates[k].shape == v.shape if rule == "metasgd" else rates[k].ndim == 1
        for k, v in trained.items()))
    if not ok:
        raise UserError(f"'{run}/best.pt' has learned inner learning rates that do not fit "
                        f"meta.algorithm={cfg.meta.algorithm} ({rule}); is the run intact?")
    return rule


def _numpy_state(run: Path, cfg: Config) -> tuple[Arrays, Arrays, Arrays]:
    """State (pruned entries zeroed: the effective θ ⊙ m), masks and learned inner learning
    rates (by parameter name; Meta-SGD's α of pruned weights zeroed too) of a run directory's
    chosen model: the best-on-validation weights with the mask they were evaluated with."""
    chosen = RunDir(run).chosen_model(cfg)
    state, mask = chosen.state, chosen.mask or {}
    params, masks, rates = {}, {}, {}
    for name, value in state.items():
        arr = value.detach().to(torch.float32).numpy().copy()
        if name.startswith(_RATES):
            rates[name[len(_RATES):]] = arr
        else:
            params[name] = arr
    for name, m in mask.items():
        masks[name] = m.numpy().astype(bool)
        params[name][~masks[name]] = 0.0
        if name in rates and rates[name].shape == masks[name].shape:
            rates[name][~masks[name]] = 0.0
    return params, masks, rates


def compact(params: Arrays, masks: Arrays, alpha: Arrays | None = None
            ) -> tuple[Arrays, Arrays, Arrays]:
    """Cut the removed filters (all-pruned slices) out of a filter-pruned Conv4.

    Each conv layer keeps its surviving filters (rows, with their bias, batch norm — per-step
    slots and running statistics included — and Meta-SGD ``alpha``) and the input channels of
    the previous layer's survivors; the head keeps the columns of the last layer's survivors.
    Exact only if nothing reads a removed filter — its batch-norm output is the constant
    ReLU(β), not 0 — so a mask where something does is refused.
    """
    params, masks, alpha = dict(params), dict(masks), dict(alpha or {})
    shaped = (params, masks, alpha)  # every dict here holds arrays in the parameters' shapes
    previous = None  # surviving filters of the layer before (None: the image channels)
    for i in range(4):
        wname = block_names(i)[0]
        mask = masks[wname]
        keep = mask.reshape(mask.shape[0], -1).any(axis=1)
        if previous is not None and mask[:, ~previous].any():
            raise ValueError(f"'{wname}' reads removed filters of the layer before; "
                             "the mask is not filter-structured")
        for d in shaped:
            for name in [k for k in d if k.startswith(f"blocks.{i}.")]:
                if name != wname:  # bias, batch norm: one entry per filter on the last axis
                    d[name] = d[name][..., keep]
                elif previous is None:
                    d[name] = d[name][keep]
                else:
                    d[name] = d[name][keep][:, previous]
        previous = keep
    head = masks["head.weight"]
    columns = np.repeat(previous, head.shape[1] // previous.size)
    if head[:, ~columns].any():
        raise ValueError("'head.weight' reads removed filters; the mask is not filter-structured")
    for d in shaped:
        if "head.weight" in d:
            d["head.weight"] = d["head.weight"][:, columns]
    return params, masks, alpha


def _export_parts(run: Path) -> tuple[Manifest, Arrays, Arrays, Arrays, dict[str, Any]]:
    """Manifest, state, masks and learned rates of a run's ``.smz`` (what ``smz.encode``
    takes), plus facts for the caller: the dense fp32 size (learned rates included) and
    prunable weights of the meta-trained Conv4."""
    cfg = load_run_config(run)
    params, masks, rates = _numpy_state(run, cfg)
    w0 = params["blocks.0.conv.weight"]
    filters, channels = int(w0.shape[0]), int(w0.shape[1])
    ways = int(params["head.weight"].shape[0])
    gamma = params["blocks.0.bn.weight"]
    bn_steps = int(gamma.shape[0]) if gamma.ndim == 2 else 1  # MAML++'s per-step batch norm
    rule = _lr_rule(cfg, params, rates, run)
    facts = {"dense_fp32_bytes": 4 * sum(v.size for v in [*params.values(), *rates.values()]),
             "prunable": sum(v.size for k, v in params.items() if smz.is_prunable(k, v.shape))}
    if cfg.prune.structure == "filters" and masks:
        try:
            if rule == "metasgd":  # α is cut like its weight; per-step rates are per tensor
                params, masks, rates = compact(params, masks, rates)
            else:
                params, masks, _ = compact(params, masks)
        except ValueError as exc:
            raise UserError(f"'{run}': {exc}; was mask.pt changed after training?") from None
    layer_filters = [int(params[block_names(i)[0]].shape[0]) for i in range(4)]
    mean, std, stats_source = _input_stats(cfg.data_spec(), channels)
    ev = RunDir(run).result().evaluation if RunDir(run).finished else None
    manifest = Manifest(
        architecture=Architecture(in_channels=channels, image_size=cfg.data.image_size,
                                  filters=filters, layer_filters=tuple(layer_filters),
                                  downsample=cfg.model.downsample, ways=ways, name=cfg.model.name),
        algorithm=cfg.meta.algorithm,
        lr_rule=rule,
        first_order=cfg.meta.first_order,
        bn=cfg.meta.bn,
        bn_steps=bn_steps,
        inner_lr=cfg.meta.inner_lr,
        inner_steps=cfg.meta.inner_steps,
        eval_inner_steps=cfg.meta.eval_inner_steps,
        shots=cfg.data.shots,
        input=InputSpec(size=cfg.data.image_size, channels=channels,
                        mean=None if mean is None else tuple(mean),
                        std=None if std is None else tuple(std),
                        invert=cfg.data.name == "omniglot", stats_source=stats_source),
        # seed/level/method only: the manifest stays small (size bound), and a model exports
        # to the same bytes wherever its experiment directory lives
        source=Source(run="/".join(run.resolve().parts[-3:]), data=cfg.data.name,
                      test_accuracy=ev.accuracy if ev else None,
                      test_ci95=ev.ci95 if ev else None),
    )
    return manifest, params, masks, rates, {**facts, "normalisation": stats_source}


def export_bytes(run_dir: str | Path, fp16: bool = False, int8: bool = False) -> int:
    """The exact size of ``export_run``'s file for this run, computed without writing it."""
    manifest, params, masks, rates, _ = _export_parts(Path(run_dir))
    try:
        return sum(len(chunk) for chunk in smz.encode(manifest, params, masks, fp16=fp16,
                                                      rates=rates, int8=int8))
    except smz.EdgeError as exc:  # e.g. non-finite weights: not exportable, said in one line
        raise UserError(f"'{run_dir}': {exc}") from None


def export_run(run_dir: str | Path, out_path: str | Path, fp16: bool = False,
               int8: bool = False) -> dict[str, Any]:
    """Write ``run_dir``'s chosen model as ``out_path`` (.smz); returns sizes and density.

    ``fp16`` stores the kept weight values, and Meta-SGD's α of them, in half precision (biases,
    batch norm and their rates stay fp32). ``density`` counts the file's weights against the
    meta-trained (uncompacted) Conv4; ``dense_fp32_bytes`` includes its learned rates.
    """
    run = Path(run_dir)
    manifest, params, masks, rates, facts = _export_parts(run)
    out = Path(out_path)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; give a file name such as model.smz")
    if not out.parent.is_dir():
        raise UserError(f"directory '{out.parent}' does not exist; create it or choose another --out")
    try:
        nbytes = smz.save(out, manifest, params, masks, fp16=fp16, rates=rates, int8=int8)
    except smz.EdgeError as exc:  # e.g. non-finite weights, or --fp16 with --int8
        raise UserError(f"'{run}': {exc}") from None
    model = smz.load(out)
    dense = facts["dense_fp32_bytes"]
    m = model.manifest
    return {
        "path": str(out), "bytes": nbytes, "dense_fp32_bytes": dense, "ratio": nbytes / dense,
        "bound_bytes": smz.size_bound(model),
        "density": m.nonzeros / facts["prunable"],
        "nonzeros": m.nonzeros, "values_dtype": m.values_dtype,
        "layer_filters": list(m.architecture.layer_filters),
        "compacted": m.architecture.compacted,
        "algorithm": m.algorithm, "lr_rule": m.lr_rule, "bn": m.bn, "bn_steps": m.bn_steps,
        "normalisation": facts["normalisation"], "run": str(run),
    }


def torch_model(model: smz.SmzModel) -> tuple[Conv4, dict[str, torch.Tensor]]:
    """The PyTorch Conv4 of a loaded ``.smz`` (at the file's, possibly compacted, widths, with
    its per-step and running batch norm, in its dtype) and its mask: to adapt or time an export
    with ``MetaLearner`` (whose learned rates are ``model.rates``)."""
    a, p = model.manifest.architecture, model.params
    net = Conv4(a.in_channels, p["head.weight"].shape[0], a.image_size, a.filters, a.downsample)
    channels = a.in_channels
    steps, running = model.manifest.bn_steps, running_names(0)[0] in p
    for i, block in enumerate(net.blocks):  # a compacted file's widths, per layer
        width = p[block_names(i)[0]].shape[0]
        block.conv = nn.Conv2d(channels, width, 3, stride=block.conv.stride, padding=1)
        block.bn = BatchNorm(width, steps, running)
        channels = width
    net.head = nn.Linear(p["head.weight"].shape[1], p["head.weight"].shape[0])
    net = net.to(torch.float64 if p["head.weight"].dtype == np.float64 else torch.float32)
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in p.items()})
    return net, {k: torch.from_numpy(m.copy()) for k, m in model.masks.items()}


def torch_learner(model: smz.SmzModel) -> MetaLearner:
    """The ``MetaLearner`` of a loaded ``.smz``: ``torch_model`` with the file's mask, batch-norm
    policy, inner learning-rate rule and learned rates (in the file's dtype), as meta-trained."""
    net, mask = torch_model(model)
    m = model.manifest
    # files before version 5 written by hand may not record meta-training's steps: the
    # adaptation steps stand in (they only size a learner that is not trained further)
    train_steps = m.eval_inner_steps if m.inner_steps is None else m.inner_steps
    learner = MetaLearner(net, inner_lr=m.inner_lr, inner_steps=train_steps, bn=m.bn, mask=mask,
                          lr_rule=m.lr_rule, eval_inner_steps=m.eval_inner_steps)
    learner.rates.to(net.head.weight.dtype)
    learner.load_state_dict({**net.state_dict(), **{f"{_RATES}{k}": torch.from_numpy(v.copy())
                                                    for k, v in model.rates.items()}})
    return learner


def _ticket_rows(exp: Path) -> list[dict]:
    """(level, density, validation accuracy, its 95% CI) of each ticket level: the mean over
    seeds with Student's t CI over seeds, or one seed's CI over validation tasks."""
    by_level: dict[int, list] = {}
    for path in rundir.finished_runs(exp):
        _, level, branch = rundir.parse_level_dir(path)
        res = RunDir(path).result()
        if branch == IMP and res.model and res.val_accuracy is not None:
            by_level.setdefault(level, []).append(res)
    if not by_level:
        raise UserError(f"'{exp}' has no finished ticket runs (no seed_*/level_*/ticket/"
                        f"{rundir.EVAL}); run the lottery experiment first")
    rows = []
    for level, results in sorted(by_level.items()):
        accs = np.array([r.val_accuracy for r in results])
        acc, ci = (mean_ci95(accs, student=True) if len(results) > 1
                   else (float(accs[0]), results[0].val_ci95 or 0.0))
        rows.append({"level": level, "density": float(np.mean([r.density for r in results])),
                     "accuracy": acc, "ci95": ci})
    return rows


def choose_level(rows: list[dict]) -> tuple[int, str]:
    """The sparsest ticket level whose validation accuracy ≥ the dense model's − its CI, and
    why (a model chosen on validation only)."""
    dense = next((r for r in rows if r["level"] == 0), None)
    if dense is None:
        raise UserError("no dense (level 0) ticket result to compare against")
    floor = dense["accuracy"] - (dense["ci95"] or 0.0)
    ok = [r for r in rows if r["accuracy"] >= floor]
    pick = min(ok, key=lambda r: (r["density"], -r["level"]))
    why = (f"level {pick['level']} (density {pick['density']:.3f}, validation accuracy "
           f"{100 * pick['accuracy']:.2f}%) on validation: the sparsest ticket within the dense "
           f"model's validation CI ({100 * dense['accuracy']:.2f}% ± "
           f"{100 * (dense['ci95'] or 0.0):.2f})")
    return int(pick["level"]), why


def choose_run(exp_dir: str | Path, level: int | None = None,
               seed: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The ticket run of a lottery experiment to export (``level`` or the choice on
    validation) and the facts of that choice."""
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
    runs = [rundir.level_dir(exp, int(s.name.split("_")[1]), level) for s in seeds]
    runs = [r for r in runs if RunDir(r).file(rundir.BEST).is_file()]
    if not runs:
        raise UserError(f"no trained ticket at level {level} under '{exp}'"
                        + (f" for seed {seed}" if seed is not None else ""))
    seed_name = runs[0].parent.parent.name
    return runs[0], {"level": level, "seed": int(seed_name.split("_")[1]),
                     "choice": f"{why}; exported {seed_name}'s ticket"}


def export_experiment(exp_dir: str | Path, out: str | Path, level: int | None = None,
                      fp16: bool = False, seed: int | None = None,
                      int8: bool = False) -> dict[str, Any]:
    """Export one ticket of a lottery experiment (``level`` or the automatic choice)."""
    run, facts = choose_run(exp_dir, level, seed)
    return {**export_run(run, out, fp16=fp16, int8=int8), **facts}


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
    rates = {"scalar": "one inner learning rate", "lslr": "learned rates per layer and step",
             "metasgd": "Meta-SGD α of the kept weights"}[result["lr_rule"]]
    per_step = f", per-step batch norm ({result['bn_steps']} slots)" if result["bn_steps"] > 1 else ""
    lines.append(f"adaptation: {result['algorithm']}, {rates}, batch norm '{result['bn']}'{per_step}")
    if result.get("normalisation") == "unknown":
        lines.append("note: the data set's normalisation was not available here; the edge runtime "
                     "will normalise with the local data's statistics")
    return "\n".join(lines)


def export_command(path: str | Path, out: str | Path, level: int | None = None,
                   fp16: bool = False, seed: int | None = None, as_json: bool = False,
                   int8: bool = False, fmt: str = "smz") -> str:
    """``sparsemeta export``: a run directory (has config.yaml) or a lottery experiment, as a
    ``.smz`` file for sparsemeta-edge or an ONNX model for ONNX Runtime."""
    p = Path(path)
    # before any work: never a directory or device, never a file a run or experiment owns
    rundir.check_out_file(out, f"model.{fmt}")
    if RunDir(p).file(rundir.CONFIG).is_file():
        if level is not None:
            raise UserError("--level applies to a lottery experiment directory, not a run directory")
        run, facts = p, {}
    else:
        run, facts = choose_run(p, level, seed)
    if fmt == "onnx":
        if fp16 or int8:
            raise UserError("--fp16 and --int8 apply to --format smz; an ONNX model is fp32")
        from sparsemeta.experiments.onnx import export_onnx, format_onnx

        result = {**export_onnx(run, out), **facts}
        return json.dumps(result, indent=2) if as_json else format_onnx(result)
    result = {**export_run(run, out, fp16=fp16, int8=int8), **facts}
    return json.dumps(result, indent=2) if as_json else format_export(result)
