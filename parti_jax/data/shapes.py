"""The shapes world (docs/DESIGN.md, section 5): one or two coloured shapes on black,
captioned with their colour, shape, size, 3x3 grid position and relation, and judgeable
(`parti_jax.data.judge` reads the attributes back from pixels). numpy only.

Every example is a pure function of (seed, split, index): random access, no
state, the same scene at every resolution (geometry is in normalised
coordinates, by default on a 1/16 lattice). 'train' and 'validation' draw from
the same scenes, none with a (colour, shape) pair of `HELDOUT_COMBINATIONS`;
every 'heldout' scene has at least one such pair (each colour and shape is
seen in training, just never together).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator, Sequence

import numpy as np

# Colours are spread around the hue circle (about 50-70 degrees apart) and fully
# saturated, so that a small VQGAN reproduces them and the judge separates
# them by hue even after blur, noise and a colour shift.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 35, 35),
    "yellow": (240, 220, 30),
    "green": (40, 210, 60),
    "cyan": (20, 220, 220),
    "blue": (30, 60, 250),
    "purple": (200, 50, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
OPPOSITE_RELATION = {"left": "right", "right": "left", "above": "below", "below": "above"}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

# Object extent (side of its bounding box) as a fraction of the image side.
# The gap between the classes is what the judge's size threshold sits in. On
# the default 1/16 lattice every small object is 3/16 and every large one 4/16
# of the side (6 and 8 pixels at 32px).
SIZE_EXTENTS: dict[str, tuple[float, float]] = {"small": (0.17, 0.19), "large": (0.24, 0.27)}
SIZE_THRESHOLD = 0.215
# Distance an object keeps from its cell's border (fraction of the image side),
# so objects in neighbouring cells stay >= 2 * CELL_INSET apart and never touch.
# On a lattice the box keeps at least a quarter of a lattice step from the
# cell border instead: box edges are lattice points, so objects in neighbouring
# cells are still at least one lattice step apart.
CELL_INSET = 0.025

# (colour, shape) pairs never shown in 'train' / 'validation'; every 'heldout'
# scene contains at least one of them.
HELDOUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("blue", "triangle"),
    ("red", "square"),
    ("green", "circle"),
    ("yellow", "cross"),
    ("purple", "diamond"),
)

SPLITS: dict[str, int] = {"train": 0, "validation": 1, "heldout": 2}

Cell = tuple[int, int]  # (row, column), 0..2 each, row 0 at the top.


@dataclasses.dataclass(frozen=True)
class ShapesWorldConfig:
    """What the world draws. The defaults are the shipped data set."""

    resolution: int = 64  # image side in pixels (square images), 32..1024
    two_object_fraction: float = 0.5  # probability that a scene has two objects
    colors: tuple[str, ...] = tuple(COLORS)  # subset of COLORS in use
    shapes: tuple[str, ...] = SHAPES  # subset of SHAPES in use
    heldout_combinations: tuple[tuple[str, str], ...] = HELDOUT_COMBINATIONS
    size_stated_probability: float = 0.85  # captions with free size wording state it this often
    supersample: int = 4  # anti-aliasing: draw at this multiple, then box-downsample
    # Objects' extents and box edges on a lattice of 1/lattice of the image side
    # (0: continuous). The default 16 puts every edge on a pixel at 32px and
    # on a 4x4 VQGAN patch border or its middle, so one shape of one size has
    # a few renderings instead of a continuum; see docs/DESIGN.md, section 5.
    lattice: int = 16

    def __post_init__(self):
        if not 32 <= self.resolution <= 1024:
            raise ValueError(
                f"ShapesWorldConfig.resolution={self.resolution}: must be in 32..1024 "
                "(below 32 pixels small shapes are not recognisable)"
            )
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError(
                f"ShapesWorldConfig.two_object_fraction={self.two_object_fraction}: must be in [0, 1]"
            )
        for field, word, known in (("colors", "colour", COLORS), ("shapes", "shape", SHAPES)):
            for v in getattr(self, field):
                if v not in known:
                    raise ValueError(
                        f"ShapesWorldConfig.{field}: unknown {word} {v!r}; known: {list(known)}"
                    )
        if len(self.allowed_pairs()) < 2:
            raise ValueError(
                "ShapesWorldConfig: fewer than two (colour, shape) pairs remain for training "
                "after removing heldout_combinations; use more colours or shapes"
            )
        if self.supersample < 1:
            raise ValueError(f"ShapesWorldConfig.supersample={self.supersample}: must be >= 1")
        if self.lattice:
            if not 6 <= self.lattice <= 256:
                raise ValueError(
                    f"ShapesWorldConfig.lattice={self.lattice}: must be 0 (continuous) or in "
                    "6..256 (coarser lattices cannot tell small from large objects)"
                )
            small, large = (_lattice_extent(z, self.lattice) / self.lattice for z in SIZES)
            if not small < SIZE_THRESHOLD < large:
                raise ValueError(
                    f"ShapesWorldConfig.lattice={self.lattice}: small and large objects would be "
                    f"{small:.3f} and {large:.3f} of the side, not on both sides of the judge's "
                    f"size threshold {SIZE_THRESHOLD}; use 0 or another lattice, e.g. 16"
                )
            for size in SIZES:
                for cell in range(3):
                    if not _lattice_edges(self.lattice, _lattice_extent(size, self.lattice), cell):
                        raise ValueError(
                            f"ShapesWorldConfig.lattice={self.lattice}: a {size} object does not "
                            f"fit inside a grid cell on this lattice; use 0 or another lattice, "
                            "e.g. 16"
                        )

    def allowed_pairs(self) -> list[tuple[str, str]]:
        """(colour, shape) pairs that train/validation scenes may use."""
        held = set(self.heldout_combinations)
        return [(c, s) for c in self.colors for s in self.shapes if (c, s) not in held]

    def heldout_pairs(self) -> list[tuple[str, str]]:
        """Held-out pairs made of colours and shapes this config uses."""
        pairs = self.heldout_combinations
        return [(c, s) for c, s in pairs if c in self.colors and s in self.shapes]


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object: its attributes and exact geometry (normalised to [0, 1])."""

    shape: str
    color: str
    size: str  # 'small' | 'large'
    cell: Cell  # (row, column) on the 3x3 grid
    center: tuple[float, float]  # (x, y) of the bounding-box centre
    extent: float  # side of the bounding box


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """A scene: one or two objects, plus the relation that captions state."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # objects[0] relative to objects[1]; None for one object


@dataclasses.dataclass(frozen=True)
class ObjectRequirement:
    """What a caption says about one object; None means not stated."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    cell: Cell | None = None


@dataclasses.dataclass(frozen=True)
class CaptionRequirements:
    """What a caption states: its objects in order and their relation (first to second)."""

    objects: tuple[ObjectRequirement, ...]
    relation: str | None = None


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    spec: SceneSpec
    requirements: CaptionRequirements  # what the caption states (shapes_parsing.parse_caption)
    split: str
    index: int


def true_relations(a: ObjectSpec, b: ObjectSpec) -> list[str]:
    """Relations of a to b implied by their grid cells (column for left/right, row for above/below)."""
    (ar, ac), (br, bc) = a.cell, b.cell
    holds = {"left": ac < bc, "right": ac > bc, "above": ar < br, "below": ar > br}
    return [r for r in RELATIONS if holds[r]]


# ----------------------------------------------------------------------------- scenes


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {list(SPLITS)}")
    return SPLITS[split]


@functools.cache
def _lattice_extent(size: str, lattice: int) -> int:
    """A size's extent in lattice steps: the middle of its range, rounded (at least 1).
    It can fall just outside SIZE_EXTENTS (e.g. 4/24 for small); the config checks
    that the two sizes stay on both sides of SIZE_THRESHOLD."""
    lo, hi = SIZE_EXTENTS[size]
    return max(1, round((lo + hi) / 2.0 * lattice))


@functools.cache
def _lattice_edges(lattice: int, extent: int, cell: int) -> tuple[int, ...]:
    """Lattice points k where a box [k, k + extent] (lattice steps) fits in grid cell
    `cell` (0..2 along one axis) with a quarter step to spare on both sides."""
    lo, hi = cell * lattice / 3.0 + 0.25, (cell + 1) * lattice / 3.0 - 0.25
    return tuple(k for k in range(lattice + 1) if k >= lo and k + extent <= hi)


def _sample_object(
    rng: np.random.Generator, pair: tuple[str, str], cell: Cell, lattice: int = 0
) -> ObjectSpec:
    color, shape = pair
    size = SIZES[int(rng.integers(len(SIZES)))]
    lo, hi = SIZE_EXTENTS[size]
    extent = float(rng.uniform(lo, hi))  # drawn on a lattice too: the same stream of draws
    if lattice:
        n = _lattice_extent(size, lattice)  # extent in lattice steps
        extent = n / lattice
    # Jitter the centre inside the cell, keeping the box CELL_INSET from the border.
    slack = max(0.0, 1.0 / 6.0 - extent / 2.0 - CELL_INSET)
    row, col = cell
    cx = (col + 0.5) / 3.0 + float(rng.uniform(-slack, slack))
    cy = (row + 0.5) / 3.0 + float(rng.uniform(-slack, slack))
    if lattice:
        # The fitting lattice position nearest to the jittered one.
        def snap(c: float, cell_index: int) -> float:
            edges = _lattice_edges(lattice, n, cell_index)
            k = min(edges, key=lambda e: abs(e - (c - extent / 2.0) * lattice))
            return (k + n / 2.0) / lattice

        cx, cy = snap(cx, col), snap(cy, row)
    return ObjectSpec(
        shape=shape, color=color, size=size, cell=cell, center=(cx, cy), extent=extent
    )


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def sample_scene(rng: np.random.Generator, split: str, config: ShapesWorldConfig) -> SceneSpec:
    """Draws a scene for `split` (see the module docstring for what each split holds)."""
    _split_id(split)
    allowed = config.allowed_pairs()
    heldout = config.heldout_pairs()
    if split == "heldout" and not heldout:
        raise ValueError(
            "the 'heldout' split is empty: no heldout_combinations use this config's colours and shapes"
        )
    two = bool(rng.random() < config.two_object_fraction)
    if not two:
        pair = _pick(rng, heldout if split == "heldout" else allowed)
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        return SceneSpec(objects=(_sample_object(rng, pair, cell, config.lattice),))
    if split == "heldout":
        pair_h = _pick(rng, heldout)
        pool = [p for p in allowed + heldout if p != pair_h]
        pair_o = _pick(rng, pool)
        pairs = (pair_h, pair_o) if rng.random() < 0.5 else (pair_o, pair_h)
    else:
        pair_a = _pick(rng, allowed)
        pairs = (pair_a, _pick(rng, [p for p in allowed if p != pair_a]))
    cells = rng.choice(9, size=2, replace=False)
    a = _sample_object(rng, pairs[0], (int(cells[0]) // 3, int(cells[0]) % 3), config.lattice)
    b = _sample_object(rng, pairs[1], (int(cells[1]) // 3, int(cells[1]) % 3), config.lattice)
    relation = _pick(rng, true_relations(a, b))
    return SceneSpec(objects=(a, b), relation=relation)


# ----------------------------------------------------------------------------- rendering


def _inside(shape: str, x: np.ndarray, y: np.ndarray, e: float) -> np.ndarray:
    """Whether points (x, y), relative to the box centre, lie inside a shape of extent e."""
    h = e / 2.0
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= h * h
    if shape == "square":
        return (ax <= h) & (ay <= h)
    if shape == "diamond":
        return ax + ay <= h
    if shape == "triangle":  # apex up; base = height = extent
        return (y <= h) & (ax <= (y + h) / 2.0)
    if shape == "cross":  # plus sign, arms one third of the extent wide
        t = e / 6.0
        return ((ax <= t) & (ay <= h)) | ((ay <= t) & (ax <= h))
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


# Area of each shape over the area of its bounding box.
SHAPE_FILL: dict[str, float] = {
    "circle": float(np.pi / 4.0), "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5.0 / 9.0,
}  # fmt: skip
# Vertical offset of a shape's centroid from its bounding-box centre, in extents.
SHAPE_CENTROID_DY: dict[str, float] = {s: (1.0 / 6.0 if s == "triangle" else 0.0) for s in SHAPES}


def coverage(
    shape: str,
    center: tuple[float, float],
    extent: float,
    height: int,
    width: int,
    *,
    origin: tuple[int, int] = (0, 0),
    supersample: int = 4,
) -> np.ndarray:
    """Fraction of each pixel covered by a shape: float32 [height, width] in [0, 1].

    `center` (x, y) and `extent` are in pixels of the image (pixel (i, j) spans
    [j, j+1) x [i, i+1)); the result covers the window of pixels starting at
    `origin` (x0, y0). Drawn at `supersample` times the resolution,
    then box-averaged: this is the anti-aliasing of `render`, and the template
    the judge compares detections with.
    """
    ss = max(1, int(supersample))
    # Sample points at the centres of an ss x ss sub-grid of every pixel.
    offsets = (np.arange(ss, dtype=np.float64) + 0.5) / ss
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1) + origin[0] - center[0]
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1) + origin[1] - center[1]
    inside = _inside(shape, xs[None, :], ys[:, None], extent)
    counts = inside.reshape(height, ss, width, ss).sum(axis=(1, 3), dtype=np.float32)
    return counts * np.float32(1.0 / (ss * ss))


def render(spec: SceneSpec, resolution: int = 64, *, supersample: int = 4) -> np.ndarray:
    """Draws a scene as uint8 [resolution, resolution, 3] (objects never overlap)."""
    background = np.asarray(BACKGROUND, np.float32)
    image = np.broadcast_to(background, (resolution, resolution, 3)).copy()
    for obj in spec.objects:
        cx, cy, e = obj.center[0] * resolution, obj.center[1] * resolution, obj.extent * resolution
        # Draw only the object's box (plus a pixel), not the whole canvas.
        x0, y0 = max(int(np.floor(cx - e / 2)) - 1, 0), max(int(np.floor(cy - e / 2)) - 1, 0)
        x1 = min(int(np.ceil(cx + e / 2)) + 1, resolution)
        y1 = min(int(np.ceil(cy + e / 2)) + 1, resolution)
        cov = coverage(
            obj.shape, (cx, cy), e, y1 - y0, x1 - x0, origin=(x0, y0), supersample=supersample
        )
        color = np.asarray(COLORS[obj.color], np.float32) - background
        image[y0:y1, x0:x1] += cov[..., None] * color
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- captions

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big"),
}
CELL_NAMES: dict[Cell, tuple[str, ...]] = {
    (0, 0): ("top left", "upper left"),
    (0, 1): ("top center", "top middle", "top"),
    (0, 2): ("top right", "upper right"),
    (1, 0): ("middle left", "center left", "left"),
    (1, 1): ("center", "middle"),
    (1, 2): ("middle right", "center right", "right"),
    (2, 0): ("bottom left", "lower left"),
    (2, 1): ("bottom center", "bottom middle", "bottom"),
    (2, 2): ("bottom right", "lower right"),
}
_CORNERS = {(0, 0), (0, 2), (2, 0), (2, 2)}


def _cell_phrases(cell: Cell) -> tuple[str, ...]:
    """Prepositional phrases for a cell: 'in the top left', 'at the top', 'on the left', ..."""
    out = []
    for name in CELL_NAMES[cell]:
        if name in ("top", "bottom"):
            out.append(f"at the {name}")
        elif name in ("left", "right"):
            out += [f"on the {name}", f"at the {name}"]
        else:
            out += [f"in the {name}", f"at the {name}"]
            if cell in _CORNERS:
                out.append(f"in the {name} corner")
    return tuple(out)


CELL_PHRASES: dict[Cell, tuple[str, ...]] = {c: _cell_phrases(c) for c in CELL_NAMES}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# Relation of the *mentioned* object to the one before it: "a square with a circle to its left".
RELATION_ITS_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to its left", "on its left"),
    "right": ("to its right", "on its right"),
    "above": ("above it",),
    "below": ("below it", "under it"),
}

# Templates. Slots: {obj1}/{obj2} = "[size] colour shape" (size stated with
# ShapesWorldConfig.size_stated_probability); {size1}/{color1}/{shape1} = the
# single words; {at1}/{at2} = prepositional position; {pos1} = bare position;
# {rel} = relation of object 1 to object 2; {rel_its} = same, as "to its left".
ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "a {obj1} {at1}",
    "{pos1}: a {obj1}",
    "there is a {obj1} {at1}",
    "{at1} there is a {obj1}",
    "a {obj1}",
    "{obj1} {at1}",
    "a picture of a {obj1} {at1}",
    "an image of a {obj1}",
    "a {size1} {shape1} in {color1} {at1}",
    "one {obj1}, {at1}",
    "{at1}, a {obj1}",
    "a {obj1} located {at1}",
)
TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "a {obj1} {rel} a {obj2}",
    "there is a {obj1} {rel} a {obj2}",
    "a {obj2} with a {obj1} {rel_its}",
    "a {obj1} {at1} and a {obj2} {at2}",
    "{obj1} {rel} {obj2}",
    "an image of a {obj1} {rel} a {obj2}",
    "two shapes: a {obj1} {rel} a {obj2}",
    "a {obj1} {at1}, a {obj2} {at2}",
)


def _states(template: str) -> dict[str, bool]:
    return {
        "position": "{at" in template or "{pos" in template,
        "relation": "{rel" in template,
        "size": "{size" in template,
    }


def caption_from_requirements(
    req: CaptionRequirements, rng: np.random.Generator, *, template: str | None = None
) -> str:
    """Words a caption for `req` with a random template that states what `req` states.

    Sizes are stated iff `req` states them (all objects alike); positions/relation
    pick the templates that state them.
    """
    n = len(req.objects)
    if template is None:
        templates = ONE_OBJECT_TEMPLATES if n == 1 else TWO_OBJECT_TEMPLATES
        want_pos = all(o.cell is not None for o in req.objects)
        want_rel = req.relation is not None

        def fits(st: dict[str, bool]) -> bool:
            if st["size"] and any(o.size is None for o in req.objects):
                return False
            if n == 1:
                return st["position"] == want_pos
            return st["relation"] == want_rel and (want_pos or not st["position"])

        ok = [t for t in templates if fits(_states(t))]
        if not ok:
            raise ValueError(f"no caption template states exactly {req}")
        template = _pick(rng, ok)
    slots: dict[str, str] = {}
    for i, o in enumerate(req.objects, start=1):
        size_word = _pick(rng, SIZE_WORDS[o.size]) if o.size else None
        slots[f"obj{i}"] = " ".join(w for w in (size_word, o.color, o.shape) if w)
        slots[f"size{i}"] = size_word or ""
        slots[f"color{i}"] = o.color or ""
        slots[f"shape{i}"] = o.shape or ""
        if o.cell is not None:
            slots[f"at{i}"] = _pick(rng, CELL_PHRASES[o.cell])
            slots[f"pos{i}"] = _pick(rng, CELL_NAMES[o.cell])
    if req.relation is not None:
        slots["rel"] = _pick(rng, RELATION_WORDS[req.relation])
        slots["rel_its"] = _pick(rng, RELATION_ITS_WORDS[req.relation])
    return template.format(**slots)


def requirements_of(
    spec: SceneSpec, *, size: bool = True, position: bool = True, relation: bool = True
) -> CaptionRequirements:
    """The full requirements of a scene, optionally leaving size / position / relation unstated."""
    objs = tuple(
        ObjectRequirement(
            shape=o.shape,
            color=o.color,
            size=o.size if size else None,
            cell=o.cell if position else None,
        )
        for o in spec.objects
    )
    return CaptionRequirements(objects=objs, relation=spec.relation if relation else None)


def sample_caption(
    spec: SceneSpec, rng: np.random.Generator, config: ShapesWorldConfig
) -> tuple[str, CaptionRequirements]:
    """A caption of `spec` (random template and synonyms, size stated with some
    probability) and what it states."""
    templates = ONE_OBJECT_TEMPLATES if len(spec.objects) == 1 else TWO_OBJECT_TEMPLATES
    template = _pick(rng, templates)
    st = _states(template)
    state_size = st["size"] or bool(rng.random() < config.size_stated_probability)
    req = requirements_of(spec, size=state_size, position=st["position"], relation=st["relation"])
    return caption_from_requirements(req, rng, template=template), req


# ----------------------------------------------------------------------------- examples


def _scene(
    index: int, split: str, seed: int, config: ShapesWorldConfig
) -> tuple[SceneSpec, str, CaptionRequirements]:
    if index < 0:
        raise ValueError(f"example index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed), _split_id(split), int(index)])
    spec = sample_scene(rng, split, config)
    caption, req = sample_caption(spec, rng, config)
    return spec, caption, req


def generate_scene(
    index: int, split: str, seed: int = 0, config: ShapesWorldConfig | None = None
) -> tuple[SceneSpec, str]:
    """(scene, caption) of example `index`, without drawing it: a pure function of
    (seed, split, index), the same at every resolution."""
    spec, caption, _ = _scene(index, split, seed, config or ShapesWorldConfig())
    return spec, caption


def generate_example(
    index: int, split: str, seed: int = 0, config: ShapesWorldConfig | None = None
) -> Example:
    """Example `index` of `split`: image uint8 [H, W, 3], caption, scene and what the caption states."""
    config = config or ShapesWorldConfig()
    spec, caption, req = _scene(index, split, seed, config)
    image = render(spec, config.resolution, supersample=config.supersample)
    return Example(
        image=image, caption=caption, spec=spec, requirements=req, split=split, index=index
    )


def iterate_examples(
    split: str,
    seed: int = 0,
    config: ShapesWorldConfig | None = None,
    *,
    start: int = 0,
    num_examples: int | None = None,
) -> Iterator[Example]:
    """Examples start, start+1, ... of `split` (endless when num_examples is None)."""
    i = start
    while num_examples is None or i < start + num_examples:
        yield generate_example(i, split, seed, config)
        i += 1


def all_caption_words() -> list[str]:
    """Every word any template or synonym can produce (the vocabulary must cover them)."""
    tables = (SIZE_WORDS, CELL_PHRASES, RELATION_WORDS, RELATION_ITS_WORDS)
    texts = [*ONE_OBJECT_TEMPLATES, *TWO_OBJECT_TEMPLATES, *COLORS, *SHAPES]
    texts += [w for table in tables for words in table.values() for w in words]
    text = re.sub(r"\{\w+\}", " ", " ".join(texts)).replace(":", " : ").replace(",", " , ")
    return sorted(set(text.split()))


# ----------------------------------------------------------------------------- near misses


def near_miss_captions(
    spec: SceneSpec,
    rng: np.random.Generator,
    config: ShapesWorldConfig | None = None,
    *,
    stated: CaptionRequirements | None = None,
) -> list[tuple[str, str]]:
    """Captions that differ from a true description of `spec` in exactly one attribute.

    Returns (caption, changed attribute) for attribute in colour, shape, size,
    position, relation (two objects) and count. A faithful judge rejects all of them.

    stated: what the true caption states (`Example.requirements`). Without it the
    near misses state everything the judge checks (sizes, and positions of one
    object or the relation of two). With it they state what it states, as it
    does, and only stated attributes change (no size near miss where sizes are
    not stated, ...): only the changed attribute tells them from a true caption
    (the contrastive model's hard negatives and its R-precision).
    """
    config = config or ShapesWorldConfig()
    objs = spec.objects
    two = len(objs) == 2
    out: list[tuple[str, str]] = []
    i = int(rng.integers(len(objs)))  # which object to change
    o = objs[i]
    other = objs[1 - i] if two else None
    if stated is None:
        state = dict(size=True, position=not two, relation=True)
    else:
        state = dict(
            size=all(r.size is not None for r in stated.objects),
            position=all(r.cell is not None for r in stated.objects),
            relation=stated.relation is not None,
        )

    def with_object(new: ObjectSpec) -> str:
        # As stated; by default one object states its position, two their relation.
        changed = list(objs)
        changed[i] = new
        req = requirements_of(dataclasses.replace(spec, objects=tuple(changed)), **state)
        return caption_from_requirements(req, rng)

    # Keep the two objects distinguishable: a changed (colour, shape) differs from the other's.
    taken = {(other.color, other.shape)} if other else set()
    colors = [c for c in config.colors if c != o.color and (c, o.shape) not in taken]
    out.append((with_object(dataclasses.replace(o, color=_pick(rng, colors))), "color"))
    shapes = [s for s in config.shapes if s != o.shape and (o.color, s) not in taken]
    out.append((with_object(dataclasses.replace(o, shape=_pick(rng, shapes))), "shape"))
    flipped = "large" if o.size == "small" else "small"
    if state["size"]:
        out.append((with_object(dataclasses.replace(o, size=flipped)), "size"))
    cells = [c for c in CELL_NAMES if c != o.cell and (other is None or c != other.cell)]
    new_cell = _pick(rng, cells)
    if two:
        if stated is None or state["position"]:
            # Only positions are stated, so the relation is not part of the change.
            changed = list(objs)
            changed[i] = dataclasses.replace(o, cell=new_cell)
            req = requirements_of(
                SceneSpec(objects=tuple(changed)), size=state["size"], relation=False
            )
            out.append((caption_from_requirements(req, rng), "position"))
        if state["relation"]:
            rel = OPPOSITE_RELATION[spec.relation]
            req = requirements_of(
                dataclasses.replace(spec, relation=rel), size=state["size"], position=False
            )
            out.append((caption_from_requirements(req, rng), "relation"))
        # Count: describe only one of the two objects (fully, or as stated).
        single = SceneSpec(objects=(o,))
        if stated is None:
            req = requirements_of(single)
        else:
            req = requirements_of(single, size=state["size"], position=state["position"])
        out.append((caption_from_requirements(req, rng), "count"))
    else:
        if state["position"]:
            out.append((with_object(dataclasses.replace(o, cell=new_cell)), "position"))
        # Count: the real object plus one that is not there.
        pairs = [
            p for p in config.allowed_pairs() + config.heldout_pairs() if p != (o.color, o.shape)
        ]
        color, shape = _pick(rng, pairs)
        extra_cell = _pick(rng, [c for c in CELL_NAMES if c != o.cell])
        extra = ObjectSpec(shape, color, _pick(rng, SIZES), extra_cell, (0.5, 0.5), 0.2)
        rel = _pick(rng, true_relations(o, extra))
        req = requirements_of(
            SceneSpec(objects=(o, extra), relation=rel), size=state["size"], position=False
        )
        out.append((caption_from_requirements(req, rng), "count"))
    return out
