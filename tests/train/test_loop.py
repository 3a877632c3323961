"""The one training loop on a tiny flax model: loss falls, logs, checkpoints and resumes,
micro-batches, NaN policies, SIGTERM, hooks, evaluation, settings checked, shardings."""

import dataclasses
import os
import signal
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from parti_jax import partitioning, storage
from parti_jax.partitioning import EMBED, MLP
from parti_jax.train import checkpoints, loop, metrics, optimizers
from parti_jax.train.optimizers import OptimizerConfig
from parti_jax.train.state import sharded_train_state

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


def step_fn(state, batch):
    loss, _, grads = loop.accumulate_gradients(loss_fn, state.params, batch, state.step_rng())
    return state.apply_gradients(grads), {
        "loss": loss,
        "grad_norm": optimizers.optax.tree.norm(grads),
    }


def make_mesh(data=8, fsdp=1, tensor=1):
    return jax.make_mesh(
        (data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3
    )


class Batches:
    """Deterministic regression batches with a checkpointable position."""

    def __init__(self, seed=0, poison_at=None, on_position=None):
        self.seed, self.position = seed, 0
        self.poison_at, self.on_position = poison_at, on_position

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        if self.on_position is not None:
            self.on_position(self.position)
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


def optimizer(min_dim=8, momentum="float32"):
    cfg = OptimizerConfig(
        learning_rate=3e-2,
        schedule="constant",
        warmup_steps=0,
        min_dim_size_to_factor=min_dim,
        momentum_dtype=momentum,
    )
    return optimizers.make_optimizer(cfg), optimizers.learning_rate_fn(cfg)


def init_fn(key):
    return MODEL.init(key, jnp.zeros((1, DIN)))


def task(data=None, **overrides):
    tx, lr = optimizer()
    kw = dict(
        init=init_fn,
        optimizer=tx,
        step=step_fn,
        data=data or (lambda seed: Batches(seed)),
        batch_keys=("x", "y"),
        learning_rate_fn=lr,
    )
    return loop.TrainTask(**{**kw, **overrides})


def train(workdir, config, data=None, mesh=None, rules=None, **task_overrides):
    mesh_config = mesh or partitioning.MeshConfig(data=-1, fsdp=1, tensor=1, rules="data_parallel")
    run = loop.start_run(workdir, batch_size=BATCH, mesh_config=mesh_config, rules=rules)
    return loop.run_training(run, task(data, **task_overrides), config)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_loss_falls_logs_checkpoints_and_resumes_exactly(where, tmp_path, request):
    """On a local folder and on gs:// (the GCS emulator): there the data position (this
    iterator writes a local file) is staged, and the step kept aside is a copy."""
    workdir = str(tmp_path) if where == "local" else request.getfixturevalue("gcs").url("run")
    config = loop.LoopConfig(num_steps=40, log_every=10, checkpoint_every=20, tensorboard=True)
    result = train(workdir, config)
    assert result.status == "done" and result.step == 40
    lines = metrics.read_metrics(storage.join(workdir, "metrics.jsonl"))
    assert [line["step"] for line in lines] == [10, 20, 30, 40]
    assert lines[-1]["loss"] < 0.7 * lines[0]["loss"]
    assert lines[0]["learning_rate"] == pytest.approx(3e-2)
    assert {"seconds_per_step", "examples_per_second"} <= set(lines[-1])
    assert storage.listdir(storage.join(workdir, "checkpoints")) == ["20", "40"]
    assert storage.glob(storage.join(workdir, "tensorboard"), "events.out.tfevents.*")

    # Resume by hand from step 20 (parameters, optimizer, data position): step 40 is kept
    # aside, steps 30 and 40 get the same losses, and metrics.jsonl has each step once.
    resumed = train(workdir, dataclasses.replace(config, restore_step=20))
    assert resumed.step == 40
    again = metrics.read_metrics(storage.join(workdir, "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in again] == [(r["step"], r["loss"]) for r in lines]
    names = storage.listdir(storage.join(workdir, "checkpoints"))
    assert names[:2] == ["20", "40"] and names[2].startswith("40.replaced-"), names
    with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint for step 30; steps t"):
        train(workdir, dataclasses.replace(config, restore_step=30))


def test_resumed_logs_drop_the_lines_past_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 4, "loss": 1}\nnot json\n{"note": 1}\n{"step": 5}\n{"step": 6, "lo')
    metrics.drop_lines_after(log, 4)  # the kill cut the last line short
    assert log.read_text() == '{"step": 4, "loss": 1}\nnot json\n{"note": 1}\n'


def test_micro_batches_match_full_batch():
    params = MODEL.init(jax.random.PRNGKey(1), jnp.zeros((1, DIN)))["params"]
    batch = next(Batches())
    acc = jax.jit(loop.accumulate_gradients, static_argnums=(0, 4))
    l1, a1, g1 = acc(loss_fn, params, batch, jax.random.PRNGKey(0), 1)
    l4, a4, g4 = acc(loss_fn, params, batch, jax.random.PRNGKey(0), 4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    np.testing.assert_allclose(a1["mse"], a4["mse"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nan_skip_keeps_params_and_stop_names_the_step(tmp_path):
    poisoned = lambda seed: Batches(seed, poison_at=2)  # noqa: E731
    skip = loop.LoopConfig(num_steps=3, log_every=1, checkpoint_every=100, nan_policy="skip")
    result = train(tmp_path / "skip", skip, data=poisoned)
    lines = metrics.read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert [m["skipped"] for m in lines] == [0.0, 1.0, 0.0]
    assert not np.isfinite(lines[1]["loss"]) and lines[2]["skipped_steps"] == 1.0
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(result.state.params))

    stop = loop.LoopConfig(num_steps=8, log_every=4, checkpoint_every=100)
    poisoned = lambda seed: Batches(seed, poison_at=3)  # noqa: E731
    with pytest.raises(loop.NonFiniteLossError, match=r"step 3: loss is nan"):
        train(tmp_path / "stop", stop, data=poisoned)
    assert not list((tmp_path / "stop" / "checkpoints").iterdir())  # no poisoned checkpoint


def test_sigterm_saves_and_stops(tmp_path):
    def kill_at_3(position):
        if position == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    config = loop.LoopConfig(num_steps=50, log_every=100, checkpoint_every=1000)
    result = train(tmp_path, config, data=lambda seed: Batches(seed, on_position=kill_at_3))
    assert result.status == "preempted" and result.step == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
    assert (tmp_path / "checkpoints" / "3" / "data" / "shard_0_of_1").read_text() == "3"
    # A resume with another number of data shards is refused unless allowed.
    state = sharded_train_state(
        init_fn,
        optimizer()[0],
        mesh=make_mesh(),
        rules=RULES["data_parallel"],
        rng=jax.random.key(0),
    )[0]
    other = checkpoints.Checkpointer(tmp_path, data_shard=checkpoints.DataShard(index=0, count=2))
    with pytest.raises(checkpoints.CheckpointError, match=r"saved for \[1\] data shard.*reads 2"):
        other.restore(state, data_iterator=Batches())
    _, data_ok = other.restore(state, data_iterator=Batches(), allow_data_reshuffle=True)
    assert data_ok is False
    other.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]  # not set aside


def test_hooks_evaluation_and_warm_start(tmp_path):
    saved, evaluated = [], []

    def warm_start(state):
        return state.replace(params=jax.tree.map(jnp.zeros_like, state.params))

    def evaluate(state, step):
        evaluated.append(step)
        return {"w1_norm": float(jnp.linalg.norm(state.params["w1"]))}

    config = loop.LoopConfig(num_steps=7, log_every=7, checkpoint_every=3, eval_every=3)
    train(
        tmp_path,
        config,
        warm_start=warm_start,
        evaluate=evaluate,
        evaluate_at_end=True,
        on_save=lambda step, state: saved.append(step),
    )
    assert evaluated == [3, 6, 7] and saved == [3, 6, 7]
    evals = [m for m in metrics.read_metrics(tmp_path / "metrics.jsonl") if "eval/w1_norm" in m]
    assert [m["step"] for m in evals] == [3, 6, 7]
    # Zeroed by the warm start, relu(0) = 0: no gradient reaches w1 or w2.
    assert evals[-1]["eval/w1_norm"] == 0.0

    # A resumed run is not warm-started again.
    train(tmp_path, loop.LoopConfig(num_steps=8, checkpoint_every=3), warm_start=pytest.fail)


def test_settings_are_checked_naming_the_field(tmp_path):
    for kwargs, message in [
        (dict(num_steps="ten"), r"LoopConfig.num_steps='ten' must be an integer >= 1"),
        (dict(num_steps=0), r"LoopConfig.num_steps=0 must be an integer >= 1"),
        (dict(num_steps=5, log_every=0), r"LoopConfig.log_every=0"),
        (
            dict(num_steps=5, keep_checkpoints=1),
            r"LoopConfig.keep_checkpoints=1 must be an .* >= 2",
        ),
        (dict(num_steps=5, restore_step=-1), r"LoopConfig.restore_step=-1 must be an .* or None"),
        (dict(num_steps=5, eval_every=-1), r"LoopConfig.eval_every=-1 .* or None"),
        (dict(num_steps=5, nan_policy="ignore"), r"LoopConfig.nan_policy='ignore'"),
        (dict(num_steps=5, profile_steps=(3, 1)), r"LoopConfig.profile_steps=\(3, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            loop.LoopConfig(**kwargs)
    with pytest.raises(ValueError, match=r"train.batch_size=-8 must be an integer >= 1"):
        loop.start_run(tmp_path, batch_size=-8)
    with pytest.raises(ValueError, match=r"train_vqgan.batch_size=12 does not divide over the "):
        loop.start_run(tmp_path, batch_size=12, where="train_vqgan")


@pytest.mark.parametrize("table", ["data_parallel", "fsdp", "fsdp_tp"])
def test_optimizer_state_shardings_follow_params(table, tmp_path):
    """Output shardings of Adafactor's moments (factored and int8) per rule table."""
    tx, _ = optimizer(min_dim=8, momentum="int8")
    result = train(
        tmp_path,
        loop.LoopConfig(num_steps=1, tensorboard=False),
        mesh=make_mesh(2, 2, 2),
        rules=RULES[table],
        optimizer=tx,
    )
    state = result.state
    ada = state.opt_state[1]
    exp = EXPECTED[table]
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
    for name in ("w1", "w2"):
        row, col = exp[name]
        assert spec(state.params[name]) == (row, col)
        assert spec(ada.v_row[name]) == (row, None)  # column dim reduced
        assert spec(ada.v_col[name]) == (None, col)  # row dim reduced
        assert spec(ada.m[name]) == (row, col) and ada.m[name].dtype == jnp.int8
        assert spec(ada.m_scale[name]) == (row, None)
    assert ada.v_row["w1"].shape == (DIN, 1) and ada.v_col["w1"].shape == (1, HID)
    assert spec(ada.v["b1"]) == exp["b1"]  # unfactored vector
    assert spec(ada.v["w1"]) == (None, None)  # placeholder


def _state(mesh, rules):
    return sharded_train_state(
        init_fn, optimizer()[0], mesh=mesh, rules=rules, rng=jax.random.PRNGKey(0)
    )[0]


def test_restore_onto_another_mesh_and_partial(tmp_path):
    state = _state(make_mesh(8, 1, 1), RULES["data_parallel"])
    state = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=1)
    ckpt.save(5, state)
    ckpt.wait_until_finished()

    target = _state(make_mesh(1, 4, 2), RULES["fsdp_tp"])
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
    adam = optimizers.make_optimizer(
        OptimizerConfig(name="adam", learning_rate=0.1, schedule="constant", warmup_steps=0)
    )
    tx = {"generator": adam, "discriminator": optimizers.make_optimizer(OptimizerConfig())}

    def init_groups(key):
        k1, k2 = jax.random.split(key)
        x = jnp.zeros((1, DIN))
        return {"generator": MODEL.init(k1, x), "discriminator": MODEL.init(k2, x)}

    state, shardings = sharded_train_state(
        init_groups, tx, mesh=mesh, rules=RULES["fsdp_tp"], rng=jax.random.PRNGKey(0)
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


@pytest.mark.parametrize("where", ["local", "gs"])
def test_profile_window_writes_a_trace_and_images_reach_tensorboard(where, tmp_path, request):
    workdir = str(tmp_path) if where == "local" else request.getfixturevalue("gcs").url("run")
    train(workdir, loop.LoopConfig(num_steps=3, log_every=3, profile_steps=(1, 2)))
    with storage.fetched(storage.join(workdir, "profile")) as profile:  # a URL: uploaded
        assert any(Path(profile).rglob("*.xplane.pb"))
    if where == "gs":
        return

    writer = metrics.MetricWriter(tmp_path / "tb")
    writer.write_images(5, {"grid": np.zeros((4, 6, 3), np.uint8)})
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    (image,) = events.Images("grid")
    assert (image.step, image.width, image.height) == (5, 6, 4)
