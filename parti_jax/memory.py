"""Per-device memory of an encoder-decoder training run, before a pod is booked.

`train_memory(..., method=...)`: 'analytic' (no devices, seconds for any size)
sizes the train state exactly from the real parameter and optimizer trees and
sharding rules on an `AbstractMesh` of the target's degrees, and gradients,
activations and logits from a formula (`activation_bytes`); 'compiled' reads
XLA's buffer assignment of the real train step (`abstract_train_step`) on a
mesh of this process's devices. With CPU devices faked by
`--xla_force_host_platform_device_count=N` that gives a per-device figure for a
mesh of the target's size without the target (XLA:CPU's fusion and layouts
differ a little from TPU / GPU). `HardwareTarget` names the machine a run file
is written for; `parti-jax benchmark memory --gin_file=runs/X.gin` prints both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from parti_jax import partitioning
from parti_jax.models.config import NAMED_REMAT_POLICIES, ModelConfig
from parti_jax.models.layers import GATED_ACTIVATIONS, banded_block_size, conv_band
from parti_jax.partitioning import MeshConfig
from parti_jax.train.optimizers import OptimizerConfig

GIB = 2**30
_AXES = partitioning.MESH_AXES
_KINDS = ("params", "optimizer_state", "gradients", "activations", "logits", "batch")


@dataclasses.dataclass(frozen=True)
class HardwareTarget:
    """The machine a run file is written for (gin: `HardwareTarget.*`)."""

    # Human-readable name, e.g. 'TPU v4-128 (64 chips)' or '8 nodes x 8 H100-80GB'.
    name: str = "8 CPU devices"
    # JAX devices the mesh spans (TPU v4/v5p: chips; v2/v3: cores; GPUs).
    num_devices: int = 8
    # JAX devices per host (processes = num_devices / devices_per_host).
    devices_per_host: int = 4
    # Memory of one device in GiB (TPU v4: 32, v5p: 95, v5e: 16, H100: 80).
    device_memory_gib: float = 16.0

    def __post_init__(self) -> None:
        counts = {"num_devices": self.num_devices, "devices_per_host": self.devices_per_host}
        partitioning.check_degrees(counts, "HardwareTarget", fill=False)
        if self.num_devices % self.devices_per_host:
            raise ValueError(
                f"HardwareTarget.devices_per_host={self.devices_per_host} does not divide "
                f"num_devices={self.num_devices}"
            )
        if not self.device_memory_gib > 0:
            raise ValueError(
                f"HardwareTarget.device_memory_gib={self.device_memory_gib!r} must be > 0"
            )

    @property
    def num_hosts(self) -> int:
        return self.num_devices // self.devices_per_host


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device holds at the peak of a train step, by kind."""

    method: str  # 'analytic' or 'compiled (<platform>)'
    mesh: Mapping[str, int]  # data / fsdp / tensor degrees (ICI x DCN folded)
    batch_per_device: int  # rows of the global batch per data x fsdp position
    micro_batch_per_device: int  # rows per micro-batch (what activations scale with)
    params: int = 0
    optimizer_state: int = 0
    gradients: int = 0  # gradients, the accumulator, optimizer-update temporaries
    activations: int = 0  # saved for backward plus the working set of one layer
    logits: int = 0  # float32 logits and their gradient (whole or one chunk)
    batch: int = 0
    compiled: Mapping[str, int] = dataclasses.field(default_factory=dict)  # XLA's sizes

    @property
    def state(self) -> int:
        """The train state (params + optimizer state) on one device."""
        return self.params + self.optimizer_state

    @property
    def total(self) -> int:
        if self.compiled:
            c = self.compiled
            return c["argument"] + c["output"] - c["alias"] + c["temp"]
        return sum(getattr(self, k) for k in _KINDS)

    def gib(self) -> dict[str, float]:
        """The figures in GiB (rounded to 0.01) for reports."""
        out = {k: round(getattr(self, k) / GIB, 2) for k in _KINDS}
        out.update({f"compiled_{k}": round(v / GIB, 2) for k, v in self.compiled.items()})
        out["total"] = round(self.total / GIB, 2)
        return out

    def fits(self, target: HardwareTarget, headroom: float = 0.9) -> bool:
        """Whether the total is within `headroom` of the target's device memory."""
        return self.total <= headroom * target.device_memory_gib * GIB


# ------------------------------------------------------------------ helpers


def abstract_mesh(degrees: Mapping[str, int]) -> jax.sharding.AbstractMesh:
    """A device-free ('data', 'fsdp', 'tensor') mesh with Auto axes."""
    return jax.sharding.AbstractMesh(
        tuple(degrees[a] for a in _AXES), _AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3
    )


def _shard_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of `tree` (its leaves' own shardings when `shardings` is None)."""
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        shards = [a.sharding for a in leaves]
    else:
        shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return sum(
        math.prod(s.shard_shape(tuple(a.shape))) * np.dtype(a.dtype).itemsize
        for a, s in zip(leaves, shards, strict=True)
    )


def state_bytes(
    config: ModelConfig,
    optimizer_config: OptimizerConfig,
    degrees: Mapping[str, int],
    rules: Any,
    text_length: int,
) -> tuple[int, int]:
    """(params, optimizer state) bytes on one device, from the real trees and shardings."""
    from parti_jax import loading
    from parti_jax.train import optimizers

    mesh = abstract_mesh(degrees)
    params = loading.t2i_abstract_params(config, text_length, mesh=mesh, rules=rules)
    opt_state = jax.eval_shape(optimizers.make_optimizer(optimizer_config).init, params)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    opt_shardings = optimizers.optimizer_state_shardings(opt_state, param_shardings, mesh)
    return _shard_bytes(params), _shard_bytes(opt_state, opt_shardings)


def _rows(batch_size: int, mesh: Any, num_micro_batches: int) -> tuple[int, int]:
    """(rows per data x fsdp position, rows per micro-batch); errors name the numbers."""
    n = partitioning.batch_devices(mesh)
    if batch_size < 1 or batch_size % (n * num_micro_batches):
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of the mesh's data x fsdp = "
            f"{n} devices times num_micro_batches={num_micro_batches}"
        )
    return batch_size // n, batch_size // n // num_micro_batches


def _widths(config: ModelConfig) -> tuple[int, int]:
    """(attention width heads x head_dim, MLP input kernels: 2, or 3 when gated)."""
    gated = config.mlp_activation in GATED_ACTIVATIONS
    return config.num_heads * config.kv_dim, 3 if gated else 2


def activation_bytes(config: ModelConfig, rows: int, text_length: int, tensor: int) -> int:
    """Activation bytes of one micro-batch of `rows` rows on one device.

    Counted per layer in the compute dtype c (elements x c), with the rows'
    heads / MLP / vocabulary split over `tensor`:
      residual stream: 3 (carry, after attention, after cross-attention);
      norm outputs: 3; attention q, k, v, context: 4/t (self), q + context 2/t
      plus k, v over the text (cross); MLP pre- and post-activation 2 F/D/t;
      attention probabilities in float32 plus the compute-dtype copy
      (heads/t x queries x keys; 'conv_sparse' self-attention computed in
      blocks: keys = block + band - 1, `layers.banded_block_size`); dropout
      masks 1 byte per element, 3 per layer.
    remat_policy 'none' keeps that for every layer, plus one layer's set of
    backward temporaries. 'full' / 'nothing_saveable'
    keep only the carry per layer plus twice one layer's set (recompute and
    its gradient). The named policies (NAMED_REMAT_POLICIES) keep the carry,
    the attention q, k, v and context (and the MLP input) per layer plus twice
    one layer's set. Other policies (dots saveable) keep the carry and the
    matmul outputs (everything but norm outputs and masks) per layer, plus
    one layer's set. Logits are counted apart (`train_memory`).
    """
    c = np.dtype(config.compute_dtype).itemsize
    t = tensor
    d, f, h = config.d_model, config.mlp_dim, config.num_heads
    n, s = config.num_image_tokens, text_length
    attn, mlp_mats = _widths(config)
    keys = n
    if config.decoder_attention == "conv_sparse":
        band = conv_band(config.image_grid, config.conv_kernel_size)
        block = banded_block_size(n, band)
        keys = n if block is None else block + band - 1
    named = NAMED_REMAT_POLICIES.get(config.remat_policy, ())

    def layer(q_len: int, cross: bool) -> tuple[float, float, float, float]:
        """(whole saved set, matmul outputs only, named activations, carry) in bytes
        for one layer (the named ones with the carry)."""
        tokens = rows * q_len
        residual = 3 if cross else 2
        norms = 3 if cross else 2
        attention = tokens * attn * 4 / t  # q, k, v, context
        probs = rows * h / t * q_len * (keys if cross else q_len) * (4 + c)
        if cross:
            attention += tokens * attn * 2 / t + rows * s * attn * 2 / t
            probs += rows * h / t * q_len * s * (4 + c)
        dots_bytes = (attention + tokens * f * mlp_mats / t) * c + probs
        whole = dots_bytes + (residual + norms) * tokens * d * c + residual * tokens * d
        carry = tokens * d * c
        named_bytes = attention * c + carry * (1 + ("mlp_in" in named))
        return whole, dots_bytes + carry, named_bytes, carry

    total = 0.0
    for q_len, cross, num_layers in (
        (s, False, config.num_encoder_layers),
        (n, True, config.num_decoder_layers),
    ):
        whole, dots, named_bytes, carry = layer(q_len, cross)
        if config.remat_policy == "none":
            total += (num_layers + 1) * whole  # + one layer's backward temporaries
        elif config.remat_policy in ("full", "nothing_saveable"):
            total += num_layers * carry + 2 * whole
        elif named:
            total += num_layers * named_bytes + 2 * whole
        else:
            total += num_layers * dots + whole
        # Embeddings, dropout mask and final norm of the stack.
        total += rows * q_len * d * (3 * c + 1)
    return int(total)


def train_memory(
    config: ModelConfig,
    *,
    target: HardwareTarget,
    mesh_config: MeshConfig,
    batch_size: int,
    text_length: int = 128,
    optimizer_config: OptimizerConfig | None = None,
    num_micro_batches: int = 1,
    loss_chunk_size: int | None = None,
    method: str = "analytic",
) -> MemoryEstimate:
    """Per-device memory of one train step on `target` (see the module docstring).

    'analytic' counts gradients as one float32 copy of the parameter shard, a
    second for the micro-batch accumulator (num_micro_batches > 1), and one
    more for the optimizer update's temporaries; with fsdp > 1 also two
    decoder layers' gathered weights and their unreduced gradients.
    'compiled' compiles the step on the first `target.num_devices` devices of
    this process.
    """
    optimizer_config = optimizer_config or OptimizerConfig()
    run = dict(
        batch_size=batch_size,
        text_length=text_length,
        optimizer_config=optimizer_config,
        num_micro_batches=num_micro_batches,
        loss_chunk_size=loss_chunk_size,
    )
    if method == "compiled":
        return _compiled_train_memory(config, mesh_config, target.num_devices, run)
    if method != "analytic":
        raise ValueError(f"method={method!r}: expected 'analytic' or 'compiled'")
    degrees = mesh_config.degrees(target.num_devices)
    mesh = abstract_mesh(degrees)
    per_device, rows = _rows(batch_size, mesh, num_micro_batches)
    partitioning.check_mesh_compat(config, mesh, mesh_config.rule_table)
    params, opt_state = state_bytes(
        config, optimizer_config, degrees, mesh_config.rule_table, text_length
    )
    chunk = loss_chunk_size or config.num_image_tokens
    vocab = config.decoder_vocab_size / degrees["tensor"]
    grads = params * (3 if num_micro_batches > 1 else 2)
    if degrees["fsdp"] > 1:
        # FSDP gathers a layer's weights (float32, then cast) before using them and
        # reduce-scatters its gradients: count two decoder layers' worth in flight.
        attn, mlp_mats = _widths(config)
        layer = 8 * config.d_model * attn + mlp_mats * config.d_model * config.mlp_dim
        grads += int(2 * layer / degrees["tensor"] * 4 * 2)
    return MemoryEstimate(
        method="analytic",
        mesh=degrees,
        batch_per_device=per_device,
        micro_batch_per_device=rows,
        params=params,
        optimizer_state=opt_state,
        gradients=grads,
        activations=activation_bytes(config, rows, text_length, degrees["tensor"]),
        logits=int(rows * chunk * vocab * 4 * 3),
        batch=per_device * (text_length + 3 * config.num_image_tokens) * 4,
    )


def report(estimate: MemoryEstimate, **run: Any) -> dict[str, Any]:
    """The JSON fields of `parti-jax benchmark memory` for an estimate of `train_memory(**run)`."""
    target = run["target"]
    return {
        "method": estimate.method,
        "target": target.name,
        "num_devices": target.num_devices,
        "device_memory_gib": target.device_memory_gib,
        "mesh": dict(estimate.mesh),
        "rules": run["mesh_config"].rules,
        "batch_size": run["batch_size"],
        "batch_per_device": estimate.batch_per_device,
        "num_micro_batches": run.get("num_micro_batches", 1),
        "micro_batch_per_device": estimate.micro_batch_per_device,
        "remat_policy": run["config"].remat_policy,
        "gib_per_device": estimate.gib(),
        "fits_90_percent": estimate.fits(target),
    }


@dataclasses.dataclass(frozen=True)
class AbstractTrainStep:
    """The trainer's step (`t2i.train_task`) jitted as the loop jits it, with abstract inputs."""

    mesh: jax.sharding.Mesh
    rules: Any
    task: Any  # loop.TrainTask: init, optimizer, step
    state: Any  # TrainState of ShapeDtypeStructs carrying their shardings
    batch: dict[str, jax.ShapeDtypeStruct]  # the four batch keys, sharded on the batch axes
    jitted: Any  # loop.compile_step: in/out shardings, donated state

    def compile(self) -> Any:
        """The compiled executable (what `memory_analysis` and the benchmark use)."""
        with partitioning.with_sharding_rules(self.mesh, self.rules):
            return self.jitted.lower(self.state, self.batch).compile()


def abstract_train_step(
    config: ModelConfig,
    *,
    mesh_config: MeshConfig,
    batch_size: int,
    text_length: int = 128,
    optimizer_config: OptimizerConfig | None = None,
    num_micro_batches: int = 1,
    loss_chunk_size: int | None = None,
    devices: Sequence[Any] | None = None,
) -> AbstractTrainStep:
    """The train step on a mesh of `devices` (default: all); nothing is allocated.

    Errors (before anything compiles) name a mesh that does not fit the model
    or a batch that does not divide over the batch axes.
    """
    from parti_jax.train import loop, t2i
    from parti_jax.train.state import sharded_train_state

    mesh = partitioning.create_mesh(mesh_config, devices)
    rules = mesh_config.rule_table
    partitioning.check_mesh_compat(config, mesh, rules)
    _rows(batch_size, mesh, num_micro_batches)
    task = t2i.train_task(
        config,
        optimizer_config=optimizer_config or OptimizerConfig(),
        text_length=text_length,
        num_micro_batches=num_micro_batches,
        loss_chunk_size=loss_chunk_size,
    )
    state, shardings = sharded_train_state(
        task.init, task.optimizer, mesh=mesh, rules=rules, rng=jax.random.PRNGKey(0), abstract=True
    )
    rows = partitioning.batch_sharding(mesh)
    b, n = batch_size, config.num_image_tokens
    shapes = {
        "encoder_input_tokens": ((b, text_length), jnp.int32),
        "decoder_input_tokens": ((b, n), jnp.int32),
        "decoder_target_tokens": ((b, n), jnp.int32),
        "decoder_loss_weights": ((b, n), jnp.float32),
    }
    batch = {k: jax.ShapeDtypeStruct(*v, sharding=rows) for k, v in shapes.items()}
    return AbstractTrainStep(mesh, rules, task, state, batch, loop.compile_step(task, shardings))


def _compiled_train_memory(
    config: ModelConfig, mesh_config: MeshConfig, num_devices: int, run: dict[str, Any]
) -> MemoryEstimate:
    """XLA's per-device memory of the compiled step on this process's first `num_devices`."""
    devices = jax.devices()
    if len(devices) < num_devices:
        raise ValueError(
            f"the compiled estimate needs {num_devices} devices, this process has "
            f"{len(devices)}; run it with XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{num_devices} JAX_PLATFORMS=cpu"
        )
    step = abstract_train_step(
        config, mesh_config=mesh_config, devices=devices[:num_devices], **run
    )
    sizes = compiled_sizes(step.compile())
    if len(sizes) < 4:
        raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis")
    per_device, rows = _rows(run["batch_size"], step.mesh, run["num_micro_batches"])
    return MemoryEstimate(
        method=f"compiled ({jax.default_backend()})",
        mesh={a: int(step.mesh.shape[a]) for a in _AXES},
        batch_per_device=per_device,
        micro_batch_per_device=rows,
        params=_shard_bytes(step.state.params),
        optimizer_state=_shard_bytes(step.state.opt_state),
        compiled=sizes,
    )


def compiled_sizes(compiled: Any) -> dict[str, int]:
    """XLA's argument / output / temp / alias bytes of a compiled executable on one device
    ({} where the backend reports none)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}
    sizes = {
        k: getattr(stats, f"{k}_size_in_bytes", None)
        for k in ("argument", "output", "temp", "alias")
    }
    return {k: int(v) for k, v in sizes.items() if v is not None}
