"""Procedurally generated, Omniglot-like offline data set ("glyphs").

Why it exists: the library needs a few-shot benchmark that works without any download.
Each *alphabet* has its own stroke style (stroke-type mix, anchor layout, preferred angles,
curvature, stroke length, stroke count, slant, pen weight), so characters of one alphabet
look related and alphabets differ. Each character is a set of 1..``max_strokes`` pen
strokes (lines, quadratic/cubic Bezier curves, polylines, arcs, dots). Each of its
``drawers`` instances re-draws it with motor noise on the control points, a smooth global
warp, an affine jitter, a random pen width and occasionally a dropped or extra stroke.

Images are ``uint8`` with **ink = 255 on background = 0** (white strokes on black), rendered
anti-aliased by drawing with PIL at 4x resolution and box-downsampling.

Determinism: every random draw comes from ``np.random.default_rng([seed, tag, a, c, d])``
(fixed-length keys, so ``[s, 1]`` and ``[s, 1, 0]`` can never collide), hence the output does
not depend on generation order or on the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sparsemeta.foundations.atomic import atomic_write, remove_stale_temps
from sparsemeta.foundations.lock import exclusive
from sparsemeta.foundations.safeio import read_json

__all__ = ["VERSION", "GlyphSpec", "generate", "load_or_generate", "pixel_nn_accuracy"]

#: Bump whenever the generator's output changes for an unchanged spec (invalidates caches).
VERSION = 1
#: the glyph cache's .json: its key and the alphabet of each class (tens of KB)
MAX_META_BYTES = 16 << 20

# RNG domain tags: keep alphabet-style, character and drawer streams independent.
_TAG_ALPHABET, _TAG_CHARACTER, _TAG_DRAWER = 1, 2, 3

# Stroke types an alphabet can prefer (order matters for the style's probability vector).
_LINE, _QUAD, _CUBIC, _POLY, _ARC, _DOT = range(6)
# How a stroke's control points are turned into a pen path.
_R_BEZIER, _R_POLY, _R_SPLINE, _R_DOT = range(4)

_SUPERSAMPLE = 4
_EXTENT = 1.5  # a character's (pre-jitter) bounding box side, canvas is [-1, 1]^2
_LIMIT = 0.92  # jittered pen paths are shifted back inside [-_LIMIT, _LIMIT]^2
_CURVE_SAMPLES = 14


@dataclass(frozen=True)
class GlyphSpec:
    """Everything that determines the data set; two equal specs give byte-identical arrays.

    Lengths are in canvas units (the image spans [-1, 1]), so they do not depend on
    ``image_size``; pen widths are in pixels of a 28x28 image and scale with ``image_size``.
    The difficulty knobs below were chosen so pixel-space 5-way 1-shot nearest neighbour
    is clearly above chance but far from solved (see ``pixel_nn_accuracy``).
    """

    seed: int = 0
    alphabets: int = 50
    characters: int = 32
    drawers: int = 20
    image_size: int = 28
    max_strokes: int = 4
    #: probability that a stroke follows its alphabet's anchors/angles rather than being free;
    #: higher -> characters within an alphabet look more alike (harder within-alphabet tasks)
    style_consistency: float = 0.8
    #: std of independent noise on each control point of each drawer
    motor_noise: float = 0.09
    #: std of a per-stroke translation of each drawer (misplaced strokes)
    stroke_shift: float = 0.07
    #: amplitude of a smooth sinusoidal warp of the whole character per drawer
    warp: float = 0.08
    #: affine jitter per drawer: max |rotation| (degrees), max relative scale change,
    #: max |shear|, max |translation| (canvas units)
    rotation: float = 20.0
    scale: float = 0.18
    shear: float = 0.25
    translation: float = 0.12
    #: pen width range in pixels at 28x28 (multiplied by a per-alphabet pen weight)
    pen_width: tuple[float, float] = (1.3, 2.8)
    #: per-drawer probability of omitting one stroke / adding a short spurious stroke
    stroke_drop_prob: float = 0.08
    stroke_add_prob: float = 0.05
    #: std of additive Gaussian background noise in grey levels (0 keeps a clean background)
    background_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError("seed must be >= 0 (it seeds numpy SeedSequence)")
        if min(self.alphabets, self.characters, self.drawers, self.max_strokes) < 1:
            raise ValueError("alphabets, characters, drawers and max_strokes must be >= 1")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")
        lo, hi = self.pen_width
        if not 0 < lo <= hi:
            raise ValueError("pen_width must be (lo, hi) with 0 < lo <= hi")
        # Normalise to a tuple of floats so lists/ints give the same key and hash.
        object.__setattr__(self, "pen_width", (float(lo), float(hi)))

    @property
    def num_classes(self) -> int:
        """Total number of classes (characters over all alphabets)."""
        return self.alphabets * self.characters

    def to_dict(self) -> dict:
        """JSON-ready fields; used for the cache key and recorded next to the cache."""
        d = dataclasses.asdict(self)
        d["pen_width"] = list(self.pen_width)
        return d

    def key(self) -> str:
        """Stable cache name: changes with any field or with the generator ``VERSION``."""
        payload = json.dumps({"version": VERSION, **self.to_dict()}, sort_keys=True)
        return f"glyphs-v{VERSION}-{hashlib.sha1(payload.encode()).hexdigest()[:10]}"


# --------------------------------------------------------------------------- geometry


def _bernstein(degree: int, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    return np.stack(
        [math.comb(degree, k) * t**k * (1 - t) ** (degree - k) for k in range(degree + 1)], axis=1
    )


_BEZIER_MATS = {
    1: _bernstein(1, 2),
    2: _bernstein(2, _CURVE_SAMPLES),
    3: _bernstein(3, _CURVE_SAMPLES),
}


def _catmull_rom_matrix(n_ctrl: int, per_seg: int = 5) -> np.ndarray:
    """Matrix mapping n_ctrl control points to points on a uniform Catmull-Rom spline."""
    t = np.linspace(0.0, 1.0, per_seg, endpoint=False)
    basis = 0.5 * np.stack(
        [-(t**3) + 2 * t**2 - t, 3 * t**3 - 5 * t**2 + 2, -3 * t**3 + 4 * t**2 + t, t**3 - t**2],
        axis=1,
    )
    rows = []
    for seg in range(n_ctrl - 1):
        idx = [max(seg - 1, 0), seg, seg + 1, min(seg + 2, n_ctrl - 1)]
        for b in basis:
            row = np.zeros(n_ctrl)
            np.add.at(row, idx, b)
            rows.append(row)
    last = np.zeros(n_ctrl)
    last[-1] = 1.0
    rows.append(last)
    return np.asarray(rows)


_SPLINE_MATS = {k: _catmull_rom_matrix(k) for k in range(2, 9)}


def _stroke_path(render: int, ctrl: np.ndarray) -> np.ndarray:
    if render == _R_BEZIER:
        return _BEZIER_MATS[len(ctrl) - 1] @ ctrl
    if render == _R_SPLINE:
        return _SPLINE_MATS[len(ctrl)] @ ctrl
    return ctrl  # polyline and dot: the control points are the path


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


# --------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class _Style:
    anchors: np.ndarray
    type_probs: np.ndarray
    first_probs: np.ndarray
    angles: np.ndarray
    curvature: float
    length: float
    mean_strokes: float
    connect: float
    arc_span: float
    poly_segments: int
    pen_scale: float
    slant: float
    aspect: float


def _alphabet_style(spec: GlyphSpec, a: int) -> _Style:
    """Sample the per-alphabet stroke style that makes its characters look related."""
    rng = np.random.default_rng([spec.seed, _TAG_ALPHABET, a, 0, 0])
    layout = int(rng.integers(3))
    if layout == 0:  # grid anchors, like block scripts
        g = int(rng.integers(2, 5))
        xs = np.linspace(-0.7, 0.7, g)
        anchors = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
        anchors = anchors + rng.normal(0, 0.04, anchors.shape)
    elif layout == 1:  # anchors on a ring (+ centre), like round scripts
        k = int(rng.integers(5, 9))
        phi = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, k, endpoint=False)
        anchors = 0.7 * np.stack([np.cos(phi), np.sin(phi)], 1)
        anchors = np.concatenate([anchors, np.zeros((1, 2))])
    else:  # free scatter
        anchors = rng.uniform(-0.75, 0.75, (int(rng.integers(5, 10)), 2))
    type_probs = rng.dirichlet(np.full(6, 0.5))
    type_probs[_DOT] *= 0.25
    type_probs /= type_probs.sum()
    first_probs = type_probs.copy()
    first_probs[_DOT] = 0.0  # a character never consists of a lone dot
    first_probs /= first_probs.sum()
    return _Style(
        anchors=anchors,
        type_probs=type_probs,
        first_probs=first_probs,
        angles=rng.uniform(0, np.pi, int(rng.integers(2, 5))),
        curvature=float(rng.uniform(0.15, 0.6)),
        length=float(rng.uniform(0.7, 1.4)),
        mean_strokes=float(rng.uniform(1.6, 3.6)),
        connect=float(rng.uniform(0.2, 0.8)),
        arc_span=float(rng.uniform(0.6, 1.8) * np.pi),
        poly_segments=int(rng.integers(2, 4)),
        pen_scale=float(rng.uniform(0.85, 1.2)),
        slant=float(rng.uniform(-0.3, 0.3)),
        aspect=float(np.exp(rng.uniform(-0.2, 0.2))),
    )


# --------------------------------------------------------------------------- characters

_Stroke = tuple[int, np.ndarray]  # (render kind, control points (k, 2))


def _shape(typ: int, start: np.ndarray, end: np.ndarray, angle: float, length: float,
           styled: bool, style: _Style, rng: np.random.Generator) -> _Stroke:
    """The control points of one stroke of type ``typ`` from ``start`` to ``end``."""
    chord = end - start
    perp = np.array([-chord[1], chord[0]])
    curv = style.curvature
    if typ == _LINE:
        return (_R_BEZIER, np.stack([start, end]))
    elif typ == _QUAD:
        bend = curv * rng.choice([-1, 1]) * rng.uniform(0.6, 1.6)
        return (_R_BEZIER, np.stack([start, (start + end) / 2 + bend * perp, end]))
    elif typ == _CUBIC:
        b1, b2 = curv * rng.normal(0, 1.2, 2)
        c1 = start + chord / 3 + b1 * perp
        c2 = start + 2 * chord / 3 + b2 * perp
        return (_R_BEZIER, np.stack([start, c1, c2, end]))
    elif typ == _POLY:
        pts = [start]
        heading = angle
        seg = length / style.poly_segments * 1.2
        for _ in range(style.poly_segments):
            pts.append(pts[-1] + seg * rng.uniform(0.7, 1.3) * _unit(heading))
            if styled:
                heading = (
                    rng.choice(style.angles) + np.pi * rng.integers(2) + rng.normal(0, 0.08)
                )
            else:
                heading += rng.uniform(-2.5, 2.5)
        return (_R_POLY, np.stack(pts))
    elif typ == _ARC:
        radius = length / 2 * rng.uniform(0.6, 1.0)
        span = style.arc_span * rng.uniform(0.8, 1.15) * rng.choice([-1, 1])
        k = 4 if abs(span) < np.pi else 6
        phi = angle + np.linspace(0, span, k)
        centre = start - radius * _unit(angle)
        return (_R_SPLINE, centre + radius * np.stack([np.cos(phi), np.sin(phi)], 1))
    return (_R_DOT, start[None, :].copy())


def _character(spec: GlyphSpec, style: _Style, a: int, c: int) -> list[_Stroke]:
    """Sample a character's prototype strokes, normalised to a centred box of side _EXTENT."""
    rng = np.random.default_rng([spec.seed, _TAG_CHARACTER, a, c, 0])
    n = int(np.clip(1 + rng.poisson(style.mean_strokes - 1), 1, spec.max_strokes))
    first = int(rng.choice(6, p=style.first_probs))
    if first in (_LINE, _QUAD):  # a lone straight/simple stroke is not a character
        n = max(n, min(2, spec.max_strokes))
    strokes: list[_Stroke] = []
    paths: list[np.ndarray] = []
    for i in range(n):
        typ = first if i == 0 else int(rng.choice(6, p=style.type_probs))
        styled = rng.random() < spec.style_consistency
        if typ == _DOT:  # diacritic-like dot next to an existing stroke
            path = paths[int(rng.integers(len(paths)))]
            near = path[int(rng.integers(len(path)))]
            start = near + style.length * rng.uniform(0.12, 0.25) * _unit(rng.uniform(0, 2 * np.pi))
        elif i > 0 and rng.random() < style.connect:
            path = paths[int(rng.integers(len(paths)))]
            if rng.random() < 0.3:  # start where an earlier stroke starts / ends / bends
                start = path[0]
            else:
                start = path[-1] if rng.random() < 0.5 else path[len(path) // 2]
        elif styled:
            start = style.anchors[int(rng.integers(len(style.anchors)))] + rng.normal(0, 0.03, 2)
        else:
            start = rng.uniform(-0.8, 0.8, 2)
        if styled:
            angle = rng.choice(style.angles) + rng.normal(0, 0.08) + np.pi * rng.integers(2)
        else:
            angle = rng.uniform(0, 2 * np.pi)
        length = style.length * float(np.exp(rng.normal(0, 0.3)))
        end = start + length * _unit(angle)
        if styled and rng.random() < 0.5:  # snap the end onto a nearby anchor
            d = np.linalg.norm(style.anchors - end, axis=1)
            j = int(np.argmin(d))
            if d[j] < 0.4 * length:
                end = style.anchors[j].copy()
        stroke = _shape(typ, start, end, angle, length, styled, style, rng)
        strokes.append(stroke)
        paths.append(_stroke_path(*stroke))
    # Alphabet-wide slant/aspect, then centre and scale the character into the canvas.
    m = np.array([[style.aspect, style.slant], [0.0, 1.0 / style.aspect]])
    strokes = [(r, ctrl @ m.T) for r, ctrl in strokes]
    allp = np.concatenate([_stroke_path(r, ctrl) for r, ctrl in strokes])
    lo, hi = allp.min(0), allp.max(0)
    s = _EXTENT / max(float((hi - lo).max()), 1e-3)
    centre = (lo + hi) / 2
    return [(r, (ctrl - centre) * s) for r, ctrl in strokes]


# --------------------------------------------------------------------------- drawers


def _draw_instance(
    spec: GlyphSpec, style: _Style, proto: list[_Stroke], a: int, c: int, d: int
) -> np.ndarray:
    """Render one drawer's version of a character as a (size, size) uint8 image."""
    rng = np.random.default_rng([spec.seed, _TAG_DRAWER, a, c, d])
    strokes = list(proto)
    if len(strokes) > 1 and rng.random() < spec.stroke_drop_prob:
        strokes.pop(int(rng.integers(1, len(strokes))))  # keep the first (never a dot) stroke
    noisy = [
        (
            r,
            ctrl
            + rng.normal(0, spec.stroke_shift, 2)
            + rng.normal(0, spec.motor_noise, ctrl.shape),
        )
        for r, ctrl in strokes
    ]
    if rng.random() < spec.stroke_add_prob:
        p0 = rng.uniform(-0.7, 0.7, 2)
        p1 = p0 + rng.uniform(0.2, 0.45) * _unit(rng.uniform(0, 2 * np.pi))
        noisy.append((_R_BEZIER, np.stack([p0, p1])))
    # Smooth warp + affine jitter, applied to the sampled pen paths.
    freq = rng.uniform(1.5, 3.0, (2, 2)) * rng.choice([-1, 1], (2, 2))
    phase = rng.uniform(0, 2 * np.pi, 2)
    theta = math.radians(rng.uniform(-spec.rotation, spec.rotation))
    sc = 1.0 + rng.uniform(-spec.scale, spec.scale)
    sh = rng.uniform(-spec.shear, spec.shear)
    shift = rng.uniform(-spec.translation, spec.translation, 2)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    aff = sc * rot @ np.array([[1.0, sh], [0.0, 1.0]])
    width = rng.uniform(*spec.pen_width) * style.pen_scale * spec.image_size / 28

    paths = []
    for r, ctrl in noisy:
        p = _stroke_path(r, ctrl)
        p = p + spec.warp * np.sin(p @ freq.T + phase)
        paths.append((r, p @ aff.T + shift))
    # Shift back inside the frame if the jitter pushed the character over an edge.
    allp = np.concatenate([p for _, p in paths])
    lo, hi = allp.min(0), allp.max(0)
    fix = np.where(hi - lo > 2 * _LIMIT, -(lo + hi) / 2, np.clip(0.0, -_LIMIT - lo, _LIMIT - hi))

    size = spec.image_size * _SUPERSAMPLE
    half = size / 2
    w = max(1, round(width * _SUPERSAMPLE))
    rad = w / 2
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for r, p in paths:
        p = (p + fix + 1.0) * half
        if r == _R_DOT:
            x, y = p[0]
            draw.ellipse((x - 1.3 * rad, y - 1.3 * rad, x + 1.3 * rad, y + 1.3 * rad), fill=255)
            continue
        draw.line(p.ravel().tolist(), fill=255, width=w)
        # A disc at every vertex gives round caps and fills the notches PIL leaves between
        # the rectangles of a wide polyline (visible as hairy edges at large image sizes).
        for x, y in p.tolist():
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=255)
    out = np.asarray(img.resize((spec.image_size, spec.image_size), Image.BOX))
    if spec.background_noise > 0:
        noise = rng.normal(0, spec.background_noise, out.shape)
        out = np.clip(out + noise, 0, 255).round().astype(np.uint8)
    return out


def _generate_alphabet(spec: GlyphSpec, a: int) -> np.ndarray:
    style = _alphabet_style(spec, a)
    n = spec.image_size
    out = np.empty((spec.characters, spec.drawers, n, n), np.uint8)
    for c in range(spec.characters):
        proto = _character(spec, style, a, c)
        for d in range(spec.drawers):
            out[c, d] = _draw_instance(spec, style, proto, a, c, d)
    return out


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork avoids re-importing the package (and torch) in every worker; spawn elsewhere.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def generate(spec: GlyphSpec, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 of shape (alphabets*characters, drawers, size, size),
    alphabet_of_class int64 of shape (alphabets*characters,)).

    Class ``i`` belongs to alphabet ``i // spec.characters``. Ink is 255 on a 0 background.
    ``workers > 1`` splits the work by alphabet over processes; the bytes are identical.
    """
    n = spec.image_size
    images = np.empty((spec.num_classes, spec.drawers, n, n), np.uint8)
    chars = spec.characters
    if workers <= 1 or spec.alphabets == 1:
        for a in range(spec.alphabets):
            images[a * chars : (a + 1) * chars] = _generate_alphabet(spec, a)
    else:
        with ProcessPoolExecutor(min(workers, spec.alphabets), mp_context=_mp_context()) as ex:
            results = ex.map(_generate_alphabet, [spec] * spec.alphabets, range(spec.alphabets))
            for a, block in enumerate(results):
                images[a * chars : (a + 1) * chars] = block
    alphabet_of_class = np.repeat(np.arange(spec.alphabets, dtype=np.int64), chars)
    return images, alphabet_of_class


# --------------------------------------------------------------------------- cache


def _try_load(spec: GlyphSpec, npy: Path, meta: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the cached arrays, or None if missing, truncated or inconsistent with spec."""
    n = spec.image_size
    expected = (spec.num_classes, spec.drawers, n, n)
    try:
        info = read_json(meta, what=f"cache file '{meta}'", limit=MAX_META_BYTES)
        alphabet_of_class = np.asarray(info["alphabet_of_class"], dtype=np.int64)
        images = np.load(npy, mmap_mode="r")
    except Exception:  # any unreadable/corrupt file just means "regenerate"
        return None
    ok = (
        info.get("key") == spec.key()
        and images.shape == expected
        and images.dtype == np.uint8
        and np.array_equal(alphabet_of_class, np.arange(spec.num_classes) // spec.characters)
        and npy.stat().st_size >= images.offset + images.nbytes
    )
    return (images, alphabet_of_class) if ok else None


def load_or_generate(
    spec: GlyphSpec, cache_dir: str | os.PathLike, *, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """First call generates and writes <cache_dir>/<spec.key()>.npy (+ a small .json with the
    alphabet ids and the spec) ATOMICALLY (temp file in the same dir, then os.replace); later
    calls memory-map the .npy with np.load(mmap_mode='r'). A corrupt/truncated cache file is
    detected (shape/size mismatch or failed load) and regenerated.

    The images are always returned as a read-only ``np.memmap`` so that data loaders in
    several processes share the page cache instead of copying ~25 MB each.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    npy, meta = cache / f"{spec.key()}.npy", cache / f"{spec.key()}.json"
    cached = _try_load(spec, npy, meta)
    if cached is not None:
        return cached
    # one generator at a time (a sweep starting N runs would otherwise generate N times)
    with exclusive(cache / f".{spec.key()}.lock", f"the glyph cache in '{cache}'", wait=True):
        cached = _try_load(spec, npy, meta)
        if cached is not None:
            return cached
        remove_stale_temps(cache)  # left by generators that were killed
        _generate_and_write(spec, npy, meta, workers)
    cached = _try_load(spec, npy, meta)
    if cached is None:  # pragma: no cover - only on a broken file system
        raise OSError(f"failed to write glyph cache {npy}")
    return cached


def _generate_and_write(spec: GlyphSpec, npy: Path, meta: Path, workers: int) -> None:
    images, alphabet_of_class = generate(spec, workers=workers)
    info = {
        "key": spec.key(),
        "version": VERSION,
        "spec": spec.to_dict(),
        "shape": list(images.shape),
        "ink": 255,
        "alphabet_of_class": alphabet_of_class.tolist(),
    }
    # The .npy is written last: a crash in between leaves a state _try_load rejects.
    atomic_write(meta, lambda f: f.write(json.dumps(info).encode()))
    atomic_write(npy, lambda f: np.save(f, images))


# --------------------------------------------------------------------------- reference


def pixel_nn_accuracy(
    images: np.ndarray,
    classes: np.ndarray,
    ways: int = 5,
    shots: int = 1,
    n_tasks: int = 500,
    seed: int = 0,
) -> float:
    """N-way K-shot accuracy of 1-nearest-neighbour in pixel space, a learner-free
    difficulty reference: far above 1/ways means learnable, far below 1.0 means non-trivial.

    ``images`` is (classes, drawers, H, W); tasks draw ``ways`` distinct classes from
    ``classes`` and, per class, ``shots`` support and up to 5 query drawers. Each image is
    centred and L2-normalised, so the distance is 1 - cosine similarity.
    """
    classes = np.asarray(classes, dtype=np.int64)
    drawers = images.shape[1]
    if len(classes) < ways:
        raise ValueError(f"need at least {ways} classes, got {len(classes)}")
    queries = min(5, drawers - shots)
    if queries < 1:
        raise ValueError(f"need more than {shots} drawers per class")
    rng = np.random.default_rng(seed)
    correct = 0
    for _ in range(n_tasks):
        cls = rng.choice(classes, ways, replace=False)
        idx = np.stack([rng.permutation(drawers)[: shots + queries] for _ in range(ways)])
        x = np.asarray(images[cls[:, None], idx], dtype=np.float32).reshape(
            ways, shots + queries, -1
        )
        x = x - x.mean(-1, keepdims=True)
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
        support = x[:, :shots].reshape(ways * shots, -1)
        query = x[:, shots:].reshape(ways * queries, -1)
        pred = np.argmax(query @ support.T, axis=1) // shots
        correct += int(np.sum(pred == np.repeat(np.arange(ways), queries)))
    return correct / (n_tasks * ways * queries)
