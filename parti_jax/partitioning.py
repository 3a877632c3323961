"""Logical axis names, rule tables that map them onto the device mesh, and meshes.

Layers name *logical* axes only (the constants below); which mesh axis each
one lands on is decided by a rule table chosen at the edge (gin). Mesh axes
are ('data', 'fsdp', 'tensor') with Auto axis types; the batch is split over
'data' x 'fsdp'. Optimizer state follows its parameters through
`train.optimizers.optimizer_state_shardings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

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

# ------------------------------------------------------------ rule tables
# Order matters: for each array dim the first rule whose mesh axis is still
# free wins, so EMBED comes before MLP/VOCAB/HEADS in `fsdp` (a 2-D kernel is
# split once, on its width). Convolution channels, codebooks, norms of conv
# nets and patch pixels stay replicated in every table: those parameters are
# small and their sizes (3 RGB channels, 32-d codes) rarely divide a mesh axis.
_ALWAYS_REPLICATED: Rules = tuple(
    (axis, None)
    for group in (
        (KV, LAYERS, POSITION, CODEBOOK, CODE_DIM),
        (CONV_HEIGHT, CONV_WIDTH, CONV_IN, CONV_OUT, NORM, PATCH),
        (ACT_LENGTH, ACT_EMBED, ACT_KV, ACT_HEIGHT, ACT_WIDTH, ACT_CHANNELS),
    )
    for axis in group
)

# Pure data parallelism: parameters replicated, batch split over data x fsdp.
DATA_PARALLEL_RULES: Rules = (
    (ACT_BATCH, BATCH_MESH_AXES),
    *((axis, None) for axis in (EMBED, MLP, HEADS, VOCAB, ACT_HEADS, ACT_MLP, ACT_VOCAB)),
    *_ALWAYS_REPLICATED,
)

# ZeRO-3 style: parameters (and so optimizer state) split over 'fsdp' on
# their width, gathered per layer; batch over data x fsdp.
FSDP_RULES: Rules = (
    (ACT_BATCH, BATCH_MESH_AXES),
    *((axis, FSDP) for axis in (EMBED, MLP, VOCAB, HEADS)),
    *((axis, None) for axis in (ACT_HEADS, ACT_MLP, ACT_VOCAB)),
    *_ALWAYS_REPLICATED,
)

# fsdp plus Megatron tensor parallelism: heads, MLP hidden and vocabulary on
# 'tensor' (parameters and the matching activations), width on 'fsdp'.
FSDP_TP_RULES: Rules = (
    (ACT_BATCH, BATCH_MESH_AXES),
    *((axis, TENSOR) for axis in (HEADS, MLP, VOCAB)),
    (EMBED, FSDP),
    *((axis, TENSOR) for axis in (ACT_HEADS, ACT_MLP, ACT_VOCAB)),
    *_ALWAYS_REPLICATED,
)

RULE_TABLES: dict[str, Rules] = {
    "data_parallel": DATA_PARALLEL_RULES,
    "fsdp": FSDP_RULES,
    "fsdp_tp": FSDP_TP_RULES,
}
# All logical names; every rule table maps each of them (a test checks).
LOGICAL_AXES = tuple(axis for axis, _ in FSDP_RULES)


def get_rules(name: str) -> Rules:
    """The rule table called `name` ('data_parallel', 'fsdp' or 'fsdp_tp')."""
    if name not in RULE_TABLES:
        raise ValueError(
            f"unknown partitioning rules {name!r}; choose one of {', '.join(RULE_TABLES)}"
        )
    return RULE_TABLES[name]


# -------------------------------------------------------------------- mesh
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh degrees and the rule table; -1 fills with the remaining devices."""

    # Pure data-parallel degree inside a slice (parameters replicated along it).
    data: int = 1
    # Fully-sharded data-parallel degree inside a slice (parameters split along it).
    fsdp: int = -1
    # Tensor-parallel degree inside a slice (heads / MLP / vocab split along it).
    tensor: int = 1
    # Degrees across slices (DCN) for multi-slice pods; their product is the number
    # of slices (or of processes where devices carry no slice index).
    # Data parallelism across slices (the usual choice: least DCN traffic).
    dcn_data: int = 1
    # FSDP across slices (parameters gathered over DCN every step).
    dcn_fsdp: int = 1
    # Tensor parallelism across slices (rarely sensible: per-layer DCN traffic).
    dcn_tensor: int = 1
    # Name of the logical-axis rule table: 'data_parallel', 'fsdp' or 'fsdp_tp'.
    rules: str = "fsdp"

    def __post_init__(self) -> None:
        check_degrees({a: getattr(self, a) for a in MESH_AXES}, "MeshConfig")
        dcn = {f"dcn_{a}": getattr(self, f"dcn_{a}") for a in MESH_AXES}
        check_degrees(dcn, "MeshConfig", fill=False)
        get_rules(self.rules)

    @property
    def rule_table(self) -> Rules:
        return get_rules(self.rules)

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp * self.dcn_tensor

    def ici_degrees(self, num_devices: int) -> dict[str, int]:
        """data / fsdp / tensor degrees inside a slice of `num_devices` devices, -1 filled."""
        slices = self.num_slices
        if num_devices % slices:
            raise ValueError(
                f"MeshConfig dcn_data*dcn_fsdp*dcn_tensor = {slices} slices does not divide "
                f"the {num_devices} devices"
            )
        devices = f"the {num_devices} devices"
        if slices > 1:
            devices = f"the {num_devices // slices} devices per slice ({slices} slices)"
        ici = {a: getattr(self, a) for a in MESH_AXES}
        return fill_degrees(ici, num_devices // slices, devices, "MeshConfig")

    def degrees(self, num_devices: int) -> dict[str, int]:
        """Mesh sizes along data / fsdp / tensor: each ICI degree times its DCN degree."""
        ici = self.ici_degrees(num_devices)
        return {a: ici[a] * getattr(self, f"dcn_{a}") for a in MESH_AXES}


def check_degrees(degrees: Mapping[str, int], owner: str, *, fill: bool = True) -> None:
    """Each degree a positive integer (or, with `fill`, -1: at most one); errors name
    `owner.axis`."""
    for axis, value in degrees.items():
        if not isinstance(value, int) or (value < 1 and not (fill and value == -1)):
            also = " or -1 (fill)" if fill else ""
            raise ValueError(f"{owner}.{axis}={value!r} must be a positive integer{also}")
    fills = [axis for axis, value in degrees.items() if value == -1]
    if len(fills) > 1:
        raise ValueError(
            f"{owner}: at most one degree may be -1 (fill), got {', '.join(fills)} = -1"
        )


def fill_degrees(
    degrees: Mapping[str, int], total: int, devices: str, owner: str
) -> dict[str, int]:
    """`degrees` with the -1 filled so that they multiply to `total` (the one mesh-degree fill).

    `devices` names the total in errors ('the 8 devices'); `owner` names the
    degrees' config ('MeshConfig', 'LaunchSpec').
    """
    check_degrees(degrees, owner)
    shown = f"{owner} " + " x ".join(f"{k}={v}" for k, v in degrees.items())
    fixed = math.prod(v for v in degrees.values() if v != -1)
    fill = [k for k, v in degrees.items() if v == -1]
    if fill and total % fixed == 0:
        return {**degrees, fill[0]: total // fixed}
    if fill:
        raise ValueError(
            f"{shown}: cannot fill {fill[0]}=-1, the other degrees multiply to {fixed}, which "
            f"does not divide {devices}; choose degrees whose product divides {total}"
        )
    if fixed != total:
        raise ValueError(
            f"{shown} = {fixed} devices, not {devices}; make the degrees multiply to {total} "
            "or set one of them to -1 to fill"
        )
    return dict(degrees)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=-1,dcn_data=2' (a --mesh flag) -> {'data': 2, 'fsdp': -1, 'dcn_data': 2}."""
    axes = (*MESH_AXES, *(f"dcn_{a}" for a in MESH_AXES))
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = (x.strip() for x in part.partition("="))
        if key not in axes or not value.lstrip("-").isdigit():
            raise ValueError(
                f"--mesh={text}: {part!r} is not AXIS=DEGREE with AXIS one of {', '.join(axes)} "
                "(-1 fills)"
            )
        out[key] = int(value)
    return out


def create_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes; hybrid ICI x DCN across slices."""
    devices = list(jax.devices() if devices is None else devices)
    ici = tuple(config.ici_degrees(len(devices)).values())
    dcn = (config.dcn_data, config.dcn_fsdp, config.dcn_tensor)
    num_slices = config.num_slices
    if num_slices == 1:
        array = mesh_utils.create_device_mesh(ici, devices)
    else:
        # Devices on TPU pods carry a slice index; elsewhere (GPU clusters, CPU
        # processes) every device reports slice 0 or none, and the DCN granule
        # is the process.
        slices = {getattr(d, "slice_index", None) for d in devices}
        by_slice = len(slices) > 1 and None not in slices
        attr = "slice_index" if by_slice else "process_index"
        found = len({getattr(d, attr) for d in devices})
        if found != num_slices:
            raise ValueError(
                f"MeshConfig dcn_data*dcn_fsdp*dcn_tensor = {num_slices} slices, but the devices "
                f"come from {found} {'slices' if by_slice else 'processes'}; set the dcn_* "
                f"degrees to multiply to {found}"
            )
        array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=not by_slice
        )
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def with_sharding_rules(mesh: Mesh | jax.sharding.AbstractMesh, rules: Rules) -> Iterator[None]:
    """Runs the body under `jax.set_mesh(mesh)` (an AbstractMesh: `use_abstract_mesh`) and
    flax logical-axis `rules`."""
    use = jax.set_mesh if isinstance(mesh, Mesh) else jax.sharding.use_abstract_mesh
    with use(mesh), nn.logical_axis_rules(rules):
        yield


# ----------------------------------------------------------- divisibility
def _mesh_axes_size(mesh: Mesh, axes: MeshAxes) -> tuple[str, int]:
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return "*".join(names), math.prod(mesh.shape[a] for a in names)


def check_divisibility(abstract: PyTree, mesh: Mesh, rules: Rules) -> None:
    """Raises (before any compile) if a boxed array dim does not divide its mesh axes."""
    problems = []
    for path, leaf in _leaves_with_path(abstract):
        if not isinstance(leaf, nn.Partitioned):
            continue
        spec = nn.logical_to_mesh_axes(leaf.names, rules)
        for dim, (size, axes, name) in enumerate(
            zip(leaf.value.shape, spec, leaf.names, strict=True)
        ):
            label, parts = _mesh_axes_size(mesh, axes)
            if size % parts:
                problems.append(
                    f"{path} dim {dim} ({name}) = {size} is not divisible by {label}={parts}"
                )
    if problems:
        raise ValueError("parameters do not fit the mesh: " + "; ".join(problems))


# Config fields of the encoder-decoder and the logical axes of the arrays they size.
_MODEL_FIELD_LAYOUTS = (
    (("d_model", "num_heads", "kv_dim"), (EMBED, HEADS, KV)),
    (("num_heads", "kv_dim", "d_model"), (HEADS, KV, EMBED)),
    (("d_model", "mlp_dim"), (EMBED, MLP)),
    (("mlp_dim", "d_model"), (MLP, EMBED)),
    (("text_vocab_size", "d_model"), (VOCAB, EMBED)),
    (("decoder_vocab_size", "d_model"), (VOCAB, EMBED)),
    (("d_model", "decoder_vocab_size"), (EMBED, VOCAB)),
)


def check_mesh_compat(config: Any, mesh: Mesh, rules: Rules) -> None:
    """Checks a ModelConfig against a mesh and rules before anything is compiled.

    Raises ValueError naming the field and the mesh axes, e.g.
    "num_heads=16 is not divisible by tensor=3".
    """
    problems: list[str] = []
    for fields, names in _MODEL_FIELD_LAYOUTS:
        spec = nn.logical_to_mesh_axes(names, rules)
        for field, axes in zip(fields, spec, strict=True):
            value = getattr(config, field)
            label, parts = _mesh_axes_size(mesh, axes)
            message = f"{'head_dim' if field == 'kv_dim' else field}={value} is not divisible by {label}={parts}"
            if value % parts and message not in problems:
                problems.append(message)
    if problems:
        raise ValueError(
            "ModelConfig does not fit the mesh "
            f"({' x '.join(f'{k}={v}' for k, v in mesh.shape.items())}): " + "; ".join(problems)
        )


# ------------------------------------------------------ sharded creation
def logical_shardings(abstract: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
    """NamedShardings for a pytree (the structure of `nn.unbox(abstract)`): boxed leaves by
    their logical names, others replicated."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)


def batch_sharding(mesh: Mesh | jax.sharding.AbstractMesh) -> NamedSharding:
    """Sharding of batch arrays ([B, ...]): the leading dim over the mesh's 'data' x 'fsdp'."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_MESH_AXES if a in mesh.shape)))


def batch_devices(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """Devices along the batch axes ('data' x 'fsdp'): a global batch is a multiple of it."""
    return math.prod(mesh.shape[a] for a in BATCH_MESH_AXES if a in mesh.shape)


def sharded_init(
    init_fn: Callable[..., PyTree], mesh: Mesh, rules: Rules, *args: Any
) -> tuple[PyTree, PyTree]:
    """(unboxed arrays, their NamedShardings) of the boxed `init_fn(*args)`, created directly
    in their sharded layout; a dim that does not divide its mesh axes fails before compiling."""
    with with_sharding_rules(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        check_divisibility(abstract, mesh, rules)
        shardings = logical_shardings(abstract, mesh, rules)
        params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return params, shardings


# -------------------------------------------------------- axes coverage
def params_without_axes(variables: PyTree) -> list[str]:
    """Paths of parameters without logical axis names (or with the wrong number) in the boxed
    output of `model.init` (or of `jax.eval_shape(model.init, ...)`)."""
    missing = []
    for path, leaf in _leaves_with_path(variables):
        if not isinstance(leaf, nn.Partitioned):
            missing.append(f"{path} (no logical axes)")
        elif len(leaf.names) != len(np.shape(leaf.value)):
            missing.append(f"{path} (names {leaf.names} for shape {np.shape(leaf.value)})")
    return missing


def assert_all_params_have_axes(variables: PyTree) -> None:
    """Fails listing every parameter without logical axes."""
    if missing := params_without_axes(variables):
        raise AssertionError(
            f"{len(missing)} parameters without logical axes: " + ", ".join(missing)
        )


# ------------------------------------------------------- host data shard
def data_shard_of_process(
    process_grid: np.ndarray, axis_names: Sequence[str], process_index: int
) -> tuple[int, int]:
    """(shard index, number of shards) of one process along the batch axes.

    `process_grid` has the mesh's shape and holds the process index of each
    device. A process's batch positions are the flattened ('data', 'fsdp')
    coordinates of its devices; processes with the same positions (differing
    only along 'tensor') read the same shard. Shards are ordered by position.
    """
    grid = np.asarray(process_grid)
    names = list(axis_names)
    batch = [names.index(a) for a in BATCH_MESH_AXES if a in names]
    rest = [i for i in range(grid.ndim) if i not in batch]
    moved = np.transpose(grid, batch + rest)
    rows = moved.reshape(math.prod(moved.shape[: len(batch)]), -1)
    positions = {
        int(p): frozenset(np.flatnonzero((rows == p).any(axis=1))) for p in np.unique(rows)
    }
    if process_index not in positions:
        raise ValueError(f"process {process_index} owns no device of the mesh")
    groups = sorted(set(positions.values()), key=min)
    for a, b in itertools.combinations(groups, 2):
        if a & b:
            owners = sorted(p for p, s in positions.items() if s in (a, b))
            raise ValueError(
                f"processes {owners} hold overlapping but different positions on the batch "
                "axes (data, fsdp); lay the mesh out so each host's devices cover whole batch rows"
            )
    if len({len(g) for g in groups}) > 1:
        raise ValueError(
            "hosts hold different numbers of batch positions "
            f"({sorted(len(g) for g in groups)}); the batch cannot be split evenly"
        )
    return groups.index(positions[process_index]), len(groups)


def host_data_shard(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
    """This host's (shard index, number of shards) for reading data, from its mesh position."""
    process_index = jax.process_index() if process_index is None else process_index
    grid = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return data_shard_of_process(grid, mesh.axis_names, process_index)


# ---------------------------------------------------------------- helpers
def _leaves_with_path(tree: PyTree) -> list[tuple[str, Any]]:
    """('a/b/c', leaf) pairs; flax `Partitioned` boxes are leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat]
