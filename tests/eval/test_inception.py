"""The FID Inception-v3 in Flax: the documented .npz format, its checks, the forward pass."""

import ast
import json
import py_compile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax.eval import fid as F
from parti_jax.eval import inception as I

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_fid_inception.py"

# torchvision's Inception3 has 27,161,264 parameters (1000 classes, with AuxLogits).
# Less AuxLogits (conv0 768*128 + bn 2*128, conv1 128*768*25 + bn 2*768, fc 768*1000 + 1000)
# and the classifier fc (2048*1000 + 1000) leaves the convolutional trunk FID uses.
TRUNK_PARAMS = 27_161_264 - (98_304 + 256 + 2_457_600 + 1_536 + 769_000) - 2_049_000


def test_expected_table_matches_torchvisions_inception_trunk():
    """The .npz table, read off the Flax module, against torchvision's published numbers."""
    table = I.expected_params()
    convs = [k for k in table if k.endswith(".conv.weight")]
    assert len(convs) == 94  # Inception-v3's conv layers without the aux head
    learned = {k: v for k, v in table.items() if "running" not in k}
    assert sum(int(np.prod(s)) for s in learned.values()) == TRUNK_PARAMS == 21_785_568
    assert len(table) == 94 * 5  # conv weight + BatchNorm weight, bias, running mean, var
    assert table["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert table["Mixed_5b.branch1x1.conv.weight"] == (64, 192, 1, 1)
    assert table["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert table["Mixed_7c.branch_pool.bn.running_var"] == (192,)


def test_converter_mapping_and_script(tmp_path):
    state = {k: np.zeros(s, np.float64) for k, s in I.expected_params().items()}
    state.update({k.replace("running_mean", "num_batches_tracked"): np.zeros((), np.int64)
                  for k in I.expected_params() if k.endswith("running_mean")})  # fmt: skip
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)
    state["fc.bias"] = np.zeros((1008,), np.float32)
    arrays = I.torch_state_to_npz_arrays(state)
    assert set(arrays) == set(I.expected_params())
    assert all(a.dtype == np.float32 for a in arrays.values())
    del state["Mixed_6a.branch3x3.bn.bias"]
    with pytest.raises(I.WeightsError, match=r"missing key\(s\): Mixed_6a.branch3x3.bn.bias"):
        I.torch_state_to_npz_arrays(state)
    # The standalone script compiles and converts through that helper, without
    # importing torch at module level (tests never import it).
    py_compile.compile(str(SCRIPT), cfile=str(tmp_path / "c.pyc"), doraise=True)
    tree = ast.parse(SCRIPT.read_text())
    top_imports = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "torch" not in top_imports and "pytorch_fid" not in top_imports
    calls = {
        f"{n.func.value.id}.{n.func.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
    }  # fmt: skip
    assert {"inception.torch_state_to_npz_arrays", "inception.validate_npz"} <= calls
    assert "fid.weights_digest" in calls


def test_validate_npz_names_missing_extra_and_misshaped_keys(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(
        path,
        **{
            "Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32),
            "Conv2d_1a_3x3.bn.weight": np.zeros((32,), np.int32),
            "fc.weight": np.zeros((2, 2), np.float32),
        },
    )
    with pytest.raises(I.WeightsError) as err:
        I.validate_npz(path)
    msg = str(err.value)
    assert msg.startswith(str(path))
    assert "missing key(s): " in msg and "Conv2d_1a_3x3.bn.bias" in msg
    assert "extra key(s): fc.weight" in msg
    assert "key Conv2d_1a_3x3.conv.weight has shape (32, 3, 5, 5), expected (32, 3, 3, 3)" in msg
    assert "key Conv2d_1a_3x3.bn.weight has dtype int32" in msg
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(I.WeightsError, match="junk.npz: not a readable .npz"):
        I.validate_npz(tmp_path / "junk.npz")


def test_fid_blocks_pool_like_tensorflow_and_resize_like_torch():
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    pooled = I._avg_pool_same(x)
    assert float(pooled[0, 0, 0, 0]) == pytest.approx((0 + 1 + 3 + 4) / 4)  # padding not counted
    assert float(pooled[0, 1, 1, 0]) == pytest.approx(4.0)
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(1, 8, 8, 3)).astype(np.float32)
    half = np.asarray(I.resize_images(jnp.asarray(img), size=4))
    # Bilinear, align_corners=False, no antialias: a 2x downscale averages 2x2 blocks.
    want = img.reshape(1, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(half, want, rtol=1e-5)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """An .npz in the documented format with random arrays (He-scaled so features stay finite)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for key, shape in I.expected_params().items():
        if key.endswith("conv.weight"):
            scale = np.sqrt(2.0 / np.prod(shape[1:]))
            arrays[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        elif key.endswith(("running_var", "bn.weight")):
            arrays[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            arrays[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    path = tmp_path_factory.mktemp("inception") / "random.npz"
    np.savez(path, **arrays)
    return path


def test_forward_pass_and_unvalidated_fid(random_weights, tmp_path, monkeypatch):
    variables = I.load_params(random_weights)
    kernel = variables["params"]["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"]
    assert kernel.shape == (5, 5, 48, 64)  # (O, I, H, W) -> (H, W, I, O)
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(2, 64, 64, 3)).astype(np.float32)
    feats = np.asarray(I.inception_features(variables, images))
    assert feats.shape == (2, I.FEATURE_DIM) and np.isfinite(feats).all()
    assert (feats >= 0).all() and not np.allclose(feats[0], feats[1])  # ReLU then mean-pool
    # The whole FID path with these (unofficial) weights: statistics of the network's
    # features reach the distance, and the figure is labelled unvalidated. (The distance
    # itself is tested in test_fid.py; a 2048-d sqrtm takes minutes on a busy 2-core CPU.)
    seen = {}

    def distance(mu1, sigma1, mu2, sigma2):
        seen.update(mu1=mu1, sigma1=sigma1, mu2=mu2)
        return float(np.sum((mu1 - mu2) ** 2))

    monkeypatch.setattr(F, "frechet_distance", distance)
    ref = F.save_stats(tmp_path / "ref.npz", feats.mean(0) + 0.1, np.eye(I.FEATURE_DIM))
    # The second batch is uint8 (scaled by 1/255, equal to the floats up to rounding).
    as_uint8 = np.round(images[::-1] * 255).astype(np.uint8)
    result = F.compute_fid(iter([images, as_uint8]), random_weights, ref)
    uint8_feats = np.asarray(I.inception_features(variables, as_uint8))
    np.testing.assert_allclose(uint8_feats, feats[::-1], atol=0.05 * np.abs(feats).max())
    both = np.concatenate([feats, uint8_feats]).astype(np.float64)
    np.testing.assert_allclose(seen["mu1"], both.mean(0), rtol=1e-2, atol=1e-2)
    sigma = np.cov(both, rowvar=False)
    np.testing.assert_allclose(seen["sigma1"], sigma, atol=1e-2 * np.abs(sigma).max())
    np.testing.assert_allclose(seen["mu2"], feats.mean(0) + 0.1, rtol=1e-6)
    assert result.status == "unvalidated" and "no provenance record" in result.reason
    assert result.num_images == 4
    assert result.value == pytest.approx(np.sum((seen["mu1"] - seen["mu2"]) ** 2))
    assert json.loads(json.dumps(result.to_metrics()))["fid_status"] == "unvalidated"
