"""The encoder-decoder task: loss, exact micro-batching, FLOPs, training on synthetic
codes, shardings per rule table, bad input, warm starts across layouts."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from parti_jax import partitioning
from parti_jax.models import transformer
from parti_jax.models.config import ModelConfig
from parti_jax.partitioning import MeshConfig
from parti_jax.train import checkpoints, metrics, optimizers, t2i
from parti_jax.train.loop import LoopConfig
from parti_jax.train.optimizers import OptimizerConfig, factored_dims
from parti_jax.train.state import TrainState, sharded_train_state
from parti_jax.train.synthetic import SyntheticCodesIterator

TINY = ModelConfig(
    text_vocab_size=64,
    codebook_size=16,
    image_grid=(4, 4),
    max_text_length=8,
    d_model=32,
    num_heads=4,
    mlp_dim=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
    dtype="float32",
)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=10, min_dim_size_to_factor=16)
DP_MESH = MeshConfig(data=-1, fsdp=1, tensor=1, rules="data_parallel")


def _batch(config=TINY, batch_size=4, seed=0):
    it = SyntheticCodesIterator(
        batch_size=batch_size,
        text_length=config.max_text_length,
        text_vocab_size=config.text_vocab_size,
        codebook_size=config.codebook_size,
        image_grid=config.image_grid,
        seed=seed,
    )
    return next(it)


def test_loss_falls_on_synthetic_codes(tmp_path):
    result = t2i.train(
        workdir=str(tmp_path),
        model_config=TINY,
        mesh_config=DP_MESH,
        optimizer_config=OPT,
        batch_size=8,
        loop=LoopConfig(num_steps=40, log_every=1, checkpoint_every=1000, eval_every=40),
        text_length=8,
        eval_steps=1,
    )
    assert result.status == "done" and result.step == 40
    lines = [m for m in metrics.read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, 41))
    first, last = lines[0]["loss"], lines[-1]["loss"]
    assert first > 4.0  # ~log(128) at initialisation
    assert last < 0.6 * first, (first, last)
    assert lines[-1]["accuracy"] > lines[0]["accuracy"]
    evals = [m for m in metrics.read_metrics(tmp_path / "metrics.jsonl") if "eval/loss" in m]
    assert evals and evals[0]["step"] == 40 and evals[0]["eval/loss"] < first
    info = json.loads((tmp_path / "model_config.json").read_text())
    assert info["model_config"]["codebook_size"] == 16
    assert (tmp_path / "checkpoints" / "40").exists()  # final save

    # A new run warm-started from this one starts where this one ended.
    warm = t2i.train(
        workdir=str(tmp_path / "warm"), model_config=TINY, mesh_config=DP_MESH,
        optimizer_config=OPT, batch_size=8, loop=LoopConfig(num_steps=1), text_length=8,
        restore_from=str(tmp_path), restore_include=r"^(encoder|decoder)/",
    )  # fmt: skip
    assert warm.last_metrics["loss"] < 0.6 * first


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, size=(2, 3))
    weights = rng.uniform(size=(2, 3)).astype(np.float32)
    sums = t2i.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), weights, 1e-2)
    log_z = np.log(np.exp(logits).sum(-1))
    ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(sums["ce"], (ce * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["z_loss"], 1e-2 * (log_z**2 * weights).sum(), rtol=1e-5)
    correct = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(sums["correct"], correct.sum(), rtol=1e-6)


class BagOfTokens(nn.Module):
    """A cheap stand-in with the EncoderDecoder call signature (compiles in a second)."""

    vocab: int = 128

    @nn.compact
    def __call__(self, encoder_input_tokens, decoder_input_tokens, enable_dropout=False):
        text = nn.Embed(64, 16)(encoder_input_tokens).mean(axis=1, keepdims=True)
        x = nn.Embed(self.vocab, 16)(decoder_input_tokens) + text
        x = nn.Dropout(0.0, deterministic=not enable_dropout)(x)
        return nn.Dense(self.vocab)(x)


def test_micro_batches_are_exact_with_uneven_weights():
    """Accumulated micro-batches give the whole batch's weighted mean and update."""
    model = BagOfTokens()
    batch = _batch(batch_size=4)
    batch["decoder_loss_weights"][0, :10] = 0.0  # uneven weight per micro-batch
    params = model.init(
        jax.random.PRNGKey(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )["params"]
    cfg = dataclasses.replace(OPT, warmup_steps=0)
    tx = optimizers.make_optimizer(cfg)
    state = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(1))
    step = jax.jit(
        functools.partial(t2i.train_step, model=model), static_argnames=("num_micro_batches",)
    )
    s1, m1 = step(state, batch, num_micro_batches=1)
    s2, m2 = step(state, batch, num_micro_batches=2)
    assert float(m1["tokens"]) == 4 * 16 - 10
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["accuracy"], m2["accuracy"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(s1.params)[0], jax.tree.leaves(params)[0])


def test_dropout_rng_impl_reaches_the_train_step():
    batch = _batch(batch_size=2)
    losses = {}
    for impl in ("threefry", "unsafe_rbg"):
        cfg = dataclasses.replace(TINY, dropout_rate=0.3, dropout_rng_impl=impl)
        model = transformer.EncoderDecoder(cfg)
        params = model.init(
            jax.random.PRNGKey(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
        )["params"]
        tx = optimizers.make_optimizer(OPT)
        state = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(1))
        step = jax.jit(functools.partial(t2i.train_step, model=model))
        losses[impl] = [float(step(state, batch)[1]["loss"]) for _ in range(2)]
    # Each generator draws fixed masks (same loss twice), and other masks than threefry's.
    for impl, (a, b) in losses.items():
        assert a == b and np.isfinite(a), impl
    assert losses["threefry"][0] != losses["unsafe_rbg"][0]


def test_flops_count_matches_xla_forward():
    cfg = dataclasses.replace(TINY, d_model=64, mlp_dim=256, image_grid=(8, 8), scan_layers=False)
    model = transformer.EncoderDecoder(cfg)
    enc = jnp.ones((2, 8), jnp.int32)
    dec = jnp.ones((2, 64), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec))
    cost = jax.jit(lambda v: model.apply(v, enc, dec)).lower(variables).compile().cost_analysis()
    ours = t2i.t2i_flops_per_step(cfg, 2, 8) / 3
    # XLA also counts elementwise work and full (not causal) score matrices.
    assert 0.75 * cost["flops"] < ours <= cost["flops"], (ours, cost["flops"])


def _check_moment_shardings(params, ada, get_spec):
    """Each factored moment is sharded like its parameter minus the reduced dim."""
    flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])  # noqa: E731
    p_flat, v_row, v_col, m, m_scale = map(flat, (params, ada.v_row, ada.v_col, ada.m, ada.m_scale))
    sharded = factored = 0
    for path, p in p_flat.items():
        spec = get_spec(p)
        sharded += any(a is not None for a in spec)
        dims = factored_dims(p.shape, True, OPT.min_dim_size_to_factor)
        if dims is not None:
            factored += 1
            r, c = dims
            assert get_spec(v_row[path]) == tuple(None if i == c else a for i, a in enumerate(spec))
            assert get_spec(v_col[path]) == tuple(None if i == r else a for i, a in enumerate(spec))
        assert get_spec(m[path]) == spec and m[path].dtype == jnp.int8
        assert get_spec(m_scale[path]) == spec[:-1] + (None,)
    assert factored > 5
    return sharded


def _tiny_init(model):
    def init_fn(key):
        return model.init(key, jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 16), jnp.int32))

    return init_fn


def test_adafactor_state_shardings_follow_each_rule_table():
    """All three rule tables on the 8-device mesh; fsdp_tp also compiled."""
    model = transformer.EncoderDecoder(TINY)
    tx = optimizers.make_optimizer(dataclasses.replace(OPT, momentum_dtype="int8"))
    for table in ("data_parallel", "fsdp", "fsdp_tp"):
        mesh = partitioning.create_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules=table))
        rules = partitioning.get_rules(table)
        with_shapes, _ = sharded_train_state(
            _tiny_init(model), tx, mesh=mesh, rules=rules, rng=jax.random.PRNGKey(0),
            abstract=True,
        )  # fmt: skip
        get = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
        sharded = _check_moment_shardings(with_shapes.params, with_shapes.opt_state[1], get)
        assert (sharded > 0) == (table != "data_parallel")
    # The compiled initialisation lays the arrays out as computed.
    state, _ = sharded_train_state(
        _tiny_init(model), tx, mesh=mesh, rules=rules, rng=jax.random.PRNGKey(0)
    )
    assert _check_moment_shardings(state.params, state.opt_state[1], get) > 0
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(with_shapes)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


def test_mesh_that_cannot_divide_heads_fails_before_compiling(tmp_path):
    cfg = dataclasses.replace(TINY, d_model=64, num_heads=16, mlp_dim=48)
    mesh = jax.make_mesh(
        (1, 1, 3), ("data", "fsdp", "tensor"), devices=jax.devices()[:3],
        axis_types=(AxisType.Auto,) * 3,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"num_heads=16 is not divisible by tensor=3"):
        t2i.train(
            workdir=str(tmp_path), model_config=cfg, mesh_config=mesh, rules="fsdp_tp",
            batch_size=3, loop=LoopConfig(num_steps=1), text_length=8,
        )  # fmt: skip
    assert not (tmp_path / "checkpoints").exists()


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"work directory .*a_file/run is not writable"):
        t2i.train(
            workdir=str(blocker / "run"), model_config=TINY, batch_size=8,
            loop=LoopConfig(num_steps=1), text_length=8,
        )  # fmt: skip


def test_warm_start_scanned_to_unscanned_and_encoder_only(tmp_path):
    def make(cfg, seed):
        init = jax.jit(_tiny_init(transformer.EncoderDecoder(cfg)))
        params = nn.unbox(init(jax.random.PRNGKey(seed)))["params"]
        return TrainState.create(params=params, tx=optax.identity(), rng=jax.random.PRNGKey(0))

    scanned_cfg = dataclasses.replace(TINY, num_decoder_layers=2, scan_layers=True)
    scanned = make(scanned_cfg, 0)
    ckpt = checkpoints.Checkpointer(tmp_path / "src", save_interval_steps=1)
    ckpt.save(7, scanned)
    ckpt.close()
    step_dir = checkpoints.resolve_checkpoint_dir(tmp_path / "src")

    target = make(dataclasses.replace(TINY, num_decoder_layers=2, scan_layers=False), 1)
    # The scanned checkpoint is unrolled to fit the unscanned model (names decide).
    params, names = checkpoints.restore_params_from(step_dir, target.params)
    expected = transformer.scan_to_unscanned(jax.device_get(scanned.params))
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    assert flat_e.keys() == flat_p.keys() and len(names) == len(flat_p)
    assert any("layers_1" in n for n in names)
    for k in flat_e:
        np.testing.assert_array_equal(np.asarray(flat_p[k]), np.asarray(flat_e[k]))
    same, _ = checkpoints.restore_params_from(step_dir, scanned.params)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(scanned.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Encoder only, same layout: the decoder keeps its initialisation.
    other = make(scanned_cfg, 2)
    params, names = checkpoints.restore_params_from(step_dir, other.params, include=r"^encoder/")
    assert names and all(n.startswith("encoder/") for n in names)
    for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(scanned.params["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(params["decoder"]), jax.tree.leaves(other.params["decoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_codes_task_checked_against_the_model(tmp_path):
    """A codes folder whose codebook differs from the model's fails naming both values."""
    pytest.importorskip("seqio")
    from parti_jax.tasks import register_codes_task
    from tests.data.data_testing import write_codes_folder

    write_codes_folder(tmp_path / "codes", codebook_size=32, grid=(4, 4), num_shards=1)
    task = register_codes_task("train_test_mismatch", str(tmp_path / "codes"))
    with pytest.raises(ValueError, match=r"codebook_size 32 != expected 16"):
        t2i.train(
            workdir=str(tmp_path / "run"), model_config=TINY, mesh_config=DP_MESH,
            task=task, batch_size=8, loop=LoopConfig(num_steps=1), text_length=8,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"codebook_hash feedc0de != expected 0123abcd"):
        t2i.train(
            workdir=str(tmp_path / "run"),
            model_config=dataclasses.replace(TINY, codebook_size=32),
            mesh_config=DP_MESH, task=task, batch_size=8, loop=LoopConfig(num_steps=1),
            text_length=8,
            codebook_hash="0123abcd",
        )  # fmt: skip
    # Matching codes train through the SeqIO pipeline; its position is checkpointed
    # and a second run resumes from it.
    cfg = dataclasses.replace(TINY, codebook_size=32, text_vocab_size=256)
    kw = dict(
        workdir=str(tmp_path / "ok"), model_config=cfg, mesh_config=DP_MESH, task=task,
        batch_size=8, text_length=8, optimizer_config=OPT,
    )  # fmt: skip
    loop = functools.partial(LoopConfig, log_every=1, checkpoint_every=2)
    assert t2i.train(loop=loop(num_steps=2), **kw).status == "done"
    saved = list((tmp_path / "ok" / "checkpoints" / "2" / "data").glob("shard_0_of_1*"))
    assert saved, "no data position saved"
    assert t2i.train(loop=loop(num_steps=3), **kw).step == 3
    steps = [m["step"] for m in metrics.read_metrics(tmp_path / "ok" / "metrics.jsonl")]
    assert steps == [1, 2, 3]
