"""`VQGANConfig`: one frozen config object for the ViT-VQGAN image tokenizer.

Sizes follow the ViT-VQGAN paper (arXiv 2110.04627, Table 1), counted per
stack: Small (8 blocks, d 512, mlp 2048, 8 heads), Base (12, 768, 3072, 12),
Large (32, 1280, 5120, 16). Encoder and decoder are sized separately because
Parti pairs a Small encoder with a Large decoder fine-tuned afterwards on the
frozen encoder and codebook (and without the final sigmoid). The gin files in
gin/vqgan/ bind these fields; library code receives the dataclass.
"""

from __future__ import annotations

import dataclasses

from parti_jax.models.config import CheckedConfig, check_group_sizes

OUTPUTS = ("sigmoid", "linear")
POSITION_EMBEDDINGS = ("learned", "sinusoidal", "none")
ENCODER_CONTEXTS = ("attention", "patch")
ATTENTION_IMPLS = ("xla", "cudnn", None)
TANH_FFN_PLACES = ("before", "after")


@dataclasses.dataclass(frozen=True)
class VQGANConfig(CheckedConfig):
    """ViT-VQGAN hyper-parameters (defaults: the paper's Small, 256px, 8x8 patches)."""

    # Side of the square input images in pixels; every batch must match it.
    image_size: int = 256
    # Side of the non-overlapping square patches that become tokens (8 in the paper).
    patch_size: int = 8
    # Encoder transformer width (d_model), blocks, attention heads and MLP hidden width.
    encoder_width: int = 512
    encoder_depth: int = 8
    encoder_heads: int = 8
    encoder_mlp_dim: int = 2048
    # Decoder transformer width, blocks, heads and MLP hidden width.
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    # Number of codebook entries K; image tokens are integers in [0, K).
    codebook_size: int = 8192
    # Width of the factorized lookup space (the encoder output is projected to it).
    code_dim: int = 32
    # Product quantization: the lookup vector splits into len(code_group_sizes) equal
    # slices, each l2-normalised and matched against its own codebook of that many
    # entries; a code is the slices' indices as digits, most significant first
    # (code = a_0 * k_1 * ... + ... + a_last; their product is codebook_size).
    # (): one codebook (the paper's). With an encoder-decoder of the same
    # ModelConfig.code_group_sizes, each image position is predicted digit by digit
    # (docs/COMPOSITIONALITY.md).
    code_group_sizes: tuple[int, ...] = ()
    # What each group's slice reads: 'shared' (the encoder's output on the image, all
    # groups) or 'value_color' (two groups, a patch-only encoder: group 0 reads the
    # image's value, max over channels, so it sees shape and not hue; group 1 reads
    # each patch's value-weighted mean colour scaled to a maximum of 1, so it sees hue
    # and not shape): image tokens whose two digits split shape from colour
    # (docs/COMPOSITIONALITY.md).
    code_group_views: str = "shared"
    # Commitment weight in the VQ loss ||sg[z] - e||^2 + beta ||z - sg[e]||^2.
    beta: float = 0.25
    # Decoder output: 'sigmoid' squashes pixels into [0, 1]; 'linear' (Parti's
    # fine-tuned decoder) leaves them unbounded in training and clips at inference.
    output: str = "sigmoid"
    # Predict a per-pixel logit-Laplace distribution (6 output channels: mu and
    # log b in logit space, see losses.logit_laplace_nll); needs output='sigmoid'.
    logit_laplace: bool = False
    # Images are squeezed into (eps, 1 - eps) for the logit-Laplace likelihood (DALL-E: 0.1).
    logit_laplace_eps: float = 0.1
    # 'learned' position tables, fixed 2-D 'sinusoidal' ones (no parameters), or
    # 'none': with local attention (attention_window > 0) the stacks are then
    # translation-equivariant, and a patch's code does not depend on where it is.
    position_embedding: str = "learned"
    # Computation dtype of matmuls and attention (bfloat16 on accelerators);
    # norms, the quantizer lookup and the outputs stay float32.
    dtype: str = "float32"
    # Parameter dtype (float32: optimizer state and weights).
    weight_dtype: str = "float32"
    # Dropout rate on attention outputs and MLP outputs inside the blocks.
    dropout: float = 0.0
    # Local attention: each patch attends only to patches within this many grid
    # steps (Chebyshev distance: 1 is a 3x3 neighbourhood), in both stacks;
    # 0 (the paper's) attends globally. Local attention keeps a patch's code a
    # function of its neighbourhood, so a flat background is one code wherever
    # it is, rather than a code that also says where the objects are. Passed to
    # jax.nn.dot_product_attention as a boolean mask (tested on the XLA path).
    attention_window: int = 0
    # What a patch's code may depend on: 'attention' (the paper's: the encoder's
    # blocks attend across patches, within attention_window) or 'patch' (MLP-only
    # encoder blocks: a code is a function of the patch's own pixels, so a
    # background patch next to an object gets the background's code and the
    # encoder-decoder meets an object's code only where it is drawn).
    encoder_context: str = "attention"
    # jax.nn.dot_product_attention implementation: 'xla', 'cudnn' (GPU) or None (jax picks).
    attention_impl: str | None = "xla"
    # Stack each stack's blocks with nn.scan (one compiled block; parameters get a 'layers' axis).
    scan_layers: bool = False
    # Rematerialise each block in the backward pass (saves activation memory).
    remat: bool = False
    # Where the decoder's tanh feed-forward sits: 'after' its blocks and final
    # norm, just before the patch unembedding (the paper's: "at the output of
    # transformer blocks", as in the encoder), or 'before' its blocks (the layout
    # of VQGANs trained before this field existed, e.g. gin/vqgan/shapes.gin).
    # Both layouts have the same parameters but compute different functions.
    decoder_tanh_ffn: str = "after"

    def __post_init__(self) -> None:
        check = self.check
        object.__setattr__(self, "code_group_sizes", tuple(int(v) for v in self.code_group_sizes))
        check(
            self.image_size % self.patch_size == 0,
            f"image_size={self.image_size} is not a multiple of VQGANConfig.patch_size="
            f"{self.patch_size}; pick sizes that divide",
        )
        check(
            self.attention_window >= 0,
            f"attention_window={self.attention_window}: must be >= 0 "
            "(0: global attention; w: a (2w+1)x(2w+1) neighbourhood of patches)",
        )
        for side in ("encoder", "decoder"):
            width, heads = getattr(self, f"{side}_width"), getattr(self, f"{side}_heads")
            check(
                width % heads == 0,
                f"{side}_width={width} is not divisible by VQGANConfig.{side}_heads={heads}",
            )
        problem = check_group_sizes(self.code_group_sizes, self.codebook_size)
        check(problem is None, str(problem))
        groups = max(1, len(self.code_group_sizes))
        check(
            self.code_dim % groups == 0,
            f"code_dim={self.code_dim} is not divisible by the {groups} code groups",
        )
        check(
            self.code_group_views in ("shared", "value_color"),
            f"code_group_views={self.code_group_views!r}: one of 'shared', 'value_color'",
        )
        check(
            self.code_group_views == "shared"
            or (len(self.code_group_sizes) == 2 and self.encoder_context == "patch"),
            "code_group_views='value_color' needs two code_group_sizes and encoder_context='patch' "
            "(each digit a function of one view of its own patch)",
        )
        self.check_choices(output=OUTPUTS, position_embedding=POSITION_EMBEDDINGS)
        self.check_choices(encoder_context=ENCODER_CONTEXTS, attention_impl=ATTENTION_IMPLS)
        self.check_choices(decoder_tanh_ffn=TANH_FFN_PLACES)
        check(
            not self.logit_laplace or self.output == "sigmoid",
            "logit_laplace=True needs VQGANConfig.output='sigmoid' (the likelihood lives in "
            "logit space); set logit_laplace=False for a linear decoder",
        )
        check(
            0.0 < self.logit_laplace_eps < 0.5,
            f"logit_laplace_eps={self.logit_laplace_eps} must be in (0, 0.5)",
        )

    @property
    def grid(self) -> int:
        """Image tokens per side: image_size // patch_size."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: grid ** 2."""
        return self.grid * self.grid

    @property
    def out_channels(self) -> int:
        """Channels per pixel predicted by the decoder: 6 (mu, log b) with logit-Laplace, else 3."""
        return 6 if self.logit_laplace else 3
