"""`parti-jax export`: bundles from the tiny trained pipeline (tests/pipeline_fixtures.py).

A bundle loaded in a fresh process (no TensorFlow, orbax or training code)
draws the images its checkpoints draw for the same seed, and its jax.export
artefact, called without any model code, draws the same image tokens. Bad
input (an occupied directory, mismatched checkpoints, corrupt or missing
files, a vocabulary too large) fails naming the file and the fix; `--inspect`
counts the parameters of checkpoints and bundles.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from parti_jax import bundle as bundle_lib
from parti_jax.bundle import BundleError, load_bundle
from parti_jax.cli import main as cli
from parti_jax.decoding import SamplingConfig
from parti_jax.export import export_bundle, inspect_path
from parti_jax.loading import CompatibilityError
from parti_jax.sampling import Generator

pytest_plugins = ["tests.pipeline_fixtures"]

PROMPTS = ["a red circle", "a small blue square on the left"]
CONFIG = SamplingConfig(temperature=1.5, top_k=32, guidance_scale=1.5, num_samples=2, seed=7)
PLATFORMS = ("cpu", "cuda", "tpu")


@pytest.fixture(scope="module")
def bundle_dir(tiny_pipeline, tmp_path_factory):
    p = tiny_pipeline
    out = tmp_path_factory.mktemp("export") / "bundle"
    export_bundle(out, t2i_path=p["t2i"], vqgan_path=p["vqgan"], upsampler_path=p["upsampler"],
                  sampling_config=CONFIG, export_batch_size=4, platforms=PLATFORMS)  # fmt: skip
    return out


def test_layout_names_and_version_stamp(bundle_dir, tiny_pipeline):
    from safetensors import safe_open

    info = json.loads((bundle_dir / "bundle.json").read_text())
    vq_meta = json.loads((Path(tiny_pipeline["vqgan"]) / "vqgan_meta.json").read_text())
    assert info["format"] == "parti_jax.bundle" and info["parti_jax_version"] == "0.1.0"
    assert info["jax_version"] and info["created"].endswith("+00:00")
    assert info["codebook_hash"] == vq_meta["codebook_hash"]
    src = info["sources"]
    assert src["encoder_decoder"]["step"] == 12 and src["vqgan"]["step"] == 6
    assert src["upsampler"]["step"] == 4 and len(src["encoder_decoder"]["params_hash"]) == 16
    assert src["vocabulary"]["sha256"] == info["files"]["spm.model"]["sha256"]
    listed = set(info["files"])
    assert listed | {"bundle.json"} == {p.name for p in bundle_dir.iterdir()}  # all listed
    for name, entry in info["files"].items():
        assert entry["bytes"] == (bundle_dir / name).stat().st_size
        assert entry["sha256"] == bundle_lib.file_sha256(bundle_dir / name)
    # The tiny model scans its layers; the file holds one entry per layer, named stably.
    assert json.loads((bundle_dir / "model_config.json").read_text())["model_config"]["scan_layers"]
    with safe_open(str(bundle_dir / "t2i.safetensors"), framework="numpy") as f:
        names = set(f.keys())  # noqa: SIM118
        assert f.get_slice("t2i/decoder/layers_0/self_attention/query/kernel").get_shape() == [
            32, 2, 16]  # fmt: skip
        assert f.metadata()["codebook_hash"] == info["codebook_hash"]
    assert not any("/layers/" in n for n in names)
    with safe_open(str(bundle_dir / "vqgan_decoder.safetensors"), framework="numpy") as f:
        vq_names = list(f.keys())  # noqa: SIM118
    assert "vqgan/quantizer/codebook" in vq_names and not any("encoder" in n for n in vq_names)
    exported = info["jax_export"]
    assert exported["platforms"] == list(PLATFORMS) and exported["batch_size"] == 4
    assert exported["compiled_in"]["top_k"] == 32


CHILD = textwrap.dedent("""
    import sys
    import parti_jax
    assert "jax" not in sys.modules, "import parti_jax must stay light"
    import numpy as np
    bundle, out = sys.argv[1], sys.argv[2]
    from parti_jax.bundle import ExportedSampler
    sampler = ExportedSampler(bundle)
    text = sampler.encode_prompts([p for p in {prompts!r} for _ in range(2)])
    codes, images = sampler(text, [0, 0, 1, 1], [0, 1, 0, 1], seed=7, temperature=1.5,
                            guidance_scale=1.5)
    no_model = sorted(m for m in sys.modules if m.startswith(("flax", "parti_jax.models")))
    b = parti_jax.load_bundle(bundle)
    results = b.generate({prompts!r}, keep_top_k=2, scorer="none")
    heavy = sorted(m for m in sys.modules
                   if m.split(".")[0] in ("tensorflow", "orbax") or m.startswith("parti_jax.train"))
    order = [np.argsort(r.sample_indices) for r in results]
    np.savez(out, ex_codes=codes, ex_images=images,
             codes=np.stack([r.codes[o] for r, o in zip(results, order)]),
             images=np.stack([r.images[o] for r, o in zip(results, order)]),
             low=np.stack([r.low_res_images[o] for r, o in zip(results, order)]))
    print("MODULES", repr(no_model), repr(heavy))
""")


def test_fresh_process_round_trip_matches_checkpoints(bundle_dir, tiny_pipeline, tmp_path):
    """load_bundle(...).generate in a fresh process == Generator.load from the checkpoints."""
    p = tiny_pipeline
    gen = Generator.load(p["t2i"], p["vqgan"], p["upsampler"], fingerprint=False)
    ref = gen.generate(PROMPTS, keep_top_k=2, sampling_config=CONFIG, scorer="none")
    order = [np.argsort(r.sample_indices) for r in ref]
    codes = np.stack([r.codes[o] for r, o in zip(ref, order)])

    out = tmp_path / "child.npz"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(prompts=PROMPTS), str(bundle_dir), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MODULES"))
    assert line == "MODULES [] []", line  # no model code for jax.export; no TF/orbax/train
    child = np.load(out)
    np.testing.assert_array_equal(child["codes"], codes)
    np.testing.assert_allclose(
        child["images"], np.stack([r.images[o] for r, o in zip(ref, order)]), atol=1e-5
    )
    assert child["images"].shape == (2, 2, 64, 64, 3)  # upsampled 16 -> 64
    # The jax.export artefact: same image tokens, and the VQGAN's images of them.
    np.testing.assert_array_equal(child["ex_codes"], codes.reshape(4, 16))
    np.testing.assert_allclose(child["ex_images"], child["low"].reshape(4, 16, 16, 3), atol=1e-5)


def test_destination_is_never_clobbered(bundle_dir, tiny_pipeline, tmp_path, capsys):
    p = tiny_pipeline
    args = ["export", "--t2i", p["t2i"], "--vqgan", p["vqgan"], "--no_jax_export"]
    # A non-empty folder that is not a bundle: refused even with --overwrite, left intact.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert cli.main([*args, "--workdir", str(other), "--overwrite"]) == 2
    assert "not a parti_jax bundle" in capsys.readouterr().err
    assert [f.name for f in other.iterdir()] == ["notes.txt"]
    # A bundle: refused without --overwrite, replaced with it (CLI and gin path).
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    assert cli.main([*args, "--workdir", str(copy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (copy / "sample.jax_export").is_file()
    assert cli.main([*args, "--workdir", str(copy), "--overwrite"]) == 0
    assert not (copy / "sample.jax_export").exists()  # the new bundle has no jax.export
    assert (copy / "operative_config.gin").is_file()
    assert not (copy / "upsampler.safetensors").exists()  # exported without --upsampler
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp leftovers
    # A missing checkpoint: named, nothing created.
    assert cli.main(["export", "--t2i", str(tmp_path / "nope"), "--vqgan", p["vqgan"],
                     "--workdir", str(tmp_path / "new")]) == 2  # fmt: skip
    assert "nope: not an encoder-decoder work directory" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_mismatched_checkpoints_are_refused(tiny_pipeline, tmp_path):
    p = tiny_pipeline
    t2i = tmp_path / "t2i"
    shutil.copytree(p["t2i"], t2i)
    info = json.loads((t2i / "model_config.json").read_text())
    info["codes_meta"]["codebook_hash"] = "0123456789abcdef"
    (t2i / "model_config.json").write_text(json.dumps(info))
    with pytest.raises(CompatibilityError, match="codebook hash: 0123456789abcdef"):
        export_bundle(tmp_path / "b", t2i_path=str(t2i), vqgan_path=p["vqgan"], jax_export=False)
    assert not (tmp_path / "b").exists()


def test_corrupt_or_inconsistent_bundles_name_the_file(bundle_dir, tmp_path):
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(bundle_dir, dst)
        return dst

    flipped = copy("flipped")
    data = bytearray((flipped / "t2i.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (flipped / "t2i.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"t2i.safetensors: sha256 differs"):
        load_bundle(flipped)
    truncated = copy("truncated")
    (truncated / "vqgan_decoder.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(BundleError, match=r"vqgan_decoder.safetensors: 2 bytes, \d+ recorded"):
        load_bundle(truncated)
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(truncated, verify=False)
    missing = copy("missing")
    (missing / "upsampler.safetensors").unlink()
    with pytest.raises(BundleError, match=r"upsampler.safetensors: missing"):
        load_bundle(missing)
    # Edited configs (checked with verify=False, past the hashes).
    vocab = copy("vocab")
    cfg = json.loads((vocab / "model_config.json").read_text())
    cfg["model_config"]["text_vocab_size"] = 100
    (vocab / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompatibilityError, match=r"text vocabulary size: 256 .*spm.model.* > 100"):
        load_bundle(vocab, verify=False)
    codebook = copy("codebook")
    vq = json.loads((codebook / "vqgan_config.json").read_text())
    vq["codebook_hash"] = "ffffffffffffffff"
    (codebook / "vqgan_config.json").write_text(json.dumps(vq))
    with pytest.raises(CompatibilityError, match="codebook hash"):
        load_bundle(codebook, verify=False)
    # An unknown sampling key: one line naming the file and the key (was a raw TypeError).
    sampling = copy("sampling")
    stored = json.loads((sampling / "sampling_config.json").read_text())
    (sampling / "sampling_config.json").write_text(json.dumps(dict(stored, top_q=0.5)))
    with pytest.raises(
        ValueError, match=r"sampling_config.json: unknown SamplingConfig field\(s\) \['top_q'\]"
    ):
        load_bundle(sampling, verify=False)
    with pytest.raises(BundleError, match="bundle.json: not found"):
        load_bundle(tmp_path)


def test_inspect_checkpoints_and_bundle(bundle_dir, tiny_pipeline, capsys):
    p = tiny_pipeline
    t2i = inspect_path(p["t2i"])
    assert t2i["kind"] == "t2i" and t2i["step"] == 12 and t2i["other_state"]["arrays"] > 0
    bundle = inspect_path(bundle_dir)
    assert bundle["kind"] == "bundle"
    # Same parameters, scanned in the checkpoint, per layer in the bundle.
    assert bundle["groups"]["t2i"]["params"] == t2i["total_params"] == 38080
    assert bundle["groups"]["t2i"]["bytes"] == 4 * 38080
    vq = inspect_path(p["vqgan"])
    assert vq["kind"] == "vqgan" and vq["total_params"] > bundle["groups"]["vqgan"]["params"]
    assert inspect_path(p["upsampler"])["total_params"] == bundle["groups"]["upsampler"]["params"]
    assert cli.main(["export", "--inspect", str(bundle_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["total_params"] == bundle["total_params"]
    entry = next(e for e in printed["parameters"] if e["name"] == "vqgan/quantizer/codebook")
    assert entry["shape"] == [64, 8] and entry["dtype"] == "float32" and entry["bytes"] == 2048
    assert cli.main(["export", "--inspect", p["upsampler"]]) == 0
    text = capsys.readouterr().out
    assert "total: 16 tensors" in text and "generator/" in text
    assert cli.main(["export", "--inspect", str(bundle_dir / "nope")]) == 2
    assert "nope: does not exist" in capsys.readouterr().err


def _abstract_pair(kind):
    """(scanned, unscanned) abstract parameters of a tiny two-layer model of `kind`."""
    from parti_jax import loading
    from parti_jax.models.config import ModelConfig
    from parti_jax.vqgan.config import VQGANConfig
    from tests.pipeline_fixtures import TINY_MODEL, TINY_VQGAN

    if kind == "t2i":
        cfg = ModelConfig(**dict(TINY_MODEL, num_decoder_layers=2, scan_layers=True))
        return tuple(
            loading.t2i_abstract_params(cfg.replace(scan_layers=s), 16) for s in (True, False)
        )
    cfg = VQGANConfig(**dict(TINY_VQGAN, decoder_depth=2, scan_layers=True))
    return tuple(
        loading.vqgan_abstract_params(dataclasses.replace(cfg, scan_layers=s))
        for s in (True, False)
    )


@pytest.mark.parametrize("kind", ["t2i", "vqgan"])
def test_scanned_stacks_are_stored_per_layer_and_restacked(kind):
    """A model trained with scan_layers=True is written under the unscanned model's names
    (read from the built models, whatever they call their layers) and read back stacked."""
    import jax

    from parti_jax.models.transformer import scan_to_unscanned

    scanned, unscanned = _abstract_pair(kind)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), scanned)
    flat = bundle_lib.flatten(scan_to_unscanned(params), kind)
    assert bundle_lib.specs(flat) == bundle_lib.specs(bundle_lib.flatten(unscanned, kind))
    assert bundle_lib.specs(bundle_lib.flatten(scanned, kind)) != bundle_lib.specs(flat)
    back = bundle_lib.unflatten(flat, kind, scan=True)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
