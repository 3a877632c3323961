"""The shapes world: determinism, splits, geometry, captions, parsing and near misses."""

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from parti_jax.data import shapes
from parti_jax.data.shapes_parsing import parse_caption


def _true_attrs(spec: shapes.SceneSpec):
    return [(o.color, o.shape, o.size, o.cell) for o in spec.objects]


def test_examples_are_pure_functions_of_seed_split_index():
    a = shapes.generate_example(7, "train", seed=3)
    b = shapes.generate_example(7, "train", seed=3)
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
    np.testing.assert_array_equal(a.image, b.image)
    assert (a.caption, a.spec) == (b.caption, b.spec)
    # Another seed, split or index is another scene.
    others = [
        shapes.generate_example(7, "train", seed=4),
        shapes.generate_example(7, "validation", seed=3),
        shapes.generate_example(8, "train", seed=3),
    ]
    assert all(o.spec != a.spec for o in others)
    # Random access agrees with iteration.
    it = list(shapes.iterate_examples("heldout", seed=1, start=5, num_examples=3))
    assert [e.index for e in it] == [5, 6, 7]
    assert it[1].caption == shapes.generate_example(6, "heldout", seed=1).caption
    with pytest.raises(ValueError, match="unknown shapes split 'test'"):
        shapes.generate_example(0, "test")


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_same_scene_at_every_resolution_and_objects_never_touch(resolution):
    cfg = shapes.ShapesWorldConfig(resolution=resolution)
    for i in range(20):
        ex = shapes.generate_example(i, "train", config=cfg)
        assert ex.image.shape == (resolution, resolution, 3)
        assert ex.spec == shapes.generate_scene(i, "train")[0]
        # Each object alone, then together: coverages are disjoint and the
        # image is their sum (nothing overlaps, nothing leaves the canvas).
        masks = [
            shapes.render(shapes.SceneSpec(objects=(o,)), resolution).max(-1) > 0
            for o in ex.spec.objects
        ]
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any()
            a, b = ex.spec.objects
            gap = max(
                abs(a.center[0] - b.center[0]) - (a.extent + b.extent) / 2,
                abs(a.center[1] - b.center[1]) - (a.extent + b.extent) / 2,
            )
            assert gap >= 2 * shapes.CELL_INSET - 1e-9
        for o in ex.spec.objects:
            lo, hi = shapes.SIZE_EXTENTS[o.size]
            assert lo <= o.extent <= hi
            assert (int(o.center[1] * 3), int(o.center[0] * 3)) == o.cell


@pytest.mark.parametrize("lattice", [0, 16, 24])
def test_geometry_on_the_lattice_or_continuous(lattice):
    cfg = shapes.ShapesWorldConfig(lattice=lattice)
    margin = 0.25 / lattice if lattice else shapes.CELL_INSET
    extents, edges = set(), set()
    for i in range(200):
        spec, caption = shapes.generate_scene(i, "train", config=cfg)
        # The lattice moves objects, never what the caption says.
        assert (
            caption
            == shapes.generate_scene(i, "train", config=dataclasses.replace(cfg, lattice=0))[1]
        )
        for o in spec.objects:
            lo, hi = shapes.SIZE_EXTENTS[o.size]
            if lattice:  # the size's lattice extent, on its side of the judge's threshold
                assert (o.extent < shapes.SIZE_THRESHOLD) == (o.size == "small")
            else:
                assert lo <= o.extent <= hi
            assert (int(o.center[1] * 3), int(o.center[0] * 3)) == o.cell
            extents.add((o.size, round(o.extent, 9)))
            for c, k in zip(o.center, o.cell[::-1]):
                left = c - o.extent / 2
                # Inside its grid cell, with a margin.
                assert k / 3 + margin <= left + 1e-9
                assert left + o.extent <= (k + 1) / 3 - margin + 1e-9
                edges.add(round(left * lattice, 6) if lattice else left)
    if lattice:
        assert len(extents) == 2  # one extent per size
        assert all(e == int(e) for e in edges)  # every box edge on the lattice
    else:
        assert len(extents) > 200 and len(edges) > 400  # a continuum


def test_rendered_colours_and_background():
    ex = next(
        e for e in shapes.iterate_examples("train", num_examples=50) if len(e.spec.objects) == 1
    )
    img = ex.image.reshape(-1, 3)
    assert (img[0] == shapes.BACKGROUND).all()
    full = img[(img != shapes.BACKGROUND).any(-1)]
    # Interior pixels carry exactly the palette colour (only edges are blended).
    colors, counts = np.unique(full, axis=0, return_counts=True)
    assert tuple(colors[np.argmax(counts)]) == shapes.COLORS[ex.spec.objects[0].color]


def test_splits_hold_out_colour_shape_pairs():
    held = set(shapes.HELDOUT_COMBINATIONS)
    seen = set()
    for split in ("train", "validation"):
        for i in range(400):
            spec, _ = shapes.generate_scene(i, split)
            pairs = {(o.color, o.shape) for o in spec.objects}
            assert not pairs & held, (split, i, pairs)
            seen |= pairs
    # Every other pair is trained on; every colour and shape appears.
    cfg = shapes.ShapesWorldConfig()
    assert seen == set(cfg.allowed_pairs())
    for i in range(300):
        spec, _ = shapes.generate_scene(i, "heldout")
        assert {(o.color, o.shape) for o in spec.objects} & held, i
    counts = [len(shapes.generate_scene(i, "train")[0].objects) for i in range(400)]
    assert 0.35 < np.mean(np.array(counts) == 2) < 0.65


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="resolution=16"):
        shapes.ShapesWorldConfig(resolution=16)
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        shapes.ShapesWorldConfig(colors=("red", "orange"))
    with pytest.raises(ValueError, match=r"lattice=6: a (small|large) object does not fit"):
        shapes.ShapesWorldConfig(lattice=6)
    with pytest.raises(ValueError, match="lattice=300"):
        shapes.ShapesWorldConfig(lattice=300)
    cfg = shapes.ShapesWorldConfig(colors=("red", "yellow"), shapes=("circle", "triangle"))
    with pytest.raises(ValueError, match="'heldout' split is empty"):
        shapes.generate_example(0, "heldout", config=cfg)
    # A smaller world draws only its own colours and shapes.
    for i in range(50):
        spec, _ = shapes.generate_scene(i, "train", config=cfg)
        assert all(o.color in cfg.colors and o.shape in cfg.shapes for o in spec.objects)


def test_templates_are_varied_and_every_caption_parses_to_what_it_states():
    assert len(shapes.ONE_OBJECT_TEMPLATES) >= 10 and len(shapes.TWO_OBJECT_TEMPLATES) >= 6
    captions = set()
    for split in shapes.SPLITS:
        for i in range(400):
            ex_spec, caption = shapes.generate_scene(i, split)
            rng = np.random.default_rng([0, shapes.SPLITS[split], i])
            spec = shapes.sample_scene(rng, split, shapes.ShapesWorldConfig())
            replay, req = shapes.sample_caption(spec, rng, shapes.ShapesWorldConfig())
            assert (spec, replay) == (ex_spec, caption)
            assert parse_caption(caption) == req, caption
            # What a caption states is true of its scene.
            for r, o in zip(req.objects, spec.objects):
                assert r.shape == o.shape and r.color == o.color
                assert r.size in (None, o.size) and r.cell in (None, o.cell)
            if req.relation:
                assert req.relation in shapes.true_relations(*spec.objects)
            captions.add(caption)
    assert len(captions) > 1000
    stated = [parse_caption(c) for c in captions]
    assert any(r.objects[0].size is None for r in stated)  # some leave size unstated
    assert any(r.objects[0].cell is None for r in stated)


def test_parse_caption_variants_and_errors():
    want = shapes.CaptionRequirements(
        objects=(shapes.ObjectRequirement("circle", "red", "small", (0, 0)),)
    )
    for text in (
        "a small red circle in the top left",
        "A Tiny RED circle at the upper left.",
        "  top left:   a little red circle ",
        "small red circle in the top left corner",
    ):
        assert parse_caption(text) == want, text
    two = parse_caption("a yellow triangle with a big blue square to its left")
    assert two.relation == "left"
    assert two.objects[0] == shapes.ObjectRequirement("square", "blue", "large", None)
    assert two.objects[1] == shapes.ObjectRequirement("triangle", "yellow", None, None)
    assert parse_caption("green diamond").objects[0].color == "green"
    with pytest.raises(ValueError, match=r"not a shapes-world caption \(unknown words: 'dog'"):
        parse_caption("a red dog in the top left")
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_caption("")


def test_near_misses_change_exactly_one_attribute():
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(150):
        spec, _ = shapes.generate_scene(i, "validation")
        misses = shapes.near_miss_captions(spec, rng)
        kinds = [k for _, k in misses]
        expected = {"color", "shape", "size", "position", "count"}
        if len(spec.objects) == 2:
            expected.add("relation")
        assert set(kinds) == expected and len(kinds) == len(expected)
        seen.add(len(spec.objects))
        for caption, kind in misses:
            req = parse_caption(caption)
            if kind == "count":
                assert len(req.objects) != len(spec.objects)
                continue
            assert len(req.objects) == len(spec.objects)
            if kind == "relation":
                assert req.relation == shapes.OPPOSITE_RELATION[spec.relation]
            elif req.relation is not None:
                assert req.relation == spec.relation
            diffs = [
                (field, j)
                for j, (r, o) in enumerate(zip(req.objects, spec.objects))
                for field, want, got in (
                    ("color", o.color, r.color),
                    ("shape", o.shape, r.shape),
                    ("size", o.size, r.size),
                    ("position", o.cell, r.cell),
                )
                if got is not None and got != want
            ]
            assert [d[0] for d in diffs] == ([] if kind == "relation" else [kind]), caption
    assert seen == {1, 2}


def test_importable_without_tensorflow():
    """shapes, judge and the tokenizer work with TensorFlow made unimportable."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tensorflow"] = None  # any `import tensorflow` now raises
        from parti_jax.data import judge, shapes, vocab
        ex = shapes.generate_example(3, "train")
        assert judge.judge(ex.image, ex.caption).match
        tok = vocab.SentencePieceTokenizer(vocab.default_vocab_path())
        assert tok.encode(ex.caption)[-1] == vocab.EOS_ID
        assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
