"""The shapes-world judge: reads objects back from pixels and checks them against a caption.

`analyse(image)` finds the objects of any image (the world's own renders, VQGAN
reconstructions, sampled images with blur, noise, colour shifts and small
artefacts) and reads colour, shape, size and position from geometry alone:

- foreground: distance from the background colour (median of the border);
  connected components, split by colour when two colours touch, small or faint
  blobs dropped;
- colour: hue of the component's core, nearest palette hue within a tolerance;
- alpha: each pixel's coverage (projection on the core colour), so that area,
  widths and moments are sub-pixel and insensitive to blur;
- shape: analysis by synthesis: every shape's template (`shapes.coverage`) is
  placed by blur-invariant statistics (centroid, area), compared by soft IoU
  at a few blur levels; the best wins if it fits well enough;
- size: the bounding-box side that the best template implies, against
  `shapes.SIZE_THRESHOLD`; position: the alpha centroid's 3x3 cell;
- relation: centroids apart by a margin along the relation's axis.

`judge(image, caption)` matches detections to what the caption states;
`ShapesJudgeScorer` is the reranking scorer (docs/DESIGN.md, section 3).
Deterministic, numpy + scipy only (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from parti_jax.data import shapes
from parti_jax.data.shapes_parsing import parse_caption

ATTRIBUTES = ("color", "shape", "size", "position", "relation", "count")


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB values [..., 3] (any non-negative scale)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = rgb.max(-1)
    c = mx - rgb.min(-1)
    safe = np.where(c > 0, c, 1.0)
    h = np.where(
        mx == r,
        ((g - b) / safe) % 6.0,
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return (h * 60.0) % 360.0


_PALETTE_NAMES = list(shapes.COLORS)
_PALETTE_HUES = _hue(np.array([shapes.COLORS[c] for c in _PALETTE_NAMES], np.float64) / 255.0)


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Thresholds of the pixel analyser (fractions of the [0, 1] intensity or of the image)."""

    foreground_threshold: float = 0.2  # max-channel distance from background to count as object
    min_peak: float = 0.35  # a blob's strongest pixel must reach this
    min_area_fraction: float = 0.0025  # blobs smaller than this fraction of the image are noise
    hue_tolerance: float = 32.0  # degrees from the nearest palette hue
    min_chroma: float = 0.15  # max - min channel of the core colour
    split_fraction: float = 0.25  # a second colour this share of a blob splits it
    # Gaussian sigmas (pixels) at which each shape template is compared.
    template_blurs: tuple[float, ...] = (0.0, 0.7, 1.2)
    min_shape_iou: float = 0.65  # best template fits worse: shape unrecognised (None)
    relation_margin: float = 0.08  # centroids must differ by this fraction of the image
    size_threshold: float = shapes.SIZE_THRESHOLD


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One object read from pixels."""

    color: str | None  # None: hue or chroma outside the palette's tolerance
    shape: str | None  # None: no template fits (soft IoU below min_shape_iou)
    size: str
    cell: shapes.Cell
    center: tuple[float, float]  # (x, y) alpha centroid, normalised
    extent: float  # bounding-box side, normalised
    area: float  # alpha area, fraction of the image
    features: dict[str, float]


@dataclasses.dataclass(frozen=True)
class JudgeResult:
    """Whether an image matches a caption: overall and per attribute."""

    match: bool
    attributes: dict[str, bool | None]  # ATTRIBUTES -> matched / None (not stated)
    detected: list[DetectedObject]
    requirements: shapes.CaptionRequirements

    @property
    def fraction_matched(self) -> float:
        stated = [v for v in self.attributes.values() if v is not None]
        return float(np.mean(stated)) if stated else 1.0


def to_float_image(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] or float [0, 1] -> float64 [H, W, 3] in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    image = image.astype(np.float64)
    if image.size and float(image.max()) > 1.5:
        raise ValueError(
            f"float images must be in [0, 1] (max here {float(image.max()):.1f}); "
            "divide by 255 or pass uint8"
        )
    return np.clip(image, 0.0, 1.0)


def _palette_distance(hue: np.ndarray) -> np.ndarray:
    """Degrees from hues [...] to each palette hue: [..., len(palette)]."""
    return np.abs((_PALETTE_HUES - hue[..., None] + 180.0) % 360.0 - 180.0)


def _classify_color(rgb: np.ndarray, cfg: JudgeConfig) -> str | None:
    if float(rgb.max() - rgb.min()) < cfg.min_chroma:
        return None
    dist = _palette_distance(_hue(rgb))
    k = int(np.argmin(dist))
    return _PALETTE_NAMES[k] if dist[k] <= cfg.hue_tolerance else None


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur along one axis (zero outside), as a matrix: blur = G @ x."""
    i = np.arange(n, dtype=np.float64)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    g[np.abs(i[:, None] - i[None, :]) > 3.0 * sigma + 0.5] = 0.0
    return g / g.sum(1, keepdims=True)


def _object_features(alpha: np.ndarray) -> dict[str, float]:
    """Area and centroid (cx, cy; pixel centres at +0.5) of one object's alpha map."""
    area = float(alpha.sum())
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]].astype(np.float64) + 0.5
    return {
        "area": area,
        "cx": float((alpha * xs).sum() / area),
        "cy": float((alpha * ys).sum() / area),
    }


def _template_scores(
    alpha: np.ndarray, cx: float, cy: float, cfg: JudgeConfig
) -> dict[str, tuple[float, float]]:
    """Soft IoU of the alpha map with each shape's template -> (iou, extent in pixels).

    Each template is placed by blur-invariant statistics only: its centroid on
    the alpha centroid and its area equal to the alpha area. It is compared at a
    few blur levels (the best one counts), so a blurred detection meets a
    blurred template.
    """
    area = float(alpha.sum())
    h, w = alpha.shape
    out = {}
    for shape in shapes.SHAPES:
        extent = float(np.sqrt(area / shapes.SHAPE_FILL[shape]))
        center = (cx, cy - shapes.SHAPE_CENTROID_DY[shape] * extent)
        template = shapes.coverage(shape, center, extent, h, w, supersample=4).astype(np.float64)
        best = 0.0
        for sigma in cfg.template_blurs:
            t = template
            if sigma > 0:
                t = _blur_matrix(h, sigma) @ template @ _blur_matrix(w, sigma).T
            iou = float(np.minimum(alpha, t).sum() / max(np.maximum(alpha, t).sum(), 1e-9))
            best = max(best, iou)
        out[shape] = (best, extent)
    return out


def analyse(image: np.ndarray, config: JudgeConfig | None = None) -> list[DetectedObject]:
    """Objects in an image (uint8 [H, W, 3] or float in [0, 1]), left to right."""
    cfg = config or JudgeConfig()
    img = to_float_image(image)
    hgt, wid = img.shape[:2]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])  # fmt: skip
    background = np.median(border, axis=0)
    d = img - background
    strength = np.abs(d).max(-1)
    fg = strength > cfg.foreground_threshold
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    min_area = max(4.0, cfg.min_area_fraction * hgt * wid)
    blobs: list[tuple[tuple[slice, slice], np.ndarray]] = []  # (box, mask in the box)
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == k
        if comp.sum() < min_area:
            continue
        # Split a blob where two palette colours touch.
        colors = np.argmin(_palette_distance(_hue(np.clip(d[sl][comp], 0.0, None))), axis=1)
        w = strength[sl][comp]
        share = np.bincount(colors, weights=w, minlength=len(_PALETTE_NAMES)) / w.sum()
        major = [c for c in np.argsort(-share) if share[c] >= cfg.split_fraction]
        if len(major) < 2:
            blobs.append((sl, comp))
            continue
        label_map = np.full(comp.shape, -1)
        label_map[comp] = colors
        for c in major:
            sub, m = ndimage.label(label_map == c, structure=np.ones((3, 3), bool))
            for j in range(1, m + 1):
                part = sub == j
                if part.sum() >= min_area:
                    blobs.append((sl, part))
    objects = []
    for sl, comp in blobs:
        s = strength[sl]
        if s[comp].max() < cfg.min_peak:
            continue
        # Core colour: the strongest pixels (the interior, away from anti-aliased edges).
        core = comp & (s >= 0.75 * s[comp].max())
        colour = d[sl][core].mean(0)
        # Alpha over the blob grown by 2 px, so faint blurred edges count towards the area.
        y0, x0 = max(sl[0].start - 2, 0), max(sl[1].start - 2, 0)
        y1, x1 = min(sl[0].stop + 2, hgt), min(sl[1].stop + 2, wid)
        grown = np.zeros((y1 - y0, x1 - x0), bool)
        grown[sl[0].start - y0 : sl[0].stop - y0, sl[1].start - x0 : sl[1].stop - x0] = comp
        grown = ndimage.binary_dilation(grown, structure=np.ones((3, 3), bool), iterations=2)
        dd = d[y0:y1, x0:x1]
        alpha = np.clip((dd @ colour) / max(float(colour @ colour), 1e-9), 0.0, 1.0) * grown
        if alpha.sum() < min_area / 2:
            continue
        f = _object_features(alpha)
        scores = _template_scores(alpha, f["cx"], f["cy"], cfg)
        shape = max(scores, key=lambda k: scores[k][0])
        ranked = sorted((v[0] for v in scores.values()), reverse=True)
        f["iou"], f["iou_margin"] = ranked[0], ranked[0] - ranked[1]
        cx, cy = (f["cx"] + x0) / wid, (f["cy"] + y0) / hgt
        extent = scores[shape][1] / max(hgt, wid)
        objects.append(
            DetectedObject(
                color=_classify_color(colour, cfg),
                shape=shape if f["iou"] >= cfg.min_shape_iou else None,
                size="large" if extent >= cfg.size_threshold else "small",
                cell=(min(int(cy * 3), 2), min(int(cx * 3), 2)),
                center=(cx, cy),
                extent=extent,
                area=f["area"] / (hgt * wid),
                features=f,
            )
        )
    return sorted(objects, key=lambda o: (o.center[0], o.center[1]))


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str, margin: float) -> bool:
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    return {
        "left": dx < -margin,
        "right": dx > margin,
        "above": dy < -margin,
        "below": dy > margin,
    }[relation]


_OBJECT_FIELDS = {"color": "color", "shape": "shape", "size": "size", "position": "cell"}


def _object_checks(
    req: shapes.ObjectRequirement, det: DetectedObject | None
) -> dict[str, bool | None]:
    """Per stated attribute: whether `det` has it (None: not stated)."""
    wanted = {a: getattr(req, f) for a, f in _OBJECT_FIELDS.items()}
    return {
        a: None if want is None else (det is not None and want == getattr(det, _OBJECT_FIELDS[a]))
        for a, want in wanted.items()
    }


def judge_requirements(
    detected: Sequence[DetectedObject],
    req: shapes.CaptionRequirements,
    config: JudgeConfig | None = None,
) -> JudgeResult:
    """Checks detected objects against parsed caption requirements."""
    cfg = config or JudgeConfig()
    n = len(req.objects)
    best: tuple[int, dict[str, bool | None]] | None = None
    # Try every assignment of caption objects to detections (at most a few objects).
    slots = list(detected) + [None] * n
    for perm in itertools.permutations(range(len(slots)), n):
        dets = [slots[p] for p in perm]
        per_obj = [_object_checks(r, d) for r, d in zip(req.objects, dets)]
        attrs: dict[str, bool | None] = {}
        for a in _OBJECT_FIELDS:
            vals = [p[a] for p in per_obj if p[a] is not None]
            attrs[a] = all(vals) if vals else None
        attrs["relation"] = None
        if req.relation is not None:
            a, b = dets[0], dets[1]
            attrs["relation"] = None not in (a, b) and _relation_holds(
                a, b, req.relation, cfg.relation_margin
            )
        attrs["count"] = len(detected) == n
        score = sum(bool(v) for p in per_obj for v in p.values()) + 2 * bool(attrs["relation"])
        if best is None or score > best[0]:
            best = (score, attrs)
    attrs = best[1]
    match = all(v is not False for v in attrs.values())
    return JudgeResult(match=match, attributes=attrs, detected=list(detected), requirements=req)


def judge(image: np.ndarray, caption: str, config: JudgeConfig | None = None) -> JudgeResult:
    """Whether an image shows what a shapes-world caption says, attribute by attribute."""
    req = parse_caption(caption)
    return judge_requirements(analyse(image, config), req, config)


class ShapesJudgeScorer:
    """Reranking scorer: 1.0 for a full match, else the fraction of stated attributes matched."""

    def __init__(self, config: JudgeConfig | None = None):
        self.config = config or JudgeConfig()

    def score(self, images: np.ndarray, prompts: Sequence[str], *, image_tokens=None) -> np.ndarray:
        """images float [B, H, W, 3] in [0, 1]; prompts: B shapes captions -> float32 [B]."""
        del image_tokens  # the judge reads pixels only
        images = np.asarray(images)
        if images.ndim != 4 or len(images) != len(prompts):
            raise ValueError(
                f"expected images [B, H, W, 3] and B prompts, got {images.shape} and {len(prompts)} prompts"
            )
        reqs = []
        for i, p in enumerate(prompts):
            try:
                reqs.append(parse_caption(p))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        out = np.zeros(len(prompts), np.float32)
        for i, (img, req) in enumerate(zip(images, reqs)):
            r = judge_requirements(analyse(img, self.config), req, self.config)
            out[i] = 1.0 if r.match else r.fraction_matched
        return out

    __call__ = score
