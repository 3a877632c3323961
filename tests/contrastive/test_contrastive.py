"""The contrastive image-text model: its loss, data, trainer (CLI, resume), scorer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin
from parti_jax.contrastive.model import ContrastiveConfig, DualEncoder, contrastive_loss
from parti_jax.models.config import ModelConfig
from parti_jax.train import metrics as metrics_lib

pytest_plugins = ["tests.pipeline_fixtures"]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_loss_is_symmetric_infonce_and_hard_negatives_join_the_image_side():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(4, 8))), _unit(rng.normal(size=(4, 8)))
    scale = jnp.float32(10.0)
    loss, m = contrastive_loss(jnp.asarray(img), jnp.asarray(txt), scale)
    logits = 10.0 * img @ txt.T

    def ce(rows):  # mean -log softmax of the diagonal, row-wise
        z = rows - rows.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - np.diagonal(z)))

    np.testing.assert_allclose(float(loss), 0.5 * (ce(logits) + ce(logits.T)), rtol=1e-5)
    # A hard negative identical to the own caption halves the image's probability of it.
    neg = txt[:, None, :]
    loss_n, m_n = contrastive_loss(jnp.asarray(img), jnp.asarray(txt), scale, jnp.asarray(neg))
    assert float(m_n["image_to_text_loss"]) > float(m["image_to_text_loss"])
    np.testing.assert_allclose(m_n["text_to_image_loss"], m["text_to_image_loss"], rtol=1e-6)
    # Images that match their captions exactly beat the opposite captions, every one.
    _, m_far = contrastive_loss(jnp.asarray(txt), jnp.asarray(txt), scale, jnp.asarray(-neg))
    assert float(m_far["near_miss_accuracy"]) == 1.0


def test_config_errors_name_the_field():
    from tests.pipeline_fixtures import TINY_CONTRASTIVE, TINY_MODEL

    with pytest.raises(ValueError, match="image_size=30 must be a multiple of patch_size=4"):
        ContrastiveConfig(text=ModelConfig(**TINY_MODEL), image_size=30)
    with pytest.raises(ValueError, match="image_width=30 must be divisible by image_heads=4"):
        ContrastiveConfig(text=ModelConfig(**TINY_MODEL), image_width=30)
    with pytest.raises(ValueError, match="image_pool_grid=3 must divide the 4 patches per side"):
        ContrastiveConfig(
            text=ModelConfig(**TINY_MODEL), **dict(TINY_CONTRASTIVE, image_pool_grid=3)
        )
    model = DualEncoder(ContrastiveConfig(text=ModelConfig(**TINY_MODEL), **TINY_CONTRASTIVE))
    with pytest.raises(ValueError, match=r"image_size\); resize"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 4), jnp.int32))


def test_near_misses_state_what_the_caption_states_and_change_one_attribute():
    from parti_jax.contrastive.data import ShapesCaptionsIterator
    from parti_jax.data import shapes
    from parti_jax.data.shapes_parsing import parse_caption
    from parti_jax.data.vocab import default_vocab_path
    from parti_jax.loading import read_vocabulary

    world = shapes.ShapesWorldConfig(resolution=32)
    for index in range(40):
        ex = shapes.generate_example(index, "validation", 0, world)
        rng = np.random.default_rng(index)
        misses = shapes.near_miss_captions(ex.spec, rng, world, stated=ex.requirements)
        attributes = [a for _, a in misses]
        assert {"color", "shape", "count"} <= set(attributes)
        sizes_stated = all(o.size is not None for o in ex.requirements.objects)
        assert ("size" in attributes) == sizes_stated
        for caption, attribute in misses:
            assert caption != ex.caption
            req = parse_caption(caption)
            if attribute != "count":  # same objects, stating the same things
                assert len(req.objects) == len(ex.requirements.objects), caption
                for got, want in zip(req.objects, ex.requirements.objects, strict=True):
                    assert (got.size is None) == (want.size is None), caption
    # The swapped-object negative: the same words, the two object phrases exchanged.
    from parti_jax.contrastive.data import shapes_near_misses, swapped_objects

    assert swapped_objects("a big green diamond with a large red triangle under it") == (
        "a large red triangle with a big green diamond under it"
    )
    assert swapped_objects("a red circle above a red circle") is None
    assert swapped_objects("a small red circle in the upper right") is None
    two = next(
        e for i in range(40)
        if len((e := shapes.generate_example(i, "train", 0, world)).spec.objects) == 2
    )  # fmt: skip
    misses = shapes_near_misses(two, 3, 0, world, swap=True)
    assert misses[0] == swapped_objects(two.caption) and len(misses) == 3
    tokenizer = read_vocabulary(default_vocab_path())
    it = ShapesCaptionsIterator(tokenizer=tokenizer, image_size=16, text_length=20,
                                hard_negatives=3, batch_size=4, seed=1)  # fmt: skip
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["negatives"].shape == (4, 3, 20)
    assert not (batch["negatives"] == batch["text"][:, None]).all(-1).any()


def test_scorer_prefers_the_right_image_for_a_caption(tiny_pipeline):
    """The trained tiny model retrieves the right caption for unseen scenes far above chance,
    and as a reranker it picks each caption's own image among others."""
    from parti_jax import rerank
    from parti_jax.contrastive.scorer import ContrastiveModel, ContrastiveScorer
    from tests.pipeline_fixtures import shapes_examples

    model = ContrastiveModel.load(tiny_pipeline["contrastive"])
    images, captions = shapes_examples(32, 16, "validation")
    sims = model.similarity_matrix(images, captions)
    assert sims.shape == (32, 32)
    hits = float(np.mean(np.argmax(sims, 0) == np.arange(32)))
    assert hits >= 0.25, hits  # chance: 1/32
    np.testing.assert_allclose(np.diagonal(sims), model.similarity(images, captions), atol=1e-5)
    # Rerank: each caption with 4 candidate images, its own among them at a varying slot.
    rows, prompts, truth = [], [], []
    for i in range(16):
        slot = i % 4
        others = [j for j in range(32) if j != i][i : i + 3]
        order = others[:slot] + [i] + others[slot:]
        rows += order
        prompts += [captions[i]] * 4
        truth.append(slot)
    keep, _ = rerank.score_and_rerank(
        ContrastiveScorer(model), images[rows], prompts, num_samples=4, keep_top_k=1
    )
    picked = (keep[:, 0] % 4) == np.asarray(truth)
    assert picked.mean() >= 0.5, picked  # chance: 1/4
    # Images at another size are resized to the tower's.
    big = np.repeat(np.repeat(images[:2], 2, 1), 2, 2)
    np.testing.assert_allclose(model.similarity(big, captions[:2]),
                               model.similarity(images[:2], captions[:2]), atol=1e-5)  # fmt: skip


def test_cli_trains_resumes_and_refuses_hard_negatives_on_a_task(tmp_path, capsys):
    from parti_jax.cli import main as cli

    workdir = tmp_path / "clip"

    def run(steps: int, *extra: str) -> int:
        try:
            return cli.main(
                [
                    "train-contrastive", "--gin_file=runs/tiny_contrastive.gin",
                    f"--workdir={workdir}", f"--gin.train_contrastive/LoopConfig.num_steps={steps}",
                    "--gin.train_contrastive/LoopConfig.log_every=10",
                    "--gin.train_contrastive/LoopConfig.eval_every=20",
                    "--gin.train_contrastive/LoopConfig.checkpoint_every=20",
                    "--gin.contrastive/adamw_optimizer.learning_rate=3e-3",
                    "--gin.train_contrastive.batch_size=32", *extra,
                ]
            )  # fmt: skip
        finally:
            gin.clear_config()

    assert run(40) == 0
    rows = metrics_lib.read_metrics(workdir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [r for r in rows if "eval/near_miss_accuracy" in r]
    assert evals and 0.0 <= evals[-1]["eval/near_miss_accuracy"] <= 1.0
    assert (workdir / "contrastive_meta.json").exists() and (workdir / "checkpoints/40").is_dir()
    assert run(60) == 0  # resumes from step 40
    steps = [r["step"] for r in metrics_lib.read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == 60 and steps.count(40) == 1
    code = run(2, "--gin.train_contrastive.task='coco_pixels'")
    assert code == 2
    assert "hard_negatives needs task='shapes_world'" in capsys.readouterr().err


def test_text_tower_from_an_encoder_decoder(tiny_pipeline, tmp_path):
    """`train_contrastive(text_tower_from=<t2i dir>)`: the fresh tower is that encoder
    (step 0's warm-up learning rate is 0, so one step keeps it); another width is refused."""
    from parti_jax.contrastive.scorer import ContrastiveModel
    from parti_jax.contrastive.train import train_contrastive
    from parti_jax.loading import load_models
    from parti_jax.train.loop import LoopConfig
    from parti_jax.train.optimizers import OptimizerConfig
    from parti_jax.vqgan.tokenizer import local_mesh
    from tests.pipeline_fixtures import TINY_CONTRASTIVE, TINY_MODEL, _mesh_config

    def run(text: ModelConfig, workdir, steps=1, warmup=5, **kw):
        return train_contrastive(
            workdir=str(workdir), config=ContrastiveConfig(text=text, **TINY_CONTRASTIVE),
            batch_size=8, text_length=16, mesh_config=_mesh_config(),
            loop=LoopConfig(num_steps=steps, log_every=1, checkpoint_every=steps,
                            eval_every=None, async_checkpoints=False, tensorboard=False),
            optimizer_config=OptimizerConfig.adamw_defaults(warmup_steps=warmup,
                                                            decay_end_step=warmup + 10),
            text_tower_from=tiny_pipeline["t2i"], **kw,
        )  # fmt: skip

    leaves = jax.tree_util.tree_leaves_with_path

    def flat(tree):
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves(tree)}

    run(ModelConfig(**TINY_MODEL), tmp_path / "clip")
    tower = ContrastiveModel.load(tmp_path / "clip").params["text_encoder"]
    p = tiny_pipeline
    encoder = load_models(p["t2i"], p["vqgan"], mesh=local_mesh(), fingerprint=False)
    want = flat(encoder.params["encoder"])
    got = flat(tower)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # freeze_text_tower: three steps at a real learning rate (and swapped-object
    # negatives) move the image side and leave the tower exactly the encoder.
    result = run(ModelConfig(**TINY_MODEL), tmp_path / "locked", steps=3, warmup=1,
                 freeze_text_tower=True, hard_negatives=2, swap_negatives=True)  # fmt: skip
    locked = ContrastiveModel.load(tmp_path / "locked")
    for k, v in flat(locked.params["text_encoder"]).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    start = flat(ContrastiveModel.load(tmp_path / "clip").params["image_encoder"])
    moved = flat(locked.params["image_encoder"])
    assert any(not np.array_equal(moved[k], start[k]) for k in start)
    assert np.isfinite(result.last_metrics["loss"])
    assert locked.meta["freeze_text_tower"] and locked.meta["swap_negatives"]
    with pytest.raises(
        ValueError, match="swap_negatives=True puts .* set train_contrastive.hard_negatives >= 1"
    ):
        run(ModelConfig(**TINY_MODEL), tmp_path / "no_negatives", swap_negatives=True)
    wider = ModelConfig(**dict(TINY_MODEL, d_model=64))
    with pytest.raises(ValueError, match="d_model: tower 64 vs train 32"):
        run(wider, tmp_path / "other")
