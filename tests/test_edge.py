"""The NumPy edge runtime computes what the PyTorch implementation computes, without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsemeta.data.tasks import Task
from sparsemeta.experiments.export import export_run, torch_learner
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.learners import build_learner
from sparsemeta.models.conv4 import Conv4
from sparsemeta.sparsity.masks import prunable_names
from sparsemeta.training.rundir import load_run_config
from sparsemeta_edge import smz
from sparsemeta_edge.cli import main as edge_main
from sparsemeta_edge.data import load_folder
from sparsemeta_edge.nn import Conv4 as EdgeConv4
from sparsemeta_edge.nn import cross_entropy
from sparsemeta_edge.runtime import Adapter, finetune
from tests.edge_images import image_folder
from tests.test_export import LSLR_PER_STEP_BN, METASGD, RUNNING, make_filter_run, make_run

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


def _task(dtype: torch.dtype = torch.float64, seed: int = 1) -> Task:
    """A 5-way 1-shot task with 5 queries per class: noisy copies of random prototypes."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(5, 1, 1, 28, 28, generator=g, dtype=torch.float64)
    xs = (protos + 0.5 * torch.randn(5, 6, 1, 28, 28, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.arange(5).unsqueeze(1).expand(5, 6)
    return Task(xs[:, :1].reshape(-1, 1, 28, 28), labels[:, :1].reshape(-1),
                xs[:, 1:].reshape(-1, 1, 28, 28), labels[:, 1:].reshape(-1))


def _run_learner(run: Path, made: dict, dtype: torch.dtype = torch.float64) -> MetaLearner:
    """The run's learner as the trainer builds and loads it (``build_learner``, best.pt)."""
    learner = build_learner(load_run_config(run), 1, made["mask"] or None)
    learner.model.to(dtype)
    learner.rates.to(dtype)
    learner.load_state_dict(made["state"])
    return learner


def _evaluate_task_logits(learner: MetaLearner, task: Task, steps: int) -> list[np.ndarray]:
    """Query logits after 0..``steps`` steps, computed as ``MetaLearner.evaluate_task`` does
    (detached copies, ``evaluating`` on: running statistics under ``meta.bn=running``)."""
    local = {k: v.detach().clone().requires_grad_(True) for k, v in learner.model.named_parameters()}
    learner.evaluating = True
    try:
        trajectory = learner.adapt(local, task, steps, create_graph=False)
        return [learner.query_logits(fast, task, step).detach().numpy()
                for step, fast in enumerate(trajectory)]
    finally:
        learner.evaluating = False


def _edge_logits(model: smz.SmzModel, task: Task, steps: int) -> list[np.ndarray]:
    """The same with the NumPy runtime: query logits after 0..``steps`` adaptation steps."""
    adapter = Adapter(model)
    sx, sy, qx = (t.numpy() for t in (task.support_x, task.support_y, task.query_x))
    out = []
    for step in range(steps + 1):
        if step:
            adapter.sgd_step(sx, sy)
        out.append(adapter.query_logits(sx, qx))
    return out


def _assert_masks_exact(model: smz.SmzModel, mask: dict[str, torch.Tensor]) -> None:
    """Pruned entries — per-step batch norm's that the trainer masked too — are still zero."""
    for k, m in mask.items():
        np.testing.assert_array_equal(model.masks[k], m.numpy())
        assert not model.params[k][~m.numpy()].any(), k


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
    task = _task()
    params = dict(model.named_parameters())
    accs, losses = learner.evaluate_task(params, task, steps=4)

    loaded = smz.load(tmp_path / "m.smz", dtype=np.float64)
    man = loaded.manifest
    assert (man.bn, man.inner_lr, man.eval_inner_steps, man.inner_steps, man.lr_rule) == (
        bn, 0.3, 4, 1, "scalar")
    qy = task.query_y.numpy()
    for step, logits in enumerate(_edge_logits(loaded, task, man.eval_inner_steps)):
        assert float((logits.argmax(1) == qy).mean()) == pytest.approx(accs[step], abs=1e-6)
        assert cross_entropy(logits, qy)[0] == pytest.approx(losses[step], rel=1e-9)
    assert losses[-1] < losses[0] and accs[-1] > accs[0]  # it did learn
    _assert_masks_exact(loaded, mask)  # the mask is still exact after adaptation


#: the learners whose export carries more than θ: α, per-step rates, per-step or running BN
LEARNERS = {"metasgd": [*METASGD, "meta.bn=support"], "lslr-per-step-bn": LSLR_PER_STEP_BN,
            "mamlpp-running": RUNNING, "maml-running": ["meta.bn=running"]}


@pytest.mark.parametrize("learner", list(LEARNERS))
def test_learned_rates_and_per_step_bn_adapt_as_evaluate_task(tmp_path, learner):
    """float64: exported and adapted with NumPy, the query logits after every step equal
    ``MetaLearner.evaluate_task``'s (≤ 1e-10), as do accuracy and loss — Meta-SGD's α
    elementwise, MAML++'s rate of each tensor and step, per-step BN slots, running statistics
    of each step. 5 steps run past meta-training's 2 (3 BN slots, 3 rates): both sides reuse
    the last rate and slot. The mask stays exact."""
    made = make_run(tmp_path / "run", 0.3, overrides=LEARNERS[learner], perturb=False)
    export_run(tmp_path / "run", tmp_path / "m.smz")
    reference = _run_learner(tmp_path / "run", made)
    task, steps = _task(), 5
    accs, losses = reference.evaluate_task(dict(reference.model.named_parameters()), task, steps)
    want = _evaluate_task_logits(reference, task, steps)
    loaded = smz.load(tmp_path / "m.smz", dtype=np.float64)
    got = _edge_logits(loaded, task, steps)
    qy = task.query_y.numpy()
    for step in range(steps + 1):
        assert _rel(got[step], want[step]) <= 1e-10, step
        assert float((got[step].argmax(1) == qy).mean()) == pytest.approx(accs[step], abs=1e-6)
        assert cross_entropy(got[step], qy)[0] == pytest.approx(losses[step], rel=1e-10)
    assert _rel(want[-1], want[0]) > 1e-2  # it did adapt
    _assert_masks_exact(loaded, made["mask"])
    # the file's own PyTorch learner (torch_learner) is the run's learner too
    fresh = smz.load(tmp_path / "m.smz", dtype=np.float64)  # `loaded` has been adapted
    from_file = _evaluate_task_logits(torch_learner(fresh), task, steps)
    assert max(_rel(a, b) for a, b in zip(from_file, want)) <= 1e-10


def test_learned_rates_adapt_as_evaluate_task_in_float32(tmp_path):
    """float32 on both sides: the NumPy runtime is as close to PyTorch as float32 allows."""
    made = make_run(tmp_path / "run", 0.3, overrides=[*METASGD, "meta.bn=running"], perturb=False)
    export_run(tmp_path / "run", tmp_path / "m.smz")
    reference = _run_learner(tmp_path / "run", made, torch.float32)
    task = _task(torch.float32)
    want = _evaluate_task_logits(reference, task, 3)
    got = _edge_logits(smz.load(tmp_path / "m.smz"), task, 3)
    assert max(_rel(a, b) for a, b in zip(got, want)) <= 1e-4


# -- the device side: CLI on image folders, with torch unimportable ------------------------


@pytest.fixture(params=["maml", "metasgd", "mamlpp-running"])
def exported(tmp_path, request) -> Path:
    """A 20%-density export of plain MAML, of Meta-SGD, and of MAML++ with per-layer-per-step
    rates, per-step batch norm and running statistics."""
    learner = {"maml": [], "metasgd": METASGD, "mamlpp-running": RUNNING}[request.param]
    # Conv4's own init (not perturbed): random N(0, 1) batch norm with random running
    # statistics can make fine-tuning diverge, which is not what these tests are about
    make_run(tmp_path / "run", 0.2, overrides=["meta.inner_lr=0.1", *learner], perturb=False)
    export_run(tmp_path / "run", tmp_path / "m.smz")
    return tmp_path / "m.smz"


def test_runtime_works_with_torch_unimportable(tmp_path, exported):
    data = image_folder(tmp_path / "data", classes=3, per_class=8)
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
    rule = smz.load(exported).manifest.lr_rule
    assert {"scalar": "inner lr 0.1", "metasgd": "Meta-SGD α per weight",
            "lslr": "learned rate per tensor and step"}[rule] in out  # fine-tuning log and info
    if rule == "metasgd":
        assert "its Meta-SGD α is the old head's mean" in out
    if rule == "lslr":
        assert "learned per-step rates are kept" in out and "3 slots" in out
        assert "running statistics of step" in proc.stderr  # predict's batch-norm note


def test_finetune_keeps_mask_and_saves_a_loadable_model(tmp_path, exported, capsys):
    data = image_folder(tmp_path / "data", classes=5, per_class=6, seed=1)
    out = tmp_path / "tuned.smz"
    assert edge_main(["finetune", str(exported), "--data", str(data), "--epochs", "6",
                      "--patience", "2", "--min-delta", "0.001", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "re-initialised" not in text  # 5 local classes = 5 exported ways: head kept
    base, tuned = smz.load(exported), smz.load(out)
    assert tuned.manifest.class_names == tuple(f"class_{c}" for c in "abcde")
    assert tuned.manifest.finetuned.epochs >= 1 and tuned.manifest.adapted_steps >= 1
    # 'running' predicts with meta-training's running statistics: no statistics of its own
    assert ("bn_stats.3.var" in tuned.extra) == (base.manifest.bn != "running")
    for k, m in base.masks.items():
        np.testing.assert_array_equal(tuned.masks[k], m)
        assert not tuned.params[k][~m].any()
    for k, r in base.rates.items():  # the learned rates are the model's, never fine-tuned
        np.testing.assert_array_equal(tuned.rates[k], r)
    assert any(not np.array_equal(tuned.params[k], base.params[k]) for k in base.params)
    assert out.stat().st_size <= smz.size_bound(tuned)
    assert edge_main(["predict", str(out), *(str(p) for p in sorted(data.glob("class_a/*.png")))]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all(line.split("\t")[1].startswith("class_") for line in lines)


def test_finetune_rates_for_a_new_head_and_the_lr_override(tmp_path):
    """A re-initialised Meta-SGD head takes the old head's mean α (kept weights; bias apart);
    MAML++'s per-step rates are per tensor and stay. ``lr`` replaces every learned rate."""
    data = image_folder(tmp_path / "data", classes=3, per_class=6)
    images, labels, names = load_folder(data, 28, 1)
    for learner in ("metasgd", "lslr"):
        run = tmp_path / learner
        make_run(run, 0.3, overrides={"metasgd": METASGD, "lslr": LSLR_PER_STEP_BN}[learner])
        export_run(run, tmp_path / f"{learner}.smz")
        base = smz.load(tmp_path / f"{learner}.smz")
        logs: list[str] = []
        tuned, _ = finetune(base, images, labels, names, epochs=2, log=logs.append)
        assert tuned.params["head.weight"].shape == (3, 16)
        if learner == "metasgd":
            assert tuned.rates["head.weight"].shape == (3, 16)
            old = base.rates["head.weight"][base.masks["head.weight"]].mean()
            np.testing.assert_allclose(tuned.rates["head.weight"], old, rtol=1e-6)
            np.testing.assert_allclose(tuned.rates["head.bias"], base.rates["head.bias"].mean(),
                                       rtol=1e-6)
            assert "its Meta-SGD α is the old head's mean" in logs[0]
        else:
            for k, r in base.rates.items():
                np.testing.assert_array_equal(tuned.rates[k], r)
            assert "per-step rates are kept" in logs[0]
        assert tuned.manifest.finetuned.lr_rule == tuned.manifest.lr_rule
        plain, _ = finetune(base, images, labels, names, epochs=1, lr=0.01, log=logs.append)
        assert plain.manifest.finetuned.lr_rule == "scalar"
        assert "lr 0.01 for every tensor (--lr)" in logs[-3]
    adapter = Adapter(smz.load(tmp_path / "lslr.smz"))
    adapter.step = 7  # past meta-training's 3 rates: the last one, as MetaLearner.lr
    assert adapter.rates() == {k: r[-1] for k, r in adapter.model.rates.items()}


def test_cli_user_errors_are_one_line_exit_2(tmp_path, exported, capsys):
    bad = tmp_path / "bad.smz"
    raw = bytearray(exported.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))
    cases = [
        (["info", str(tmp_path / "missing.smz")], "does not exist"),
        (["info", str(bad)], "checksum"),
        (["finetune", str(exported), "--data", str(tmp_path / "nodata")], "does not exist"),
        (["finetune", str(exported), "--data", str(tmp_path)], "class folders"),
        # options are checked before the data folder is even listed
        (["finetune", str(exported), "--data", str(tmp_path), "--holdout", "1.5"], "--holdout"),
        (["predict", str(exported), str(tmp_path / "nope.png")], "does not exist"),
        (["predict", str(exported), str(tmp_path)], "is a directory; give image files"),
        (["finetune", str(exported), "--data", str(tmp_path), "--out", str(exported)],
         "is the input model"),
    ]
    for argv, needle in cases:
        assert edge_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    data = image_folder(tmp_path / "data", classes=2, per_class=3)
    assert edge_main(["finetune", str(exported), "--data", str(data), "--holdout", "1.5"]) == 2
    assert "--holdout" in capsys.readouterr().err


def test_models_are_written_readable_to_others_under_the_umask(tmp_path, exported):
    """A model is for copying to devices: not mkstemp's 0600 but 0666 less the umask."""
    old = os.umask(0o022)
    try:
        smz.save_model(tmp_path / "m.smz", smz.load(exported))
    finally:
        os.umask(old)
    assert (tmp_path / "m.smz").stat().st_mode & 0o777 == 0o644


def test_float32_gradients_stay_accurate_at_mini_imagenet_scale():
    """Batch-norm sums over 25·84·84 rows: float32 running sums gave 1e-3 errors here; the
    runtime's float32 gradients must be within 1e-4 of float64 ones.

    The float64 reference is taken through the same pooling/ReLU branches as the float32 pass
    (its routes): max-pool is not differentiable at a tie, and a window whose two largest values
    lie within float32 rounding picks another branch in float64 — one window of 352,800 did on an
    AMD EPYC here, moving two layers' gradients by 1e-3 with no accumulation error at all. The
    float64 runtime itself is checked against PyTorch's float64 (1e-10)."""
    torch.manual_seed(0)
    model = Conv4(3, 5, 84, filters=32).double()
    x, y = torch.randn(25, 3, 84, 84, dtype=torch.float64), torch.arange(25) % 5
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    truth = dict(zip(params, (g.numpy() for g in torch.autograd.grad(loss, list(params.values())))))

    def edge(dtype: type) -> EdgeConv4:
        return EdgeConv4({k: v.detach().numpy().astype(dtype) for k, v in params.items()})

    e32, e64 = edge(np.float32), edge(np.float64)
    _, d32 = cross_entropy(e32.forward(x.numpy().astype(np.float32), keep=True), y.numpy())
    _, d64 = cross_entropy(e64.forward(x.numpy(), keep=True), y.numpy())
    for b32, b64 in zip(e32._cache, e64._cache, strict=True):
        b64.route = b32.route  # float64 through the float32 pass's pooling/ReLU branches
    g32, g64 = e32.backward(d32), e64.backward(d64)
    _, plain = cross_entropy(e64.forward(x.numpy(), keep=True), y.numpy())
    exact = e64.backward(plain)
    for k, g in truth.items():
        if not k.endswith("conv.bias"):
            assert _rel(exact[k], g) <= 1e-10, k
            assert _rel(g32[k], g64[k]) <= 1e-4, k


# -- structured tickets: the compacted network is the masked one ---------------------------
COMPACTED = {"transductive": ["meta.bn=transductive"], "support": ["meta.bn=support"],
             "metasgd": [*METASGD, "meta.bn=support"],
             "mamlpp-running": [*RUNNING, "meta.inner_lr=0.001"]}  # huge activations: small steps


@pytest.mark.parametrize("case", list(COMPACTED))
def test_compacted_filter_ticket_computes_the_masked_network(tmp_path, case, capsys):
    """float64: adaptation step by step of the exported 8-filter network equals the run's
    masked 16-filter learner (whose removed filters output a non-zero constant ReLU(β): nothing
    reads it) — in NumPy and in the PyTorch learner built from the file — with Meta-SGD's α,
    per-step batch norm and running statistics cut like the weights."""
    made = make_filter_run(tmp_path / "run", 0.5, seed=2, overrides=COMPACTED[case])
    export_run(tmp_path / "run", tmp_path / "m.smz")
    loaded = smz.load(tmp_path / "m.smz", dtype=np.float64)
    assert loaded.manifest.architecture.layer_filters == (8,) * 4
    compact_torch = torch_learner(smz.load(tmp_path / "m.smz", dtype=np.float64))
    assert compact_torch.model.blocks[3].conv.weight.shape == (8, 8, 3, 3)
    if case == "metasgd":
        assert loaded.rates["blocks.2.conv.weight"].shape == (8, 8, 3, 3)
        assert loaded.rates["head.weight"].shape == (5, 8)
    if case == "mamlpp-running":
        assert loaded.params["blocks.1.bn.running_var"].shape == (3, 8)
        assert loaded.params["blocks.1.bn.weight"].shape == (3, 8)

    rng = np.random.default_rng(0)
    sx, qx = rng.normal(size=(5, 1, 28, 28)), rng.normal(size=(10, 1, 28, 28))
    task = Task(*(torch.from_numpy(a) for a in (sx, np.arange(5), qx, np.arange(10) % 5)))
    want = _evaluate_task_logits(_run_learner(tmp_path / "run", made), task, 4)
    got = _edge_logits(loaded, task, 4)
    from_file = _evaluate_task_logits(compact_torch, task, 4)
    for step in range(5):
        assert _rel(got[step], want[step]) <= 1e-10, step
        assert _rel(from_file[step], want[step]) <= 1e-10, step
    assert _rel(want[-1], want[0]) > 1e-3  # it did adapt
    assert edge_main(["info", str(tmp_path / "m.smz")]) == 0
    info = capsys.readouterr().out
    nonzeros = loaded.manifest.nonzeros
    assert "Conv4-16 (maxpool), filters compacted to 8/8/8/8" in info
    assert f"density       {nonzeros / 7136:.4f} ({nonzeros} of 7136 prunable" in info
