"""`train(text_encoder_from=...)`: the encoder-decoder's text encoder starts from a
contrastive model's text tower (tiny pipeline: its contrastive model's tower is the
tiny t2i's encoder); with `restore_from` too, the tower's encoder wins; a tower that
does not fit is refused before anything runs."""

import dataclasses
import hashlib
import json
import shutil

import jax
import numpy as np
import pytest

pytest_plugins = ["tests.pipeline_fixtures"]


def _train(tiny_pipeline, workdir, config=None, **kw):
    import parti_jax.tasks
    from parti_jax.models.config import ModelConfig
    from parti_jax.partitioning import MeshConfig
    from parti_jax.train import t2i
    from parti_jax.train.loop import LoopConfig
    from parti_jax.train.optimizers import OptimizerConfig
    from tests.pipeline_fixtures import BATCH, TEXT_LENGTH, TINY_MODEL

    codes = tiny_pipeline["codes"]
    name = "warm_tower_" + hashlib.sha256(codes.encode()).hexdigest()[:8]
    task = parti_jax.tasks.register_codes_task(name, codes, shuffle_buffer_size=64)
    return t2i.train(
        workdir=str(workdir),
        model_config=config or ModelConfig(**TINY_MODEL),
        batch_size=BATCH,
        # Step 0's warm-up learning rate is 0: the one step leaves the parameters as started.
        loop=LoopConfig(
            num_steps=1,
            log_every=1,
            checkpoint_every=1000,
            eval_every=None,
            async_checkpoints=False,
            tensorboard=False,
        ),  # fmt: skip
        mesh_config=MeshConfig(data=-1, fsdp=1, tensor=1, rules="data_parallel"),
        optimizer_config=OptimizerConfig(
            learning_rate=1e-2, warmup_steps=2, min_dim_size_to_factor=16
        ),
        task=task,
        text_length=TEXT_LENGTH,
        **kw,
    )


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_text_encoder_from_contrastive_tower(tiny_pipeline, tmp_path):
    from parti_jax.contrastive.scorer import ContrastiveModel

    tower = _flat(ContrastiveModel.load(tiny_pipeline["contrastive"]).params["text_encoder"])
    cold = _train(tiny_pipeline, tmp_path / "cold")
    warm = _train(tiny_pipeline, tmp_path / "warm",
                  text_encoder_from=tiny_pipeline["contrastive"])  # fmt: skip
    encoder = _flat(warm.state.params["encoder"])
    assert encoder.keys() == tower.keys()
    for name, array in tower.items():
        np.testing.assert_array_equal(encoder[name], array, err_msg=name)
    cold_encoder = _flat(cold.state.params["encoder"])
    assert any(not np.array_equal(cold_encoder[n], tower[n]) for n in tower)
    # The decoder is this run's own initialisation (same seed): only the encoder moved.
    for name, array in _flat(cold.state.params["decoder"]).items():
        np.testing.assert_array_equal(_flat(warm.state.params["decoder"])[name], array)
    assert warm.last_metrics["loss"] != pytest.approx(cold.last_metrics["loss"], rel=1e-4)
    record = json.loads((tmp_path / "warm" / "model_config.json").read_text())
    source = record["text_encoder_from"]
    assert source["workdir"] == tiny_pipeline["contrastive"] and source["step"] > 0
    assert source["checkpoint"].endswith(f"checkpoints/{source['step']}")
    cold_record = json.loads((tmp_path / "cold" / "model_config.json").read_text())
    assert cold_record["text_encoder_from"] is None

    # Both: restore_from first (every parameter of the tiny t2i), then the tower's encoder.
    both = _train(tiny_pipeline, tmp_path / "both", restore_from=tiny_pipeline["t2i"],
                  text_encoder_from=tiny_pipeline["contrastive"])  # fmt: skip
    from parti_jax.train import checkpoints

    restored, _ = checkpoints.restore_params_from(tiny_pipeline["t2i"], cold.state.params)
    for name, array in _flat(restored["decoder"]).items():
        np.testing.assert_array_equal(_flat(both.state.params["decoder"])[name], array)
    for name, array in tower.items():
        np.testing.assert_array_equal(_flat(both.state.params["encoder"])[name], array)


def test_text_tower_that_does_not_fit(tiny_pipeline, tmp_path):
    from parti_jax.models.config import ModelConfig
    from parti_jax.train import t2i
    from tests.pipeline_fixtures import TINY_MODEL

    wide = ModelConfig(**dict(TINY_MODEL, d_model=64, num_heads=4))
    with pytest.raises(ValueError) as e:
        _train(tiny_pipeline, tmp_path / "wide", wide,
               text_encoder_from=tiny_pipeline["contrastive"])  # fmt: skip
    message = str(e.value)
    assert "d_model: tower 32 vs train 64" in message
    assert "ContrastiveConfig.text" in message and "text_encoder_from" in message
    assert not (tmp_path / "wide").exists()  # refused before the work dir was claimed
    # A tower trained with another vocabulary than the codes task's.
    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_pipeline["contrastive"], other)
    meta = json.loads((other / "contrastive_meta.json").read_text())
    (other / "contrastive_meta.json").write_text(json.dumps(dict(meta, vocab_sha256="0" * 64)))
    with pytest.raises(ValueError, match="trained with the vocabulary 000000000000.*vocab_path"):
        _train(tiny_pipeline, tmp_path / "vocab", text_encoder_from=str(other))
    # Another kind of work dir is named as such.
    with pytest.raises(ValueError, match="contrastive_meta.json.*train-contrastive"):
        t2i.text_encoder_warm_start(tiny_pipeline["t2i"], ModelConfig(**TINY_MODEL))
    # The layouts convert: an unrolled encoder takes the scanned tower.
    unrolled = dataclasses.replace(ModelConfig(**TINY_MODEL), scan_layers=False)
    assert t2i.text_encoder_warm_start(tiny_pipeline["contrastive"], unrolled).relayout
