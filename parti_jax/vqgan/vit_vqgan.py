"""ViT-VQGAN (arXiv 2110.04627): a ViT encoder over 8x8 patches, a factorized
l2 quantizer, and a ViT decoder back to pixels, built from `models/layers.py`.

Encoder: patches -> linear patch embedding -> + positions -> pre-norm layers
-> LayerNorm -> the paper's two-layer tanh feed-forward -> quantizer. Decoder:
+ positions -> layers -> LayerNorm -> tanh feed-forward -> linear patch
unembedding to patch_size**2 * out_channels values per token. With
`VQGANConfig.decoder_tanh_ffn='before'` (the older layout) the decoder's tanh
feed-forward comes before its layers instead. Every dense has xavier-uniform
kernels and zero biases. Parameters: 'encoder' / 'decoder' hold
'patch_embedding', 'position_embedding', 'transformer' ('layers_<i>' or one
scanned 'layers'), 'final_norm', 'tanh_ffn', 'patch_unembedding'; 'quantizer'
holds the projections and the codebook.

Images in and out are float32 [B, H, W, 3] in [0, 1]; image tokens are int32
[B, grid, grid] in row-major patch order (token t = row * grid + col).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.models.layers import HIDDEN_AXES, EncoderLayer, LayerSpec, Mlp, Stack, constrain
from parti_jax.partitioning import EMBED, PATCH, POSITION
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.quantizer import FactorizedQuantizer

Array = jax.Array


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


def check_images(images: Array, size: int, field: str, fix: str) -> None:
    """Raises unless `images` is [B, size, size, 3]; the error names `field` and `fix`."""
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"image batch has shape {tuple(images.shape)} but {field}={size} expects "
            f"[B, {size}, {size}, 3]; {fix}"
        )


def layer_spec(config: VQGANConfig, side: str) -> LayerSpec:
    """The layers of the 'encoder' or 'decoder' stack."""
    width, heads = getattr(config, f"{side}_width"), getattr(config, f"{side}_heads")
    return LayerSpec(
        width=width,
        num_heads=heads,
        head_dim=width // heads,
        mlp_dim=getattr(config, f"{side}_mlp_dim"),
        activation="gelu",
        use_bias=True,
        kernel_init="xavier",
        dtype=config.compute_dtype,
        param_dtype=config.param_dtype,
        attention_impl=config.attention_impl,
        dropout_rate=config.dropout,
    )


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
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=0.02), (POSITION, EMBED)
                ),
                (self.grid * self.grid, self.width),
                self.config.param_dtype,
            )
        return x + jnp.asarray(table, x.dtype)[None]


class ViTStack(nn.Module):
    """The encoder or the decoder (`side`) of the ViT-VQGAN (see the module docstring).

    'encoder': images [B, H, W, 3] in [0, 1] -> features [B, N, encoder_width];
    'decoder': quantized features [B, N, decoder_width] -> raw output
    [B, H, W, out_channels] in float32.
    """

    config: VQGANConfig
    side: str

    @nn.compact
    def __call__(self, x: Array, enable_dropout: bool = False) -> Array:
        cfg, encoder = self.config, self.side == "encoder"
        spec = layer_spec(cfg, self.side)
        # The paper's two-layer feed-forward network with a tanh in the middle.
        tanh_ffn = Mlp(dataclasses.replace(spec, activation="tanh"), name="tanh_ffn")
        if encoder:
            x = patchify(x.astype(jnp.float32) * 2.0 - 1.0, cfg.patch_size)
            x = spec.dense((spec.width,), (PATCH, EMBED), name="patch_embedding")(x)
        elif cfg.decoder_tanh_ffn == "before":
            x = tanh_ffn(x)
        x = PositionEmbedding(cfg.grid, spec.width, cfg, name="position_embedding")(x)
        mask = None
        if cfg.attention_window:
            mask = jnp.asarray(local_attention_mask(cfg.grid, cfg.attention_window))[None, None]
        attention = not encoder or cfg.encoder_context == "attention"
        layer = functools.partial(EncoderLayer, spec, attention=attention)
        depth = getattr(cfg, f"{self.side}_depth")
        stack = Stack(layer, depth, scan=cfg.scan_layers, remat=cfg.remat, name="transformer")
        x, _ = stack(constrain(x, HIDDEN_AXES), None, (None, mask), enable_dropout)
        x = spec.norm(name="final_norm")(x)
        if encoder or cfg.decoder_tanh_ffn == "after":
            x = tanh_ffn(x)
        if encoder:
            return x
        pixels = (cfg.patch_size**2 * cfg.out_channels,)
        x = spec.dense(pixels, (EMBED, PATCH), name="patch_unembedding")(x)
        return unpatchify(x.astype(jnp.float32), cfg.patch_size, cfg.grid, cfg.out_channels)


def decoder_output_to_images(output: Array, config: VQGANConfig) -> Array:
    """Raw decoder output -> images [B, H, W, 3], unclipped.

    'sigmoid': sigmoid(out); with logit_laplace the first 3 of 6 channels are
    the logit-Laplace mean mu (see losses.logit_laplace_nll) and the image is
    (sigmoid(mu) - eps) / (1 - 2 eps). 'linear' (Parti's fine-tuned decoder):
    out predicts pixels in [-1, 1], so out / 2 + 0.5 (`decode_codes` clips).
    """
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
        self.encoder = ViTStack(cfg, "encoder")
        sizes = (cfg.codebook_size, cfg.code_dim, cfg.decoder_width, cfg.beta)
        self.quantizer = FactorizedQuantizer(
            *sizes, cfg.compute_dtype, cfg.param_dtype, group_sizes=tuple(cfg.code_group_sizes)
        )
        self.decoder = ViTStack(cfg, "decoder")

    def _check_images(self, images: Array) -> None:
        fix = "resize the images or set VQGANConfig.image_size to match"
        check_images(images, self.config.image_size, "VQGANConfig.image_size", fix)

    def __call__(
        self, images: Array, enable_dropout: bool = False
    ) -> tuple[Array, dict[str, Array]]:
        """Reconstructs images [B, H, W, 3] in [0, 1] (dropout only with `enable_dropout`).

        Returns:
          (recon [B, H, W, 3] float32, unclipped, aux): aux holds the quantizer's
          entries (`codes` int32 [B, grid, grid], `latents`, `vq_loss`,
          `codebook_loss`, `commitment_loss`, `code_counts`, `perplexity`,
          `usage`) and `decoder_output` (raw float32 [B, H, W, out_channels],
          what losses.logit_laplace_nll reads).
        """
        self._check_images(images)
        quantized, aux = self.quantizer.quantize(self._latents(images, enable_dropout))
        output = self.decoder(quantized, enable_dropout)
        b, g = images.shape[0], self.config.grid
        aux = dict(aux, codes=aux["codes"].reshape(b, g, g), decoder_output=output)
        return decoder_output_to_images(output, self.config), aux

    def encode(self, images: Array) -> Array:
        """Images [B, H, W, 3] in [0, 1] -> image tokens int32 [B, grid, grid]."""
        self._check_images(images)
        latents = self._latents(images)
        g = self.config.grid
        return self.quantizer.lookup(latents).reshape(images.shape[0], g, g)

    def _latents(self, images: Array, enable_dropout: bool = False) -> Array:
        """Lookup-space latents [B, N, code_dim]: the encoder on the image, or with
        code_group_views='value_color' on its value view (group 0) and its colour view
        (group 1)."""
        if self.config.code_group_views == "shared":
            return self.quantizer.project(self.encoder(images, enable_dropout))
        views = value_color_views(images, self.config.patch_size)
        return self.quantizer.project_views([self.encoder(v, enable_dropout) for v in views])

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
        output = self.decoder(quantized)
        return jnp.clip(decoder_output_to_images(output, cfg), 0.0, 1.0)


def value_color_views(images: Array, patch: int) -> tuple[Array, Array]:
    """(value view, colour view) of images [B, H, W, 3] in [0, 1], per patch:

    - value: the max over channels divided by the patch's largest value, in all three
      channels: where the patch is bright, not how bright or in what hue (shape);
    - colour: the patch filled with one colour, sum(rgb) / sum(value) (the hue and
      saturation of its pixels) times the patch's largest value (colour, not shape).
    """
    b, h, w, _ = images.shape
    tiles = (b, h // patch, patch, w // patch, patch)
    rgb = images.reshape(*tiles, 3)
    value = jnp.max(rgb, axis=-1, keepdims=True)
    peak = jnp.max(value, axis=(2, 4), keepdims=True)
    shape = jnp.broadcast_to(value / (peak + 1e-6), (*tiles, 3)).reshape(images.shape)
    chroma = rgb.sum((2, 4), keepdims=True) / (value.sum((2, 4), keepdims=True) + 1e-6)
    color = jnp.broadcast_to(chroma * peak, (*tiles, 3)).reshape(images.shape)
    return shape, color
