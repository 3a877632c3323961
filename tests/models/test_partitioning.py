"""Meshes, rule tables, sharded init, constraints, optimizer-state specs, host data shards.

Runs on the 8 CPU devices from conftest.py (a 2x2x2 data x fsdp x tensor mesh).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from parti_jax import partitioning as pt
from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder

CFG = ModelConfig(
    text_vocab_size=64,
    codebook_size=40,
    image_grid=(2, 4),
    max_text_length=8,
    d_model=32,
    num_heads=2,
    mlp_dim=64,
    num_encoder_layers=1,
    num_decoder_layers=2,
    dtype="float32",
)
ENC = np.array([[5, 6, 1, 0]] * 4, np.int32)
DEC = np.zeros((4, CFG.num_image_tokens), np.int32)

# Expected mesh specs of a few parameters under each table (scanned layout).
EXPECTED = {
    "data_parallel": {
        ("decoder", "layers", "mlp", "wi", "kernel"): P(None, None, None),
        ("decoder", "layers", "self_attention", "query", "kernel"): P(None, None, None, None),
        ("decoder", "token_embedder", "embedding"): P(None, None),
    },
    "fsdp": {
        ("decoder", "layers", "mlp", "wi", "kernel"): P(None, "fsdp", None),
        ("decoder", "layers", "self_attention", "query", "kernel"): P(None, "fsdp", None, None),
        ("decoder", "token_embedder", "embedding"): P(None, "fsdp"),
    },
    "fsdp_tp": {
        ("decoder", "layers", "mlp", "wi", "kernel"): P(None, "fsdp", "tensor"),
        ("decoder", "layers", "self_attention", "query", "kernel"): P(None, "fsdp", "tensor", None),
        ("decoder", "token_embedder", "embedding"): P("tensor", "fsdp"),
    },
}


@pytest.fixture(scope="module")
def mesh(cpu_devices):
    return pt.create_mesh(pt.MeshConfig(data=2, fsdp=-1, tensor=2))


def _init(rng, enc, dec):
    return EncoderDecoder(CFG).init(rng, enc, dec)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# -------------------------------------------------------------------- mesh
def test_mesh_axes_and_fill(mesh, cpu_devices):
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_names == pt.MESH_AXES
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3
    filled = pt.create_mesh(pt.MeshConfig())  # fsdp=-1 takes every device
    assert dict(filled.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    tensor_fill = pt.create_mesh(pt.MeshConfig(data=2, fsdp=1, tensor=-1))
    assert tensor_fill.shape["tensor"] == 4
    subset = pt.create_mesh(pt.MeshConfig(fsdp=1, tensor=-1), devices=cpu_devices[:2])
    assert subset.devices.size == 2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(data=3, fsdp=-1),
            "cannot fill fsdp=-1, the other degrees multiply to 3, which does not divide the 8 devices",
        ),
        (dict(data=2, fsdp=2, tensor=1), "= 4 devices, not the 8 devices"),
        (dict(dcn_data=2, fsdp=-1), "2 slices, but the devices come from 1 processes"),
        (dict(dcn_data=3), "3 slices does not divide the 8 devices"),
    ],
)
def test_bad_mesh_degrees_name_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pt.create_mesh(pt.MeshConfig(**kwargs))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(data=-1, fsdp=-1), "at most one degree may be -1"),
        (dict(tensor=0), "MeshConfig.tensor=0"),
        (dict(dcn_fsdp=-1), "MeshConfig.dcn_fsdp=-1"),
        (dict(rules="megatron"), "unknown partitioning rules 'megatron'"),
    ],
)
def test_mesh_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pt.MeshConfig(**kwargs)


def test_degrees_fold_ici_and_dcn_and_parse_from_a_flag():
    config = pt.MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=4)
    assert config.ici_degrees(32) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert config.degrees(32) == {"data": 4, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match=r"does not divide the 6 devices per slice \(4 slices\)"):
        pt.MeshConfig(data=4, fsdp=-1, dcn_data=4).degrees(24)
    assert pt.parse_mesh("data=2, fsdp=-1,dcn_data=2") == {"data": 2, "fsdp": -1, "dcn_data": 2}
    with pytest.raises(ValueError, match="'model=4' is not AXIS=DEGREE"):
        pt.parse_mesh("data=2,model=4")


# ------------------------------------------------------------ rule tables
def test_rule_tables_cover_every_logical_axis():
    constants = {
        value
        for name, value in vars(pt).items()
        if name.isupper() and isinstance(value, str) and value not in pt.MESH_AXES
    }
    assert constants == set(pt.LOGICAL_AXES)
    for name, rules in pt.RULE_TABLES.items():
        mapped = [logical for logical, _ in rules]
        assert len(mapped) == len(set(mapped)), f"{name}: duplicate entries"
        assert set(mapped) == constants, f"{name}: missing {constants - set(mapped)}"
        assert dict(rules)[pt.ACT_BATCH] == pt.BATCH_MESH_AXES
    assert pt.get_rules("fsdp") is pt.FSDP_RULES
    with pytest.raises(ValueError, match="data_parallel, fsdp, fsdp_tp"):
        pt.get_rules("zero3")


def test_every_model_parameter_has_logical_axes():
    for cfg in (CFG, CFG.replace(scan_layers=False, mlp_activation="swiglu")):
        boxed = jax.eval_shape(EncoderDecoder(cfg).init, jax.random.key(0), ENC, DEC)
        assert pt.params_without_axes(boxed) == []
        pt.assert_all_params_have_axes(boxed)


def test_params_without_axes_lists_offenders():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="proj")(x)

    variables = jax.eval_shape(Plain().init, jax.random.key(0), jnp.ones((1, 2)))
    missing = pt.params_without_axes(variables)
    assert missing == ["params/proj/bias (no logical axes)", "params/proj/kernel (no logical axes)"]
    with pytest.raises(AssertionError, match="2 parameters without logical axes"):
        pt.assert_all_params_have_axes(variables)


# ---------------------------------------------------------- sharded init
def test_sharded_init_and_compiled_shardings_follow_each_table(mesh):
    rng = jax.random.key(0)
    params, shardings = pt.sharded_init(_init, mesh, pt.FSDP_TP_RULES, rng, ENC, DEC)
    abstract = jax.eval_shape(_init, rng, ENC, DEC)
    assert jax.tree.structure(params) == jax.tree.structure(nn.unbox(abstract))
    # Parameters were created sharded (real model.init values: norm scales are 1).
    scale = params["params"]["decoder"]["final_norm"]["scale"]
    np.testing.assert_array_equal(np.asarray(scale), np.ones(CFG.d_model))
    wi = params["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    assert wi.shape == (2, 32, 64) and wi.addressable_shards[0].data.shape == (2, 16, 32)

    for table, expected in EXPECTED.items():
        rules = pt.get_rules(table)
        target = pt.logical_shardings(abstract, mesh, rules)
        moved = jax.jit(lambda p: p, out_shardings=target)(params)
        for path, spec in expected.items():
            array = _get(moved["params"], path)
            want = NamedSharding(mesh, spec)
            assert array.sharding.is_equivalent_to(want, array.ndim), (table, path, array.sharding)
            shard = array.addressable_shards[0].data.shape
            assert shard == want.shard_shape(array.shape), (table, path, shard)
        if table == "data_parallel":
            assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(moved))
        np.testing.assert_array_equal(
            np.asarray(_get(moved["params"], ("decoder", "layers", "mlp", "wi", "kernel"))),
            np.asarray(wi),
        )


def test_logical_constraint_changes_compiled_sharding(mesh):
    def constrained(x):
        return nn.with_logical_constraint(x * 2, (pt.ACT_BATCH, pt.ACT_EMBED))

    def plain(x):
        return x * 2

    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P()))
    with pt.with_sharding_rules(mesh, pt.FSDP_RULES):
        y = jax.jit(constrained)(x)
        z = jax.jit(plain)(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
    assert y.addressable_shards[0].data.shape == (2, 16)
    assert z.sharding.is_fully_replicated
    batch = pt.batch_sharding(mesh)
    assert batch.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
    assert pt.batch_devices(mesh) == 4
    # Rules without a mesh in context do nothing (why with_sharding_rules sets both).
    with nn.logical_axis_rules(pt.FSDP_RULES):
        assert jax.jit(constrained)(x).sharding.is_fully_replicated


def test_model_activations_are_constrained(mesh):
    replicated = NamedSharding(mesh, P())
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
        nn.unbox(jax.eval_shape(_init, jax.random.key(0), ENC, DEC)),
    )
    apply = jax.jit(EncoderDecoder(CFG).apply)
    with pt.with_sharding_rules(mesh, pt.FSDP_TP_RULES):
        hlo = apply.lower(abstract, ENC, DEC).as_text()
    assert hlo.count("sharding_constraint") >= 10
    assert '{"data", "fsdp"}' in hlo and '{"tensor"}' in hlo
    assert "sharding_constraint" not in apply.lower(abstract, ENC, DEC).as_text()


# ------------------------------------------------------------ divisibility
def test_mesh_compat_check_names_field_and_axis(cpu_devices):
    mesh3 = pt.create_mesh(pt.MeshConfig(fsdp=1, tensor=3), devices=cpu_devices[:3])
    cfg = ModelConfig(num_heads=16, d_model=1024, mlp_dim=4096)
    with pytest.raises(ValueError, match="num_heads=16 is not divisible by tensor=3"):
        pt.check_mesh_compat(cfg, mesh3, pt.FSDP_TP_RULES)
    pt.check_mesh_compat(cfg, mesh3, pt.FSDP_RULES)  # fsdp=1: nothing is split
    mesh8 = pt.create_mesh(pt.MeshConfig(data=1, fsdp=4, tensor=2))
    pt.check_mesh_compat(cfg, mesh8, pt.FSDP_TP_RULES)
    with pytest.raises(ValueError, match="d_model=1022 is not divisible by fsdp=4"):
        pt.check_mesh_compat(cfg.replace(d_model=1022, num_heads=14), mesh8, pt.FSDP_TP_RULES)


def test_sharded_init_fails_before_compiling_on_a_bad_mesh(cpu_devices):
    mesh3 = pt.create_mesh(pt.MeshConfig(fsdp=1, tensor=3), devices=cpu_devices[:3])
    with pytest.raises(
        ValueError,
        match=r"self_attention/query/kernel dim 2 \(heads\) = 2 is not divisible by tensor=3",
    ):
        pt.sharded_init(_init, mesh3, pt.FSDP_TP_RULES, jax.random.key(0), ENC[:3], DEC[:3])


# -------------------------------------------------------- host data shard
def test_host_data_shard_single_process(mesh):
    assert pt.host_data_shard(mesh) == (0, 1)


def _grid(fn):
    grid = np.zeros((2, 2, 2), int)
    for index in np.ndindex(grid.shape):
        grid[index] = fn(*index)
    return grid


@pytest.mark.parametrize(
    "owner,expected",
    [
        (lambda d, f, t: d, {0: (0, 2), 1: (1, 2)}),  # one host per data row
        (lambda d, f, t: t, {0: (0, 1), 1: (0, 1)}),  # hosts differ only along tensor
        (lambda d, f, t: 2 * d + f, {0: (0, 4), 1: (1, 4), 2: (2, 4), 3: (3, 4)}),
        (lambda d, f, t: 2 * f + t, {p: (p // 2, 2) for p in range(4)}),  # fsdp x tensor
    ],
)
def test_data_shard_of_process(owner, expected):
    grid = _grid(owner)
    for process, answer in expected.items():
        assert pt.data_shard_of_process(grid, pt.MESH_AXES, process) == answer


def test_data_shard_of_process_rejects_overlap():
    grid = np.array([[[0, 0], [0, 1]]])  # process 0 holds batch rows {0, 1}, process 1 row {1}
    with pytest.raises(ValueError, match="overlapping"):
        pt.data_shard_of_process(grid, pt.MESH_AXES, 0)
    with pytest.raises(ValueError, match="process 5 owns no device"):
        pt.data_shard_of_process(grid, pt.MESH_AXES, 5)
