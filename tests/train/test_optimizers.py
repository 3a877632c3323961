"""The paper's Adafactor against a numpy reference, weight decay, schedules, int8 momentum."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parti_jax.train import optimizers, schedules
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


def test_paper_schedule_values():
    lr = schedules.parti_schedule()
    assert float(lr(0)) == 0.0
    assert float(lr(2_500)) == pytest.approx(2.25e-5)
    assert float(lr(5_000)) == pytest.approx(4.5e-5)
    assert float(lr(85_000)) == pytest.approx(4.5e-5)
    assert float(lr(450_000)) == pytest.approx(4.5e-5 * 0.025, rel=1e-5)
    assert float(lr(267_500)) == pytest.approx(4.5e-5 * 0.025**0.5, rel=1e-5)
    assert float(lr(600_000)) == pytest.approx(4.5e-5 * 0.025, rel=1e-5)
    cfg_lr = optimizers.learning_rate_fn(OptimizerConfig())
    assert float(cfg_lr(450_000)) == pytest.approx(float(lr(450_000)))


def test_cosine_schedule_values():
    lr = schedules.warmup_cosine_schedule(1e-3, warmup_steps=10, total_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(0.5e-3)
    assert float(lr(110)) == pytest.approx(0.0, abs=1e-12)


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
