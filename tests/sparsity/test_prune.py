"""Magnitude pruning removes exact fractions; controls match the ticket's densities."""

from __future__ import annotations

import pytest
import torch

from sparsemeta.models.conv4 import Conv4
from sparsemeta.sparsity.masks import density, full_mask, hamming, layer_densities, nonzeros
from sparsemeta.sparsity.prune import magnitude_prune, output_layer, random_mask_like


def _weights():
    torch.manual_seed(0)
    return {k: v.detach() for k, v in Conv4(1, 5, 28, filters=8).named_parameters()}


def test_mask_covers_conv_and_linear_weights_only():
    mask = full_mask(_weights())
    assert list(mask) == [f"blocks.{i}.conv.weight" for i in range(4)] + ["head.weight"]
    assert output_layer(mask) == "head.weight"


def test_layerwise_pruning_removes_exact_fraction_and_output_at_half_rate():
    w = _weights()
    mask = full_mask(w)
    new = magnitude_prune(w, mask, rate=0.2, scope="layerwise", output_rate_factor=0.5)
    for k, m in new.items():
        r = 0.1 if k == "head.weight" else 0.2
        assert int(m.sum()) == m.numel() - round(r * m.numel()), k
        # the removed weights are the smallest by magnitude
        assert w[k].abs()[~m].max() <= w[k].abs()[m].min()
    again = magnitude_prune(w, new, rate=0.2, scope="layerwise")
    for k in new:  # a second level removes 20% of what remained, never re-grows
        r = 0.1 if k == "head.weight" else 0.2
        assert int(again[k].sum()) == int(new[k].sum()) - round(r * int(new[k].sum()))
        assert not (again[k] & ~new[k]).any()


def test_global_pruning_ranks_hidden_layers_together():
    w = _weights()
    with torch.no_grad():
        w["blocks.0.conv.weight"].mul_(100.0)  # huge weights: global pruning spares this layer
    mask = full_mask(w)
    new = magnitude_prune(w, mask, rate=0.2, scope="global")
    hidden = [k for k in mask if k != "head.weight"]
    total = sum(mask[k].numel() for k in hidden)
    assert sum(int(new[k].sum()) for k in hidden) == total - round(0.2 * total)
    assert bool(new["blocks.0.conv.weight"].all())
    threshold = max(float(w[k].abs()[~new[k]].max()) for k in hidden if (~new[k]).any())
    assert all(float(w[k].abs()[new[k]].min()) >= threshold for k in hidden)
    head = new["head.weight"]
    assert int(head.sum()) == head.numel() - round(0.1 * head.numel())


def test_random_control_matches_per_layer_counts_but_not_the_pattern():
    w = _weights()
    ticket = magnitude_prune(w, full_mask(w), rate=0.5)
    rand = random_mask_like(ticket, torch.Generator().manual_seed(1))
    assert {k: int(m.sum()) for k, m in rand.items()} == {k: int(m.sum()) for k, m in ticket.items()}
    assert layer_densities(rand) == pytest.approx(layer_densities(ticket))
    assert hamming(rand, ticket) > 0.2
    assert density(rand) == density(ticket) and nonzeros(rand) == nonzeros(ticket)


def test_hamming_distance_counts_differing_entries():
    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([True, False, True, False])}
    assert hamming(a, b) == 0.5 and hamming(a, a) == 0.0
