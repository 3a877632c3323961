"""ViT-VQGAN (arXiv 2110.04627): a ViT encoder over 8x8 patches, a factorized
l2 quantizer, and a ViT decoder back to pixels.

Encoder: patches -> linear patch embedding -> + position embedding -> pre-norm
transformer blocks -> LayerNorm -> the paper's two-layer feed-forward network
with a tanh in the middle -> quantizer (projects to code_dim, looks up, projects
up to the decoder width). Decoder: tanh feed-forward -> + position embedding ->
pre-norm blocks -> LayerNorm -> linear patch unembedding to
patch_size**2 * out_channels values per token -> pixels.

How the decoder output becomes an image (`decoder_output_to_images`):
  * output='sigmoid', logit_laplace=False: 3 channels, image = sigmoid(out).
  * output='sigmoid', logit_laplace=True: 6 channels [mu (3), log b (3)] of a
    logit-Laplace distribution over pixels squeezed into (eps, 1 - eps);
    image = (sigmoid(mu) - eps) / (1 - 2 eps). See losses.logit_laplace_nll.
  * output='linear' (Parti's fine-tuned decoder): 3 channels predicting pixels
    in [-1, 1]; image = out / 2 + 0.5, unclipped in training (`__call__`),
    clipped to [0, 1] by `decode_codes`.

Images in and out are float32 [B, H, W, 3] in [0, 1]; image tokens are int32
[B, grid, grid] in row-major patch order (token t = row * grid + col).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.partitioning import (
    ACT_BATCH,
    ACT_EMBED,
    ACT_LENGTH,
    EMBED,
    HEADS,
    KV,
    LAYERS,
    MLP,
    PATCH,
    POSITION,
)
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.quantizer import FactorizedQuantizer

Array = jax.Array

_DENSE_INIT = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros
_ONES = nn.initializers.ones


def _kernel(axes: tuple[str | None, ...], init=_DENSE_INIT):
    return nn.with_logical_partitioning(init, axes)


def _layer_norm(name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed in float32 with logically partitioned scale and bias."""
    return nn.LayerNorm(
        dtype=jnp.float32,
        scale_init=_kernel((EMBED,), _ONES),
        bias_init=_kernel((EMBED,), _ZEROS),
        name=name,
    )


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


def sincos_2d(grid: int, width: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position table [grid*grid, width] (half the channels per axis)."""
    if width % 4:
        raise ValueError(f"sinusoidal 2-D position embeddings need width % 4 == 0, got {width}")
    quarter = width // 4
    omega = 1.0 / (10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    out = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        out += [np.sin(angles), np.cos(angles)]
    return np.concatenate(out, axis=1).astype(np.float32)


def local_attention_mask(grid: int, window: int) -> np.ndarray:
    """bool [N, N] (N = grid**2, row-major patches): True where patch j lies within
    `window` grid steps of patch i along both axes."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    near = np.abs(rows[:, None] - rows[None, :]) <= window
    return near & (np.abs(cols[:, None] - cols[None, :]) <= window)


def patchify(images: Array, patch: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: Array, patch: int, grid: int, channels: int) -> Array:
    """Inverse of `patchify`: [B, grid*grid, p*p*C] -> [B, grid*p, grid*p, C]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, grid, grid, patch, patch, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * patch, grid * patch, channels)


class HeadsProjection(nn.Module):
    """[B, T, E] -> [B, T, heads, head_dim], or back with `to_heads=False`.

    The kernel is created at its full rank ([E, H, D] or [H, D, E]): nn.DenseGeneral
    calls its initializer with a flattened 2-D shape, which breaks 3-D logical
    sharding constraints under a mesh.
    """

    heads: int
    head_dim: int
    width: int
    config: VQGANConfig
    to_heads: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        if self.to_heads:
            shape, axes = (self.width, self.heads, self.head_dim), (EMBED, HEADS, KV)
            init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
            bias_shape, bias_axes, eq = (self.heads, self.head_dim), (HEADS, KV), "bte,ehd->bthd"
        else:
            shape, axes = (self.heads, self.head_dim, self.width), (HEADS, KV, EMBED)
            init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
            bias_shape, bias_axes, eq = (self.width,), (EMBED,), "bthd,hde->bte"
        kernel = self.param("kernel", _kernel(axes, init), shape, cfg.param_dtype)
        bias = self.param("bias", _kernel(bias_axes, _ZEROS), bias_shape, cfg.param_dtype)
        dtype = cfg.compute_dtype
        y = jnp.einsum(eq, x.astype(dtype), jnp.asarray(kernel, dtype))
        return y + jnp.asarray(bias, dtype)


class Attention(nn.Module):
    """Multi-head self-attention through jax.nn.dot_product_attention."""

    width: int
    heads: int
    config: VQGANConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        head_dim = self.width // self.heads
        args = (self.heads, head_dim, self.width, cfg)
        q = HeadsProjection(*args, name="query")(x)
        k = HeadsProjection(*args, name="key")(x)
        v = HeadsProjection(*args, name="value")(x)
        mask = None
        if cfg.attention_window:
            mask = jnp.asarray(local_attention_mask(cfg.grid, cfg.attention_window))[None, None]
        y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
        return HeadsProjection(*args, to_heads=False, name="out")(y)


class FeedForward(nn.Module):
    """Two dense layers with `activation` between them (GELU in blocks, tanh around the stacks)."""

    width: int
    hidden: int
    config: VQGANConfig
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = nn.Dense(
            self.hidden,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_kernel((EMBED, MLP)),
            bias_init=_kernel((MLP,), _ZEROS),
            name="wi",
        )(x)
        h = jnp.tanh(h) if self.activation == "tanh" else nn.gelu(h)
        return nn.Dense(
            self.width,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_kernel((MLP, EMBED)),
            bias_init=_kernel((EMBED,), _ZEROS),
            name="wo",
        )(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    width: int
    heads: int
    mlp_dim: int
    config: VQGANConfig
    attention: bool = True  # False: an MLP-only block, each patch on its own

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, None]:
        drop = nn.Dropout(self.config.dropout, deterministic=not train)
        if self.attention:
            y = Attention(self.width, self.heads, self.config, name="attention")(
                _layer_norm("pre_attention_norm")(x)
            )
            x = _constrain(x + drop(y).astype(x.dtype))
        y = FeedForward(self.width, self.mlp_dim, self.config, name="mlp")(
            _layer_norm("pre_mlp_norm")(x)
        )
        x = _constrain(x + drop(y).astype(x.dtype))
        return x, None


class Transformer(nn.Module):
    """`depth` blocks, unrolled or under nn.scan (parameters stacked on a 'layers' axis)."""

    width: int
    depth: int
    heads: int
    mlp_dim: int
    config: VQGANConfig
    attention: bool = True  # False: MLP-only blocks (VQGANConfig.encoder_context='patch')

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg = self.config
        block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
        args = (self.width, self.heads, self.mlp_dim, cfg, self.attention)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )(*args, name="blocks")
            x, _ = stack(x, train)
        else:
            for i in range(self.depth):
                x, _ = block(*args, name=f"block_{i}")(x, train)
        return x


class PositionEmbedding(nn.Module):
    """Adds learned ([POSITION, EMBED] table) or fixed 2-D sine-cosine position embeddings."""

    grid: int
    width: int
    config: VQGANConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.config.position_embedding == "none":
            return x
        if self.config.position_embedding == "sinusoidal":
            table = jnp.asarray(sincos_2d(self.grid, self.width))
        else:
            table = self.param(
                "table",
                _kernel((POSITION, EMBED), nn.initializers.normal(stddev=0.02)),
                (self.grid * self.grid, self.width),
                self.config.param_dtype,
            )
        return x + jnp.asarray(table, x.dtype)[None]


class ViTEncoder(nn.Module):
    """Images [B, H, W, 3] in [0, 1] -> token features [B, N, encoder_width]."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        cfg = self.config
        x = patchify(images.astype(jnp.float32) * 2.0 - 1.0, cfg.patch_size)
        x = nn.Dense(
            cfg.encoder_width,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_kernel((PATCH, EMBED)),
            bias_init=_kernel((EMBED,), _ZEROS),
            name="patch_embedding",
        )(x)
        x = PositionEmbedding(cfg.grid, cfg.encoder_width, cfg, name="position_embedding")(x)
        x = _constrain(x)
        x = Transformer(
            cfg.encoder_width,
            cfg.encoder_depth,
            cfg.encoder_heads,
            cfg.encoder_mlp_dim,
            cfg,
            attention=cfg.encoder_context == "attention",
            name="transformer",
        )(x, train)
        x = _layer_norm("final_norm")(x)
        return FeedForward(
            cfg.encoder_width, cfg.encoder_mlp_dim, cfg, activation="tanh", name="tanh_ffn"
        )(x)


class ViTDecoder(nn.Module):
    """Quantized features [B, N, decoder_width] -> raw output [B, H, W, out_channels] (f32)."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cfg = self.config
        x = FeedForward(
            cfg.decoder_width, cfg.decoder_mlp_dim, cfg, activation="tanh", name="tanh_ffn"
        )(x)
        x = PositionEmbedding(cfg.grid, cfg.decoder_width, cfg, name="position_embedding")(x)
        x = _constrain(x)
        x = Transformer(
            cfg.decoder_width,
            cfg.decoder_depth,
            cfg.decoder_heads,
            cfg.decoder_mlp_dim,
            cfg,
            name="transformer",
        )(x, train)
        x = _layer_norm("final_norm")(x)
        x = nn.Dense(
            cfg.patch_size * cfg.patch_size * cfg.out_channels,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_kernel((EMBED, PATCH)),
            bias_init=_kernel((PATCH,), _ZEROS),
            name="patch_unembedding",
        )(x)
        return unpatchify(x.astype(jnp.float32), cfg.patch_size, cfg.grid, cfg.out_channels)


def decoder_output_to_images(output: Array, config: VQGANConfig) -> Array:
    """Raw decoder output -> images [B, H, W, 3] (unclipped; see the module docstring)."""
    if config.logit_laplace:
        eps = config.logit_laplace_eps
        return (jax.nn.sigmoid(output[..., :3]) - eps) / (1.0 - 2.0 * eps)
    if config.output == "sigmoid":
        return jax.nn.sigmoid(output)
    return output * 0.5 + 0.5


class ViTVQGAN(nn.Module):
    """The image tokenizer: `__call__` (training), `encode` (image tokens), `decode_codes`."""

    config: VQGANConfig

    def setup(self) -> None:
        cfg = self.config
        self.encoder = ViTEncoder(cfg)
        self.quantizer = FactorizedQuantizer(
            codebook_size=cfg.codebook_size,
            code_dim=cfg.code_dim,
            out_dim=cfg.decoder_width,
            beta=cfg.beta,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
        )
        self.decoder = ViTDecoder(cfg)

    def _check_images(self, images: Array) -> None:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(
                f"image batch has shape {tuple(images.shape)} but VQGANConfig.image_size="
                f"{size} expects [B, {size}, {size}, 3]; resize the images or set "
                "VQGANConfig.image_size to match"
            )

    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        """Reconstructs images [B, H, W, 3] in [0, 1].

        Returns:
          (recon [B, H, W, 3] float32, unclipped, aux): aux holds the quantizer's
          entries (`codes` int32 [B, grid, grid], `latents`, `vq_loss`,
          `codebook_loss`, `commitment_loss`, `code_counts`, `perplexity`,
          `usage`) and `decoder_output` (raw float32 [B, H, W, out_channels],
          what losses.logit_laplace_nll reads).
        """
        self._check_images(images)
        features = self.encoder(images, train)
        quantized, aux = self.quantizer(features)
        output = self.decoder(quantized, train)
        b, g = images.shape[0], self.config.grid
        aux = dict(aux, codes=aux["codes"].reshape(b, g, g), decoder_output=output)
        return decoder_output_to_images(output, self.config), aux

    def encode(self, images: Array) -> Array:
        """Images [B, H, W, 3] in [0, 1] -> image tokens int32 [B, grid, grid]."""
        self._check_images(images)
        latents = self.quantizer.project(self.encoder(images, False))
        g = self.config.grid
        return self.quantizer.lookup(latents).reshape(images.shape[0], g, g)

    def decode_codes(self, codes: Array) -> Array:
        """Image tokens int32 [B, grid, grid] (or [B, grid*grid]) -> images [B, H, W, 3] in [0, 1]."""
        cfg = self.config
        if codes.ndim == 2 and codes.shape[1] == cfg.num_tokens:
            codes = codes.reshape(codes.shape[0], cfg.grid, cfg.grid)
        if codes.ndim != 3 or codes.shape[1:] != (cfg.grid, cfg.grid):
            raise ValueError(
                f"image tokens have shape {tuple(codes.shape)} but this VQGAN's grid is "
                f"{cfg.grid}x{cfg.grid} (VQGANConfig.image_size={cfg.image_size}, patch_size="
                f"{cfg.patch_size}); pass codes from the VQGAN that made them"
            )
        if not isinstance(codes, jax.core.Tracer):
            lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
            if lo < 0 or hi >= cfg.codebook_size:
                raise ValueError(
                    f"image tokens range over [{lo}, {hi}] but VQGANConfig.codebook_size="
                    f"{cfg.codebook_size}; codes must lie in [0, {cfg.codebook_size - 1}] "
                    "(decoder token ids are codes + 1: subtract the offset first)"
                )
        b = codes.shape[0]
        quantized = self.quantizer.embed_codes(codes.reshape(b, cfg.num_tokens).astype(jnp.int32))
        output = self.decoder(quantized, False)
        return jnp.clip(decoder_output_to_images(output, cfg), 0.0, 1.0)


def param_count(tree: Any) -> int:
    """Number of scalars in a (possibly boxed, possibly abstract) parameter tree."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
    return int(sum(np.prod(leaf.shape) for leaf in leaves))
