"""`ModelConfig`: one frozen dataclass that describes the Parti encoder-decoder.

Sizes are gin files (gin/models/*.gin) that set these fields; library code
takes the dataclass. Every field is checked in `__post_init__`, so a bad
config fails at construction with the field named, not deep inside jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

# Decoder vocabulary is padded to a multiple of this (MXU/tensor-core friendly,
# and divisible by any tensor-parallel degree up to 128).
VOCAB_MULTIPLE = 128

MLP_ACTIVATIONS = ("gelu", "relu", "gated_gelu", "swiglu")
ATTENTION_IMPLS = ("xla", "cudnn")
DECODER_ATTENTIONS = ("full", "conv_sparse")
DROPOUT_RNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")
CONV_ATTENTION_KERNELS = ("auto", "cudnn", "splash", "banded", "dense")
DECODE_ATTENTION_KERNELS = ("reduce", "fused")
NORM_TYPES = ("layernorm", "rmsnorm")
TEXT_POSITIONS = ("learned", "rotary")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Policies that save only activations named with `jax.ad_checkpoint.checkpoint_name`
# in models/layers.py: 'query', 'key', 'value' (the projections), 'attention_out'
# (the heads' output before the output projection), 'mlp_in' (the MLP's normed input).
NAMED_REMAT_POLICIES = {
    "save_qkv_attention_out": ("query", "key", "value", "attention_out"),
    "save_qkv_attention_out_mlp_in": ("query", "key", "value", "attention_out", "mlp_in"),
}
# 'none': no rematerialisation; 'full': save nothing (recompute the whole block);
# NAMED_REMAT_POLICIES' keys: save those names only; the others name a policy in
# `jax.checkpoint_policies`.
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "everything_saveable",
    "nothing_saveable",
    *NAMED_REMAT_POLICIES,
)


def check_counts(where: str, low: int = 1, **values: Any) -> None:
    """Each of `values` is an integer >= `low` or None; the error names `<where>.<name>`."""
    for name, value in values.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            raise ValueError(f"{where}.{name}={value!r} must be an integer >= {low} or None")


def digit_weights(sizes: Sequence[int]) -> list[int]:
    """Place values of a product codebook's digits: code = sum_g digit_g * weight_g, the
    first digit most significant (weight_g = product of the later groups' sizes)."""
    return [int(np.prod(sizes[g + 1 :], dtype=np.int64)) for g in range(len(sizes))]


def check_group_sizes(sizes: Sequence[int], codebook_size: int) -> str | None:
    """Why `sizes` is not a product codebook of `codebook_size` codes (None when it is)."""
    if not sizes:
        return None
    if len(sizes) < 2 or min(sizes) < 2:
        return f"code_group_sizes={tuple(sizes)}: give () or two or more sizes >= 2"
    if int(np.prod(sizes, dtype=np.int64)) != codebook_size:
        return (
            f"code_group_sizes={tuple(sizes)} multiply to "
            f"{int(np.prod(sizes, dtype=np.int64))}, not codebook_size={codebook_size}"
        )
    return None


class CheckedConfig:
    """Mixin of the config dataclasses: the `dtype` (compute) and `weight_dtype`
    (parameters) fields as jnp dtypes, and checks whose errors name the field."""

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def param_dtype(self) -> Any:
        return DTYPES[self.weight_dtype]

    def check(self, ok: bool, message: str) -> None:
        """Raises ValueError('<class>.<message>') unless `ok`."""
        if not ok:
            raise ValueError(f"{type(self).__name__}.{message}")

    def check_choices(self, **allowed: Sequence[Any]) -> None:
        """Checks that `dtype`, `weight_dtype` and each named field hold allowed values."""
        for name, options in dict(dtype=DTYPES, weight_dtype=DTYPES, **allowed).items():
            value = getattr(self, name)
            self.check(
                value in options, f"{name}={value!r} is not one of {', '.join(map(repr, options))}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig(CheckedConfig):
    """Architecture and numerics of the text-to-image encoder-decoder."""

    # SentencePiece vocabulary size of the text encoder (pad 0, eos 1, unk 2).
    text_vocab_size: int = 16384
    # Number of VQGAN codebook entries K; decoder tokens are codes + 1 (0 = pad/BOS).
    codebook_size: int = 8192
    # Image-token grid (rows, columns); the decoder writes rows * columns tokens.
    image_grid: tuple[int, int] = (32, 32)
    # Longest text the encoder accepts (and the size of the learned position table).
    max_text_length: int = 128
    # Text positions: 'learned' (a table of absolute positions, the paper's) or
    # 'rotary' (queries and keys rotated by position, so scores depend on the offset
    # between tokens as with T5's relative bias, and fused attention still applies:
    # "at the top left" finds the words just before it wherever the caption has them).
    text_positions: str = "learned"
    # Model (residual stream) width.
    d_model: int = 1024
    # Attention heads per attention layer.
    num_heads: int = 16
    # Per-head width; None means d_model // num_heads.
    head_dim: int | None = None
    # Hidden width of the feed-forward block.
    mlp_dim: int = 4096
    # Image codes as digits of a product codebook (VQGANConfig.code_group_sizes, e.g.
    # (128, 8)): the decoder embeds a code as the sum of one embedding per digit and
    # predicts each digit with its own head (a code's log-probability is the sum of its
    # digits'), so a code never seen as a target still gets its digits' probability.
    # (): one embedding and one softmax over the codebook (the paper's).
    code_group_sizes: tuple[int, ...] = ()
    # Transformer layers in the text encoder.
    num_encoder_layers: int = 12
    # False: the encoder's layers are MLPs only, each token on its own (with learned
    # positions), so a word's state cannot carry its neighbours' attributes (the
    # context-free encoder of the compositionality experiments, docs/COMPOSITIONALITY.md).
    encoder_attention: bool = True
    # Transformer layers in the image-token decoder.
    num_decoder_layers: int = 12
    # 'gelu' / 'relu': plain 2-matrix MLP (Parti); 'gated_gelu' / 'swiglu': gated, 3 matrices.
    mlp_activation: str = "gelu"
    # Dropout on embeddings and on every residual branch (attention, MLP) in training.
    dropout_rate: float = 0.1
    # Compute dtype of matmuls and attention ('bfloat16' on accelerators, 'float32' on CPU).
    dtype: str = "bfloat16"
    # Storage dtype of parameters (and so of optimizer state).
    weight_dtype: str = "float32"
    # jax.nn.dot_product_attention implementation for full-sequence attention:
    # 'cudnn' on GPUs, 'xla' on CPU/TPU and in exported functions. Single-step
    # cached decoding always uses 'xla' (one query row; memory bound).
    attention_impl: str = "xla"
    # Decoder self-attention: 'full' causal, or 'conv_sparse' (Parti's conv-shaped
    # causal mask: the prediction of a cell sees the earlier cells in a
    # conv_kernel_size window centred on it; layers.conv_sparse_mask). Training
    # computes only the mask's band (conv_attention_kernel).
    decoder_attention: str = "full"
    # Side of the 2-D window of 'conv_sparse' attention (odd, >= 3).
    conv_kernel_size: int = 11
    # How training computes 'conv_sparse' attention: 'cudnn' (sliding window plus
    # the mask; needs attention_impl='cudnn'), 'splash' (Pallas TPU block-sparse
    # kernel; grids of a multiple of 128 tokens), 'banded' (blocks of queries over
    # static key slices, XLA on any backend), 'dense' (the masked N x N). 'auto':
    # cudnn with attention_impl='cudnn', else splash on TPU, else banded where it
    # reads at most half the keys, else dense.
    conv_attention_kernel: str = "auto"
    # Cached decoding of decoder_attention='full': None reads each layer's whole
    # self-attention cache per step (masked beyond the step); an integer (dividing
    # the image tokens) reads only the blocks of this many positions up to the step
    # (~half the cache traffic over a grid, but a dynamic loop: one host round-trip
    # per block on XLA:GPU). 'conv_sparse' decoding reads only its mask's window.
    decode_block_size: int | None = None
    # Cached decoding of decoder_attention='full' in this many loops of static
    # length (decoding.sample's `segments`): segment j's steps read the cache's
    # first e_j positions only (e_j: where it ends), a static slice; 1 reads the
    # whole preallocated cache every step. ~(1 + 1/S) / 2 of the reads, no
    # dynamic loop; each segment compiles its own loop body.
    decode_segments: int = 1
    # Attention of a cached step: 'reduce' (multiply + reduce in float32, which
    # XLA fuses with the slice of the stacked cache) or 'fused' (one
    # jax.nn.dot_product_attention per attention with the filled lengths as
    # key_value_seq_lengths, through attention_impl: a cuDNN kernel with 'cudnn').
    # 'full' self-attention without decode_block_size only.
    decode_attention_kernel: str = "reduce"
    # Generator of the dropout masks in training: 'threefry' (jax's default; the
    # same masks on every backend) or XLA's RngBitGenerator, 'rbg' / 'unsafe_rbg'
    # (far fewer operations per random bit on GPU/TPU; other masks, seeded from
    # the step's threefry key).
    dropout_rng_impl: str = "threefry"
    # Scan over layers (one compiled block, parameters stacked on a LAYERS axis).
    scan_layers: bool = True
    # Rematerialisation of each block in training: see REMAT_POLICIES.
    remat_policy: str = "none"
    # 'layernorm' (scale and bias) or 'rmsnorm' (scale only); computed in float32.
    norm_type: str = "layernorm"
    # Epsilon of every norm.
    layer_norm_epsilon: float = 1e-6
    # dtype of the output logits (float32 so the loss and sampling are exact).
    logits_dtype: str = "float32"

    def __post_init__(self) -> None:
        check = self.check
        object.__setattr__(self, "image_grid", tuple(int(v) for v in self.image_grid))
        object.__setattr__(self, "code_group_sizes", tuple(int(v) for v in self.code_group_sizes))
        check(len(self.image_grid) == 2, f"image_grid={self.image_grid} must be (rows, columns)")
        positive = ["text_vocab_size", "codebook_size", "max_text_length", "d_model", "num_heads"]
        positive += ["mlp_dim", "num_encoder_layers", "num_decoder_layers", "conv_kernel_size"]
        positive.append("decode_segments")
        optional = [n for n in ("head_dim", "decode_block_size") if getattr(self, n) is not None]
        for name in positive + optional:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            check(
                ok, f"{name}={value!r} must be a positive integer" + " or None" * (name in optional)
            )
        check(min(self.image_grid) > 0, f"image_grid={self.image_grid} must be positive")
        check(
            self.text_vocab_size > 2,
            f"text_vocab_size={self.text_vocab_size} must exceed the 3 reserved ids (pad, eos, unk)",
        )
        if self.head_dim is None:
            check(
                self.d_model % self.num_heads == 0,
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "change one of them or set head_dim explicitly",
            )
        self.check_choices(mlp_activation=MLP_ACTIVATIONS, attention_impl=ATTENTION_IMPLS)
        self.check_choices(decoder_attention=DECODER_ATTENTIONS, remat_policy=REMAT_POLICIES)
        self.check_choices(dropout_rng_impl=DROPOUT_RNG_IMPLS)
        self.check_choices(conv_attention_kernel=CONV_ATTENTION_KERNELS)
        self.check_choices(decode_attention_kernel=DECODE_ATTENTION_KERNELS)
        check(
            self.decode_attention_kernel == "reduce"
            or (self.decoder_attention == "full" and self.decode_block_size is None),
            "decode_attention_kernel='fused' applies to decoder_attention='full' without "
            "decode_block_size",
        )
        check(
            self.conv_attention_kernel != "cudnn" or self.attention_impl == "cudnn",
            "conv_attention_kernel='cudnn' needs attention_impl='cudnn'",
        )
        self.check_choices(norm_type=NORM_TYPES, text_positions=TEXT_POSITIONS, logits_dtype=DTYPES)
        problem = check_group_sizes(self.code_group_sizes, self.codebook_size)
        check(problem is None, f"{problem}; use the VQGAN's code_group_sizes")
        check(
            self.encoder_attention or self.text_positions == "learned",
            "encoder_attention=False with text_positions='rotary': rotary positions act only "
            "in attention, so the encoder would not see word order; set text_positions='learned'",
        )
        if self.text_positions == "rotary":
            check(
                self.kv_dim % 2 == 0,
                f"text_positions='rotary' needs an even head width, got {self.kv_dim}",
            )
        if (block := self.decode_block_size) is not None:
            check(
                self.num_image_tokens % block == 0,
                f"decode_block_size={block} must divide the {self.num_image_tokens} image "
                f"tokens of image_grid={self.image_grid}",
            )
            check(
                self.decoder_attention == "full",
                f"decode_block_size={block} applies to decoder_attention='full'; "
                "'conv_sparse' decoding already reads only its window (set it to None)",
            )
        if self.decode_segments > 1:
            check(
                self.decode_segments <= self.num_image_tokens,
                f"decode_segments={self.decode_segments} exceeds the {self.num_image_tokens} "
                f"image tokens of image_grid={self.image_grid}",
            )
            check(
                self.decoder_attention == "full" and self.decode_block_size is None,
                f"decode_segments={self.decode_segments} applies to decoder_attention='full' "
                "without decode_block_size (those already read less than the whole cache)",
            )
        check(
            self.conv_kernel_size % 2 == 1 and self.conv_kernel_size >= 3,
            f"conv_kernel_size={self.conv_kernel_size} must be odd and >= 3 (a window centred "
            "on the predicted cell that holds an earlier cell)",
        )
        check(0.0 <= self.dropout_rate < 1.0, f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        check(
            self.layer_norm_epsilon > 0, f"layer_norm_epsilon={self.layer_norm_epsilon} must be > 0"
        )

    # ----------------------------------------------------------- derived
    @property
    def kv_dim(self) -> int:
        """Per-head width actually used."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def decoder_vocab_size(self) -> int:
        """K codes + pad/BOS id 0, padded up to a multiple of 128."""
        return -(-(self.codebook_size + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def num_image_tokens(self) -> int:
        """Tokens the decoder writes per image (rows * columns)."""
        return self.image_grid[0] * self.image_grid[1]

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
