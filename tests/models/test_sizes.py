"""Every model size builds (abstractly) with the parameter counts its gin file states.

The Parti sizes are checked against numbers that do not come from the build:
the paper's nominal sizes (Table 1: 350M / 750M / 3B / 20B) and the exact
counts of the architecture written out below. `jax.eval_shape` traces
`model.init` without allocating, so even the 20B model is counted in about a
second.
"""

from __future__ import annotations

import argparse
import re

import jax
import numpy as np
import pytest

import gin
from parti_jax.cli import flags
from parti_jax.models.config import ModelConfig
from parti_jax.models.layers import param_count
from parti_jax.models.transformer import EncoderDecoder

# The Parti paper's Table 1: (encoder, decoder) layers, width, MLP, heads, nominal params.
PAPER = {
    "models/parti_350m.gin": ((12, 12), 1024, 4096, 16, 350e6),
    "models/parti_750m.gin": ((12, 36), 1024, 4096, 16, 750e6),
    "models/parti_3b.gin": ((12, 36), 2048, 8192, 32, 3e9),
    "models/parti_20b.gin": ((16, 64), 4096, 16384, 64, 20e9),
}
# The paper's sizes count the transformer layers, not the embeddings and the
# output layer: ours come within 2.5% of them (20B: +2.0%, the others +0.7%).
PAPER_TOLERANCE = 0.025
SIZE_FILES = [
    f for f in flags.list_gin_files() if f.startswith("models/") and f != "models/base.gin"
]


def gin_configurables(name: str, *configurables: str) -> list:
    """The named configurables (e.g. 'ModelConfig') as gin file `name` binds them."""
    flags.setup_gin(flags.CommonArgs([name], [], [], None, argparse.Namespace()), finalize=False)
    try:
        return [gin.get_configurable(c)() for c in configurables]
    finally:
        gin.clear_config()


def stated_params(name: str, what: str = "") -> tuple[int, int | None]:
    """Gin file `name`'s "# <what>params: N" count, and M of "N built; M without ..."."""
    text = (flags.gin_dir() / name).read_text()
    match = re.search(rf"^#\s*{what}params:\s*([\d,]+)(?: built; ([\d,]+) without)?", text, re.M)
    assert match, f"{name}: state the parameter count in a '# {what}params: N' comment"
    return tuple(int(g.replace(",", "")) if g else None for g in match.groups())


def count_params(cfg: ModelConfig) -> int:
    enc = jax.ShapeDtypeStruct((1, cfg.max_text_length), np.int32)
    dec = jax.ShapeDtypeStruct((1, cfg.num_image_tokens), np.int32)
    return param_count(jax.eval_shape(EncoderDecoder(cfg).init, jax.random.key(0), enc, dec))


def parti_counts(layers: tuple[int, int], d: int, mlp: int) -> tuple[int, int]:
    """(all parameters, without embeddings and output layer) of a Parti size, by hand.

    Pre-norm layers with LayerNorm (scale and bias), bias-free projections
    (q, k, v, out: 4 d^2 for multi-head attention with heads x head_dim = d),
    a 2-matrix MLP, a final LayerNorm on the encoder and on the decoder.
    Embeddings: 16,384 text tokens, 128 text positions, 8,320 decoder ids
    (8,192 codes + BOS, padded to a multiple of 128), 32 row + 32 column image
    positions. Output layer: d x 8,320, untied.
    """
    norm = 2 * d
    encoder_layer = 4 * d * d + 2 * d * mlp + 2 * norm
    decoder_layer = 8 * d * d + 2 * d * mlp + 3 * norm  # self- and cross-attention
    body = layers[0] * encoder_layer + layers[1] * decoder_layer + 2 * norm
    embeddings = (16_384 + 128 + 8_320 + 32 + 32) * d
    return body + embeddings + d * 8_320, body


def test_all_sizes_are_shipped():
    for name in [*PAPER, "models/tiny.gin", "models/shapes.gin"]:
        assert name in SIZE_FILES, f"{name} is missing from gin/"


def test_hand_count_of_parti_350m():
    """The formula above, once with its numbers: 352.4M in the layers, 386.5M in all."""
    assert parti_counts((12, 12), 1024, 4096) == (386_461_696, 352_448_512)


@pytest.mark.parametrize("name", SIZE_FILES)
def test_param_count_matches_gin_comment(name):
    (cfg,) = gin_configurables(name, "ModelConfig")
    n = count_params(cfg)
    stated, stated_body = stated_params(name)
    assert n == stated, f"{name}: built {n:,} params, comment says {stated:,}"
    if name not in PAPER:
        return
    (enc_layers, dec_layers), width, mlp, heads, nominal = PAPER[name]
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (enc_layers, dec_layers)
    assert (cfg.d_model, cfg.mlp_dim, cfg.num_heads) == (width, mlp, heads)
    assert (cfg.text_vocab_size, cfg.codebook_size, cfg.decoder_vocab_size) == (16384, 8192, 8320)
    assert cfg.image_grid == (32, 32) and cfg.max_text_length == 128
    total, body = parti_counts((enc_layers, dec_layers), width, mlp)
    assert (n, stated_body) == (total, body), f"{name}: by hand {total:,} / {body:,}"
    assert abs(body - nominal) <= PAPER_TOLERANCE * nominal, (
        f"{name}: {body:,} params without embeddings vs the paper's {nominal:,.0f}"
    )


def test_sizes_override_only_what_differs():
    """Each size file includes a base or another size rather than restating it."""
    for name in SIZE_FILES:
        text = (flags.gin_dir() / name).read_text()
        assert re.search(r"^include 'models/\w+\.gin'", text, re.MULTILINE), name
