"""Typed configuration: dataclasses with defaults, YAML presets and dotted ``--set`` overrides.

Every value is checked before any work starts, and every error names the key, so a week-long
run never dies at hour 30 on a typo. Each section checks its own ranges (``validate``);
``Config.validate`` adds the few checks that span sections. Every field carries a docstring,
which ``config_keys`` reads back for ``sparsemeta config keys``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import keyword
import math
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from sparsemeta.data.registry import NAMES
from sparsemeta.data.spec import DataSpec, TaskSpec
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.safeio import (
    MAX_CONFIG_BYTES,
    check_key,
    load_yaml,
    parse_value,
    read_text,
    short,
)
from sparsemeta.sparsity.prune import MagnitudeRule

DEFAULT_PRESET = "glyphs-quick"


# -- range checks (for every section, here and in the methods): each raises UserError naming
# the full dotted key ---------------------------
#: seeds are 32-bit (torch, NumPy and Optuna all take them)
MAX_SEED = 2**32 - 1
#: the widest conv layer anyone trains here; the edge format refuses more
MAX_FILTERS = 4096
#: image side in pixels. MAML works at 28 (Omniglot) and 84 (mini-ImageNet), ImageNet-size work
#: at 224; 512 leaves room above that. Every image is held at this size: the decoded cache
#: (mini-ImageNet's 60,000 RGB images: 47 GB at 512, 9 GB at 224) and the glyph generator
#: (32,000 images in memory: 8.4 GB at 512), and Conv4's first layer holds filters × side²
#: floats per image (64 MiB at 512 with 64 filters). The edge format's 2048 is a file limit.
MAX_IMAGE_SIZE = 512
#: evaluation tasks (eval.tasks, train.val_tasks, ``eval --tasks``): 600 is the field's standard,
#: 10,000 the most reported; an evaluation keeps 2 × tasks × (steps + 1) float64 results
#: (1.6 GB at both bounds)
MAX_TASKS = 100_000
#: inner-loop steps: MAML takes 1-10, fine-tuning baselines 100s; MAML++ keeps per-step
#: batch-norm weights and learning rates, and an evaluation one result per step
MAX_INNER_STEPS = 1000
#: CPU task threads of one process: each is an OS thread, more than any machine has cores
MAX_THREADS = 1024
#: pixels of one meta-batch (meta_batch × ways × (shots + queries) × side², per channel):
#: 2^32 is 16 GiB as float32 — 400 times the largest standard setting (32 tasks of 20-way
#: 5-shot Omniglot with 15 queries at 28 px: 10 M) and 6 times 32 such tasks at 224 px
MAX_BATCH_PIXELS = 2**32


def at_most(key: str, value: int, high: int, why: str = "") -> None:
    if not value <= high:
        raise UserError(f"{key} must be <= {high}{why}, got {value}")


def at_least(key: str, value: float | None, low: int, why: str = "") -> None:
    """``value >= low`` (``None`` passes: an optional field left at its default)."""
    if value is not None and not value >= low:
        raise UserError(f"{key} must be >= {low}{why}, got {value}")


def positive(key: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{key} must be > 0, got {value}")


def learning_rate(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{key} must be > 0 and finite, got {value}")


def open_unit(key: str, value: float, closed_high: bool = False) -> None:
    """``value`` in (0, 1), or in (0, 1] with ``closed_high``."""
    if not (0.0 < value < 1.0 or (closed_high and value == 1.0)):
        raise UserError(f"{key} must be in (0, 1{']' if closed_high else ')'}, got {value}")


#: data set names, from the data layer's registry (a new loader there is a new name here; the
#: registry imports no loader until one is used)
DATASET_NAMES = NAMES


@dataclass
class DataConfig:
    """Data set and task shape: N-way K-shot classification tasks."""

    name: Literal[DATASET_NAMES] = "glyphs"
    """Data set: generated glyphs (no download), Omniglot, mini-ImageNet, or a folder of class
    folders."""
    root: str | None = None
    """Data directory (real data sets) or cache directory (glyphs; default: the user cache)."""
    ways: int = 5
    """N: classes per task."""
    shots: int = 1
    """K: support (training) examples per class of a task."""
    queries: int = 15
    """Query (evaluation) examples per class of a meta-training task."""
    image_size: int = 28
    """Side of the square input images in pixels."""
    rotations: bool = True
    """Meta-training augmentation: rotations by 90°, 180°, 270° count as new classes."""
    shift: int = 0
    """Meta-training augmentation: random shift of up to this many pixels."""
    seed: int = 0
    """Seed of the generated glyph set and of the omniglot/folder class splits (not of tasks)."""
    split: Literal["maml", "background"] = "maml"
    """Omniglot class split: 'maml' (1,200 meta-train characters incl. 100 validation, 423
    test; seeded) or 'background' (train/val from images_background, test = evaluation)."""
    split_file: str | None = None
    """folder: JSON {train|val|test: [class names]}; default ROOT/splits.json if present."""
    val_fraction: float = 0.2
    """folder without a split file: fraction of classes for validation (seeded)."""
    test_fraction: float = 0.2
    """folder without a split file: fraction of classes for test (seeded)."""
    channels: int | None = None
    """folder: 1 (grayscale) or 3 (RGB); default: inferred from the images."""
    augment: bool = True
    """mini-ImageNet meta-training augmentation: random crop (8 px padding) + horizontal flip."""

    def validate(self, at: str = "data") -> None:
        at_least(f"{at}.ways", self.ways, 2, " for a classification task")
        for name in ("shots", "queries"):
            at_least(f"{at}.{name}", getattr(self, name), 1)
        at_least(f"{at}.image_size", self.image_size, 16, " for Conv4")
        at_most(f"{at}.image_size", self.image_size, MAX_IMAGE_SIZE)
        at_least(f"{at}.shift", self.shift, 0)
        at_most(f"{at}.shift", self.shift, self.image_size // 2, " (half the image side)")
        at_least(f"{at}.seed", self.seed, 0)
        at_most(f"{at}.seed", self.seed, MAX_SEED, " (a 32-bit seed)")
        v, t = self.val_fraction, self.test_fraction
        if not (0 < v < 1 and 0 < t < 1 and v + t < 1):
            raise UserError(
                f"{at}.val_fraction and {at}.test_fraction must be in (0, 1) with a sum below 1, "
                f"got {v} and {t}"
            )
        if self.channels not in (None, 1, 3):
            raise UserError(f"{at}.channels must be 1, 3 or null, got {self.channels}")


@dataclass
class ModelConfig:
    """The network: Conv4 (four 3×3 conv blocks with batch norm and ReLU, then a linear layer)."""

    name: Literal["conv4"] = "conv4"
    """Architecture (Conv4 only)."""
    filters: int = 64
    """Output channels of each conv block (64 for Omniglot, 32 for mini-ImageNet in MAML)."""
    downsample: Literal["maxpool", "stride"] = "maxpool"
    """How each block halves the resolution: 2×2 max-pooling, or a stride-2 convolution."""

    def validate(self, at: str = "model") -> None:
        at_least(f"{at}.filters", self.filters, 1)
        at_most(f"{at}.filters", self.filters, MAX_FILTERS)


@dataclass
class MetaConfig:
    """The meta-learning algorithm and its inner loop (adaptation on the support set)."""

    algorithm: Literal["maml", "mamlpp", "metasgd"] = "maml"
    """maml (scalar inner lr), mamlpp (MAML++: see the mamlpp section), metasgd (a learned
    inner learning rate α per weight)."""
    first_order: bool = False
    """First-order MAML: no second derivatives through the inner loop."""
    inner_lr: float = 0.4
    """Inner-loop learning rate α (metasgd and MAML++'s LSLR: its initial value)."""
    inner_steps: int = 1
    """Inner-loop gradient steps during meta-training."""
    eval_inner_steps: int = 3
    """Inner-loop gradient steps when evaluating on validation and test tasks."""
    bn: Literal["transductive", "support", "running"] = "transductive"
    """Batch-norm statistics: 'transductive' normalises support and query each with their own
    batch statistics (original MAML); 'support' normalises the query with the support set's
    statistics, so no query example influences another's prediction; 'running' trains with
    batch statistics while accumulating running ones (per step under MAML++'s per-step BN) and
    evaluates with the running statistics."""
    mix: Literal["none", "metamix"] = "none"
    """'metamix': the outer loss mixes the query with the permuted support set at a random
    layer (MetaMix); needs data.queries == data.shots."""
    adapt: str = "all"
    """What the inner loop adapts: 'all' (MAML), 'head' (ANIL: the classifier only), 'bn' (batch
    norm and head), 'last:K' (the last K conv blocks and the head); the others stay as
    meta-trained. Meta-train with the mode the device fine-tunes with (sparsemeta-edge
    finetune --update)."""

    def validate(self, at: str = "meta") -> None:
        learning_rate(f"{at}.inner_lr", self.inner_lr)
        at_least(f"{at}.inner_steps", self.inner_steps, 1)
        at_least(f"{at}.eval_inner_steps", self.eval_inner_steps, 0)
        for name in ("inner_steps", "eval_inner_steps"):
            at_most(f"{at}.{name}", getattr(self, name), MAX_INNER_STEPS)
        if not re.fullmatch(r"all|head|bn|last:[1-4]", self.adapt):
            raise UserError(f"{at}.adapt must be all, head, bn or last:K with K in 1..4; "
                            f"got {self.adapt!r}")


@dataclass
class TrainConfig:
    """The outer (meta-training) loop."""

    iterations: int = 1000
    """Meta-iterations (outer steps) of one training run."""
    meta_batch: int = 8
    """Tasks per meta-iteration (their outer losses are averaged)."""
    meta_lr: float = 1e-3
    """Outer (meta) learning rate of Adam."""
    val_every: int = 100
    """Meta-iterations between validations (the best one is the run's chosen model)."""
    val_tasks: int = 100
    """Validation tasks per validation (fixed tasks, the same every time)."""
    checkpoint_every: int = 50
    """Meta-iterations between checkpoints (a killed run resumes from the last)."""
    core: Literal["auto", "loop", "grouped", "vmap"] = "auto"
    """How the tasks of a meta-batch (and of an evaluation) are computed: 'loop' one task after
    another (on the CPU, on train.threads task threads); 'grouped' all in one pass, each layer a
    grouped convolution over the tasks (batch statistics, no MetaMix); 'vmap' meta-batches in
    one torch.func.vmap pass (measured ~0.65× the loop on the CPU at ~3× its memory; evaluation
    as 'auto' evaluates); 'auto' grouped on CUDA where the learner allows it, else the loop.
    Every core computes the loop's meta-gradient (tested in float64)."""
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """The arithmetic of meta-training and evaluation: 'fp32' true float32 (CUDA's TF32 off);
    'tf32' TF32 matrix products and convolutions on CUDA (the CPU computes float32); 'bf16'
    bfloat16 autocast of every forward. fp32 by default: this is a research tool whose results
    are compared across runs, and TF32 moved a float32 MAML meta-gradient by 1.2 relative on a
    GPU (docs/speed.md)."""
    threads: int | None = None
    """CPU threads one training process uses (null: the cores it may run on, shared among
    ``--workers`` processes). On the CPU they compute the tasks of a meta-batch (and of an
    evaluation) side by side with one intra-op thread each, which keeps a run from collapsing
    when other processes compete for the cores (OpenMP oversubscription)."""

    def validate(self, at: str = "train") -> None:
        for name in ("iterations", "meta_batch", "val_every", "val_tasks", "checkpoint_every"):
            at_least(f"{at}.{name}", getattr(self, name), 1)
        at_least(f"{at}.threads", self.threads, 1)
        if self.threads is not None:
            at_most(f"{at}.threads", self.threads, MAX_THREADS)
        at_most(f"{at}.val_tasks", self.val_tasks, MAX_TASKS)
        learning_rate(f"{at}.meta_lr", self.meta_lr)


@dataclass
class EvalConfig:
    """The final evaluation of a run's chosen model."""

    tasks: int = 600
    """Tasks of the final evaluation (mean accuracy ± 95% confidence interval over them)."""
    split: Literal["test", "val"] = "test"
    """Split of a run's final evaluation; 'val' for tuning (``sparsemeta tune``), so a search
    never sees a test task."""
    queries: int | None = None
    """Query examples per class of validation and test tasks (default: data.queries), so
    learners trained with different query sizes (MetaMix) are evaluated on the same tasks."""

    def validate(self, at: str = "eval") -> None:
        at_least(f"{at}.tasks", self.tasks, 1)
        at_most(f"{at}.tasks", self.tasks, MAX_TASKS)
        at_least(f"{at}.queries", self.queries, 1)


@dataclass
class MamlppConfig:
    """MAML++ (Antoniou et al., 2019): each part switchable; used when meta.algorithm=mamlpp."""

    multi_step_loss: bool = True
    """Outer loss over every inner step, weights annealed towards the last step."""
    msl_epochs: int = 10
    """Epochs of multi-step loss (then the last step only)."""
    lslr: bool = True
    """Learned inner learning rate per layer and per step."""
    per_step_bn: bool = True
    """Per-step BN weights and biases (BNWB), and per-step running statistics (BNRS) when
    meta.bn=running."""
    first_order_epochs: int = 50
    """Derivative-order annealing: first order before this epoch, then second (0: off)."""
    cosine_lr: bool = True
    """Cosine annealing of the meta learning rate from train.meta_lr to min_meta_lr."""
    min_meta_lr: float = 1e-5
    """Meta learning rate at the end of the cosine annealing (at most train.meta_lr)."""
    epoch_iterations: int = 500
    """Meta-iterations per epoch (the unit of msl_epochs and first_order_epochs)."""

    def validate(self, at: str = "mamlpp") -> None:
        at_least(f"{at}.msl_epochs", self.msl_epochs, 1)
        at_least(f"{at}.epoch_iterations", self.epoch_iterations, 1)
        at_least(f"{at}.first_order_epochs", self.first_order_epochs, 0)
        if not (math.isfinite(self.min_meta_lr) and self.min_meta_lr >= 0):
            raise UserError(f"{at}.min_meta_lr must be >= 0 and finite, got {self.min_meta_lr}")


@dataclass
class MetaMixConfig:
    """MetaMix (Yao et al., 2021): λ ~ Beta(alpha, beta)."""

    alpha: float = 2.0
    """First shape parameter α of the Beta distribution of the mixing weight λ."""
    beta: float = 2.0
    """Second shape parameter β of the Beta distribution of the mixing weight λ."""
    channel_shuffle_from: int | None = None
    """Meta-iteration from which Channel Shuffle is used, on half of the meta-batches as in the
    MetaMix code (null: never): at the mixing layer, each class takes one of 6 contiguous channel
    groups from another class of the task (support in the inner loop, support and query in the
    outer loss), labels unchanged."""

    def validate(self, at: str = "metamix") -> None:
        positive(f"{at}.alpha", self.alpha)
        positive(f"{at}.beta", self.beta)
        at_least(f"{at}.channel_shuffle_from", self.channel_shuffle_from, 0)


@dataclass
class PruneConfig:
    """Iterative magnitude pruning (the lottery-ticket procedure)."""

    rate: float = 0.2
    """Fraction of the remaining hidden-layer weights removed at each level."""
    levels: int | None = None
    """Pruning levels after the dense level 0; default: enough to reach about 5% density."""
    scope: Literal["layerwise", "global"] = "layerwise"
    """Rank weights by magnitude within each layer ('layerwise') or across all layers."""
    rewind: str = "init"
    """Weights the survivors restart from: 'init' (θ₀), 'step:k' (after k meta-iterations of
    level 0, late rewinding) or 'none' (keep the trained weights: fine-tuning)."""
    output_rate_factor: float = 0.5
    """The output layer is pruned at rate × this factor (LTH convention: half)."""
    targets: list[float] | None = None
    """Densities (fractions of prunable weights, e.g. [0.5, 0.2, 0.1]) at which the controls
    and every method other than IMP itself are compared; each maps to the IMP level whose
    density is nearest. null: every level."""
    structure: Literal["unstructured", "filters"] = "unstructured"
    """'unstructured' removes single weights; 'filters' removes `rate` of the remaining output
    filters of every conv layer by L2 norm (layerwise only; the output layer loses just the
    columns of removed filters), so the ticket exports as a smaller dense network that
    fine-tunes faster. Only the methods that say so take 'filters' (sparsemeta run refuses the
    others)."""

    def rewind_step(self) -> int | None:
        return int(self.rewind.split(":", 1)[1]) if self.rewind.startswith("step:") else None

    def num_levels(self) -> int:
        if self.levels is not None:
            return self.levels
        return math.ceil(math.log(0.05) / math.log(1.0 - self.rate))

    def rule(self) -> MagnitudeRule:
        """One magnitude-pruning round as this section sets it (rate, scope, output layer)."""
        return MagnitudeRule(self.rate, self.scope, self.output_rate_factor)

    def validate(self, at: str = "prune") -> None:
        open_unit(f"{at}.rate", self.rate)
        at_least(f"{at}.levels", self.levels, 0)
        if not 0.0 <= self.output_rate_factor * self.rate < 1.0:
            raise UserError(
                f"{at}.output_rate_factor × {at}.rate must be in [0, 1), got "
                f"{self.output_rate_factor} × {self.rate}"
            )
        if self.structure == "filters" and self.scope == "global":
            raise UserError(f"{at}.scope=global needs {at}.structure=unstructured: filter norms "
                            "of layers with different fan-in are not comparable")
        for i, target in enumerate(self.targets or []):
            open_unit(f"{at}.targets[{i}]", target)
        if self.targets is not None and not self.targets:
            raise UserError(f"{at}.targets is empty; give densities like [0.5, 0.2] or null")
        if self.targets and len(set(self.targets)) < len(self.targets):
            twice = next(t for t in self.targets if self.targets.count(t) > 1)
            raise UserError(f"{at}.targets has {twice} twice; give each density once")
        if self.targets and self.levels == 0:
            raise UserError(f"{at}.targets needs pruning levels to map to; {at}.levels is 0")
        if not re.fullmatch(r"init|none|step:[1-9][0-9]*", self.rewind):
            raise UserError(
                f"{at}.rewind must be init, none or step:K (K >= 1), got {self.rewind!r}")


#: config sections owned by other layers — a sparsity method's settings — by name, in the
#: order they were added (``add_section``: the method registry adds its methods' sections)
_SECTIONS: dict[str, type] = {}


def add_section(name: str, cls: type) -> None:
    """Give every config built from now on a section ``name`` of type ``cls`` (a dataclass of
    typed fields with defaults, docstrings and ``validate(at)``, like the sections here)."""
    core = {_key(f.name) for f in dataclasses.fields(Config) if f.name != "sections"}
    if name in core or not dataclasses.is_dataclass(cls):
        raise ValueError(f"config section '{name}' clashes with a core key or is not a dataclass")
    _SECTIONS[name] = cls


def remove_section(name: str) -> None:
    _SECTIONS.pop(name, None)


#: the modules that add sections when imported: the sparsity methods' registry. The one place
#: where this layer names a layer above it — by module name, imported on the first config built
#: (not at import), so importing the config never imports the methods; tests/test_layers.py
#: allows exactly this dynamic import and the data registry's loaders.
SECTION_PROVIDERS = ("sparsemeta.experiments.methods",)
_loaded: list[bool] = []


def _load_sections() -> None:
    """Import the section providers once; a config built while one of them is still being
    imported would silently miss sections, so that is refused."""
    if _loaded:
        return
    for name in SECTION_PROVIDERS:
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing",
                                          False):
            raise RuntimeError(f"a config was built while '{name}' was being imported: build "
                               "configs at run time, not at import")
        importlib.import_module(name)
    _loaded.append(True)


def _new_sections() -> dict[str, Any]:
    _load_sections()
    return {name: cls() for name, cls in _SECTIONS.items()}


@dataclass
class Config:
    seed: int = 0
    """Seed of θ₀ (the model's initial weights), of the task sampler and of MetaMix's draws."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to compute: 'auto' takes CUDA when available, else the CPU."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mamlpp: MamlppConfig = field(default_factory=MamlppConfig)
    metamix: MetaMixConfig = field(default_factory=MetaMixConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    sections: dict[str, Any] = field(default_factory=_new_sections)
    """Sections added by ``add_section`` (written at the top level, like the ones above)."""

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def section(self, name: str) -> Any:
        """A section added by ``add_section`` (a sparsity method's settings)."""
        return self.sections[name]

    def data_spec(self) -> DataSpec:
        """What the data layer loads: the ``data`` section without the task shape."""
        d = self.data
        return DataSpec(name=d.name, root=d.root, image_size=d.image_size, seed=d.seed,
                        split=d.split, split_file=d.split_file, val_fraction=d.val_fraction,
                        test_fraction=d.test_fraction, channels=d.channels, augment=d.augment)

    def task_spec(self) -> TaskSpec:
        """The episodes of this run: task shape, evaluation queries and the task seed."""
        d = self.data
        return TaskSpec(ways=d.ways, shots=d.shots, queries=d.queries,
                        eval_queries=self.eval.queries, seed=self.seed, rotations=d.rotations,
                        shift=d.shift)

    def validate(self) -> Config:
        """Check value ranges that types alone cannot express; raise UserError naming the key."""
        _check_finite(self, "")
        at_least("seed", self.seed, 0)
        at_most("seed", self.seed, MAX_SEED, " (a 32-bit seed)")
        for key, section in _sections_of(self):
            _check_finite(section, f"{key}.")
            section.validate(key)
        self._validate_across_sections()
        return self

    def _validate_across_sections(self) -> None:
        d = self.data
        pixels = self.train.meta_batch * d.ways * (d.shots + d.queries) * d.image_size**2
        if pixels > MAX_BATCH_PIXELS:
            raise UserError(f"train.meta_batch × data.ways × (data.shots + data.queries) × "
                            f"data.image_size² = {pixels:,} pixels in one meta-batch, more than "
                            f"{MAX_BATCH_PIXELS:,} (16 GiB of float32); lower one of them")
        if self.meta.mix == "metamix" and self.data.queries != self.data.shots:
            raise UserError(
                f"meta.mix=metamix mixes each query example with a support example, so it needs "
                f"data.queries == data.shots (got {self.data.queries} and {self.data.shots})"
            )
        shuffle_from = self.metamix.channel_shuffle_from
        if shuffle_from is not None and self.meta.mix != "metamix":
            raise UserError(
                f"metamix.channel_shuffle_from needs meta.mix=metamix "
                f"(got {shuffle_from} with meta.mix={self.meta.mix})"
            )
        if self.mamlpp.min_meta_lr > self.train.meta_lr:
            raise UserError(f"mamlpp.min_meta_lr must be <= train.meta_lr "
                            f"({self.train.meta_lr}), got {self.mamlpp.min_meta_lr}")
        k = self.prune.rewind_step()
        if k is not None and k > self.train.iterations:
            raise UserError(
                f"prune.rewind={self.prune.rewind} is past train.iterations={self.train.iterations}"
            )


def _key(field_name: str) -> str:
    """Config key of a field: ``lambda_`` is spelled ``lambda`` (a Python keyword)."""
    base = field_name[:-1]
    return base if field_name.endswith("_") and keyword.iskeyword(base) else field_name


def _fields(obj: Any) -> list[tuple[str, Any]]:
    """(key, value) of an object's config keys: its fields, and for a ``Config`` the added
    sections after them (its ``sections`` field is not itself a key)."""
    out = [(_key(f.name), getattr(obj, f.name)) for f in dataclasses.fields(obj)
           if not (isinstance(obj, Config) and f.name == "sections")]
    return out + (list(obj.sections.items()) if isinstance(obj, Config) else [])


def _sections_of(cfg: Config) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in _fields(cfg) if dataclasses.is_dataclass(v)]


def _to_dict(obj: Any) -> dict[str, Any]:
    return {k: _to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in _fields(obj)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_finite(obj: Any, prefix: str) -> None:
    """Every float field of ``obj`` is finite (no inf, no nan), whoever built it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if hints[f.name] is float and isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}{_key(f.name)} must be a finite number, got {value}")


def _as_float(key: str, value: Any) -> float:
    """A number, or any string Python's ``float()`` reads (YAML 1.1 reads ``1e-3`` as a
    string); finite only."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{key} must be a number, got {short(value)}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{key} must be a number (e.g. 0.001 or 1e-3), got {short(value)}") from None
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise UserError(f"{key} must be a finite number, got {short(value)}")
    return number


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints and numeric strings
    become float for a float field)."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(
                f"{key} must be one of {', '.join(map(str, choices))}; got {short(value)}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{key}: invalid value {short(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list (e.g. [0.5, 0.2]), got {short(value)}")
        (item,) = get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(
            f"{key} must be an integer (a whole number like 1000; not 1e3 or 2.0), got {short(value)}")
    if tp is float:
        return _as_float(key, value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key} must be a string, got {short(value)}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


#: keys of older versions, read from saved configs (``upgrade_saved``) and, in user input,
#: refused with the key that replaced them
RENAMED = {"train.vmap": "train.core=vmap",
           "train.grouped": "train.core (true → grouped, false → loop, null → auto)"}


def upgrade_saved(data: Any) -> Any:
    """A resolved config as an older sparsemeta saved it (a run directory's ``config.yaml``),
    in today's keys: ``train.vmap``/``train.grouped`` become ``train.core``. Only the shapes an
    older version wrote are translated (booleans, null, not both cores, no ``core`` beside
    them); anything else is left for the config's own one-line refusal of the old key."""
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, dict) or not {"vmap", "grouped"} & set(train) or "core" in train:
        return data
    vmap, grouped = train.get("vmap", False), train.get("grouped")
    if type(vmap) is not bool or not (grouped is None or type(grouped) is bool) or (
            vmap and grouped):
        return data
    train = {k: v for k, v in train.items() if k not in ("vmap", "grouped")}
    train["core"] = "vmap" if vmap else {True: "grouped", False: "loop"}.get(grouped, "auto")
    return {**data, "train": train}


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Merge a nested dict into a dataclass instance, type-checking each leaf."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {short(data)}")
    hints = typing.get_type_hints(type(obj))
    names = {k: f.name for k, f in ((_key(f.name), f) for f in dataclasses.fields(obj))
             if not (isinstance(obj, Config) and f.name == "sections")}
    added = obj.sections if isinstance(obj, Config) else {}
    for name, value in data.items():
        key = f"{prefix}{name}" if isinstance(name, str) else f"{prefix}{short(name)}"
        if name in added:
            _apply(added[name], value, prefix=f"{key}.")
            continue
        if name not in names:
            raise UserError(_unknown_key(key, name, value, [*names, *added]))
        attr = names[name]
        tp = hints[attr]
        if _is_dataclass_type(tp):
            _apply(getattr(obj, attr), value, prefix=f"{key}.")
        else:
            setattr(obj, attr, _coerce(key, value, tp))


def _unknown_key(key: Any, name: Any, value: Any, known: list[str]) -> str:
    """The one line for a key no section has: a renamed key's new name, or a look-alike,
    dotted or misspelt key pointed out (``safeio.check_key``), then the valid keys there."""
    if isinstance(key, str) and key in RENAMED:
        return f"config key '{key}' is now {RENAMED[key]}; rename it"
    hint = check_key(name, known, value=value) if isinstance(name, str) else None
    return (f"unknown config key {short(key)}" + (f"; {hint}" if hint else "")
            + f"; valid keys here: {', '.join(sorted(known))}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set expects key=value (e.g. train.iterations=200), got {short(item)}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set expects key=value, got {short(item)}")
    return key.split("."), parse_value(raw, where=f"the --set value of {short(key)}")


# -- the documentation of every key, read from the field docstrings ---------------------------
@dataclass(frozen=True)
class KeyDoc:
    """One config key as ``sparsemeta config keys`` lists it."""

    key: str
    """Dotted key as written in YAML and ``--set`` (``train.meta_lr``; top level: ``seed``)."""
    type: str
    """Readable type: ``int``, ``float``, ``bool``, ``str``, ``one of a|b``, ``… or null``."""
    default: Any
    """Default value (Python value: None, bool, int, float or str)."""
    doc: str
    """The field's docstring on one line (whitespace collapsed)."""

    @property
    def section(self) -> str:
        """``train`` for ``train.meta_lr``; ``""`` for a top-level key."""
        return self.key.rpartition(".")[0]


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(map(str, get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after a field) of a class, by field."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (e.g. a frozen application)
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            text = re.sub(r"``(.+?)``", r"'\1'", after.value.value)  # reST code: 'code'
            docs[node.target.id] = " ".join(text.split())
    return docs


def config_keys(cls: type = Config) -> list[KeyDoc]:
    """Every leaf key of the config, in ``to_dict`` order, with type, default and docstring."""
    out: list[KeyDoc] = []

    def walk(obj: Any, prefix: str) -> None:
        hints, docs = typing.get_type_hints(type(obj)), _field_docs(type(obj))
        attrs = {_key(f.name): f.name for f in dataclasses.fields(obj)}
        for key, value in _fields(obj):
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{key}.")
            else:
                out.append(KeyDoc(f"{prefix}{key}", _type_name(hints[attrs[key]]), value,
                                  docs.get(attrs[key], "")))

    walk(cls(), "")
    return out


def _show(value: Any) -> str:
    """A default as one would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) and not value else str(value)


#: a type cell wider than this wraps at its '|' and ' ' (a long list of choices would otherwise
#: squeeze the doc column of its whole section)
TYPE_WIDTH = 16


def _wrap_type(text: str) -> list[str]:
    parts = re.findall(r"[^| ]+[| ]?", text)
    lines = [""]
    for part in parts:
        if lines[-1] and len(lines[-1] + part.rstrip()) > TYPE_WIDTH:
            lines.append("")
        lines[-1] += part
    return [line.rstrip() for line in lines]


def format_keys(keys: list[KeyDoc], width: int = 100) -> str:
    """An aligned text table (key, type, default, doc), one block per section; docs wrap in
    their column, at least 30 characters wide."""
    sections: dict[str, list[KeyDoc]] = {}
    for k in keys:
        sections.setdefault(k.section, []).append(k)
    blocks = []
    for section, rows in sections.items():
        types = [_wrap_type(k.type) for k in rows]
        cells = [(k.key, t[0], _show(k.default)) for k, t in zip(rows, types)]
        widths = [max(len(c[0]) for c in cells), max(len(x) for t in types for x in t),
                  max(len(c[2]) for c in cells)]
        indent = 2 + sum(widths) + 3 * 2
        lines = [f"[{section}]" if section else "[top level]"]
        for k, row, typ in zip(rows, cells, types):
            doc = textwrap.wrap(k.doc, max(30, width - indent), break_on_hyphens=False) or [""]
            for i in range(max(len(doc), len(typ))):
                cols = row if i == 0 else ("", typ[i] if i < len(typ) else "", "")
                left = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
                lines.append(f"  {left}  {doc[i] if i < len(doc) else ''}".rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# -- presets and config files -----------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files("sparsemeta.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def read_preset(name_or_path: str) -> dict[str, Any]:
    """A preset is a packaged YAML name (``glyphs-quick``) or a path to a YAML file."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or os.path.lexists(path):
        where = f"config file '{name_or_path}'"
        text = read_text(path, limit=MAX_CONFIG_BYTES, what=where)
    else:
        res = resources.files("sparsemeta.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise UserError(
                f"unknown preset '{name_or_path}'; available: {', '.join(preset_names())}"
                " (or give a path to a .yaml file)"
            )
        where = f"preset '{name_or_path}'"
        text = res.read_text(encoding="utf-8")
    data = load_yaml(text, where=where)
    if data is None:
        raise UserError(f"{where} is empty (no settings); write the keys to change, e.g. "
                        "'train: {iterations: 200}', or use a preset")
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a YAML mapping of sections (e.g. 'train: "
                        f"{{iterations: 200}}'), got a {type(data).__name__}")
    return data


#: keys of a preset's ``experiment:`` block: the defaults of ``sparsemeta run``'s flags
EXPERIMENT_KEYS = ("methods", "seeds", "controls", "workers")


def experiment_defaults(preset: str) -> dict[str, Any]:
    """A preset's optional ``experiment:`` block (methods, seeds, controls: lists, or a comma
    text as on the command line — ``controls: none``; workers: an int), as written there: the
    defaults of the ``run`` command's flags."""
    block = read_preset(preset).get("experiment") or {}
    if not isinstance(block, dict) or set(block) - set(EXPERIMENT_KEYS):
        raise UserError(f"preset '{preset}': 'experiment' may hold only "
                        f"{', '.join(EXPERIMENT_KEYS)}")
    for key, value in block.items():
        ok = (isinstance(value, int) and not isinstance(value, bool) if key == "workers"
              else isinstance(value, (list, str)))
        if not ok:
            what = "an integer like 2" if key == "workers" else "a list like [a, b] (or none)"
            raise UserError(f"preset '{preset}': experiment.{key} must be {what}, got "
                            f"{short(value)}")
    return block


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def build_config(
    preset: str | dict[str, Any] | None = DEFAULT_PRESET,
    overrides: list[str] | None = None,
    cls: type = Config,
) -> Any:
    """Defaults ← preset (name, path or dict) ← ``--set`` overrides, validated."""
    cfg = cls()
    if preset is not None:
        data = dict(preset if isinstance(preset, dict) else read_preset(preset))
        data.pop("experiment", None)  # the experiment's defaults (see experiment_defaults)
        _apply(cfg, data)
    for item in overrides or []:
        path, value = _parse_override(item)
        _apply(cfg, _nest(path, value))
    return cfg.validate()


def config_from_dict(data: dict[str, Any], cls: type = Config, source: str = "saved config"
                     ) -> Any:
    """Rebuild a saved, resolved config (as written to a run directory). ``source`` names it
    in errors (e.g. the path of a run's config.yaml)."""
    if not isinstance(data, dict):
        what = "nothing (an empty file?)" if data is None else f"a {type(data).__name__}"
        raise UserError(f"{source} must be a mapping of config sections, got {what}")
    return build_config(upgrade_saved(data), cls=cls)
