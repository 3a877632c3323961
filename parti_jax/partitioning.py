"""Logical axis names, rule tables that map them onto the device mesh, and meshes.

Layers name *logical* axes only (the constants below); which mesh axis each
one lands on is decided by a rule table chosen at the edge (gin). Mesh axes
are ('data', 'fsdp', 'tensor') with Auto axis types.
"""

from __future__ import annotations

# ---------------------------------------------------------------- mesh axes
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
# Axes that split the batch: a host's data shard is its position along these.
BATCH_MESH_AXES = (DATA, FSDP)

# ------------------------------------------------------- parameter axes
EMBED = "embed"  # model width (d_model)
MLP = "mlp"  # feed-forward hidden width
HEADS = "heads"  # attention heads
KV = "kv"  # per-head width
VOCAB = "vocab"  # token vocabulary (embedding rows, logits columns)
LAYERS = "layers"  # stacked layer axis of scanned blocks
POSITION = "position"  # learned position tables
CODEBOOK = "codebook"  # VQ codebook entries
CODE_DIM = "code_dim"  # VQ lookup-space width
CONV_HEIGHT = "conv_height"  # convolution kernel rows
CONV_WIDTH = "conv_width"  # convolution kernel columns
CONV_IN = "conv_in"  # convolution input channels
CONV_OUT = "conv_out"  # convolution output channels
NORM = "norm"  # per-channel scale/bias of norms in conv nets
PATCH = "patch"  # flattened patch pixels (patch embedding / unpatchify)

# ------------------------------------------------------ activation axes
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV = "activation_kv"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
ACT_HEIGHT = "activation_height"
ACT_WIDTH = "activation_width"
ACT_CHANNELS = "activation_channels"
