"""The generic loop on a tiny flax model: loss falls, micro-batches, NaN policies,
SIGTERM save, data position, restore onto another mesh, optimizer-state shardings."""

import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from parti_jax import partitioning
from parti_jax.partitioning import EMBED, MLP
from parti_jax.train import checkpoints, loop, metrics, optimizers
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.state import create_sharded_train_state

DIN, HID, BATCH = 16, 32, 8
RULES = {name: partitioning.get_rules(name) for name in partitioning.RULE_TABLES}
# Parameter specs each rule table must give (w1: embed x mlp, w2: mlp x embed, b1: mlp).
EXPECTED = {
    "data_parallel": {"w1": (None, None), "w2": (None, None), "b1": (None,)},
    "fsdp": {"w1": ("fsdp", None), "w2": (None, "fsdp"), "b1": ("fsdp",)},
    "fsdp_tp": {"w1": ("fsdp", "tensor"), "w2": ("tensor", "fsdp"), "b1": ("tensor",)},
}


class TinyMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        w1 = self.param("w1", nn.with_logical_partitioning(init, (EMBED, MLP)), (DIN, HID))
        b1 = self.param("b1", nn.with_logical_partitioning(nn.initializers.zeros, (MLP,)), (HID,))
        w2 = self.param("w2", nn.with_logical_partitioning(init, (MLP, EMBED)), (HID, DIN))
        return jax.nn.relu(x @ w1 + b1) @ w2


MODEL = TinyMlp()
TARGET = np.random.default_rng(0).normal(size=(DIN, DIN)).astype(np.float32) / 4


def loss_fn(params, batch, rng):
    del rng
    pred = MODEL.apply({"params": params}, batch["x"])
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mse": loss}


def make_mesh(data=8, fsdp=1, tensor=1):
    return jax.make_mesh(
        (data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3
    )


class Iterator:
    """Deterministic regression batches with a checkpointable position."""

    def __init__(self, poison_at=None):
        self.position = 0
        self.poison_at = poison_at

    def __next__(self):
        rng = np.random.default_rng(self.position)
        self.position += 1
        x = rng.normal(size=(BATCH, DIN)).astype(np.float32)
        if self.position == self.poison_at:
            x[0, 0] = np.nan
        return {"x": x, "y": x @ TARGET}

    def save(self, path):
        with open(path, "w") as f:
            f.write(str(self.position))

    def restore(self, path):
        with open(path) as f:
            self.position = int(f.read())


def setup(mesh, rules, *, nan_policy="stop", lr=3e-2, min_dim=8, momentum="float32"):
    cfg = OptimizerConfig(
        learning_rate=lr,
        schedule="constant",
        warmup_steps=0,
        min_dim_size_to_factor=min_dim,
        momentum_dtype=momentum,
    )
    tx = optimizers.make_optimizer(cfg)
    init_fn = lambda k: MODEL.init(k, jnp.zeros((1, DIN)))  # noqa: E731
    state, shardings = create_sharded_train_state(
        init_fn, tx, mesh=mesh, rules=rules, rng=jax.random.PRNGKey(0)
    )
    step_fn = loop.make_train_step(
        loss_fn, nan_policy=nan_policy, learning_rate_fn=optimizers.learning_rate_fn(cfg)
    )
    bsh = loop.batch_sharding(mesh)
    jitted = loop.compile_step(step_fn, shardings, {"x": bsh, "y": bsh})
    return state, shardings, jitted, bsh


def test_loss_falls_logs_and_resumes(tmp_path):
    mesh = make_mesh()
    state, shardings, step, bsh = setup(mesh, RULES["data_parallel"])
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=20, async_save=True)
    writer = metrics.MetricWriter(tmp_path)
    it = Iterator()
    result = loop.run(
        train_step=step,
        state=state,
        data_iterator=it,
        batch_sharding=bsh,
        num_data_shards=1,
        num_steps=40,
        workdir=tmp_path,
        checkpointer=ckpt,
        writer=writer,
        log_every=10,
    )
    assert result.status == "done" and result.step == 40
    lines = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [10, 20, 30, 40]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    assert ckpt.all_steps() == [20, 40]

    # Resume from step 20 (params, optimizer, data position) -> same losses at 30, 40.
    fresh, _, step, _ = setup(mesh, RULES["data_parallel"])
    it2 = Iterator()
    restored, data_ok = ckpt.restore(fresh, step=20, data_iterator=it2)
    assert data_ok and it2.position == 20 and int(restored.step) == 20
    writer2 = metrics.MetricWriter(tmp_path, filename="resumed.jsonl")
    loop.run(
        train_step=step,
        state=restored,
        data_iterator=it2,
        batch_sharding=bsh,
        num_data_shards=1,
        num_steps=40,
        workdir=tmp_path,
        writer=writer2,
        log_every=10,
    )
    writer2.close()
    resumed = metrics.read_metrics(tmp_path / "resumed.jsonl")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in lines[2:]]
    ckpt.close()


def test_micro_batches_match_full_batch():
    params = MODEL.init(jax.random.PRNGKey(1), jnp.zeros((1, DIN)))["params"]
    batch = next(Iterator())
    acc = jax.jit(loop.accumulate_gradients, static_argnums=(0, 4))
    l1, a1, g1 = acc(loss_fn, params, batch, jax.random.PRNGKey(0), 1)
    l4, a4, g4 = acc(loss_fn, params, batch, jax.random.PRNGKey(0), 4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    np.testing.assert_allclose(a1["mse"], a4["mse"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nan_skip_keeps_params_and_stop_names_the_step(tmp_path):
    mesh = make_mesh()
    state, _, step, bsh = setup(mesh, RULES["data_parallel"], nan_policy="skip")
    it = Iterator(poison_at=2)
    s1, _ = step(state, loop.make_global_batch(next(it), bsh, 1))
    before = jax.device_get(s1.params)
    s2, m2 = step(s1, loop.make_global_batch(next(it), bsh, 1))
    assert float(m2["skipped"]) == 1.0 and not np.isfinite(float(m2["loss"]))
    assert int(s2.step) == 2
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(s2.params))):
        np.testing.assert_array_equal(a, b)
    s3, m3 = step(s2, loop.make_global_batch(next(it), bsh, 1))
    assert float(m3["skipped"]) == 0.0 and np.isfinite(float(m3["loss"]))

    state, _, step, bsh = setup(mesh, RULES["data_parallel"], nan_policy="stop")
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=100)
    with pytest.raises(loop.NonFiniteLossError, match=r"step 3: loss is nan"):
        loop.run(
            train_step=step,
            state=state,
            data_iterator=Iterator(poison_at=3),
            batch_sharding=bsh,
            num_data_shards=1,
            num_steps=8,
            workdir=tmp_path,
            checkpointer=ckpt,
            log_every=4,
            nan_policy="stop",
        )
    assert ckpt.all_steps() == []  # no poisoned checkpoint written


def test_sigterm_saves_and_stops(tmp_path):
    mesh = make_mesh()
    state, _, step, bsh = setup(mesh, RULES["data_parallel"])
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=1000)
    it = Iterator()

    def hook(s, local):
        if s == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    result = loop.run(
        train_step=step,
        state=state,
        data_iterator=it,
        batch_sharding=bsh,
        num_data_shards=1,
        num_steps=50,
        workdir=tmp_path,
        checkpointer=ckpt,
        log_every=100,
        batch_hook=hook,
    )
    assert result.status == "preempted" and result.step == 3
    assert ckpt.all_steps() == [3]
    shard_file = tmp_path / "checkpoints" / "3" / "data" / "shard_0_of_1"
    assert shard_file.read_text() == "3"
    # A resume with another number of data shards is refused unless allowed.
    other = checkpoints.Checkpointer(tmp_path, data_shard=checkpoints.DataShard(index=0, count=2))
    with pytest.raises(checkpoints.CheckpointError, match=r"saved for \[1\] data shard.*reads 2"):
        other.restore(state, data_iterator=Iterator())
    _, data_ok = other.restore(state, data_iterator=Iterator(), allow_data_reshuffle=True)
    assert data_ok is False
    ckpt.close()
    other.close()


@pytest.mark.parametrize("table", ["data_parallel", "fsdp", "fsdp_tp"])
def test_optimizer_state_shardings_follow_params(table):
    """Compiled output shardings of Adafactor's moments (factored and int8) per rule table."""
    mesh = make_mesh(2, 2, 2)
    state, _, step, bsh = setup(mesh, RULES[table], min_dim=8, momentum="int8")
    new_state, _ = step(state, loop.make_global_batch(next(Iterator()), bsh, 1))
    ada = new_state.opt_state[1]
    exp = EXPECTED[table]
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
    for name in ("w1", "w2"):
        row, col = exp[name]
        assert spec(new_state.params[name]) == (row, col)
        assert spec(ada.v_row[name]) == (row, None)  # column dim reduced
        assert spec(ada.v_col[name]) == (None, col)  # row dim reduced
        assert spec(ada.m[name]) == (row, col) and ada.m[name].dtype == jnp.int8
        assert spec(ada.m_scale[name]) == (row, None)
    assert ada.v_row["w1"].shape == (DIN, 1) and ada.v_col["w1"].shape == (1, HID)
    assert spec(ada.v["b1"]) == exp["b1"]  # unfactored vector
    assert spec(ada.v["w1"]) == (None, None)  # placeholder


def test_restore_onto_another_mesh_and_partial(tmp_path):
    state, _, _, _ = setup(make_mesh(8, 1, 1), RULES["data_parallel"])
    state = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=1)
    ckpt.save(5, state)
    ckpt.wait_until_finished()

    target, shardings, _, _ = setup(make_mesh(1, 4, 2), RULES["fsdp_tp"])
    restored, _ = ckpt.restore(target)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.params["w1"].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert restored.opt_state[1].v_row["w1"].sharding.spec == PartitionSpec("fsdp", None)
    ckpt.close()

    # Partial warm start: only w1; the rest keeps its initialisation.
    params, names = checkpoints.restore_params_from(tmp_path, target.params, include=r"^w1$")
    assert names == ["w1"]
    np.testing.assert_array_equal(np.asarray(params["w1"]), np.asarray(state.params["w1"]))
    np.testing.assert_array_equal(np.asarray(params["w2"]), np.asarray(target.params["w2"]))
    assert params["w1"].sharding.spec == PartitionSpec("fsdp", "tensor")

    # A hook converts the checkpoint's layout; shape mismatches name the parameter.
    renamed = {"w1": target.params["w2"], "b1": target.params["b1"], "w2": target.params["w1"]}
    swap = lambda p: {"w1": p["w2"], "b1": p["b1"], "w2": p["w1"]}  # noqa: E731
    params, names = checkpoints.restore_params_from(tmp_path, renamed, convert=swap)
    assert sorted(names) == ["b1", "w1", "w2"]
    with pytest.raises(checkpoints.CheckpointError, match=r"parameter w1 has shape \(16, 32\)"):
        checkpoints.restore_params_from(tmp_path, renamed)


def test_two_param_groups_with_their_own_optimizers():
    """The VQGAN pattern: generator and discriminator, one step counter, sharded init."""
    mesh = make_mesh(2, 2, 2)
    rules = RULES["fsdp_tp"]
    adam = optimizers.make_optimizer(
        OptimizerConfig(name="adam", learning_rate=0.1, schedule="constant", warmup_steps=0)
    )
    tx = {"generator": adam, "discriminator": optimizers.make_optimizer(OptimizerConfig())}

    def init_fn(key):
        k1, k2 = jax.random.split(key)
        x = jnp.zeros((1, DIN))
        return {"generator": MODEL.init(k1, x), "discriminator": MODEL.init(k2, x)}

    state, shardings = create_sharded_train_state(
        init_fn, tx, mesh=mesh, rules=rules, rng=jax.random.PRNGKey(0)
    )
    assert state.params["generator"]["w1"].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert shardings.opt_state["discriminator"][1].v["b1"].spec == PartitionSpec("tensor")
    grads = {"generator": jax.tree.map(jnp.ones_like, state.params["generator"])}
    new = state.apply_gradients(grads, increment_step=False)
    assert int(new.step) == 0
    assert not np.allclose(new.params["generator"]["w1"], state.params["generator"]["w1"])
    np.testing.assert_array_equal(
        new.params["discriminator"]["w1"], state.params["discriminator"]["w1"]
    )
    d_grads = {"discriminator": jax.tree.map(jnp.ones_like, state.params["discriminator"])}
    assert int(new.apply_gradients(d_grads).step) == 1
    with pytest.raises(ValueError, match=r"unknown params group\(s\) \['critic'\]"):
        state.apply_gradients({"critic": grads["generator"]})


def test_profile_window_writes_a_trace(tmp_path):
    mesh = make_mesh()
    state, _, step, bsh = setup(mesh, RULES["data_parallel"])
    loop.run(
        train_step=step,
        state=state,
        data_iterator=Iterator(),
        batch_sharding=bsh,
        num_data_shards=1,
        num_steps=3,
        workdir=tmp_path,
        profile_steps=(1, 2),
        log_every=3,
    )
    assert any((tmp_path / "profile").rglob("*.xplane.pb"))
