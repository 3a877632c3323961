"""ViT-VQGAN: shapes, errors, logical axes, parameter counts of the paper's sizes, training.

Parameter counts are taken with `jax.eval_shape` (nothing allocated, nothing
compiled). Counted per stack: the encoder's patch embedding + position table +
transformer layers + final LayerNorm + tanh feed-forward; the decoder's position
table + layers + final LayerNorm + tanh feed-forward + patch unembedding.
The quantizer (projections and codebook) is counted apart.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from parti_jax import partitioning
from parti_jax.models.layers import param_count, scan_to_unscanned
from parti_jax.partitioning import LAYERS
from parti_jax.vqgan import tokenizer
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.losses import LossConfig
from parti_jax.vqgan.vit_vqgan import ViTVQGAN, patchify, unpatchify
from tests.models.test_sizes import gin_configurables, stated_params
from tests.pipeline_fixtures import TINY_VQGAN

# The ViT-VQGAN paper's per-stack sizes (encoder, decoder parameters); Parti pairs
# a Small encoder with a Large decoder.
PAPER = {
    "vqgan/small.gin": (32e6, 32e6),
    "vqgan/base.gin": (91e6, 91e6),
    "vqgan/large.gin": (599e6, 599e6),
    "vqgan/parti_finetune.gin": (32e6, 599e6),
}


def tiny_config(**overrides) -> VQGANConfig:
    return VQGANConfig(**{**TINY_VQGAN, **overrides})


def images(n: int = 2, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)


def init(cfg: VQGANConfig, abstract: bool = False):
    model = ViTVQGAN(cfg)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    if abstract:
        return model, jax.eval_shape(model.init, jax.random.key(0), x)
    return model, jax.jit(model.init)(jax.random.key(0), x)


def test_shapes_of_call_encode_decode():
    cfg = tiny_config()
    model, variables = init(cfg)
    x = images()
    apply = jax.jit(model.apply, static_argnames="method")
    recon, aux = apply(variables, x)
    assert recon.shape == (2, 16, 16, 3) and recon.dtype == jnp.float32
    assert aux["codes"].shape == (2, 4, 4) and aux["codes"].dtype == jnp.int32
    assert aux["decoder_output"].shape == (2, 16, 16, 3)
    assert aux["latents"].shape == (2, 16, 8) and aux["code_counts"].shape == (64,)
    assert float(jnp.sum(aux["code_counts"])) == 2 * 16
    assert 1.0 <= float(aux["perplexity"]) <= 64.0 and 0.0 < float(aux["usage"]) <= 1.0
    for key in ("vq_loss", "codebook_loss", "commitment_loss"):
        assert aux[key].shape == () and float(aux[key]) >= 0.0
    codes = apply(variables, x, method=ViTVQGAN.encode)
    np.testing.assert_array_equal(codes, aux["codes"])
    out = apply(variables, codes, method=ViTVQGAN.decode_codes)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    # Decoding the codes reproduces the training-path reconstruction (sigmoid: already in range).
    np.testing.assert_allclose(out, recon, atol=1e-5)
    flat = apply(variables, codes.reshape(2, 16), method=ViTVQGAN.decode_codes)
    np.testing.assert_allclose(flat, out, atol=1e-6)


def test_logit_laplace_and_linear_outputs():
    cfg = tiny_config(logit_laplace=True)
    model, variables = init(cfg)
    recon, aux = jax.jit(model.apply)(variables, images())
    assert aux["decoder_output"].shape == (2, 16, 16, 6)
    eps = cfg.logit_laplace_eps
    mu = aux["decoder_output"][..., :3]
    np.testing.assert_allclose(recon, (jax.nn.sigmoid(mu) - eps) / (1 - 2 * eps), atol=1e-6)

    cfg = tiny_config(output="linear")
    model, variables = init(cfg)
    # Push the decoder output far out of range: training path unclipped, decode clipped.
    variables = jax.tree_util.tree_map(lambda a: a * 40.0, variables)
    apply = jax.jit(model.apply, static_argnames="method")
    recon, aux = apply(variables, images())
    assert float(jnp.max(jnp.abs(recon - 0.5))) > 0.5
    out = apply(variables, aux["codes"], method=ViTVQGAN.decode_codes)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    with pytest.raises(ValueError, match="logit_laplace=True needs VQGANConfig.output='sigmoid'"):
        tiny_config(output="linear", logit_laplace=True)


def test_bad_inputs_name_the_sizes():
    cfg = tiny_config()
    model, variables = init(cfg)
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 3\).*image_size=16"):
        model.apply(variables, images(size=32))
    with pytest.raises(ValueError, match="image_size=16"):
        model.apply(variables, images(size=32), method=ViTVQGAN.encode)
    with pytest.raises(ValueError, match="grid is 4x4"):
        model.apply(variables, jnp.zeros((2, 5, 5), jnp.int32), method=ViTVQGAN.decode_codes)
    with pytest.raises(ValueError, match=r"\[64, 64\].*codebook_size=64"):
        model.apply(variables, jnp.full((2, 4, 4), 64, jnp.int32), method=ViTVQGAN.decode_codes)
    with pytest.raises(ValueError, match="not a multiple of VQGANConfig.patch_size"):
        tiny_config(image_size=18)


def test_patchify_roundtrip_is_row_major():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 4, 48)
    # Token 1 is the top-right patch.
    np.testing.assert_array_equal(tokens[0, 1].reshape(4, 4, 3), x[0, :4, 4:])
    np.testing.assert_array_equal(unpatchify(tokens, 4, 2, 3), x)


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
    cfg = tiny_config(scan_layers=scan, encoder_depth=2)
    _, variables = init(cfg, abstract=True)
    assert partitioning.params_without_axes(variables) == []
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 20
    assert any(leaf.names[0] == LAYERS for leaf in leaves) == scan


def test_sharded_scanned_remat_dropout_training_on_a_mesh(cpu_devices):
    mesh = partitioning.create_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
    rules = partitioning.get_rules("fsdp_tp")
    # Unscanned layout, abstractly: the query kernel [E, H, D] splits on fsdp x tensor.
    model = ViTVQGAN(tiny_config())
    with partitioning.with_sharding_rules(mesh, rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), images(4))
        shardings = partitioning.logical_shardings(abstract, mesh, rules)
    query = shardings["params"]["encoder"]["transformer"]["layers_0"]["attention"]["query"]
    assert query["kernel"].spec == P("fsdp", "tensor", None)

    # Scanned + remat + dropout: sharded init, then gradients under the mesh.
    cfg = tiny_config(scan_layers=True, remat=True, dropout=0.5, decoder_depth=2)
    model = ViTVQGAN(cfg)
    x = images(4)
    variables, _ = partitioning.sharded_init(model.init, mesh, rules, jax.random.key(0), x)
    layers = variables["params"]["encoder"]["transformer"]["layers"]
    assert layers["attention"]["query"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)

    def loss(v, key):
        recon, aux = model.apply(v, x, enable_dropout=True, rngs={"dropout": key})
        return jnp.mean(jnp.square(recon - x)) + aux["vq_loss"], aux["codes"]

    with partitioning.with_sharding_rules(mesh, rules):
        grad_fn = jax.jit(jax.grad(loss, has_aux=True))
        g1, codes = grad_fn(variables, jax.random.key(1))
        g2, _ = grad_fn(variables, jax.random.key(2))
    assert codes.shape == (4, 4, 4)
    wi1 = g1["params"]["decoder"]["transformer"]["layers"]["mlp"]["wi"]["kernel"]
    wi2 = g2["params"]["decoder"]["transformer"]["layers"]["mlp"]["wi"]["kernel"]
    assert wi1.shape[0] == 2  # the stacked 'layers' axis
    assert float(jnp.abs(wi1).sum()) > 0
    assert not np.allclose(wi1, wi2)  # dropout masks differ per key


def test_sinusoidal_positions_have_no_table():
    _, variables = init(tiny_config(position_embedding="sinusoidal"), abstract=True)
    assert "position_embedding" not in variables["params"]["encoder"]
    _, variables = init(tiny_config(), abstract=True)
    assert variables["params"]["encoder"]["position_embedding"]["table"].value.shape == (16, 32)


def test_local_attention_without_positions_codes_a_patch_by_its_neighbourhood():
    # An 8x8 grid, window 1, one block per stack: a patch's encoder output sees
    # patches at most 1 step away; without position embeddings a patch's code does
    # not depend on where it is.
    local = tiny_config(
        image_size=32, attention_window=1, position_embedding="none", codebook_size=512
    )
    x = np.zeros((1, 32, 32, 3), np.float32)
    x[0, 4:10, 4:10] = (1.0, 0.1, 0.1)  # an object in patches (1..2, 1..2)
    far = x.copy()
    far[0, 24:32, 24:32] = (0.1, 0.2, 1.0)  # something else in patches (6..7, 6..7)

    def features(cfg):
        model, variables = init(cfg)
        fn = jax.jit(lambda v, im: model.apply(v, im, method=lambda m, im: m.encoder(im)))
        return np.asarray(fn(variables, x)), np.asarray(fn(variables, far))

    near_a, near_b = (f.reshape(8, 8, -1)[:4, :4] for f in features(local))
    np.testing.assert_allclose(near_a, near_b, atol=1e-6)  # the far change is invisible
    glob_a, glob_b = (f.reshape(8, 8, -1)[:4, :4] for f in features(tiny_config(image_size=32)))
    assert np.abs(glob_a - glob_b).max() > 1e-4  # global attention sees it

    model, variables = init(local)
    codes = np.asarray(
        jax.jit(lambda v, im: model.apply(v, im, method=ViTVQGAN.encode))(variables, x)
    )
    rows, cols = np.mgrid[0:8, 0:8]
    # Background patches away from the object and the image border: all one code.
    inner = (
        (np.maximum(np.abs(rows - 1.5), np.abs(cols - 1.5)) > 2.5) & (rows % 7 > 0) & (cols % 7 > 0)
    )
    assert inner.sum() >= 10 and len(np.unique(codes[0][inner])) == 1
    with pytest.raises(ValueError, match="attention_window=-1"):
        tiny_config(attention_window=-1)


def test_patch_encoder_codes_a_patch_by_its_own_pixels():
    # encoder_context='patch': the encoder has no attention, so a patch's code is a
    # function of its pixels alone: every empty patch, even one touching the
    # object, gets the background's code; the decoder still attends.
    cfg = tiny_config(
        image_size=32,
        attention_window=1,
        position_embedding="none",
        codebook_size=512,
        encoder_context="patch",
    )
    model, variables = init(cfg)
    assert "attention" not in variables["params"]["encoder"]["transformer"]["layers_0"]
    assert "attention" in variables["params"]["decoder"]["transformer"]["layers_0"]
    x = np.zeros((1, 32, 32, 3), np.float32)
    x[0, 4:10, 4:10] = (1.0, 0.1, 0.1)  # an object in patches (1..2, 1..2)
    codes = np.asarray(
        jax.jit(lambda v, im: model.apply(v, im, method=ViTVQGAN.encode))(variables, x)
    )[0].reshape(8, 8)
    empty = np.ones((8, 8), bool)
    empty[1:3, 1:3] = False
    assert len(np.unique(codes[empty])) == 1  # halo and border patches included
    assert codes[1, 1] != codes[0, 0]
    with pytest.raises(ValueError, match="encoder_context='pixels'"):
        tiny_config(encoder_context="pixels")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sizes_per_stack(name):
    cfg, loss_cfg = gin_configurables(name, "VQGANConfig", "LossConfig")
    assert (cfg.image_size, cfg.patch_size, cfg.codebook_size, cfg.code_dim) == (256, 8, 8192, 32)
    assert cfg.grid == 32 and cfg.num_tokens == 1024
    if name == "vqgan/parti_finetune.gin":
        assert cfg.output == "linear" and not cfg.logit_laplace
        assert loss_cfg == LossConfig(logit_laplace_weight=0.0)
    else:
        assert loss_cfg == LossConfig()  # the paper's loss weights
        assert cfg.logit_laplace and cfg.output == "sigmoid"
    assert cfg.decoder_tanh_ffn == "after"  # the paper's placement
    _, variables = init(cfg, abstract=True)
    params = variables["params"]
    for stack, paper in zip(("encoder", "decoder"), PAPER[name]):
        count = param_count(params[stack])
        assert abs(count / paper - 1) < 0.15, f"{name} {stack}: {count:,}"
        assert count == stated_params(name, f"{stack} ")[0], f"{name}: update '# {stack} params'"


@pytest.mark.parametrize("name", ["vqgan/shapes.gin", "vqgan/tiny.gin"])
def test_small_gin_configs_build(name):
    (cfg,) = gin_configurables(name, "VQGANConfig")
    assert cfg.decoder_tanh_ffn == "before"  # the layout the shapes VQGAN was measured with
    _, variables = init(cfg, abstract=True)
    total = param_count(variables["params"])
    assert total == stated_params(name, "total ")[0], f"{name}: update the '# total params'"


def test_training_steps_lower_reconstruction_loss():
    cfg = tiny_config()
    model, variables = init(cfg)
    params = nn.meta.unbox(variables["params"])
    yy, xx = np.mgrid[0:16, 0:16]
    batch = np.full((4, 16, 16, 3), 0.1, np.float32)
    for i, color in enumerate(np.eye(3, dtype=np.float32).tolist() + [[1.0, 1.0, 0.0]]):
        batch[i][(xx - 4 - 2 * i) ** 2 + (yy - 8) ** 2 <= 9] = color
    opt = optax.adam(3e-3)

    def loss_fn(p):
        recon, aux = model.apply({"params": p}, batch, enable_dropout=True)
        return jnp.mean(jnp.square(recon - batch)) + aux["vq_loss"]

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = opt.init(params)
    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def _decoder_stages(model, variables, codes):
    """Outputs of the decoder's final norm, tanh feed-forward and patch unembedding."""
    _, state = model.apply(
        variables, codes, method=ViTVQGAN.decode_codes, capture_intermediates=True
    )
    stages = state["intermediates"]["decoder"]
    return {k: stages[k]["__call__"][0] for k in ("final_norm", "tanh_ffn", "patch_unembedding")}


def test_decoder_tanh_ffn_placement():
    after, before = tiny_config(decoder_tanh_ffn="after"), tiny_config(decoder_tanh_ffn="before")
    assert VQGANConfig().decoder_tanh_ffn == "after"  # the default: the paper's
    (model_a, variables), (model_b, variables_b) = init(after), init(before)
    # The same parameters, even their values ...
    assert jax.tree.structure(variables) == jax.tree.structure(variables_b)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables_b), strict=True):
        np.testing.assert_array_equal(a, b)
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 4, 4)), jnp.int32)
    stages_a = _decoder_stages(model_a, variables, codes)
    stages_b = _decoder_stages(model_b, variables, codes)
    # ... but other functions: the patch unembedding reads the tanh feed-forward's
    # output ('after') or the final norm's ('before').
    unembedding = nn.meta.unbox(variables["params"]["decoder"]["patch_unembedding"])
    for stages, unembedded in ((stages_a, "tanh_ffn"), (stages_b, "final_norm")):
        got = stages[unembedded] @ unembedding["kernel"] + unembedding["bias"]
        np.testing.assert_allclose(got, stages["patch_unembedding"], atol=1e-5)
    assert np.abs(stages_a["patch_unembedding"] - stages_b["patch_unembedding"]).max() > 1e-3


def test_decoder_tanh_ffn_is_validated_and_recorded():
    with pytest.raises(ValueError, match="VQGANConfig.decoder_tanh_ffn='middle'"):
        tiny_config(decoder_tanh_ffn="middle")
    fields = dataclasses.asdict(tiny_config(decoder_tanh_ffn="after"))
    assert tokenizer.config_from_meta({"config": fields}).decoder_tanh_ffn == "after"
    # A meta written before the field existed describes the old layout ...
    legacy = {k: v for k, v in fields.items() if k != "decoder_tanh_ffn"}
    saved = tokenizer.config_from_meta({"config": legacy, "format_version": 1})
    assert saved.decoder_tanh_ffn == "before"
    # ... and resuming it with the paper's layout is refused by the config comparison.
    assert tokenizer.config_differences(saved, tiny_config(decoder_tanh_ffn="after")) == [
        "VQGANConfig.decoder_tanh_ffn: checkpoint 'before', given 'after'"
    ]


def test_scanned_and_unrolled_layers_agree():
    cfg = tiny_config(encoder_depth=2, decoder_depth=3, attention_window=1)
    model, variables = init(dataclasses.replace(cfg, scan_layers=True))
    unrolled = scan_to_unscanned(variables)
    layers = sorted(unrolled["params"]["decoder"]["transformer"])
    assert layers == [f"layers_{i}" for i in range(3)]
    x = images()
    recon, _ = jax.jit(model.apply)(variables, x)
    recon_unrolled, _ = jax.jit(ViTVQGAN(cfg).apply)(unrolled, x)
    np.testing.assert_allclose(recon, recon_unrolled, atol=1e-5)
