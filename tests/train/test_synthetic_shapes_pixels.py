"""`ShapesPixelsIterator.unpaired_heldout_every`: a tokenizer's images of every colour-shape
pair (the compositionality experiments, docs/COMPOSITIONALITY.md)."""

from __future__ import annotations

import numpy as np
import pytest

from parti_jax.data import shapes
from parti_jax.train.synthetic import UNPAIRED_HELDOUT_OFFSET, ShapesPixelsIterator


def test_every_nth_image_is_an_unpaired_heldout_scene():
    plain = next(ShapesPixelsIterator(image_size=32, batch_size=10))["image"]
    it = ShapesPixelsIterator(image_size=32, batch_size=10, unpaired_heldout_every=5)
    mixed = next(it)["image"]
    assert it.settings["unpaired_heldout_every"] == 5
    world = shapes.ShapesWorldConfig(resolution=32)
    for g in range(10):
        if g % 5 == 4:  # a held-out-split scene far from the eval scenes' indices
            scene = shapes.generate_example(UNPAIRED_HELDOUT_OFFSET + g, "heldout", 0, world)
            np.testing.assert_array_equal(mixed[g], scene.image.astype(np.float32) / 255)
            pairs = {(o.color, o.shape) for o in scene.spec.objects}
            assert pairs & set(world.heldout_pairs())
        else:
            np.testing.assert_array_equal(mixed[g], plain[g])
    # Off by default, and not in the settings a resumed run compares.
    assert (
        "unpaired_heldout_every" not in ShapesPixelsIterator(image_size=32, batch_size=2).settings
    )
    with pytest.raises(ValueError, match="unpaired_heldout_every=-1"):
        ShapesPixelsIterator(image_size=32, batch_size=2, unpaired_heldout_every=-1)
