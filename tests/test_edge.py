"""The NumPy edge runtime computes what the PyTorch implementation computes, without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sparsemeta.export import export_run, torch_model
from sparsemeta.meta.core import MetaLearner, Task
from sparsemeta.models.conv4 import Conv4
from sparsemeta.sparsity.masks import prunable_names
from sparsemeta_edge import smz
from sparsemeta_edge.cli import main as edge_main
from sparsemeta_edge.nn import Conv4 as EdgeConv4
from sparsemeta_edge.nn import cross_entropy
from sparsemeta_edge.runtime import adapt, network, query_logits
from tests.test_export import make_filter_run, make_run

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _rel(a: np.ndarray, b: np.ndarray, scale: float | None = None) -> float:
    return float(np.abs(a - b).max() / (scale if scale is not None else np.abs(b).max()))


def _pair(dtype: torch.dtype, downsample: str, size: int, channels: int, density: float, seed: int):
    """A PyTorch Conv4 with a random mask and the NumPy model on the same effective weights."""
    torch.manual_seed(seed)
    model = Conv4(channels, 5, size, filters=8, downsample=downsample).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bn" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    params = dict(model.named_parameters())
    mask = {k: torch.rand(params[k].shape) < density for k in prunable_names(params)}
    eff = {k: (v * mask[k] if k in mask else v).detach().numpy().copy() for k, v in params.items()}
    edge = EdgeConv4(eff, {k: m.numpy() for k, m in mask.items()}, downsample)
    return model, mask, edge


CASES = [("maxpool", 28, 1, None), ("maxpool", 42, 3, 4), ("stride", 21, 3, None),
         ("stride", 20, 1, 6)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("downsample,size,channels,stats_rows", CASES)
def test_forward_and_gradients_match_pytorch(dtype, tol, downsample, size, channels, stats_rows):
    model, mask, edge = _pair(dtype, downsample, size, channels, density=0.4, seed=size)
    learner = MetaLearner(model, inner_lr=0.1, inner_steps=1, mask=mask)
    x = torch.randn(10, channels, size, size, dtype=dtype)
    y = torch.arange(10) % 5
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    logits = learner.logits(params, x, stats_rows=stats_rows)
    loss = F.cross_entropy(logits, y)
    tloss = float(loss.detach())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    out = edge.forward(x.numpy(), stats_rows=stats_rows, keep=True)
    assert out.dtype == x.numpy().dtype
    assert _rel(out, logits.detach().numpy()) <= tol
    eloss, dlogits = cross_entropy(out, y.numpy())
    assert abs(eloss - tloss) <= tol * abs(tloss)
    egrads = edge.backward(dlogits)
    assert egrads.keys() == grads.keys()
    scale = max(float(g.abs().max()) for g in grads.values())
    for k, g in grads.items():
        ref = g.numpy()
        if k.endswith("conv.bias"):
            # batch norm cancels a conv bias: its true gradient is 0, both sides are rounding noise
            assert _rel(egrads[k], ref, scale) <= tol, k
        else:
            assert _rel(egrads[k], ref) <= tol, k
        if k in mask:
            assert not egrads[k][~mask[k].numpy()].any(), f"{k}: gradient leaks into pruned weights"


def test_fixed_statistics_equal_support_rows():
    """Stored statistics (``stats``) reproduce normalising with the support rows."""
    _, _, edge = _pair(torch.float64, "maxpool", 28, 1, density=0.5, seed=3)
    rng = np.random.default_rng(0)
    support, query = rng.normal(size=(5, 1, 28, 28)), rng.normal(size=(7, 1, 28, 28))
    joint = edge.forward(np.concatenate([support, query]), stats_rows=5)[5:]
    np.testing.assert_allclose(edge.forward(query, stats=edge.batch_stats(support)), joint,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bn,downsample", [("transductive", "maxpool"), ("support", "maxpool"),
                                           ("support", "stride")])
def test_adaptation_matches_metalearner_evaluate_task(tmp_path, bn, downsample):
    """Exported, loaded and adapted with NumPy = ``MetaLearner.evaluate_task`` step by step."""
    made = make_run(tmp_path / "run", 0.3, overrides=[f"meta.bn={bn}", "meta.eval_inner_steps=4",
                                                      f"model.downsample={downsample}"],
                    perturb=False)
    export_run(tmp_path / "run", tmp_path / "m.smz")
    model = Conv4(1, 5, 28, filters=16, downsample=downsample).double()
    model.load_state_dict(made["state"])
    mask = made["mask"]
    learner = MetaLearner(model, inner_lr=0.3, inner_steps=1, bn=bn, mask=mask)
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(5, 1, 1, 28, 28, generator=g, dtype=torch.float64)
    xs = protos + 0.5 * torch.randn(5, 6, 1, 28, 28, generator=g, dtype=torch.float64)
    labels = torch.arange(5).unsqueeze(1).expand(5, 6)
    task = Task(xs[:, :1].reshape(-1, 1, 28, 28), labels[:, :1].reshape(-1),
                xs[:, 1:].reshape(-1, 1, 28, 28), labels[:, 1:].reshape(-1))
    params = dict(model.named_parameters())
    accs, losses = learner.evaluate_task(params, task, steps=4)

    loaded = smz.load(tmp_path / "m.smz", dtype=np.float64)
    man = loaded.manifest
    assert (man["bn"], man["inner_lr"], man["inner_steps"]) == (bn, 0.3, 4)
    net = network(loaded)
    sx, sy, qx, qy = (t.numpy() for t in (task.support_x, task.support_y, task.query_x, task.query_y))
    for step in range(man["inner_steps"] + 1):
        if step:
            adapt(net, sx, sy, man["inner_lr"], 1)
        logits = query_logits(net, sx, qx, man["bn"])
        assert float((logits.argmax(1) == qy).mean()) == pytest.approx(accs[step], abs=1e-6)
        assert cross_entropy(logits, qy)[0] == pytest.approx(losses[step], rel=1e-9)
    assert losses[-1] < losses[0] and accs[-1] > accs[0]  # it did learn
    for k, m in mask.items():  # the mask is still exact after adaptation
        assert not net.params[k][~m.numpy()].any()


# -- the device side: CLI on image folders, with torch unimportable ------------------------
def _image_folder(root: Path, classes: int, per_class: int, size: int = 28, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        proto = rng.integers(0, 256, size=(size, size))
        (root / f"class_{chr(97 + c)}").mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(proto + rng.normal(0, 30, size=(size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(root / f"class_{chr(97 + c)}" / f"{i}.png")
    return root


@pytest.fixture
def exported(tmp_path) -> Path:
    make_run(tmp_path / "run", 0.2, overrides=["meta.inner_lr=0.1"])
    export_run(tmp_path / "run", tmp_path / "m.smz")
    return tmp_path / "m.smz"


def test_runtime_works_with_torch_unimportable(tmp_path, exported):
    data = _image_folder(tmp_path / "data", classes=3, per_class=8)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.path.insert(0, {SRC!r})
        from sparsemeta_edge.cli import main
        rc = main(["finetune", {str(exported)!r}, "--data", {str(data)!r}, "--epochs", "4",
                   "--patience", "2", "--batch", "10", "--out", {str(tmp_path / "t.smz")!r}])
        assert rc == 0, rc
        assert main(["predict", {str(tmp_path / "t.smz")!r},
                     {str(data / "class_b" / "0.png")!r}]) == 0
        assert main(["info", {str(tmp_path / "t.smz")!r}]) == 0
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sparsemeta")
                        and sys.modules[m] is not None)
        assert not leaked, leaked
        print("NO-TORCH-OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "NO-TORCH-OK" in out
    assert "re-initialised the head for 3 classes" in out
    assert "epoch   1/4" in out and "peak RSS" in out and "holdout loss" in out
    assert "class_b" in out


def test_finetune_keeps_mask_and_saves_a_loadable_model(tmp_path, exported, capsys):
    data = _image_folder(tmp_path / "data", classes=5, per_class=6, seed=1)
    out = tmp_path / "tuned.smz"
    assert edge_main(["finetune", str(exported), "--data", str(data), "--epochs", "6",
                      "--patience", "2", "--min-delta", "0.001", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "re-initialised" not in text  # 5 local classes = 5 exported ways: head kept
    base, tuned = smz.load(exported), smz.load(out)
    assert tuned.manifest["class_names"] == [f"class_{c}" for c in "abcde"]
    assert tuned.manifest["finetuned"]["epochs"] >= 1
    assert "bn_stats.3.var" in tuned.extra
    for k, m in base.masks.items():
        np.testing.assert_array_equal(tuned.masks[k], m)
        assert not tuned.params[k][~m].any()
    assert any(not np.array_equal(tuned.params[k], base.params[k]) for k in base.params)
    assert out.stat().st_size <= smz.size_bound(tuned)
    assert edge_main(["predict", str(out), *(str(p) for p in sorted(data.glob("class_a/*.png")))]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all(line.split("\t")[1].startswith("class_") for line in lines)


def test_cli_user_errors_are_one_line_exit_2(tmp_path, exported, capsys):
    bad = tmp_path / "bad.smz"
    raw = bytearray(exported.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))
    cases = [
        (["info", str(tmp_path / "missing.smz")], "does not exist"),
        (["info", str(bad)], "checksum"),
        (["finetune", str(exported), "--data", str(tmp_path / "nodata")], "does not exist"),
        (["finetune", str(exported), "--data", str(tmp_path), "--holdout", "1.5"], "class folders"),
        (["predict", str(exported), str(tmp_path / "nope.png")], "does not exist"),
    ]
    for argv, needle in cases:
        assert edge_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    data = _image_folder(tmp_path / "data", classes=2, per_class=3)
    assert edge_main(["finetune", str(exported), "--data", str(data), "--holdout", "1.5"]) == 2
    assert "--holdout" in capsys.readouterr().err


def test_float32_gradients_stay_accurate_at_mini_imagenet_scale():
    """Batch-norm sums over 25·84·84 rows: float32 running sums gave 1e-3 errors here; the
    runtime must be as close to the float64 truth as PyTorch's float32 is (≤ 1e-4)."""
    torch.manual_seed(0)
    model = Conv4(3, 5, 84, filters=32)
    x, y = torch.randn(25, 3, 84, 84), torch.arange(25) % 5

    def torch_grads(dtype: torch.dtype) -> dict[str, np.ndarray]:
        m = model.to(dtype)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
        loss = F.cross_entropy(torch.func.functional_call(m, params, (x.to(dtype),)), y)
        return {k: g.numpy() for k, g in zip(params, torch.autograd.grad(loss, list(params.values())))}

    truth = torch_grads(torch.float64)
    edge = EdgeConv4({k: v.detach().numpy().astype(np.float32)
                      for k, v in model.to(torch.float32).named_parameters()})
    _, dlogits = cross_entropy(edge.forward(x.numpy(), keep=True), y.numpy())
    grads = edge.backward(dlogits)
    for k, g in truth.items():
        if not k.endswith("conv.bias"):
            assert _rel(grads[k], g) <= 1e-4, k


# -- structured tickets: the compacted network is the masked one ---------------------------
@pytest.mark.parametrize("bn", ["transductive", "support"])
def test_compacted_filter_ticket_computes_the_masked_network(tmp_path, bn, capsys):
    """float64: forward, and adaptation step by step, of the exported 8-filter network equal
    the masked 16-filter network's (whose removed filters output a non-zero constant ReLU(β):
    nothing reads it) — in NumPy and in a PyTorch model built from the file."""
    made = make_filter_run(tmp_path / "run", 0.5, seed=2, overrides=[f"meta.bn={bn}"])
    export_run(tmp_path / "run", tmp_path / "m.smz")
    loaded = smz.load(tmp_path / "m.smz", dtype=np.float64)
    assert loaded.manifest["architecture"]["layer_filters"] == [8] * 4
    mask = made["mask"]
    full = {k: (v * mask[k] if k in mask else v).double().numpy() for k, v in made["state"].items()}
    masked = EdgeConv4(full, {k: m.numpy() for k, m in mask.items()})
    small = network(loaded)
    compact_torch, compact_mask = torch_model(loaded)
    assert compact_torch.blocks[3].conv.weight.shape == (8, 8, 3, 3)
    torch_small = MetaLearner(compact_torch, inner_lr=0.3, inner_steps=1, bn=bn, mask=compact_mask)
    big = Conv4(1, 5, 28, filters=16).double()
    big.load_state_dict(made["state"])
    torch_big = MetaLearner(big, inner_lr=0.3, inner_steps=1, bn=bn, mask=mask)

    rng = np.random.default_rng(0)
    sx, qx = rng.normal(size=(5, 1, 28, 28)), rng.normal(size=(10, 1, 28, 28))
    sy = np.arange(5)
    task = Task(*(torch.from_numpy(a) for a in (sx, sy, qx, np.arange(10) % 5)))
    out_big = torch_big.adapt(dict(big.named_parameters()), task, 3, create_graph=False)
    out_small = torch_small.adapt(dict(compact_torch.named_parameters()), task, 3,
                                  create_graph=False)
    for step in range(4):
        if step:
            adapt(masked, sx, sy, 0.3, 1)
            adapt(small, sx, sy, 0.3, 1)
        want = query_logits(masked, sx, qx, bn)
        assert _rel(query_logits(small, sx, qx, bn), want) <= 1e-10, step
        t_big = torch_big.query_logits(out_big[step], task).detach().numpy()
        t_small = torch_small.query_logits(out_small[step], task).detach().numpy()
        assert _rel(t_small, t_big) <= 1e-10 and _rel(t_small, want) <= 1e-10, step
    assert not np.allclose(want, query_logits(network(smz.load(tmp_path / "m.smz", np.float64)),
                                              sx, qx, bn))  # it did adapt
    assert edge_main(["info", str(tmp_path / "m.smz")]) == 0
    info = capsys.readouterr().out
    nonzeros = loaded.manifest["nonzeros"]
    assert "Conv4-16 (maxpool), filters compacted to 8/8/8/8" in info
    assert f"density       {nonzeros / 7136:.4f} ({nonzeros} of 7136 prunable" in info
