"""Configuration: presets, overrides, and up-front validation that names the key."""

from __future__ import annotations

import dataclasses
import math
import os
import re

import pytest
import torch
import yaml

from sparsemeta.config import (
    Config,
    DataConfig,
    EvalConfig,
    MamlppConfig,
    MetaConfig,
    MetaMixConfig,
    ModelConfig,
    PruneConfig,
    TrainConfig,
    build_config,
    config_from_dict,
    config_keys,
    format_keys,
    preset_names,
)
from sparsemeta.experiments.methods.earlybird import EarlyBirdSettings
from sparsemeta.experiments.methods.l1 import L1Settings
from sparsemeta.experiments.methods.rigl import RiglSettings
from sparsemeta.foundations import safeio
from sparsemeta.foundations.errors import UserError
from sparsemeta.meta.engine import resolve_engine


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
    assert all(build_config(n).train.meta_lr == 1e-3 for n in names
               if not n.startswith(("glyphs", "compare", "cheap")))


def test_unknown_preset_and_missing_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        build_config("nope")
    with pytest.raises(UserError, match="does not exist"):
        build_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(UserError, match="not valid YAML"):
        build_config(str(bad))


# -- numbers as Python reads them ------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("1e-3", 0.001), ("1E6", 1e6), (".5", 0.5), ("5", 5.0), ("2.5e-4", 2.5e-4), ("1_0", 10.0),
])
def test_float_fields_take_every_number_python_reads_in_set(raw, expected):
    cfg = build_config(overrides=[f"train.meta_lr={raw}"])
    assert cfg.train.meta_lr == expected and type(cfg.train.meta_lr) is float


def test_float_written_1e_minus_3_in_a_yaml_file_reads_as_a_number(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as the string '1e-3'
    path = tmp_path / "lr.yaml"
    path.write_text("train: {meta_lr: 1e-3}\nmamlpp: {min_meta_lr: 1E-5}\nl1: {lambda: 2e-4}\n")
    cfg = build_config(str(path))
    assert (cfg.train.meta_lr, cfg.mamlpp.min_meta_lr, cfg.section("l1").lambda_) == (
        0.001, 1e-5, 2e-4)
    assert cfg.to_dict()["train"]["meta_lr"] == 0.001  # saved as a number, not a string


@pytest.mark.parametrize("override, fragment", [
    ("train.iterations=1e3", "train.iterations must be an integer"),
    ("train.iterations=2.0", "train.iterations must be an integer"),
    ("prune.levels=1e1", "prune.levels must be an integer"),
    ("train.meta_lr=fast", "train.meta_lr must be a number"),
    ("train.meta_lr=true", "train.meta_lr must be a number"),
    ("train.meta_lr=[1]", "train.meta_lr must be a number"),
])
def test_ints_take_integers_only_and_floats_numbers_only(override, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        build_config(overrides=[override])


FLOAT_KEYS = [k.key for k in config_keys() if k.type == "float"]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("raw", ["inf", ".inf", "-.inf", "nan", ".nan", "1e999", "-Infinity"])
def test_every_float_field_refuses_non_finite_values_naming_the_key(key, raw):
    with pytest.raises(UserError, match=re.escape(key) + " must be a finite number"):
        build_config(overrides=[f"{key}={raw}"])


def test_non_finite_values_are_refused_by_validate_too():
    cfg = Config()
    cfg.section("rigl").drop_fraction = math.nan
    with pytest.raises(UserError, match=r"rigl\.drop_fraction must be a finite number"):
        cfg.validate()


@pytest.mark.parametrize("override, fragment", [
    ("meta.inner_lr=0", "meta.inner_lr must be > 0"),
    ("train.meta_lr=-1e-3", "train.meta_lr must be > 0"),
    ("mamlpp.min_meta_lr=-1e-9", "mamlpp.min_meta_lr must be >= 0"),
    ("mamlpp.min_meta_lr=1e-2", "mamlpp.min_meta_lr must be <= train.meta_lr"),
])
def test_learning_rates_are_positive_and_ordered(override, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        build_config(overrides=[override])
    assert build_config(overrides=["mamlpp.min_meta_lr=0"]).mamlpp.min_meta_lr == 0.0


# -- each section validates itself, naming the dotted key --------------------------------------
@pytest.mark.parametrize("section, field, value, fragment", [
    (DataConfig, "ways", 1, "data.ways must be >= 2"),
    (DataConfig, "seed", -1, "data.seed must be >= 0"),
    (DataConfig, "channels", 2, "data.channels must be 1, 3 or null"),
    (ModelConfig, "filters", 0, "model.filters must be >= 1"),
    (MetaConfig, "eval_inner_steps", -1, "meta.eval_inner_steps must be >= 0"),
    (TrainConfig, "checkpoint_every", 0, "train.checkpoint_every must be >= 1"),
    (EvalConfig, "queries", 0, "eval.queries must be >= 1"),
    (MamlppConfig, "epoch_iterations", 0, "mamlpp.epoch_iterations must be >= 1"),
    (MetaMixConfig, "beta", 0.0, "metamix.beta must be > 0"),
    (PruneConfig, "rewind", "step:0", "prune.rewind must be init, none or step:K"),
    (L1Settings, "lambda_", -1.0, "l1.lambda must be >= 0"),
    (RiglSettings, "end_fraction", 1.5, "rigl.end_fraction must be in (0, 1]"),
    (EarlyBirdSettings, "window", 0, "earlybird.window must be >= 1"),
])
def test_each_section_validates_itself_naming_the_dotted_key(section, field, value, fragment):
    assert section().validate() is None  # defaults are valid
    bad = dataclasses.replace(section(), **{field: value})
    with pytest.raises(UserError, match=re.escape(fragment)):
        bad.validate()
    cfg = Config()  # and Config.validate reaches it, a method's own section too
    added = next((k for k, v in cfg.sections.items() if isinstance(v, section)), None)
    if added is not None:
        cfg.sections[added] = bad
    else:
        setattr(cfg, next(f.name for f in dataclasses.fields(cfg)
                          if isinstance(getattr(cfg, f.name), section)), bad)
    with pytest.raises(UserError, match=re.escape(fragment)):
        cfg.validate()


def test_a_section_names_the_key_where_it_is_mounted():
    with pytest.raises(UserError, match=r"^other\.ways must be >= 2"):
        DataConfig(ways=1).validate("other")


@pytest.mark.parametrize("overrides, fragment", [
    (["seed=-1"], "seed must be >= 0"),
    (["prune.rewind=step:50", "train.iterations=10"], "prune.rewind=step:50 is past train.iterations=10"),
    (["meta.mix=metamix", "data.queries=15"], "needs data.queries == data.shots"),
    (["metamix.channel_shuffle_from=0"], "metamix.channel_shuffle_from needs meta.mix=metamix"),
    (["prune.structure=filters", "prune.scope=global"], "prune.scope=global needs prune.structure=unstructured"),
    (["data.val_fraction=0.6", "data.test_fraction=0.5"], "data.val_fraction and data.test_fraction must be in (0, 1)"),
])
def test_checks_across_sections(overrides, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        build_config(overrides=overrides)


def test_validate_returns_the_config_and_valid_settings_pass():
    cfg = Config()
    assert cfg.validate() is cfg
    ok = build_config(overrides=["prune.rewind=step:10", "meta.mix=metamix", "data.queries=1",
                                 "metamix.channel_shuffle_from=0", "eval.queries=15"])
    assert ok.prune.rewind_step() == 10


# -- the documentation of every key --------------------------------------------------------------
def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def test_every_key_is_documented_exactly_once():
    keys = config_keys()
    assert [k.key for k in keys] == _leaf_keys(Config().to_dict())  # all, once, in order
    undocumented = [k.key for k in keys if not k.doc.strip()]
    assert not undocumented
    assert all("\n" not in k.doc and "  " not in k.doc for k in keys)  # one line each


def test_key_docs_give_type_default_and_doc():
    by_key = {k.key: k for k in config_keys()}
    lr = by_key["train.meta_lr"]
    assert (lr.type, lr.default, lr.section) == ("float", 0.001, "train")
    assert "learning rate" in lr.doc
    assert by_key["meta.algorithm"].type == "one of maml|mamlpp|metasgd"
    assert (by_key["data.root"].type, by_key["data.root"].default) == ("str or null", None)
    assert by_key["eval.queries"].type == "int or null"
    assert by_key["l1.lambda"].default == 1e-4 and "'l1.lambda'" in by_key["l1.lambda"].doc
    assert by_key["seed"].section == "" and by_key["seed"].type == "int"


def rows_of(keys, section):
    return [k for k in keys if k.section == section]


def test_format_keys_is_an_aligned_table_grouped_by_section():
    keys = config_keys()
    lines = format_keys(keys).splitlines()
    assert lines[0] == "[top level]" and "[train]" in lines and "[earlybird]" in lines
    for k in keys:  # every key starts exactly one row
        assert sum(line.startswith(f"  {k.key} ") for line in lines) == 1
    iterations, meta_lr = (next(line for line in lines if line.startswith(f"  train.{name} "))
                           for name in ("iterations", "meta_lr"))
    # type, default and doc columns start at the same place on every row of a section
    assert meta_lr.index("float") == iterations.index("int ")
    assert meta_lr.index("0.001") == iterations.index("1000")
    assert meta_lr.index("Outer (meta)") == iterations.index("Meta-iterations")
    train = format_keys([k for k in keys if k.section == "train"], width=80).splitlines()
    assert max(map(len, train)) <= 80 and len(train) > len(rows_of(keys, "train")) + 1
    one = format_keys([k for k in keys if k.key == "data.channels"])
    assert one.splitlines() == [
        "[data]",
        "  data.channels  int or null  null  folder: 1 (grayscale) or 3 (RGB); default: inferred "
        "from the", " " * 36 + "images."]


# -- config files from anywhere end in one UserError line ---------------------------------------
def _one_line(call, *fragments):
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_an_empty_config_file_is_refused_not_taken_for_the_defaults(tmp_path):
    for text in ("", "\n\n", "# only a comment\n", "~\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        _one_line(lambda p=path: build_config(str(p)), str(path), "is empty")


def test_unreadable_config_files_are_one_line_user_errors(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train: {iterations: 5}  # caf\u00e9\n".encode("latin-1"))
    _one_line(lambda: build_config(str(latin1)), str(latin1), "not UTF-8", "0xe9")
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    _one_line(lambda: build_config(str(folder)), str(folder), "is a directory")
    _one_line(lambda: build_config(str(tmp_path)), str(tmp_path), "is a directory")
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- meta\n")
    _one_line(lambda: build_config(str(listed)), str(listed), "must be a YAML mapping", "list")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("hello\n")
    _one_line(lambda: build_config(str(scalar)), str(scalar), "must be a YAML mapping", "str")
    corrupt = tmp_path / "corrupt.yaml"
    corrupt.write_text("train:\n  iterations: 5\n bad: [1, 2\n")
    _one_line(lambda: build_config(str(corrupt)), str(corrupt), "not valid YAML", "line ")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train: \x00\x01\n")
    _one_line(lambda: build_config(str(binary)), str(binary))
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("train: !!python/object/apply:os.system ['true']\n")
    _one_line(lambda: build_config(str(tagged)), str(tagged), "not valid YAML")
    _one_line(lambda: build_config(str(tmp_path / "missing.yaml")), "does not exist")
    if os.name == "posix":
        fifo = tmp_path / "fifo.yaml"
        os.mkfifo(fifo)
        _one_line(lambda: build_config(str(fifo)), str(fifo), "not a regular file")


def test_a_read_error_is_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.yaml"
    path.write_text("train: {iterations: 5}\n")

    real = safeio.os.open

    def refuse(name, *args, **kwargs):
        if str(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(safeio.os, "open", refuse)
    _one_line(lambda: build_config(str(path)), str(path), "cannot be read", "Permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_a_config_file_without_read_permission_is_a_user_error(tmp_path):
    path = tmp_path / "secret.yaml"
    path.write_text("train: {iterations: 5}\n")
    path.chmod(0)
    try:
        _one_line(lambda: build_config(str(path)), str(path), "cannot be read", "permissions")
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("data, fragment", [
    (None, "got nothing (an empty file?)"), ([1, 2], "got a list"), ("train", "got a str"),
])
def test_config_from_dict_refuses_what_is_not_a_mapping(data, fragment):
    message = _one_line(lambda: config_from_dict(data, source="run/config.yaml"), fragment)
    assert message.startswith("run/config.yaml must be a mapping of config sections")
    _one_line(lambda: config_from_dict(data), "saved config")


def test_config_from_dict_round_trips_to_dict():
    cfg = build_config("mamlpp-omniglot-5w1s", ["train.meta_lr=2e-3"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    assert again == cfg and list(again.to_dict()) == list(cfg.to_dict())


@pytest.mark.parametrize("overrides, fragment, auto_on_cuda", [
    (["train.core=grouped", "meta.bn=running"],
     "train.core=grouped cannot run this learner: meta.bn=running", "loop"),
    (["train.core=grouped", "meta.mix=metamix", "data.queries=1"],
     "train.core=grouped cannot run this learner: MetaMix", "loop"),
    (["train.core=vmap", "meta.adapt=head"], "train.core=vmap cannot run this learner",
     "grouped"),
    (["train.core=vmap", "meta.algorithm=mamlpp"], "mamlpp.multi_step_loss=false", "grouped"),
])
def test_an_engine_is_refused_up_front_where_it_cannot_compute_the_loops_result(
        overrides, fragment, auto_on_cuda):
    cfg = build_config(overrides=overrides)
    with pytest.raises(UserError, match=re.escape(fragment)):
        resolve_engine(cfg, torch.device("cpu"))
    # auto takes a core that can compute it instead of refusing
    auto = build_config(overrides=[o for o in overrides if not o.startswith("train.core")])
    assert resolve_engine(auto, torch.device("cpu")).core == "loop"
    assert resolve_engine(auto, torch.device("cuda")).core == auto_on_cuda


def test_auto_takes_the_grouped_core_on_cuda_and_the_loop_on_the_cpu():
    cfg = build_config()
    assert resolve_engine(cfg, torch.device("cpu")).core == "loop"
    assert resolve_engine(cfg, torch.device("cuda")).core == "grouped"


@pytest.mark.parametrize("saved, engine", [
    ({"vmap": True, "grouped": None}, "vmap"), ({"vmap": False, "grouped": True}, "grouped"),
    ({"vmap": False, "grouped": False}, "loop"), ({"vmap": False, "grouped": None}, "auto")])
def test_a_config_saved_with_the_old_engine_keys_still_loads(saved, engine):
    old = Config().to_dict()
    old["train"].pop("core")
    old["train"].update(saved)
    assert config_from_dict(old).train.core == engine


@pytest.mark.parametrize("saved", [
    {"grouped": [1]}, {"vmap": "false"}, {"grouped": "yes"}, {"vmap": True, "grouped": True},
    {"grouped": 1}, {"grouped": None, "core": "loop"}])
def test_an_old_engine_key_of_a_shape_no_version_wrote_is_refused_not_guessed(saved):
    old = Config().to_dict()
    old["train"].pop("core")
    old["train"].update(saved)
    with pytest.raises(UserError, match=r"config key 'train\.(grouped|vmap)' is now train\.core"):
        config_from_dict(old)


def test_the_old_engine_keys_in_user_input_name_the_new_key():
    with pytest.raises(UserError, match=r"'train.grouped' is now train.core"):
        build_config(overrides=["train.grouped=true"])
