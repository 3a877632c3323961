"""`UpsamplerConfig`: the super-resolution network's one config object.

Parti's upsampler (arXiv 2206.10789, §2.4) is a WDSR-style convolutional
residual network, 12 residual blocks of 128 channels, no text conditioning;
about 15M parameters for 2x and 30M for 4x, so 4x is read as two cascaded 2x
stages. gin/upsampler/*.gin bind these fields.
"""

from __future__ import annotations

import dataclasses
import math

from parti_jax.models.config import CheckedConfig

GLOBAL_RESIDUALS = ("bicubic", "nearest")


@dataclasses.dataclass(frozen=True)
class UpsamplerConfig(CheckedConfig):
    """WDSR-A-style upsampler hyper-parameters (defaults: Parti's 256 -> 1024)."""

    # Total upscaling factor; a power of two, built from log2(scale) cascaded 2x stages.
    scale: int = 4
    # Side of the square input images (the VQGAN's output size); batches must match.
    input_size: int = 256
    # Residual blocks per 2x stage.
    num_blocks: int = 12
    # Feature channels between blocks.
    channels: int = 128
    # WDSR wide activation: the ReLU in each block runs at channels * expansion.
    expansion: int = 4
    # Scale on each block's residual branch before it is added (EDSR-style; stabilises
    # training without WDSR's weight normalisation).
    residual_scale: float = 0.1
    # Image each stage's prediction is added to: 'bicubic' or 'nearest' 2x resize of its input.
    global_residual: str = "bicubic"
    # Computation and parameter dtypes.
    dtype: str = "float32"
    weight_dtype: str = "float32"

    def __post_init__(self) -> None:
        power = 2 ** int(round(math.log2(self.scale))) if self.scale >= 2 else 0
        self.check(power == self.scale, f"scale={self.scale} must be 2, 4, 8, ...")
        for name in ("num_blocks", "channels", "expansion", "input_size"):
            self.check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        self.check_choices(global_residual=GLOBAL_RESIDUALS)

    @property
    def num_stages(self) -> int:
        """Cascaded 2x stages: log2(scale)."""
        return int(round(math.log2(self.scale)))

    @property
    def output_size(self) -> int:
        """Side of the output images: input_size * scale."""
        return self.input_size * self.scale
