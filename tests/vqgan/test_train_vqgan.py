"""train_vqgan: the loss falls, outputs and metrics are written, resume repeats the losses of an
uninterrupted run, decoder fine-tuning keeps the codebook hash, bad input fails clearly."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from parti_jax.models.transformer import unscanned_to_scan
from parti_jax.train.checkpoints import CheckpointError
from parti_jax.train.synthetic import SyntheticImagesIterator
from parti_jax.vqgan.discriminator import DiscriminatorConfig
from parti_jax.vqgan.losses import LossConfig
from parti_jax.vqgan.tokenizer import ImageTokenizer, load_vqgan_meta
from tests.vqgan.vqgan_testing import TINY, train_tiny


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_jsonl(path) if "loss" in m}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("base")
    result = train_tiny(
        workdir, num_steps=20, eval_every=10, num_eval_images=8, num_grid_images=4,
        checkpoint_every=10, codebook_window=5, tensorboard=True,
    )  # fmt: skip
    return workdir, result


def test_loss_falls_and_outputs_are_written(base_run):
    workdir, result = base_run
    assert result.status == "done" and result.step == 20
    lines = read_jsonl(workdir / "metrics.jsonl")
    l2 = {m["step"]: m["l2"] for m in lines if "l2" in m}
    assert sorted(l2) == list(range(1, 21))
    assert np.mean([l2[s] for s in range(17, 21)]) < 0.6 * np.mean([l2[s] for s in range(1, 5)])
    last = [m for m in lines if m["step"] == 20 and "loss" in m][-1]
    for key in ("psnr", "vq_loss", "codebook_usage", "codebook_perplexity", "grad_norm"):
        assert np.isfinite(last[key]), key
    assert 0 < last["codebook_usage"] <= 1 and 1 <= last["codebook_perplexity"] <= 64
    evals = {m["step"]: m for m in lines if "eval/psnr" in m}
    assert sorted(evals) == [10, 20] and evals[20]["eval/psnr"] > evals[10]["eval/psnr"] - 1.0
    assert all(np.isfinite(evals[s]["eval/lpips"]) for s in evals)
    for step in (10, 20):
        png = workdir / "images" / f"step_{step}.png"
        from PIL import Image

        assert Image.open(png).size == (4 * 18 + 2, 2 * 18 + 2)  # 4 columns, inputs + recons
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Images("eval/reconstructions")] == [10, 20]
    assert [e.step for e in events.Scalars("eval/psnr")] == [10, 20]
    meta = load_vqgan_meta(workdir)
    assert meta["step"] == 20 and meta["codebook_hash"] == result.records["codebook_hash"]
    assert set(meta["codebook_hashes"]) == {"10", "20"}
    assert meta["config"] == json.loads(json.dumps(dataclasses.asdict(TINY)))


def test_resume_repeats_the_uninterrupted_losses(tmp_path):
    """Killed after the step-3 checkpoint (step 6's deleted): steps 4..6 come out the same."""
    workdir = tmp_path / "run"
    common = dict(
        num_steps=6,
        checkpoint_every=3,
        keep_checkpoints=3,
        codebook_window=2,
        dead_code_reinit=True,
        dead_code_threshold=2.0,
        loss_config=LossConfig(
            perceptual_weight=0.0, adversarial_weight=0.1, adversarial_start_step=2, r1_gamma=1.0
        ),
        discriminator_config=DiscriminatorConfig(
            base_channels=8, max_channels=16, mbstd_group_size=4
        ),
    )
    first = train_tiny(workdir, **common)
    reference = train_losses(workdir / "metrics.jsonl")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    lines = read_jsonl(workdir / "metrics.jsonl")
    assert sum(m.get("dead_codes_reinitialised", 0) for m in lines) > 0  # restarts happened
    assert max(m.get("disc_loss", 0) for m in lines) > 0  # the discriminator trained
    shutil.rmtree(workdir / "checkpoints" / "6")
    second = train_tiny(workdir, **common)
    # The lines past the step-3 checkpoint are logged again by the resumed run, not twice.
    resumed = read_jsonl(workdir / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [m["step"] for m in lines]
    assert [m["loss"] for m in resumed] == [reference[m["step"]] for m in resumed]
    assert second.records["codebook_hash"] == first.records["codebook_hash"]


def test_decoder_finetune_keeps_the_codebook_hash(base_run, tmp_path):
    base_dir, base = base_run
    bigger = dataclasses.replace(
        TINY,
        decoder_width=48,
        decoder_depth=2,
        decoder_mlp_dim=96,
        output="linear",
        scan_layers=True,
    )
    ft_dir = tmp_path / "finetuned"
    ft = train_tiny(
        ft_dir, config=bigger, num_steps=3, init_from=str(base_dir), freeze="encoder_and_codebook"
    )
    base_hash = base.records["codebook_hash"]
    assert ft.records["codebook_hash"] == base_hash
    meta = load_vqgan_meta(ft_dir)
    assert meta["freeze"] == "encoder_and_codebook" and meta["init_from"]["step"] == 20
    base_tok, ft_tok = ImageTokenizer.load(base_dir), ImageTokenizer.load(ft_dir)
    assert ft_tok.config.output == "linear" and ft_tok.config.decoder_width == 48
    # Encoder and codebook bit-identical (the fine-tune scans its blocks, the base does not).
    base_params = unscanned_to_scan(jax.device_get(base_tok.params))
    ft_params = jax.device_get(ft_tok.params)
    frozen = {"encoder": ft_params["encoder"], "in_proj": ft_params["quantizer"]["in_proj"],
              "codebook": ft_params["quantizer"]["codebook"]}  # fmt: skip
    base_frozen = {"encoder": base_params["encoder"], "in_proj": base_params["quantizer"]["in_proj"],
                   "codebook": base_params["quantizer"]["codebook"]}  # fmt: skip
    flat_ft = dict(jax.tree_util.tree_leaves_with_path(frozen))
    flat_base = jax.tree_util.tree_leaves_with_path(base_frozen)
    assert len(flat_base) == len(flat_ft) > 20
    for path, leaf in flat_base:
        np.testing.assert_array_equal(np.asarray(flat_ft[path]), np.asarray(leaf))
    assert not np.allclose(  # the decoder did train (and has another size anyway)
        ft_params["quantizer"]["out_proj"]["bias"], 0.0
    )
    images = next(SyntheticImagesIterator(batch_size=8, image_size=16, seed=5))["image"]
    codes = base_tok.encode(images)
    np.testing.assert_array_equal(ft_tok.encode(images), codes)
    codes_meta = {"codebook_size": 64, "grid": [4, 4], "codebook_hash": base_hash}
    ft_tok.check_codes_meta(codes_meta)  # codes of the original encoder are accepted
    assert ft_tok.decode(codes).shape == (8, 16, 16, 3)
    other_dir = tmp_path / "other"
    other = train_tiny(other_dir, seed=1)
    assert other.records["codebook_hash"] != base_hash
    with pytest.raises(ValueError, match=f"codebook_hash {base_hash} != this VQGAN's"):
        ImageTokenizer.load(other_dir).check_codes_meta(codes_meta)
    # The frozen part must keep the base's encoder fields (named, with both values).
    with pytest.raises(ValueError, match=r"VQGANConfig.encoder_width: base 32, this run 48"):
        train_tiny(
            tmp_path / "bad",
            config=dataclasses.replace(bigger, encoder_width=48),
            init_from=str(base_dir),
            freeze="encoder_and_codebook",
        )


def test_bad_input(base_run, tmp_path):
    base_dir, _ = base_run
    with pytest.raises(ValueError, match=r"VQGANConfig.codebook_size: checkpoint 64, given 32"):
        train_tiny(base_dir, config=dataclasses.replace(TINY, codebook_size=32), num_steps=30)
    with pytest.raises(
        ValueError, match="freeze='encoder_and_codebook' needs train_vqgan.init_from"
    ):
        train_tiny(tmp_path / "a", freeze="encoder_and_codebook")
    with pytest.raises(
        ValueError, match="train_vqgan.batch_size=6 does not divide over the mesh's 8"
    ):
        train_tiny(tmp_path / "b", batch_size=6)

    def wrong_size(batch_size, **_):
        return iter([{"image": np.zeros((batch_size, 32, 32, 3), np.float32)}] * 4)

    with pytest.raises(ValueError, match=r"shape \(8, 32, 32, 3\) but VQGANConfig.image_size=16"):
        train_tiny(tmp_path / "c", data_factory=wrong_size)
    # A failed run wrote nothing; warm-starting from it names the missing file and the fix.
    with pytest.raises(FileNotFoundError, match=r"c/vqgan_meta.json: not found; pass the work"):
        train_tiny(tmp_path / "d", init_from=str(tmp_path / "c"), freeze="encoder_and_codebook")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "vqgan_meta.json").write_text((base_dir / "vqgan_meta.json").read_text())
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        train_tiny(tmp_path / "f", init_from=str(tmp_path / "e"), freeze="encoder_and_codebook")


def test_cli_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "parti_jax", "train-vqgan", "--gin_file=runs/tiny_vqgan.gin",
         f"--workdir={tmp_path}", "--gin.train_vqgan.freeze='encoder_and_codebook'"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs train_vqgan.init_from" in proc.stderr
