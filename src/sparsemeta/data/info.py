"""``sparsemeta data info NAME --root DIR``: check the layout, print classes and images per split.

For image-file layouts nothing is decoded (only the tree is listed), so it answers in seconds and
tells whether the decoded cache exists yet; the glyph set and mini-ImageNet pickles are loaded
(generating or building their cache). It also says whether the configured N-way K-shot + Q-query
tasks fit every split, and flags counts that differ from the published data sets.
"""

from __future__ import annotations

import numpy as np

from sparsemeta.data.base import SPLITS, FewShotData
from sparsemeta.data.cache import Layout, layout_cache
from sparsemeta.data.spec import DataSpec, TaskSpec
from sparsemeta.data.tasks import check_tasks
from sparsemeta.foundations.errors import UserError

#: the preset a ``data`` command should start from for each data set (image size, ways, ...)
PRESETS = {"glyphs": "glyphs-quick", "omniglot": "omniglot-5w1s",
           "miniimagenet": "miniimagenet-5w1s", "folder": "glyphs-quick"}

_STANDARD = {
    "omniglot": ("Omniglot has 1,623 characters × 20 drawers (32,460 images)", 1623, 20),
    "miniimagenet": ("Ravi & Larochelle's mini-ImageNet has 64/16/20 classes × 600 images",
                     100, 600),
}


#: what the report says when the configured tasks do not fit a split (exit 1 from the CLI)
DO_NOT_FIT = "do NOT fit"

def preset_for(name: str) -> str:
    """The packaged preset matching data set ``name`` (fallback: the glyph preset)."""
    return PRESETS.get(name, "glyphs-quick")


def split_counts(spec: DataSpec) -> tuple[str, dict[str, list[int]], list[str]]:
    """(description, images per class for each split, notes) of the configured data set."""
    name = spec.name
    notes: list[str] = []
    if name == "glyphs":
        from sparsemeta.data.registry import load_glyphs

        data = load_glyphs(spec)
        return "generated glyph set", _from_data(data), notes
    if name == "omniglot":
        from sparsemeta.data import omniglot as mod

        source = mod.scan_omniglot(spec)
    elif name == "folder":
        from sparsemeta.data import folder as mod

        source = mod.scan_folder(spec)
    elif name == "miniimagenet":
        from sparsemeta.data import miniimagenet as mod

        source = mod.scan_miniimagenet(spec)
        if isinstance(source, mod.PickleSource):
            data = mod.load_miniimagenet(spec)
            return source.description, _from_data(data), ["cache: built (memory-mapped)"]
    else:
        raise UserError(f"unknown data set '{name}'; choose one of {', '.join(sorted(PRESETS))}")
    assert isinstance(source, Layout)
    cache = layout_cache(source, name, **mod.decode_args(spec))
    total = sum(len(files) for _, files in source.classes)
    notes.append(f"cache: {cache}" if cache else
                 f"cache: not built yet (the first load decodes {total:,} images once)")
    return source.description, {s: source.per_class(s) for s in SPLITS}, notes


def _from_data(data: FewShotData) -> dict[str, list[int]]:
    return {s: [len(i) for i in data.classes.get(s, [])] for s in SPLITS}


def _fmt_per_class(counts: list[int]) -> str:
    if not counts:
        return "-"
    lo, hi = min(counts), max(counts)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def info(spec: DataSpec, tasks: TaskSpec) -> str:
    """A multi-line report of the configured data set (raises UserError on layout problems)."""
    name = spec.name
    desc, per_split, notes = split_counts(spec)
    lines = [f"{name}: {desc}", f"  {'split':<6} {'classes':>8} {'images':>9}  per class"]
    for s in SPLITS:
        c = per_split.get(s, [])
        lines.append(f"  {s:<6} {len(c):>8,} {sum(c):>9,}  {_fmt_per_class(c)}")
    all_counts = [n for s in SPLITS for n in per_split.get(s, [])]
    lines.append(f"  {'total':<6} {len(all_counts):>8,} {sum(all_counts):>9,}")
    standard = _STANDARD.get(name)
    if standard and (len(all_counts) != standard[1] or set(all_counts) != {standard[2]}):
        notes.append(f"note: differs from the published set ({standard[0]})")
    shape = FewShotData(
        name, np.empty((0, 1, 1, 1), np.uint8),
        {s: [np.arange(n) for n in per_split.get(s, [])] for s in SPLITS},
    )
    task = f"{tasks.ways}-way {tasks.shots}-shot {tasks.queries}-query tasks"
    try:
        check_tasks(shape, tasks)
        notes.append(f"tasks: {task} fit every split")
    except UserError as exc:
        notes.append(f"tasks: {task} {DO_NOT_FIT}: {exc}")
    return "\n".join(lines + [f"  {n}" for n in notes])
