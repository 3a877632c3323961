"""The shapes judge: accuracy on the world's own images, near-miss rejection, robustness."""

import numpy as np
import pytest
from scipy import ndimage

from parti_jax.data import judge, shapes
from parti_jax.data.shapes_parsing import parse_caption


def _degrade(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Blur + Gaussian noise (std 0.03) + a colour shift (gains and offsets) + a few specks."""
    x = ndimage.gaussian_filter(image.astype(np.float64) / 255.0, sigma=(sigma, sigma, 0))
    x = x + rng.normal(0.0, 0.03, x.shape)
    x = x * rng.uniform(0.9, 1.1, 3) + rng.uniform(-0.05, 0.05, 3)
    side = x.shape[0]
    for _ in range(4):  # 2x2 artefacts, below the small-blob threshold
        i, j = rng.integers(0, side - 2, 2)
        x[i : i + 2, j : j + 2] = rng.uniform(0.0, 1.0, 3)
    return np.clip(x, 0.0, 1.0)


def _rates(resolution: int, per_split: int, sigma: float):
    cfg = shapes.ShapesWorldConfig(resolution=resolution)
    rng = np.random.default_rng(resolution)
    n = clean = degraded = rejected = misses = 0
    for split in shapes.SPLITS:
        for i in range(per_split):
            ex = shapes.generate_example(i, split, config=cfg)
            req = parse_caption(ex.caption)
            detected = judge.analyse(ex.image)
            n += 1
            clean += judge.judge_requirements(detected, req).match
            noisy = judge.analyse(_degrade(ex.image, rng, sigma))
            degraded += judge.judge_requirements(noisy, req).match
            for caption, _ in shapes.near_miss_captions(ex.spec, rng, cfg):
                misses += 1
                rejected += not judge.judge_requirements(detected, parse_caption(caption)).match
    return n, clean / n, degraded / n, rejected / misses


@pytest.mark.parametrize(("resolution", "per_split", "sigma"), [(64, 170, 0.7), (128, 40, 1.4)])
def test_judge_accuracy_near_misses_and_robustness(resolution, per_split, sigma):
    n, clean, degraded, rejected = _rates(resolution, per_split, sigma)
    print(
        f"{resolution}px n={n} clean={clean:.4f} degraded={degraded:.4f} near-miss={rejected:.4f}"
    )
    assert clean >= 0.99
    assert rejected >= 0.99
    assert degraded >= 0.97


def _scene(*objects, relation=None):
    return shapes.SceneSpec(objects=tuple(objects), relation=relation)


RED_CIRCLE = shapes.ObjectSpec("circle", "red", "small", (0, 0), (1 / 6, 1 / 6), 0.155)
BLUE_SQUARE = shapes.ObjectSpec("square", "blue", "large", (0, 2), (5 / 6, 1 / 6), 0.245)


def test_attributes_are_reported_one_by_one():
    image = shapes.render(_scene(RED_CIRCLE), 64)
    (obj,) = judge.analyse(image)
    assert (obj.color, obj.shape, obj.size, obj.cell) == ("red", "circle", "small", (0, 0))
    r = judge.judge(image, "a small red circle in the top left")
    assert r.match and r.attributes == {
        "color": True, "shape": True, "size": True, "position": True, "relation": None, "count": True,
    }  # fmt: skip
    r = judge.judge(image, "a large green circle in the top left")
    assert not r.match
    assert (r.attributes["color"], r.attributes["size"], r.attributes["shape"]) == (
        False,
        False,
        True,
    )
    assert r.attributes["relation"] is None
    r = judge.judge(image, "a red circle")  # size and position unstated
    assert r.match and r.attributes["size"] is None and r.attributes["position"] is None
    r = judge.judge(image, "a red circle to the left of a blue square")
    assert not r.match and r.attributes["count"] is False and r.attributes["relation"] is False


def test_two_objects_relations_and_an_empty_image():
    image = shapes.render(_scene(RED_CIRCLE, BLUE_SQUARE, relation="left"), 64)
    assert judge.judge(image, "a red circle to the left of a blue square").match
    assert judge.judge(image, "a blue square with a red circle to its left").match
    assert judge.judge(image, "a large blue square right of a small red circle").match
    r = judge.judge(image, "a red circle to the right of a blue square")
    assert not r.match and r.attributes["relation"] is False
    assert not judge.judge(image, "a red circle above a blue square").match
    empty = np.zeros((64, 64, 3), np.uint8)
    assert judge.analyse(empty) == []
    r = judge.judge(empty, "a red circle")
    assert not r.match and r.attributes["count"] is False and r.attributes["color"] is False


def test_touching_objects_of_different_colours_are_split():
    a = shapes.ObjectSpec("square", "red", "large", (1, 1), (0.5 - 0.12, 0.5), 0.24)
    b = shapes.ObjectSpec("square", "green", "large", (1, 1), (0.5 + 0.12, 0.5), 0.24)
    image = shapes.render(_scene(a, b), 64)
    found = judge.analyse(image)
    assert [(o.color, o.shape) for o in found] == [("red", "square"), ("green", "square")]


def test_inputs_and_determinism():
    ex = shapes.generate_example(11, "validation")
    as_uint8 = judge.analyse(ex.image)
    as_float = judge.analyse(ex.image.astype(np.float32) / 255.0)
    assert [(o.color, o.shape, o.size, o.cell) for o in as_uint8] == [
        (o.color, o.shape, o.size, o.cell) for o in as_float
    ]
    assert judge.analyse(ex.image) == as_uint8
    with pytest.raises(ValueError, match=r"expected an image \[H, W, 3\]"):
        judge.analyse(ex.image[..., 0])
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        judge.analyse(ex.image.astype(np.float32))
    # Grey is no palette colour.
    grey = shapes.render(_scene(RED_CIRCLE), 64).max(-1, keepdims=True).repeat(3, -1)
    assert judge.analyse(grey)[0].color is None


def test_scorer_interface():
    examples = [shapes.generate_example(i, "train") for i in range(4)]
    images = np.stack([e.image for e in examples]).astype(np.float32) / 255.0
    captions = [e.caption for e in examples]
    scorer = judge.ShapesJudgeScorer()
    scores = scorer.score(images, captions, image_tokens=np.zeros((4, 64), np.int32))
    assert scores.shape == (4,) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, 1.0)
    rng = np.random.default_rng(0)
    misses = [shapes.near_miss_captions(e.spec, rng)[0][0] for e in examples]
    worse = scorer(images, misses)
    assert ((worse < 1.0) & (worse > 0.0)).all()
    with pytest.raises(ValueError, match="prompt 1: 'a cat' is not a shapes-world caption"):
        scorer(images[:2], [captions[0], "a cat"])
    with pytest.raises(ValueError, match="B prompts"):
        scorer(images, captions[:3])
