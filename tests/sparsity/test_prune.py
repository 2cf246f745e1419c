"""Magnitude pruning removes exact fractions; controls match the ticket's densities."""

from __future__ import annotations

import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.meta.learners import model_spec
from sparsemeta.models.conv4 import Conv4, build_model
from sparsemeta.sparsity.masks import density, full_mask, hamming, layer_densities, nonzeros
from sparsemeta.sparsity.prune import (
    clear_removed_filters,
    conv_layers,
    filter_counts,
    filter_mask,
    filter_prune,
    kept_filters,
    magnitude_prune,
    output_layer,
    random_filter_mask_like,
    random_mask_like,
)


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


# -- structured tickets ------------------------------------------------------------------------
def _filter_weights(filters: int = 10):
    torch.manual_seed(0)
    return {k: v.detach() for k, v in Conv4(1, 5, 28, filters=filters).named_parameters()}


def _assert_filter_structured(mask, keep):
    """Removed filters: whole slice, next layer's input channels and head columns all pruned;
    everything else kept; and ``filter_mask`` builds exactly this mask from the kept filters."""
    built = filter_mask({k: m.shape for k, m in mask.items()}, keep)
    assert all(torch.equal(built[k], mask[k]) for k in mask)
    cin = torch.ones(1, dtype=torch.bool)
    for name in conv_layers(mask):
        want = keep[name][:, None, None, None] & cin[None, :, None, None]
        assert torch.equal(mask[name], want.expand_as(mask[name])), name
        cin = keep[name]
    assert torch.equal(mask["head.weight"], cin.expand_as(mask["head.weight"]))  # 1×1 final map


def test_filter_pruning_removes_exact_filter_counts_by_filter_norm_per_level():
    w = _filter_weights(10)
    mask = full_mask(w)
    expected = [10, 7, 5, 3, 2]  # 10 − round(3) − round(2.1) − round(1.5) − round(0.9)
    assert [c["blocks.2.conv.weight"] for c in filter_counts(mask, 0.3, 4)] == expected
    for level in range(1, 5):
        new = filter_prune(w, mask, rate=0.3)
        keep = kept_filters(new)
        for name in conv_layers(new):
            assert int(keep[name].sum()) == expected[level], (name, level)
            assert not (keep[name] & ~kept_filters(mask)[name]).any()  # removed stay removed
            norms = (w[name] * mask[name]).flatten(1).norm(dim=1)
            removed = kept_filters(mask)[name] & ~keep[name]
            assert norms[removed].max() <= norms[keep[name]].min()  # the smallest L2 norms go
        _assert_filter_structured(new, keep)
        # weight counts follow from filter counts: out × in × 3 × 3 (the head: out × ways)
        k = expected[level]
        assert int(new["blocks.1.conv.weight"].sum()) == k * k * 9
        assert int(new["blocks.0.conv.weight"].sum()) == k * 9
        assert int(new["head.weight"].sum()) == 5 * k
        mask = new


def test_filter_pruning_never_removes_a_layers_last_filter():
    w = _filter_weights(2)
    mask = full_mask(w)
    for _ in range(3):
        mask = filter_prune(w, mask, rate=0.9)
    assert all(int(k.sum()) == 1 for k in kept_filters(mask).values())
    assert [c["blocks.0.conv.weight"] for c in filter_counts(full_mask(w), 0.9, 3)] == [2, 1, 1, 1]


def test_random_filter_control_matches_filter_counts_but_not_the_filters():
    w = _filter_weights(16)
    ticket = filter_prune(w, full_mask(w), rate=0.5)
    rand = random_filter_mask_like(ticket, torch.Generator().manual_seed(1))
    assert {k: int(v.sum()) for k, v in kept_filters(rand).items()} == {
        k: 8 for k in conv_layers(ticket)}
    assert {k: int(m.sum()) for k, m in rand.items()} == {k: int(m.sum()) for k, m in ticket.items()}
    _assert_filter_structured(rand, kept_filters(rand))
    assert any(not torch.equal(kept_filters(rand)[k], kept_filters(ticket)[k])
               for k in conv_layers(ticket))


def test_clearing_removed_filters_zeroes_their_bias_and_batch_norm_only():
    w = _filter_weights(8)
    state = {k: torch.randn_like(v) for k, v in w.items()}
    mask = filter_prune(w, full_mask(w), rate=0.5)
    cleared = clear_removed_filters(state, mask)
    for name, keep in kept_filters(mask).items():
        prefix = name[: -len("conv.weight")]
        for key in ("conv.bias", "bn.weight", "bn.bias"):
            v = cleared[prefix + key]
            assert not v[~keep].any() and torch.equal(v[keep], state[prefix + key][keep])
    assert torch.equal(cleared["blocks.0.conv.weight"], state["blocks.0.conv.weight"])
    assert torch.equal(cleared["head.bias"], state["head.bias"])


def test_masks_cover_conv_and_linear_weights_but_never_per_step_batch_norm():
    cfg = build_config(overrides=["meta.algorithm=mamlpp", "mamlpp.per_step_bn=true",
                                  "meta.inner_steps=3", "model.filters=8"])
    params = dict(build_model(model_spec(cfg, 1)).named_parameters())
    assert params["blocks.0.bn.weight"].shape == (4, 8)  # one BN slot per step (0..3)
    assert list(full_mask(params)) == [f"blocks.{i}.conv.weight" for i in range(4)] + ["head.weight"]
