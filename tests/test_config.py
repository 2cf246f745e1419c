"""Configuration: presets, overrides, and up-front validation that names the key."""

from __future__ import annotations

import pytest

from sparsemeta.config import build_config, preset_names
from sparsemeta.foundations.errors import UserError


def test_default_preset_is_glyphs_quick_and_overrides_apply_with_types():
    cfg = build_config(overrides=["train.iterations=200", "meta.first_order=true",
                                  "meta.inner_lr=1", "data.root=/tmp/x"])
    assert cfg.data.name == "glyphs"
    assert cfg.train.iterations == 200
    assert cfg.meta.first_order is True
    assert cfg.meta.inner_lr == 1.0 and isinstance(cfg.meta.inner_lr, float)
    assert cfg.data.root == "/tmp/x"


@pytest.mark.parametrize("override, fragment", [
    ("nope=1", "unknown config key 'nope'"),
    ("meta.nope=1", "unknown config key 'meta.nope'"),
    ("meta.bn=foo", "meta.bn must be one of transductive, support"),
    ("train.iterations=abc", "train.iterations must be an integer"),
    ("train.iterations=0", "train.iterations must be >= 1"),
    ("meta.first_order=maybe", "meta.first_order must be true or false"),
    ("meta.inner_lr=-1", "meta.inner_lr must be > 0"),
    ("data.ways=1", "data.ways must be >= 2"),
    ("train", "--set expects key=value"),
])
def test_invalid_values_are_rejected_with_the_key_named(override, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        build_config(overrides=[override])


def test_every_packaged_preset_loads_and_paper_settings_are_exact():
    names = preset_names()
    assert {"glyphs-quick", "glyphs-lottery", "compare", "omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s",
            "miniimagenet-5w1s",
            "miniimagenet-5w5s"} <= set(names)
    for name in names:
        build_config(name)
    o = build_config("omniglot-5w1s")
    assert (o.model.filters, o.model.downsample, o.meta.inner_lr, o.meta.inner_steps,
            o.meta.eval_inner_steps, o.train.meta_batch) == (64, "stride", 0.4, 1, 3, 32)
    o20 = build_config("omniglot-20w1s")
    assert (o20.data.ways, o20.meta.inner_lr, o20.meta.inner_steps, o20.train.meta_batch) == (
        20, 0.1, 5, 16)
    m = build_config("miniimagenet-5w1s")
    assert (m.model.filters, m.model.downsample, m.meta.inner_lr, m.meta.inner_steps,
            m.meta.eval_inner_steps, m.data.queries, m.train.meta_batch, m.data.image_size) == (
        32, "maxpool", 0.01, 5, 10, 15, 4, 84)
    assert build_config("miniimagenet-5w5s").train.meta_batch == 2
    assert all(build_config(n).train.meta_lr == 1e-3 for n in names if not n.startswith(("glyphs", "compare")))


def test_unknown_preset_and_missing_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        build_config("nope")
    with pytest.raises(UserError, match="does not exist"):
        build_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(UserError, match="not valid YAML"):
        build_config(str(bad))
