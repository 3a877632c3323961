"""The paper's Adafactor against a numpy reference, weight decay, schedules, int8 momentum."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parti_jax.train import optimizers
from parti_jax.train.optimizers import OptimizerConfig


def _reference_adafactor(params, grads_seq, lr_seq, *, beta1, beta2, wd, eps, clip, min_dim):
    """The paper's rule written out in numpy (see parti_jax/train/optimizers.py)."""
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    state = {}
    for g_all, lr in zip(grads_seq, lr_seq):
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in g_all.values()))
        factor = min(1.0, clip / norm)
        for k in p:
            g = g_all[k].astype(np.float64) * factor
            g2 = g * g + eps
            st = state.setdefault(k, {})
            if g.ndim == 2 and min(g.shape) >= min_dim:
                r = st.get("r", 0.0) * beta2 + (1 - beta2) * g2.mean(axis=1)
                c = st.get("c", 0.0) * beta2 + (1 - beta2) * g2.mean(axis=0)
                st["r"], st["c"] = r, c
                vhat = np.outer(r, c) / r.mean()
            else:
                vhat = st.get("v", 0.0) * beta2 + (1 - beta2) * g2
                st["v"] = vhat
            u = g / np.sqrt(vhat)
            m = st.get("m", 0.0) * beta1 + (1 - beta1) * u
            st["m"] = m
            p[k] = p[k] - lr * (m + wd * p[k])
    return p


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "kernel": rng.normal(size=(6, 5)).astype(np.float32),
        "bias": rng.normal(size=(5,)).astype(np.float32),
    }
    grads = [
        {k: rng.normal(size=v.shape).astype(np.float32) * (1 + i) for k, v in params.items()}
        for i in range(4)
    ]
    return params, grads


@pytest.mark.parametrize("min_dim", [4, 128])  # factored matrix / unfactored
def test_adafactor_matches_numpy_reference(min_dim):
    params, grads = _tensors()
    cfg = OptimizerConfig(
        learning_rate=1e-2,
        schedule="constant",
        warmup_steps=0,
        min_dim_size_to_factor=min_dim,
        grad_clip_norm=4.0,
    )
    tx = optimizers.make_optimizer(cfg)
    p = jax.tree.map(jnp.asarray, params)
    st = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        u, st = update(jax.tree.map(jnp.asarray, g), st, p)
        p = optax.apply_updates(p, u)
    ref = _reference_adafactor(
        params,
        grads,
        [1e-2] * len(grads),
        beta1=0.9,
        beta2=0.96,
        wd=4.5e-2,
        eps=1e-30,
        clip=4.0,
        min_dim=min_dim,
    )
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=2e-5, atol=2e-6)
        assert not np.allclose(np.asarray(p[k]), params[k])
    adafactor_state = st[1]
    if min_dim == 4:  # the matrix keeps factored row/column statistics only
        assert adafactor_state.v_row["kernel"].shape == (6, 1)
        assert adafactor_state.v_col["kernel"].shape == (1, 5)
        assert adafactor_state.v["kernel"].size == 1
    else:
        assert adafactor_state.v["kernel"].shape == (6, 5)


def test_weight_decay_is_lr_times_wd_times_param():
    """With zero gradients only the decay acts: p_{t+1} = p_t (1 - lr_t wd)."""
    cfg = OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=4, weight_decay=0.5)
    tx = optimizers.make_optimizer(cfg)
    p = {"w": jnp.ones((3,))}
    st = tx.init(p)
    expected = 1.0
    for t in range(6):
        u, st = tx.update({"w": jnp.zeros((3,))}, st, p)
        p = optax.apply_updates(p, u)
        expected *= 1 - 0.1 * min(1.0, t / 4) * 0.5
        np.testing.assert_allclose(np.asarray(p["w"]), expected, rtol=1e-6)


def test_weight_decay_exclude():
    cfg = OptimizerConfig(
        learning_rate=0.1, schedule="constant", warmup_steps=0, weight_decay_exclude=r"bias$"
    )
    tx = optimizers.make_optimizer(cfg)
    p = {"layer": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}}
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    assert float(u["layer"]["bias"][0]) == 0.0
    assert float(u["layer"]["kernel"][0]) == pytest.approx(-0.1 * 4.5e-2)


def _closed_form_lr(c: OptimizerConfig, t: np.ndarray) -> np.ndarray:
    """The schedules written out in float64 (docs: OptimizerConfig, learning_rate_fn)."""
    t = t.astype(np.float64)
    warm = np.minimum(1.0, t / c.warmup_steps) if c.warmup_steps else np.ones_like(t)
    if c.schedule == "parti":
        span = c.decay_end_step - c.decay_start_step
        frac = np.clip((t - c.decay_start_step) / span, 0.0, 1.0)
        return c.learning_rate * warm * c.final_lr_ratio**frac
    if c.schedule == "cosine":
        frac = np.clip((t - c.warmup_steps) / (c.decay_end_step - c.warmup_steps), 0.0, 1.0)
        cosine = 0.5 * (1.0 + np.cos(np.pi * frac))
        return c.learning_rate * warm * (c.final_lr_ratio + (1 - c.final_lr_ratio) * cosine)
    return c.learning_rate * warm


ADAMW = OptimizerConfig.adamw_defaults
# Every OptimizerConfig the shipped gin files bind (gin/runs/*.gin), the defaults, and
# the VQGAN trainer's default for a 5-step run (warm-up 0).
SCHEDULES = {
    "paper (parti_paper_common.gin, defaults)": OptimizerConfig(),
    "shapes_train.gin": OptimizerConfig(
        learning_rate=2e-3,
        warmup_steps=100,
        decay_start_step=600,
        decay_end_step=1200,
        final_lr_ratio=0.1,
    ),
    "tiny_train.gin": OptimizerConfig(learning_rate=1e-2, warmup_steps=10),
    "adamw_defaults": ADAMW(),
    "shapes_vqgan.gin": ADAMW(learning_rate=1e-3, warmup_steps=100, decay_end_step=2000),
    "shapes_upsampler.gin": ADAMW(learning_rate=2e-3, warmup_steps=30, decay_end_step=150),
    "photos_vqgan.gin": ADAMW(learning_rate=1e-3, warmup_steps=100, decay_end_step=800),
    "vqgan_finetune_decoder.gin": ADAMW(warmup_steps=5000, decay_end_step=200_000),
    "tiny_vqgan.gin": ADAMW(learning_rate=3e-3, warmup_steps=2, decay_end_step=100),
    "vqgan default, 5 steps": ADAMW(warmup_steps=0, decay_end_step=5),
    "constant": OptimizerConfig(schedule="constant", warmup_steps=4),
    "constant, no warm-up": OptimizerConfig(schedule="constant", warmup_steps=0),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_equals_the_closed_form_at_every_step(name):
    c = SCHEDULES[name]
    end = max(c.decay_start_step, c.decay_end_step) + 1000
    steps = np.arange(end) if end <= 20_000 else np.unique(np.r_[0:20_000, 0:end:7, end - 1])
    lr = jax.jit(jax.vmap(optimizers.learning_rate_fn(c)))(jnp.asarray(steps, jnp.int32))
    want = _closed_form_lr(c, steps)
    # float32 rounding: the schedules subtract values of the peak's size (warm-up, cosine),
    # so the error is a few float32 ulps of the peak rate, not of each value.
    ulp = c.learning_rate * 2.0**-23
    np.testing.assert_allclose(np.asarray(lr, np.float64), want, rtol=1e-6, atol=2 * ulp)
    # Python ints (as the loop logs them) give the same values.
    for t in (0, 1, c.warmup_steps, c.decay_start_step, end - 1):
        got = float(optimizers.learning_rate_fn(c)(t))
        assert got == pytest.approx(_closed_form_lr(c, np.array([t]))[0], rel=1e-6, abs=2 * ulp)


def test_paper_schedule_landmarks():
    lr = optimizers.learning_rate_fn(OptimizerConfig())
    assert float(lr(0)) == 0.0
    assert float(lr(2_500)) == pytest.approx(2.25e-5)
    assert float(lr(85_000)) == pytest.approx(4.5e-5)
    assert float(lr(267_500)) == pytest.approx(4.5e-5 * 0.025**0.5, rel=1e-6)
    assert float(lr(600_000)) == pytest.approx(4.5e-5 * 0.025, rel=1e-6)
    cosine = optimizers.learning_rate_fn(
        ADAMW(learning_rate=1e-3, warmup_steps=10, decay_end_step=110)
    )
    assert [float(cosine(t)) for t in (10, 60)] == pytest.approx([1e-3, 0.5e-3])
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-12)
    for bad, field in (
        (dict(warmup_steps=90_000), "warmup_steps=90000"),
        (dict(decay_end_step=85_000), "decay_end_step=85000"),
        (dict(final_lr_ratio=0.0), "final_lr_ratio=0.0"),
        (dict(schedule="cosine", decay_end_step=10), "decay_end_step=10"),
        (dict(schedule="linear"), "schedule='linear'"),
    ):
        with pytest.raises(ValueError, match=f"OptimizerConfig.*{field}"):
            optimizers.learning_rate_fn(OptimizerConfig(**bad))


def test_int8_momentum_tracks_float():
    rng = np.random.default_rng(1)
    p0 = {"w": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)}
    target = jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)
    base = OptimizerConfig(
        learning_rate=3e-2, schedule="constant", warmup_steps=0, min_dim_size_to_factor=8
    )
    results = {}
    for dtype in ("float32", "int8"):
        tx = optimizers.make_optimizer(dataclasses.replace(base, momentum_dtype=dtype))
        p, st = p0, tx.init(p0)
        for i in range(30):
            noise = jax.random.normal(jax.random.PRNGKey(i), (16, 24)) * 0.3
            g = {"w": p["w"] - target + noise}
            u, st = tx.update(g, st, p)
            p = optax.apply_updates(p, u)
        results[dtype] = (np.asarray(p["w"]), st)
    assert results["int8"][1][1].m["w"].dtype == jnp.int8
    assert results["int8"][1][1].m_scale["w"].shape == (16, 1)
    moved = np.abs(results["float32"][0] - np.asarray(p0["w"])).mean()
    diff = np.abs(results["float32"][0] - results["int8"][0]).mean()
    assert diff < 0.01 * moved, (diff, moved)


def test_quantize_roundtrip():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 50)) * 1e-3, jnp.float32)
    q, s = optimizers.quantize_int8(x)
    err = np.abs(np.asarray(optimizers.dequantize_int8(q, s) - x))
    assert err.max() < 0.02 * float(jnp.abs(x).max())


def test_adamw_config_builds():
    cfg = OptimizerConfig.adamw_defaults(learning_rate=1e-3, warmup_steps=1, decay_end_step=10)
    tx = optimizers.make_optimizer(cfg)
    p = {"w": jnp.ones((3,))}
    u, _ = tx.update({"w": jnp.ones((3,))}, tx.init(p), p)
    assert float(u["w"][0]) == 0.0  # warm-up starts at 0
    with pytest.raises(ValueError, match="OptimizerConfig.name"):
        optimizers.make_optimizer(OptimizerConfig(name="sgd"))


def _muon_tx(**overrides):
    base = dict(
        name="muon",
        learning_rate=1.0,
        schedule="constant",
        warmup_steps=0,
        weight_decay=0.0,
        grad_clip_norm=None,
    )
    base.update(overrides)
    return optimizers.make_optimizer(OptimizerConfig(**base))


def test_muon_orthogonalises_attention_and_mlp_matrices_only():
    rng = np.random.default_rng(0)
    shapes = {
        "layers_0/self_attention/query/kernel": (16, 2, 8),  # [embed, heads, head]
        "layers_0/self_attention/out/kernel": (2, 8, 16),  # [heads, head, embed]
        "layers_0/mlp/wi/kernel": (16, 48),
        "layers/mlp/wo/kernel": (3, 48, 16),  # scanned: a leading layers axis
        "token_embedder/embedding": (40, 16),
        "logits_dense/kernel": (16, 40),
        "final_norm/scale": (16,),
    }
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.normal(size=s) * 3.0, jnp.float32) for k, s in shapes.items()}
    tx = _muon_tx(muon_update_rms=0.2)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    u = {k: -np.asarray(v) for k, v in u.items()}  # lr 1: the update is -scaled

    def matrices(name, x):
        if name.endswith(("query/kernel", "out/kernel")):
            return [x.reshape(16, 16)]  # [embed, heads * head] / [heads * head, embed]
        if name == "layers/mlp/wo/kernel":
            return list(x)  # each layer's [48, 16] on its own
        return [x]

    for name in ("query", "out", "mlp/wi", "layers/mlp/wo"):
        key = next(k for k in shapes if name in k)
        for mat in matrices(key, u[key]):
            sv = np.linalg.svd(mat, compute_uv=False)
            # Newton-Schulz (optax's quintic) leaves singular values in ~[0.7, 1.2]
            # times the scale; the raw gradient's spread is far wider.
            assert sv.max() / sv.min() < 2.0, (key, sv)
            rms = float(np.sqrt(np.mean(mat**2)))
            assert 0.12 < rms < 0.26, (key, rms)
    # Adam on the rest: the first bias-corrected step is g / |g| elementwise.
    for key in ("token_embedder/embedding", "logits_dense/kernel", "final_norm/scale"):
        np.testing.assert_allclose(np.abs(u[key]), 1.0, rtol=1e-3)
    assert optimizers.muon_matrix_axes("decoder/layers_0/mlp/wi/kernel", 2) == ((-2,), (-1,))
    assert optimizers.muon_matrix_axes("decoder/logits_dense/kernel", 2) is None
    assert optimizers.muon_matrix_axes("vqgan/out/kernel", 2) is None  # not [heads, head, embed]
    for bad in (dict(muon_beta=1.0), dict(muon_update_rms=0.0), dict(muon_newton_schulz_steps=0)):
        with pytest.raises(ValueError, match=f"OptimizerConfig.{next(iter(bad))}="):
            _muon_tx(**bad)


def test_muon_minimises_least_squares():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, 12)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)
    y = x @ target
    params = {"mlp/wi/kernel": jnp.zeros((12, 10), jnp.float32)}
    tx = _muon_tx(learning_rate=0.05)
    state = tx.init(params)

    def loss(p):
        return jnp.mean((x @ p["mlp/wi/kernel"] - y) ** 2)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    first = float(loss(params))
    for _ in range(150):
        params, state, _ = step(params, state)
    assert float(loss(params)) < 0.05 * first


def test_muon_state_shards_like_its_parameters_and_checkpoints(tmp_path):
    import orbax.checkpoint as ocp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    params = {
        "mlp": {"wi": {"kernel": jnp.ones((16, 32))}},
        "attention": {"query": {"kernel": jnp.ones((16, 2, 8))}},
        "embedding": jnp.ones((40, 16)),
    }
    specs = {
        "mlp": {"wi": {"kernel": PartitionSpec("fsdp", None)}},
        "attention": {"query": {"kernel": PartitionSpec("fsdp", None, None)}},
        "embedding": PartitionSpec(None, "fsdp"),
    }
    tx = _muon_tx()
    state = tx.init(params)
    shardings = optimizers.optimizer_state_shardings(jax.eval_shape(tx.init, params), specs, mesh)
    got = {
        optimizers.path_name(p): s.spec
        for p, s in jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
        )[0]
    }
    momentum = [k for k in got if k.endswith("mlp/wi/kernel")]
    assert momentum and all(got[k] == PartitionSpec("fsdp", None) for k in momentum)
    assert any(k.endswith("query/kernel") and got[k][0] == "fsdp" for k in got)
    state = jax.device_put(state, shardings)
    grads = jax.tree.map(lambda x: x * 0.5, params)
    _, state = tx.update(grads, state, params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "opt", jax.eval_shape(lambda: state))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
