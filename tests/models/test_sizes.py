"""Every model size builds (abstractly) with the parameter count its gin file states.

`jax.eval_shape` traces `model.init` without allocating, so even the 20B
model is counted in about a second.
"""

from __future__ import annotations

import argparse
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

import gin
from parti_jax.cli import flags
from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder

# The Parti paper's sizes (docs/DESIGN.md §4): layers, width, MLP, heads, params.
PAPER = {
    "models/parti_350m.gin": ((12, 12), 1024, 4096, 16, 0.39e9),
    "models/parti_750m.gin": ((12, 36), 1024, 4096, 16, 0.79e9),
    "models/parti_3b.gin": ((12, 36), 2048, 8192, 32, 3.1e9),
    "models/parti_20b.gin": ((16, 64), 4096, 16384, 64, 20.5e9),
}
SIZE_FILES = [
    f for f in flags.list_gin_files() if f.startswith("models/") and f != "models/base.gin"
]
_PARAMS_COMMENT = re.compile(r"^#\s*params:\s*([\d,]+)", re.MULTILINE)


def config_from_gin(name: str) -> ModelConfig:
    args = flags.CommonArgs([name], [], [], None, argparse.Namespace())
    flags.setup_gin(args, finalize=False)
    try:
        return gin.get_configurable("ModelConfig")()
    finally:
        gin.clear_config()


def count_params(cfg: ModelConfig) -> int:
    enc = jax.ShapeDtypeStruct((1, cfg.max_text_length), np.int32)
    dec = jax.ShapeDtypeStruct((1, cfg.num_image_tokens), np.int32)
    shapes = jax.eval_shape(EncoderDecoder(cfg).init, jax.random.key(0), enc, dec)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


def stated_count(name: str) -> int:
    text = (flags.gin_dir() / name).read_text()
    match = _PARAMS_COMMENT.search(text)
    assert match, f"{name}: add a '# params: N' comment stating the parameter count"
    return int(match.group(1).replace(",", ""))


def test_all_sizes_are_shipped():
    for name in [*PAPER, "models/tiny.gin", "models/shapes.gin"]:
        assert name in SIZE_FILES, f"{name} is missing from gin/"


@pytest.mark.parametrize("name", SIZE_FILES)
def test_param_count_matches_gin_comment(name):
    cfg = config_from_gin(name)
    n = count_params(cfg)
    stated = stated_count(name)
    assert abs(n - stated) <= 0.02 * stated, f"{name}: built {n:,} params, comment says {stated:,}"
    if name in PAPER:
        (enc_layers, dec_layers), width, mlp, heads, paper = PAPER[name]
        assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (enc_layers, dec_layers)
        assert (cfg.d_model, cfg.mlp_dim, cfg.num_heads) == (width, mlp, heads)
        assert (cfg.text_vocab_size, cfg.codebook_size) == (16384, 8192)
        assert cfg.image_grid == (32, 32) and cfg.max_text_length == 128
        assert abs(n - paper) <= 0.05 * paper, f"{name}: {n:,} params vs paper {paper:,.0f}"


def test_sizes_override_only_what_differs():
    """Each size file includes a base or another size rather than restating it."""
    for name in SIZE_FILES:
        text = (flags.gin_dir() / name).read_text()
        assert re.search(r"^include 'models/\w+\.gin'", text, re.MULTILINE), name
