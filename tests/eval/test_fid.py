"""Fréchet distance, float64 feature statistics, reference stats files and skipping rules."""

import json

import numpy as np
import pytest
import scipy.linalg

from parti_jax.eval import fid as F
from tests.eval.test_gallery import write_png


def _spd(rng, d, n=None):
    n = n or 3 * d
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return np.atleast_2d(np.cov(x, rowvar=False))


def _direct(mu1, s1, mu2, s2):
    """||mu1-mu2||^2 + Tr(s1) + Tr(s2) - 2 sum sqrt(eig(s1 s2)): s1 s2 is similar to the
    SPD matrix s1^1/2 s2 s1^1/2, so its eigenvalues are real and >= 0."""
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig)))


@pytest.mark.parametrize("d", [1, 8, 64])
def test_matches_direct_formula_zero_and_symmetric(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
    s1, s2 = _spd(rng, d), _spd(rng, d)
    got = F.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_direct(mu1, s1, mu2, s2), rel=1e-6)
    assert F.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)
    assert abs(F.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
    # Equal covariances: only the means differ.
    assert F.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-6)


def test_singular_product_gets_eps_and_imaginary_parts_are_checked(monkeypatch):
    rng = np.random.default_rng(0)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu = np.zeros(6)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def first_call_fails(a):
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    eps = 1e-3
    got = F.frechet_distance(mu, s1, mu, s2, eps=eps)
    np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(6)) @ (s2 + eps * np.eye(6)))
    i = eps * np.eye(6)
    want = (
        np.trace(s1)
        + np.trace(s2)
        - 2 * np.sum(np.sqrt(np.linalg.eigvals((s1 + i) @ (s2 + i)).real))
    )
    assert got == pytest.approx(want, rel=1e-6)

    def complex_result(a):
        return real_sqrtm(a) + 1j * 0.1 * np.eye(len(a))

    monkeypatch.setattr(scipy.linalg, "sqrtm", complex_result)
    with pytest.raises(F.FIDError, match="imaginary component"):
        F.frechet_distance(mu, s1, mu, s2)

    def tiny_imaginary(a):
        return real_sqrtm(a) + 1j * 1e-6 * np.eye(len(a))

    monkeypatch.setattr(scipy.linalg, "sqrtm", tiny_imaginary)
    assert F.frechet_distance(mu, s1, mu, s2) == pytest.approx(_direct(mu, s1, mu, s2), rel=1e-6)
    with pytest.raises(F.FIDError, match="covariances must be"):
        F.frechet_distance(mu, s1, mu, s2[:5, :5])


def test_feature_stats_are_float64_and_batch_size_independent():
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((103, 5)) * 3 + 1000).astype(np.float32)  # large mean
    whole = F.FeatureStats()
    whole.update(feats)
    pieces = F.FeatureStats()
    for start, stop in [(0, 1), (1, 40), (40, 40), (40, 103)]:
        pieces.update(feats[start:stop])
    ref = feats.astype(np.float64)
    for s in (whole, pieces):
        assert s.count == 103 and s.mu().dtype == np.float64
        np.testing.assert_allclose(s.mu(), ref.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.sigma(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-9)
    one = F.FeatureStats()
    one.update(feats[:1])
    with pytest.raises(F.FIDError, match="at least 2 images"):
        one.sigma()
    with pytest.raises(F.FIDError, match="dim 4, earlier batches had 5"):
        whole.update(feats[:, :4])
    with pytest.raises(F.FIDError, match="NaN"):
        whole.update(np.full((2, 5), np.nan))


def test_stats_files(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = rng.standard_normal(4), _spd(rng, 4)
    path = F.save_stats(tmp_path / "ref.npz", mu, sigma)
    got_mu, got_sigma = F.load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(F.FIDError, match=r"bad.npz: missing key\(s\) sigma"):
        F.load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(F.FIDError, match="shape.npz: 'mu' \\(4,\\) and 'sigma' \\(3, 4\\)"):
        F.load_stats(tmp_path / "shape.npz")
    with pytest.raises(F.FIDError, match="no such reference statistics file"):
        F.load_stats(tmp_path / "none.npz")


def test_no_weights_or_no_reference_skips_with_a_reason(tmp_path):
    F.save_stats(tmp_path / "ref.npz", np.zeros(3), np.eye(3))
    images = iter([np.zeros((2, 8, 8, 3), np.float32)])
    result = F.compute_fid(images, None, tmp_path / "ref.npz")
    assert result.value is None and result.status == "skipped"
    assert "scripts/convert_fid_inception.py" in result.reason
    assert result.to_metrics() == {
        "fid": None,
        "fid_status": "skipped",
        "fid_reason": result.reason,
        "fid_num_images": 0,
    }
    skipped = F.compute_fid(images, "w.npz", "")
    assert skipped.status == "skipped" and "reference statistics" in skipped.reason
    with pytest.raises(ValueError, match="missing.npz: no such Inception weights file"):
        F.compute_fid(images, tmp_path / "missing.npz", tmp_path / "ref.npz")


def test_compute_fid_pipeline_with_a_feature_function(tmp_path):
    rng = np.random.default_rng(3)
    proj = rng.standard_normal((4 * 4 * 3, 6))

    def features(batch):
        x = np.asarray(batch, np.float64)
        if batch.dtype == np.uint8:
            x = x / 255.0
        return x.reshape(len(x), -1) @ proj

    real = rng.uniform(size=(40, 4, 4, 3))
    fake = rng.uniform(size=(30, 4, 4, 3)) ** 2
    ref = F.compute_reference_stats(
        [real[:25], real[25:]], None, tmp_path / "r.npz", feature_fn=features
    )
    result = F.compute_fid(iter([fake[:7], fake[7:]]), None, ref, feature_fn=features)
    fr, ff = features(real), features(fake)
    want = _direct(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    assert result.value == pytest.approx(want, rel=1e-6)
    assert result.status == "unvalidated" and result.num_images == 30
    with pytest.raises(F.FIDError, match="at least 2 images"):
        F.compute_fid(iter([fake[:1]]), None, ref, feature_fn=features)
    with pytest.raises(F.FIDError, match="dim 6 but the network gives 5"):
        F.compute_fid(iter([fake]), None, ref, feature_fn=lambda b: features(b)[:, :5])

    # Images from files: the top-ranked image per prompt, in batches of equal size.
    for i in range(3):
        write_png(tmp_path / "imgs" / f"{i}.png", (10 * i, 0, 0), size=4)
    batches = list(F.iter_image_batches(sorted((tmp_path / "imgs").glob("*.png")), batch_size=2))
    assert [b.shape for b in batches] == [(2, 4, 4, 3), (1, 4, 4, 3)]
    assert batches[1].dtype == np.uint8 and batches[1][0, 0, 0, 0] == 20


def test_weights_validation_from_provenance(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, **{"a.conv.weight": np.ones((2, 1, 1, 1), np.float32)})
    ok, why = F.weights_validation(path)
    assert not ok and "no provenance record" in why
    record = {
        "source_sha256": F.OFFICIAL_SHA256_PREFIX + "0" * 56,
        "npz_digest": F.weights_digest(path),
        "parity_check": {"passed": True, "max_abs_diff": 1e-5},
    }
    prov = tmp_path / ("w.npz" + F.PROVENANCE_SUFFIX)
    prov.write_text(json.dumps(record))
    assert F.weights_validation(path) == (True, "official weights; Flax features match pytorch-fid")
    prov.write_text(json.dumps(dict(record, parity_check=None)))
    assert "parity check" in F.weights_validation(path)[1]
    prov.write_text(json.dumps(dict(record, source_sha256="ab" * 32)))
    assert "not the official" in F.weights_validation(path)[1]
    prov.write_text(json.dumps(record))
    np.savez(path, **{"a.conv.weight": np.zeros((2, 1, 1, 1), np.float32)})
    assert F.weights_validation(path) == (
        False,
        "the .npz arrays differ from those the provenance record describes",
    )
