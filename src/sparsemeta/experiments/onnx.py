"""A run's chosen model as an ONNX graph, for devices that already run ONNX Runtime.

The graph is the meta-trained forward pass with the mask baked in (pruned weights are exact
zeros) and batch norm as meta-trained: ``transductive``/``support`` normalise with the statistics
of the input batch (feed a task's images as one batch), ``running`` with the stored running
statistics. Its input is a float32 batch ``images`` [N, C, H, W] normalised as in training, its
output ``logits`` [N, ways]. Adaptation to new classes is the edge runtime's job (``.smz``); this
file is for inference with the model as it is (e.g. after ``sparsemeta-edge finetune``'s classes
match meta-training's, or for the meta-trained classes themselves).
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsemeta.foundations.atomic import atomic_write
from sparsemeta.foundations.errors import UserError
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.learners import build_learner
from sparsemeta.models.conv4 import Pass, plain_batch_norm
from sparsemeta.sparsity.masks import apply_mask
from sparsemeta.training.rundir import RunDir, load_run_config

#: ONNX operator set: supported by ONNX Runtime ≥ 1.14 and by the exporter of torch 2.x
OPSET = 17


class _Inference(nn.Module):
    """The learner's model with the effective weights θ ⊙ m and its evaluation ``Pass``, as a
    plain module to trace (the functional forward cannot be traced)."""

    def __init__(self, learner: MetaLearner) -> None:
        super().__init__()
        self.model = copy.deepcopy(learner.model)
        effective = apply_mask(dict(learner.model.named_parameters()), learner.mask)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(effective[name])
        self.policy = Pass(running=learner.bn == "running")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.policy)


def inference_learner(run: Path) -> MetaLearner:
    """The run's chosen model (best weights with their mask) as an evaluating learner."""
    cfg = load_run_config(run)
    chosen = RunDir(run).chosen_model(cfg)
    channels = int(chosen.state["blocks.0.conv.weight"].shape[1])
    learner = build_learner(cfg, channels, chosen.mask)
    learner.load_state_dict(chosen.state)
    learner.evaluating = True  # bn=running: the stored running statistics
    return learner


def export_onnx(run_dir: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Write ``run_dir``'s chosen model as an ONNX file; return what was written."""
    run, out = Path(run_dir), Path(out_path)
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out '{out}' must be a file in an existing directory, e.g. model.onnx")
    learner = inference_learner(run)
    cfg = load_run_config(run)
    example = torch.zeros(cfg.data.ways * cfg.data.shots, learner.model.blocks[0].conv.in_channels,
                          cfg.data.image_size, cfg.data.image_size)
    graph = io.BytesIO()  # written atomically below: a failure leaves no torn file at --out
    # plain-op batch norm: the exporter cannot express the fused kernel's batch statistics
    with warnings.catch_warnings(), torch.no_grad(), plain_batch_norm():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        _onnx_export(_Inference(learner).eval(), (example,), graph, dynamo=False,
                     input_names=["images"], output_names=["logits"], opset_version=OPSET,
                     dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    atomic_write(out, lambda fh: fh.write(graph.getvalue()))
    return {"path": str(out), "bytes": out.stat().st_size, "input": list(example.shape[1:]),
            "ways": cfg.data.ways, "bn": cfg.meta.bn, "opset": OPSET, "run": str(run)}


def _onnx_export(*args: Any, **kwargs: Any) -> None:
    try:
        torch.onnx.export(*args, **kwargs)
    except ImportError as exc:  # some torch builds need the onnx package to serialise
        raise UserError(f"ONNX export needs {exc.name or 'onnx'}: pip install -e \".[onnx]\"") from None


def format_onnx(result: dict[str, Any]) -> str:
    lines = [f"chose {result['choice']}"] if "choice" in result else []
    batch = ("batch statistics of the input: feed a task's images as one batch"
             if result["bn"] != "running" else "stored running statistics")
    lines.append(f"wrote {result['path']}: ONNX opset {result['opset']}, {result['bytes']} bytes; "
                 f"input 'images' [N, {', '.join(map(str, result['input']))}] float32, output "
                 f"'logits' [N, {result['ways']}]; batch norm: {batch}")
    return "\n".join(lines)
