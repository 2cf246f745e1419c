"""Conv4 against an independent forward written with torch.nn.functional ops, for every
batch-norm policy a ``Pass`` can express; and the two batch-norm code paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsemeta.models.conv4 import Conv4, Pass, batch_norm, plain_batch_norm

EPS = 1e-5


def _randomise(model: Conv4, seed: int = 0) -> None:
    """Non-trivial values for every parameter and running statistic (init leaves BN at 1/0 and
    biases at 0, which would hide a wrong step slot or a dropped bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for block in model.blocks:
            block.bn.weight.add_(1.0)
            if block.bn.running_mean is not None:
                block.bn.running_mean.copy_(torch.randn(block.bn.running_mean.shape, generator=gen))
                block.bn.running_var.copy_(torch.rand(block.bn.running_var.shape, generator=gen) + 0.5)


def _reference(model: Conv4, x: torch.Tensor, p: Pass) -> tuple[torch.Tensor, list]:
    """Logits and, per block, the (mean, unbiased var) a tracking pass should fold into the
    running statistics: written from the MAML/MAML++ definitions, not from Conv4's code."""
    stats = []
    for block in model.blocks:
        conv, bn = block.conv, block.bn
        stride = conv.stride[0]
        h = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
        slot = min(p.step, bn.steps - 1)
        gamma = bn.weight if bn.weight.dim() == 1 else bn.weight[slot]
        beta = bn.bias if bn.bias.dim() == 1 else bn.bias[slot]
        ref = h if p.stats_rows is None else h[:p.stats_rows]
        n = ref.shape[0] * ref.shape[2] * ref.shape[3]
        mean = ref.sum(dim=(0, 2, 3)) / n
        var = ((ref - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / n
        stats.append((mean, var * n / (n - 1)))
        if p.running:
            mean, var = bn.running_mean[slot], bn.running_var[slot]
        h = ((h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
             * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1))
        h = torch.clamp(h, min=0)
        x = F.max_pool2d(h, 2) if block.pool else h
    return x.reshape(x.shape[0], -1) @ model.head.weight.T + model.head.bias, stats


@pytest.mark.parametrize("size, channels, downsample, filters, last", [
    (28, 1, "maxpool", 8, 1), (28, 1, "stride", 8, 2), (84, 3, "maxpool", 4, 5),
    (84, 3, "stride", 4, 6)])
def test_conv4_forward_equals_the_functional_definition_on_omniglot_and_miniimagenet_sizes(
        size, channels, downsample, filters, last):
    model = Conv4(channels, ways=5, image_size=size, filters=filters, downsample=downsample).double()
    _randomise(model)
    x = torch.randn(4, channels, size, size, dtype=torch.float64)
    expected, _ = _reference(model, x, Pass())
    assert expected.shape == (4, 5)
    assert torch.allclose(model(x), expected, rtol=1e-10, atol=1e-10)
    # the head reads every position of the last block (pools floor, stride-2 convs ceil)
    assert model.head.in_features == filters * last * last


@pytest.mark.parametrize("p", [
    Pass(), Pass(stats_rows=3), Pass(step=1), Pass(step=2, stats_rows=3), Pass(step=7),
    Pass(step=1, running=True), Pass(step=2, running=True),
], ids=lambda p: f"rows{p.stats_rows}-step{p.step}-{'running' if p.running else 'batch'}")
def test_every_batch_norm_policy_and_step_slot_equals_the_functional_definition(p):
    """Per-step BN (MAML++'s BNWB/BNRS, 3 slots) with a different γ/β/running statistics per
    slot: a pass at step k must use slot k (the last slot past it), support-row statistics
    when asked, and running statistics only when asked."""
    model = Conv4(1, ways=3, image_size=16, filters=4, bn_steps=3, bn_running=True).double()
    _randomise(model, seed=1)
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64) * 2 + 1
    expected, _ = _reference(model, x, p)
    got = model(x, p)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    # and the slot matters: the neighbouring slot's γ/β give other logits
    other = Pass(stats_rows=p.stats_rows, step=(min(p.step, 2) + 1) % 3, running=p.running)
    assert not torch.allclose(model(x, other), got, atol=1e-4)


def test_tracking_pass_updates_only_its_step_slot_with_unbiased_variance():
    model = Conv4(1, ways=3, image_size=16, filters=4, bn_steps=3, bn_running=True).double()
    _randomise(model, seed=2)
    before = [(b.bn.running_mean.clone(), b.bn.running_var.clone()) for b in model.blocks]
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64) * 2 + 1
    p = Pass(step=1, stats_rows=4, track=True)
    _, stats = _reference(model, x, Pass(step=1, stats_rows=4))
    out = model(x, p)
    # a tracking pass normalises with the batch (support rows), as before the update
    assert torch.allclose(out, _reference(model, x, Pass(step=1, stats_rows=4))[0], atol=1e-10)
    for block, (rm, rv), (mean, var) in zip(model.blocks, before, stats):
        bn = block.bn
        assert torch.allclose(bn.running_mean[1], 0.9 * rm[1] + 0.1 * mean, atol=1e-12)
        assert torch.allclose(bn.running_var[1], 0.9 * rv[1] + 0.1 * var, atol=1e-12)
        for slot in (0, 2):
            assert torch.equal(bn.running_mean[slot], rm[slot])
            assert torch.equal(bn.running_var[slot], rv[slot])


def test_model_without_running_statistics_has_no_buffers_and_refuses_running_passes():
    model = Conv4(1, ways=3, image_size=16, filters=4)
    assert list(model.buffers()) == []
    with pytest.raises(ValueError, match="no running batch-norm statistics"):
        model(torch.randn(2, 1, 16, 16), Pass(running=True))


def test_fused_and_plain_batch_norm_agree_in_value_and_second_order_gradient():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def second_order(fn):
        y = fn(x, w, b)
        (g,) = torch.autograd.grad((y.sin()).sum(), x, create_graph=True)
        return y, torch.autograd.grad(g.pow(2).sum(), (x, w, b))

    fused = second_order(batch_norm)
    with plain_batch_norm():
        plain = second_order(batch_norm)
    assert torch.allclose(fused[0], plain[0], atol=1e-12)
    for a, c in zip(fused[1], plain[1]):
        assert torch.allclose(a, c, atol=1e-10)
    # stats from the first rows only: normalising those rows alone gives the same values
    sub = batch_norm(x, w, b, stats_rows=4)
    assert torch.allclose(sub[:4], batch_norm(x[:4], w, b), atol=1e-12)
