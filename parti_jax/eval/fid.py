"""Fréchet Inception Distance (FID) from Inception pool3 features.

FID is the Fréchet distance between Gaussians fitted to two sets of Inception
features (Heusel et al. 2017), computed as pytorch-fid does: `scipy.linalg.sqrtm`
of the covariance product, eps * I added to both covariances if that is not
finite, and a complex result with imaginary diagonal below 1e-3 taken as real.
Statistics accumulate in float64 with Chan's parallel update (independent of
the batch size); covariances are unbiased (ddof = 1). Reference statistics are
an `.npz` with `mu` [2048] and `sigma` [2048, 2048] (pytorch-fid's format).

A figure is "validated" only if the weights file has a provenance record from
scripts/convert_fid_inception.py (`<weights>.npz.provenance.json`) saying it
came from the official `pt_inception-2015-12-05-6726825d.pth`, that the Flax
features matched pytorch-fid's, and whose digest matches the file's arrays;
anything else is "unvalidated".
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from parti_jax import storage

log = logging.getLogger(__name__)

OFFICIAL_SHA256_PREFIX = "6726825d"
PROVENANCE_SUFFIX = ".provenance.json"


class FIDError(ValueError):
    """Bad statistics, a numerical failure, or unusable inputs (the message names the file)."""


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(c, np.float64)) for c in (sigma1, sigma2))
    if mu1.shape != mu2.shape:
        raise FIDError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise FIDError(
                f"matrix square root has an imaginary component {imag:.3g} on its diagonal; "
                "the statistics are ill-conditioned (too few images for the feature size?)"
            )
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(value)


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64 (Chan's merge)."""

    def __init__(self) -> None:
        self.dim: int | None = None
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of centred features

    def update(self, features: Any) -> None:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise FIDError(f"features must be [batch, dim], got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise FIDError(f"features have dim {x.shape[1]}, earlier batches had {self.dim}")
        if not np.isfinite(x).all():
            raise FIDError("features contain NaN or inf; check the images and weights")
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        if self._mean is None:  # the merge below then gives exactly mean_b and m2_b
            self._mean, self._m2 = np.zeros_like(mean_b), np.zeros_like(m2_b)
        n = self.count + n_b
        delta = mean_b - self._mean
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self.count = n

    def mu(self) -> np.ndarray:
        if self._mean is None:
            raise FIDError("no features accumulated")
        return self._mean.copy()

    def sigma(self) -> np.ndarray:
        if self.count < 2:
            raise FIDError(f"a covariance needs at least 2 images, got {self.count}")
        return self._m2 / (self.count - 1)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> storage.Path:
    """Writes reference statistics as an .npz with keys `mu` and `sigma` (a local file or
    a URL, atomically)."""
    path = storage.path(path)
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    storage.write_bytes(path, buffer.getvalue())
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads an .npz with `mu` [d] and `sigma` [d, d] (local or at a URL); errors name the
    file and key."""
    path = storage.path(path)
    if not path.is_file():
        raise FIDError(f"{path}: no such reference statistics file")
    try:
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
            found = sorted(data.files)
            arrays = {k: np.asarray(data[k], np.float64) for k in found if k in ("mu", "sigma")}
    except Exception as e:
        raise FIDError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    missing = {"mu", "sigma"} - set(arrays)
    if missing:
        raise FIDError(
            f"{path}: missing key(s) {', '.join(sorted(missing))}; reference statistics "
            f"need 'mu' and 'sigma' (found: {', '.join(found) or 'none'})"
        )
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(
            f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not match as [d], [d, d]"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path}: statistics contain NaN or inf")
    return mu, sigma


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 over the .npz's arrays (sorted keys, dtype, shape, bytes): layout-independent."""
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as data:
        for key in sorted(data.files):
            a = np.ascontiguousarray(data[key])
            h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def weights_validation(path: str | os.PathLike) -> tuple[bool, str]:
    """(validated, why) for a weights file, from its provenance record (see module doc)."""
    record_path = Path(str(path) + PROVENANCE_SUFFIX)
    if not record_path.is_file():
        return False, f"no provenance record {record_path.name} (not made by the converter)"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return False, f"{record_path}: unreadable provenance record ({e})"
    if not str(record.get("source_sha256", "")).startswith(OFFICIAL_SHA256_PREFIX):
        return False, "source is not the official pt_inception-2015-12-05-6726825d.pth"
    parity = record.get("parity_check") or {}
    if not parity.get("passed"):
        return False, "no passed parity check against pytorch-fid (run the converter with --check)"
    if record.get("npz_digest") != weights_digest(path):
        return False, "the .npz arrays differ from those the provenance record describes"
    return True, "official weights; Flax features match pytorch-fid"


@dataclasses.dataclass(frozen=True)
class FIDResult:
    """An FID value, or None with the reason it was skipped."""

    value: float | None
    status: str  # "validated", "unvalidated" or "skipped"
    reason: str
    num_images: int = 0

    def to_metrics(self) -> dict[str, Any]:
        """Keys for metrics.json: `fid`, `fid_status`, `fid_reason`, `fid_num_images`."""
        rest = {f"fid_{k}": getattr(self, k) for k in ("status", "reason", "num_images")}
        return {"fid": self.value, **rest}


def accumulate_stats(
    images_iter: Iterable[Any], feature_fn: Callable[[np.ndarray], Any]
) -> FeatureStats:
    """Runs `feature_fn` over batches of images and accumulates float64 statistics."""
    stats = FeatureStats()
    for images in images_iter:
        x = np.asarray(images)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[-1] != 3:
            raise FIDError(f"images must be [B, H, W, 3] (or one [H, W, 3]), got shape {x.shape}")
        stats.update(np.asarray(feature_fn(x)))
    return stats


def _skip(reason: str) -> FIDResult:
    log.warning("FID skipped: %s", reason)
    return FIDResult(None, "skipped", reason)


def inception_feature_fn(inception_params_path: str | os.PathLike) -> Callable[[np.ndarray], Any]:
    """A jitted images -> [B, 2048] function for a validated weights file."""
    from parti_jax.eval import inception  # jax/flax only when features are computed

    variables = inception.load_params(inception_params_path)
    return lambda images: inception.inception_features(variables, images)


def compute_fid(
    images_iter: Iterable[Any],
    inception_params_path: str | os.PathLike | None,
    ref_stats_path: str | os.PathLike | None,
    *,
    feature_fn: Callable[[np.ndarray], Any] | None = None,
) -> FIDResult:
    """FID of `images_iter` (batches [B, H, W, 3], float in [0, 1] or uint8, any size)
    against reference statistics (.npz with `mu`, `sigma`), with the Inception weights made by
    scripts/convert_fid_inception.py. `feature_fn` replaces the network (the result is then
    "unvalidated"); without statistics, or without weights and feature_fn, it is "skipped"."""
    if not ref_stats_path:
        return _skip("no reference statistics given (an .npz with mu and sigma)")
    if feature_fn is None and not inception_params_path:
        return _skip(
            "no Inception weights given; convert pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth with scripts/convert_fid_inception.py "
            "and pass the .npz"
        )
    mu_ref, sigma_ref = load_stats(ref_stats_path)
    if feature_fn is None:
        feature_fn = inception_feature_fn(inception_params_path)
        validated, why = weights_validation(inception_params_path)
    else:
        validated, why = False, "custom feature function, not the validated Inception network"
    stats = accumulate_stats(images_iter, feature_fn)
    if stats.count < 2:
        raise FIDError(f"FID needs at least 2 images, got {stats.count}")
    if stats.dim != mu_ref.shape[0]:
        raise FIDError(
            f"{ref_stats_path}: reference features have dim {mu_ref.shape[0]} but the "
            f"network gives {stats.dim}"
        )
    value = frechet_distance(stats.mu(), stats.sigma(), mu_ref, sigma_ref)
    status = "validated" if validated else "unvalidated"
    if not validated:
        log.warning("FID %.3f is unvalidated: %s", value, why)
    return FIDResult(value, status, why, stats.count)


def compute_reference_stats(
    images_iter: Iterable[Any],
    inception_params_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    feature_fn: Callable[[np.ndarray], Any] | None = None,
) -> Path:
    """Accumulates statistics of (real) images and writes them as a reference .npz."""
    if feature_fn is None:
        feature_fn = inception_feature_fn(inception_params_path)
    stats = accumulate_stats(images_iter, feature_fn)
    return save_stats(out_path, stats.mu(), stats.sigma())


def iter_image_batches(
    paths: Iterable[str | os.PathLike], batch_size: int = 50
) -> Iterable[np.ndarray]:
    """Loads image files as uint8 [B, H, W, 3] batches (all images of a batch the same size)."""
    from PIL import Image

    def load(path: str | os.PathLike) -> np.ndarray:
        try:
            with storage.open(path, "rb") as f, Image.open(f) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise FIDError(f"{path}: cannot read image ({e})") from None

    paths = list(paths)
    for start in range(0, len(paths), batch_size):
        batch = [load(p) for p in paths[start : start + batch_size]]
        shapes = {b.shape for b in batch}
        if len(shapes) != 1:
            raise FIDError(
                f"images in one batch differ in size: {sorted(shapes)}; resize them first"
            )
        yield np.stack(batch)


def eval_dir_batches(
    eval_dir: str | os.PathLike, batch_size: int = 50, *, first_only: bool = True
) -> Iterator[np.ndarray]:
    """uint8 batches of an eval folder's images (the top-ranked per prompt by default); the
    manifest is read only when the first batch is asked for."""
    from parti_jax.eval import records

    recs = records.read_manifest(eval_dir, check_images=True, allow_torn_tail=True)
    folder = storage.path(eval_dir)
    paths = [folder / i for r in recs for i in (r.images[:1] if first_only else r.images)]
    yield from iter_image_batches(paths, batch_size)
