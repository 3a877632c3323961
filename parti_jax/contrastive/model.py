"""The contrastive image-text model (the paper's CoCa role): a dual encoder and its loss.

    model = DualEncoder(config)
    variables = model.init(key, images, tokens)            # images [B, S, S, 3] in [0, 1]
    out = model.apply(variables, images, tokens, negatives)  # {'image', 'text', 'scale', ...}
    text_emb = model.apply(variables, tokens, method=DualEncoder.embed_text)
    image_emb = model.apply(variables, images, method=DualEncoder.embed_image)

The text tower is the encoder-decoder's `Encoder` (models/transformer.py) built
from `ContrastiveConfig.text`, a `ModelConfig` whose encoder fields it uses:
its parameters have the layout of `EncoderDecoder`'s 'encoder', so `train`
can start its text encoder from them (`train.text_encoder_from`), and
`train_contrastive` its text tower from a trained encoder-decoder's encoder
(`train_contrastive.text_tower_from`).
The image tower is a ViT from the same layers (models/layers.py): patches,
learned positions, pre-norm blocks, a final norm. Each tower mean-pools its
outputs (the text over its non-pad tokens; the image over all patches, or over
each cell of an `image_pool_grid` grid, kept apart) and projects them to `embed_dim`;
embeddings are L2-normalised and compared by cosine similarity times a
learned scale exp(logit_scale) (CLIP's temperature, capped at 100).

`contrastive_loss` is the symmetric InfoNCE loss: each image against every
caption of the batch (plus, optionally, its own hard negatives: captions
that differ from its caption in one attribute), each caption against every
image of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.models.config import CheckedConfig, ModelConfig
from parti_jax.models.layers import (
    HIDDEN_AXES,
    EncoderLayer,
    LayerSpec,
    constrain,
    layer_stack,
    run_stack,
    text_lengths,
)
from parti_jax.models.transformer import Encoder
from parti_jax.partitioning import EMBED, PATCH, POSITION

Array = jax.Array
PROJECTION = "projection"  # the shared embedding axis: replicated (no rule names it)
MAX_LOGIT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig(CheckedConfig):
    """The dual encoder: a text tower (`text`'s encoder fields) and a ViT image tower."""

    # The text tower: the encoder-decoder's Encoder with this config's encoder fields
    # (gin: `ContrastiveConfig.text = @ModelConfig()`, the t2i model's own, so a
    # warm start fits). Its decoder fields are unused.
    text: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # Side of the square images the image tower reads (others are resized to it).
    image_size: int = 32
    # Side of a square patch; image_size must be a multiple.
    patch_size: int = 4
    # The image tower's width, depth, heads and MLP width.
    image_width: int = 128
    image_depth: int = 2
    image_heads: int = 4
    image_mlp_dim: int = 512
    # Width of the shared embedding space.
    embed_dim: int = 128
    # How the image tower's patch features become one vector: 1 averages them all
    # (CLIP); g > 1 averages each cell of a g x g grid of patches and projects the
    # g*g averages together, so where a feature is stays in the embedding
    # (shapes world, 300 steps: position near misses 74% -> 97%; relations
    # stayed at chance either way, README "Measured").
    image_pool_grid: int = 1
    # Initial softmax temperature (CLIP: 0.07); learned as log(1 / temperature).
    init_temperature: float = 0.07
    # Compute and parameter dtypes of the image tower and projections.
    dtype: str = "float32"
    weight_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):  # from a JSON record
            object.__setattr__(self, "text", ModelConfig(**self.text))
        self.check(isinstance(self.text, ModelConfig), f"text={self.text!r} must be a ModelConfig")
        for name in ("image_size", "patch_size", "image_width", "image_depth", "image_heads",
                     "image_mlp_dim", "embed_dim", "image_pool_grid"):  # fmt: skip
            value = getattr(self, name)
            self.check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name}={value!r} must be a positive integer",
            )
        self.check(
            self.image_size % self.patch_size == 0,
            f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}",
        )
        side = self.image_size // self.patch_size
        self.check(
            side % self.image_pool_grid == 0,
            f"image_pool_grid={self.image_pool_grid} must divide the {side} patches per side "
            f"(image_size={self.image_size} / patch_size={self.patch_size})",
        )
        self.check(
            self.image_width % self.image_heads == 0,
            f"image_width={self.image_width} must be divisible by image_heads={self.image_heads}",
        )
        self.check(
            0.0 < self.init_temperature < 1.0,
            f"init_temperature={self.init_temperature} must be in (0, 1)",
        )
        self.check_choices()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def image_spec(config: ContrastiveConfig) -> LayerSpec:
    return LayerSpec(
        width=config.image_width,
        num_heads=config.image_heads,
        head_dim=config.image_width // config.image_heads,
        mlp_dim=config.image_mlp_dim,
        activation="gelu",
        use_bias=True,
        kernel_init="xavier",
        dtype=config.compute_dtype,
        param_dtype=config.param_dtype,
    )


def _patchify(images: Array, patch: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ImageTower(nn.Module):
    """Images [B, S, S, 3] in [0, 1] -> features [B, N, image_width] (a ViT encoder)."""

    config: ContrastiveConfig

    @nn.compact
    def __call__(self, images: Array, enable_dropout: bool = False) -> Array:
        cfg = self.config
        if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"images have shape {images.shape[1:]}, the image tower reads "
                f"({cfg.image_size}, {cfg.image_size}, 3) (ContrastiveConfig.image_size); "
                "resize them first (`resize_images`)"
            )
        spec = image_spec(cfg)
        x = _patchify(images.astype(jnp.float32) * 2.0 - 1.0, cfg.patch_size)
        x = spec.dense((spec.width,), (PATCH, EMBED), name="patch_embedding")(x)
        table = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (POSITION, EMBED)),
            (cfg.num_patches, spec.width),
            cfg.param_dtype,
        )
        x = constrain(x + jnp.asarray(table, x.dtype)[None], HIDDEN_AXES)
        stack = layer_stack(functools.partial(EncoderLayer, spec), cfg.image_depth, scan=False)
        x, _ = run_stack(stack, x, None, (None, None), enable_dropout)
        return spec.norm(name="final_norm")(x)


def _mean_over_tokens(x: Array, lengths: Array) -> Array:
    """[B, L, D] -> [B, D]: the mean over each row's first `lengths` positions."""
    valid = (jnp.arange(x.shape[1])[None] < lengths[:, None]).astype(x.dtype)
    return jnp.sum(x * valid[..., None], 1) / jnp.maximum(valid.sum(1), 1.0)[:, None]


def _normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class DualEncoder(nn.Module):
    """Text tower + image tower + projections + the learned logit scale."""

    config: ContrastiveConfig

    def setup(self) -> None:
        cfg = self.config
        self.text_encoder = Encoder(cfg.text)
        self.image_encoder = ImageTower(cfg)
        kw = dict(use_bias=False, dtype=jnp.float32, param_dtype=cfg.param_dtype)
        self.text_projection = nn.DenseGeneral(
            cfg.embed_dim,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (EMBED, PROJECTION)
            ),
            **kw,
        )
        self.image_projection = nn.DenseGeneral(
            cfg.embed_dim,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (EMBED, PROJECTION)
            ),
            **kw,
        )
        init = math.log(1.0 / cfg.init_temperature)
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(init), ()),
            (),
            jnp.float32,
        )

    def encode_text(self, tokens: Array, enable_dropout: bool = False) -> Array:
        """Text ids [B, L] -> the text tower's token states float32 [B, L, D]."""
        return self.text_encoder(tokens, enable_dropout=enable_dropout).astype(jnp.float32)

    def embed_text(self, tokens: Array, enable_dropout: bool = False) -> Array:
        """Text ids [B, L] (0-padded, EOS last) -> unit embeddings float32 [B, E]."""
        return self._pool_text(self.encode_text(tokens, enable_dropout), tokens)

    def _pool_text(self, hidden: Array, tokens: Array) -> Array:
        return _normalize(self.text_projection(_mean_over_tokens(hidden, text_lengths(tokens))))

    def embed_image(self, images: Array, enable_dropout: bool = False) -> Array:
        """Images [B, S, S, 3] in [0, 1] -> unit embeddings float32 [B, E]."""
        return self._pool_image(self.image_encoder(images, enable_dropout=enable_dropout))

    def _pool_image(self, features: Array) -> Array:
        features = features.astype(jnp.float32)
        g = self.config.image_pool_grid
        if g == 1:
            return _normalize(self.image_projection(jnp.mean(features, 1)))
        b, n, w = features.shape
        side = math.isqrt(n)
        cells = features.reshape(b, g, side // g, g, side // g, w).mean(axis=(2, 4))
        return _normalize(self.image_projection(cells.reshape(b, g * g * w)))

    def scale(self) -> Array:
        """exp(logit_scale), capped at MAX_LOGIT_SCALE."""
        return jnp.minimum(jnp.exp(self.logit_scale), MAX_LOGIT_SCALE)

    def __call__(
        self,
        images: Array,
        tokens: Array,
        negatives: Array | None = None,
        enable_dropout: bool = False,
    ) -> dict[str, Array]:
        """The training pass: images [B, S, S, 3], their captions [B, L] and optional
        hard negatives [B, K, L] -> {'image', 'text' [B, E], 'scale', 'negatives'
        [B, K, E] (with negatives)}: one pass of the text tower over captions and
        negatives together."""
        features = self.image_encoder(images, enable_dropout=enable_dropout)
        b, length = tokens.shape
        k = 0 if negatives is None else negatives.shape[1]
        every = tokens if not k else jnp.concatenate([tokens, negatives.reshape(b * k, length)])
        hidden = self.encode_text(every, enable_dropout)
        embedded = self._pool_text(hidden, every)
        out = {"image": self._pool_image(features), "text": embedded[:b], "scale": self.scale()}
        if k:
            out["negatives"] = embedded[b:].reshape(b, k, -1)
        return out


def contrastive_loss(
    image_emb: Array,
    text_emb: Array,
    scale: Array,
    negative_emb: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Symmetric InfoNCE over a batch; returns (loss, metrics).

    image_emb, text_emb: unit embeddings [B, E], row i of each a pair.
    scale: the logit scale (exp of the learned log inverse temperature).
    negative_emb: optional [B, K, E], hard negative captions of each image:
      they join the image's softmax over captions (not the captions' over images).

    Metrics: the loss, its two directions, in-batch retrieval accuracy both ways,
    'near_miss_accuracy' (the own caption beats all K negatives) and 'temperature'.
    """
    b = image_emb.shape[0]
    logits = scale * image_emb @ text_emb.T  # [B images, B texts]
    labels = jnp.arange(b)
    image_logits = logits
    if negative_emb is not None:
        hard = scale * jnp.einsum("be,bke->bk", image_emb, negative_emb)
        image_logits = jnp.concatenate([logits, hard], axis=1)
    image_to_text = -jnp.mean(jax.nn.log_softmax(image_logits, axis=1)[labels, labels])
    text_to_image = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[labels, labels])
    loss = 0.5 * (image_to_text + text_to_image)
    metrics = {
        "loss": loss,
        "image_to_text_loss": image_to_text,
        "text_to_image_loss": text_to_image,
        "image_to_text_accuracy": jnp.mean(jnp.argmax(image_logits, 1) == labels),
        "text_to_image_accuracy": jnp.mean(jnp.argmax(logits, 0) == labels),
        "temperature": 1.0 / scale,
    }
    if negative_emb is not None:
        own = jnp.diagonal(logits)
        metrics["near_miss_accuracy"] = jnp.mean(own > jnp.max(hard, axis=1))
    return loss, metrics


def resize_images(images: np.ndarray | Array, size: int) -> Array:
    """Float images [B, H, W, 3] -> [B, size, size, 3] (area-averaged down by a whole
    factor, else bilinear), the image tower's input size."""
    images = jnp.asarray(images, jnp.float32)
    h, w = images.shape[1:3]
    if (h, w) == (size, size):
        return images
    if h == w and h % size == 0:
        f = h // size
        return images.reshape(images.shape[0], size, f, size, f, 3).mean(axis=(2, 4))
    return jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear")
