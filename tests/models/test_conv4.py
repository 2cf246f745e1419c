"""Conv4 shapes and the two batch-norm code paths."""

from __future__ import annotations

import pytest
import torch

from sparsemeta.models.conv4 import Conv4, batch_norm, plain_batch_norm


@pytest.mark.parametrize("size, channels, downsample, filters", [
    (28, 1, "maxpool", 64), (28, 1, "stride", 64), (84, 3, "maxpool", 32), (84, 3, "stride", 32)])
def test_conv4_handles_omniglot_and_miniimagenet_inputs(size, channels, downsample, filters):
    model = Conv4(channels, ways=5, image_size=size, filters=filters, downsample=downsample)
    assert model(torch.randn(4, channels, size, size)).shape == (4, 5)
    assert sum(p.numel() for p in model.parameters()) > 0


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
