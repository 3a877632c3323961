"""Reconstruction eval of the image tokenizer (VQGAN) and the upsampler.

Over held-out images of a pixels task (or the shapes world, TensorFlow-free):
the VQGAN's PSNR, LPIPS and codebook usage (share of the K codes used, and the
perplexity exp(entropy) of the code histogram: K for uniform use, 1 for one
code); with an upsampler, originals at its output size are area downsampled,
reconstructed by the VQGAN and upsampled, beside a bicubic upsample of the same
reconstructions (the baseline the network must beat).

PSNR is 10 log10(1 / MSE) per image (pixels in [0, 1]), averaged; an exact
reconstruction counts as PSNR_CAP_DB and in `psnr_num_identical`. LPIPS uses
parti_jax/vqgan/lpips.py; images too small for its deepest feature map get
`lpips: null` and `lpips_note`. metrics.json::

    {"suite": "reconstruction", "num_images", "source": {"task", "split", "seed"},
     "psnr_cap_db": 100.0, "lpips_net": "vgg16" | null, "lpips_note": str (if skipped),
     "vqgan": {"image_size", "psnr", "psnr_num_identical", "mse", "lpips",
               "codebook_size", "codebook_used", "codebook_usage", "codebook_perplexity"},
     "upsampler": {"input_size", "output_size", "psnr", "psnr_num_identical", "lpips",
                   "bicubic": {"psnr", "psnr_num_identical", "lpips"},
                   "psnr_gain_over_bicubic"}}     # only with an upsampler

`report.html` shows the numbers and the first images of each kind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from parti_jax import storage
from parti_jax.eval import html as H
from parti_jax.eval import records as R
from parti_jax.eval import suites as S
from parti_jax.models.config import check_counts

NAME = "reconstruction"
PSNR_CAP_DB = 100.0
SHAPES_WORLD = "shapes_world"


def psnr_per_image(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PSNR in dB capped at PSNR_CAP_DB, identical mask, MSE) per image of two [B, H, W, 3]
    batches."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = np.mean(diff * diff, axis=(1, 2, 3))
    identical = mse == 0.0
    with np.errstate(divide="ignore"):
        value = 10.0 * np.log10(1.0 / np.where(identical, 1.0, mse))
    return np.where(identical, PSNR_CAP_DB, np.minimum(value, PSNR_CAP_DB)), identical, mse


def codebook_stats(counts: np.ndarray) -> dict[str, Any]:
    """Usage of a codebook from its code histogram [K]."""
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log(p)).sum()) if total else 0.0
    return {
        "codebook_size": int(counts.size),
        "codebook_used": int((counts > 0).sum()),
        "codebook_usage": float((counts > 0).sum() / counts.size),
        "codebook_perplexity": float(math.exp(entropy)),
    }


def lpips_problem(net: str, size: int) -> str | None:
    """Why LPIPS-`net` cannot compare `size`-pixel images (an empty feature map), or None."""
    import jax
    import jax.numpy as jnp

    from parti_jax.vqgan import lpips

    trunk = lpips.VGG16Features() if net == "vgg16" else lpips.AlexNetFeatures()
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    feats, _ = jax.eval_shape(lambda v: trunk.init_with_output(jax.random.key(0), v), x)
    if any(0 in f.shape for f in feats):
        return f"{size}px images are too small for LPIPS-{net} (its deepest feature map is empty)"
    return None


def _compare(pred: np.ndarray, target: np.ndarray, lpips_fn: Callable | None) -> dict:
    """Per-image PSNR, identical mask, MSE and (with `lpips_fn`) LPIPS of one batch."""
    psnr, identical, mse = psnr_per_image(pred, target)
    out = {"psnr": psnr, "identical": identical, "mse": mse}
    if lpips_fn is not None:
        out["lpips"] = np.asarray(lpips_fn(pred, target), np.float64)
    return out


def _summary(batches: list[dict]) -> dict[str, Any]:
    """The means over every image of `_compare`'s batches."""
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return {
        "psnr": float(np.mean(cat["psnr"])),
        "psnr_num_identical": int(cat["identical"].sum()),
        "mse": float(np.mean(cat["mse"])),
        "lpips": float(np.mean(cat["lpips"])) if "lpips" in cat else None,
    }


def tokenizer_size(tokenizer: Any, name: str) -> int:
    """The tokenizer's `image_size` or `codebook_size` (an attribute, else in its meta)."""
    value = getattr(tokenizer, name, None)
    return int(tokenizer.meta[name] if value is None else value)


def upsample_fn_of(upsampler: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy images -> images function from a LoadedUpsampler or a plain callable."""
    if hasattr(upsampler, "make_upsample_fn"):
        fn, params = upsampler.make_upsample_fn(), upsampler.params
        return lambda x: np.asarray(fn(params, x), np.float32)
    fn = getattr(upsampler, "upsample", upsampler)
    return lambda x: np.asarray(fn(x), np.float32)


def upsampler_output_size(upsampler: Any, input_size: int) -> int:
    config = getattr(upsampler, "config", None)
    if config is not None and hasattr(config, "output_size"):
        if int(config.input_size) != input_size:
            raise S.SuiteError(
                f"{NAME}: the upsampler takes {config.input_size}px images but the VQGAN makes "
                f"{input_size}px; give the upsampler trained on this VQGAN's reconstructions"
            )
        return int(config.output_size)
    import jax
    import jax.numpy as jnp

    probe = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    return int(jax.eval_shape(getattr(upsampler, "upsample", upsampler), probe).shape[1])


def shapes_world_images(
    *, image_size: int, split: str = "validation", seed: int = 0, batch_size: int = 32
) -> Iterator[np.ndarray]:
    """Endless float32 [B, S, S, 3] batches of shapes-world examples 0, 1, ... of `split`
    (sides under the world's 32 px minimum are drawn at a multiple and area downsampled)."""
    from parti_jax.data import shapes
    from parti_jax.upsampler.data import area_downsample

    factor = -(-32 // image_size)
    config = shapes.ShapesWorldConfig(resolution=image_size * factor)
    i = 0
    while True:
        batch = [
            shapes.generate_example(i + r, split, seed, config).image for r in range(batch_size)
        ]
        i += batch_size
        yield area_downsample(np.stack(batch).astype(np.float32) / np.float32(255.0), factor)


def _take(batches: Iterable[np.ndarray], num_images: int | None) -> Iterator[np.ndarray]:
    """The first `num_images` images (all if None) as float32 batches in [0, 1]."""
    left = num_images
    for batch in batches:
        batch = np.asarray(batch)
        if batch.dtype == np.uint8:
            batch = batch.astype(np.float32) / np.float32(255.0)
        if left is not None:
            batch = batch[:left]
            left -= len(batch)
        if len(batch):
            yield batch.astype(np.float32)
        if left is not None and left <= 0:
            return


def evaluate_reconstruction(
    tokenizer: Any,
    out_dir: str | os.PathLike,
    images: Iterable[np.ndarray],
    *,
    upsampler: Any = None,
    num_images: int | None = None,
    lpips_net: str | None = "vgg16",
    lpips_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    report_images: int = 8,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Reconstruction metrics over `images` (batches [B, S, S, 3]); writes metrics and report.

    `S` is the VQGAN's image size, or the upsampler's output size when an
    upsampler is given. `lpips_fn(a, b) -> [B]` replaces the LPIPS network.
    """
    from parti_jax.upsampler.data import area_downsample, bicubic_upsample

    out_dir = storage.path(out_dir)
    size, k = tokenizer_size(tokenizer, "image_size"), tokenizer_size(tokenizer, "codebook_size")
    upsample = upsample_fn_of(upsampler) if upsampler is not None else None
    hi_size = upsampler_output_size(upsampler, size) if upsampler is not None else size
    lpips_note, lpips_label = None, "custom" if lpips_fn is not None else lpips_net
    if lpips_fn is None and lpips_net:
        lpips_note = lpips_problem(lpips_net, size)
        if lpips_note is None:
            import jax

            from parti_jax.vqgan.lpips import make_lpips_fn

            lpips_fn = jax.jit(make_lpips_fn(lpips_net))
        else:
            lpips_label = None
    vq, up, bic = [], [], []
    counts = np.zeros(k, np.int64)
    shown: list[dict[str, np.ndarray]] = []
    total = 0
    for batch in _take(images, num_images):
        if batch.ndim != 4 or batch.shape[1:] != (hi_size, hi_size, 3):
            what = "the upsampler's output size" if upsampler is not None else "the VQGAN's size"
            raise S.SuiteError(
                f"{NAME}: images have shape {batch.shape[1:]} but {what} is {hi_size}; give a "
                f"source at {hi_size}px"
            )
        low = np.asarray(area_downsample(batch, hi_size // size), np.float32)
        codes = np.asarray(tokenizer.encode(low))
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise S.SuiteError(f"{NAME}: the tokenizer returned codes outside [0, {k})")
        counts += np.bincount(codes.reshape(-1), minlength=k)
        recon = np.clip(np.asarray(tokenizer.decode(codes), np.float32), 0.0, 1.0)
        vq.append(_compare(recon, low, lpips_fn))
        row = {"original": low, "reconstruction": recon}
        if upsample is not None:
            upsampled = np.clip(upsample(recon), 0.0, 1.0)
            bicubic = np.clip(np.asarray(bicubic_upsample(recon, hi_size // size)), 0.0, 1.0)
            up.append(_compare(upsampled, batch, lpips_fn))
            bic.append(_compare(bicubic, batch, lpips_fn))
            row.update(original_hi=batch, upsampled=upsampled, bicubic=bicubic)
        for i in range(min(len(batch), report_images - len(shown))):
            shown.append({key: value[i] for key, value in row.items()})
        total += len(batch)
    if total == 0:
        raise S.SuiteError(f"{NAME}: the image source gave no images")
    metrics: dict[str, Any] = dict(suite=NAME, num_images=total, source=source or {})
    metrics.update(psnr_cap_db=PSNR_CAP_DB, lpips_net=lpips_label)
    metrics["vqgan"] = {"image_size": size, **_summary(vq), **codebook_stats(counts)}
    if lpips_note:
        metrics["lpips_note"] = lpips_note
    if upsample is not None:
        u, b = _summary(up), _summary(bic)
        metrics["upsampler"] = {"input_size": size, "output_size": hi_size, **u, "bicubic": b}
        metrics["upsampler"]["psnr_gain_over_bicubic"] = u["psnr"] - b["psnr"]
    R.update_metrics(out_dir, metrics)
    _write_report(out_dir, metrics, shown)
    return metrics


def _write_report(
    out_dir: storage.Path, metrics: dict[str, Any], shown: list[dict]
) -> storage.Path:
    rows = []
    for i, images in enumerate(shown):
        cells = []
        for key, image in images.items():
            rel = f"{R.IMAGES_DIR}/{i:03d}_{key}.png"
            S.save_png(out_dir / rel, S.to_uint8(image))
            cells.append(f"<td>{H.img_tag(rel, title=key, caption=key)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    body = (
        "<header><h1>Reconstruction</h1></header>"
        f'<p class="muted">PSNR in dB (identical images count as {PSNR_CAP_DB:g}); LPIPS lower '
        "is better; codebook usage = share of codes used, perplexity = exp(entropy).</p>"
        f'<div id="metrics">{H.metrics_table(metrics)}</div><h2>First images</h2>'
        f'<table id="samples"><tbody>{"".join(rows)}</tbody></table>'
    )
    return H.write_page(out_dir / S.REPORT, "Reconstruction", body)


def run_reconstruction(
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    upsampler: Any = None,
    task: Any = SHAPES_WORLD,
    split: str = "validation",
    num_images: int = 256,
    batch_size: int = 32,
    data_seed: int = 0,
    lpips_net: str | None = "vgg16",
    lpips_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    report_images: int = 8,
    process_index: int | None = None,
) -> dict[str, Any]:
    """The reconstruction suite over a pixels task split; runs on process 0 only.

    Args:
      tokenizer: an `ImageTokenizer` (encode / decode / image_size / codebook_size).
      upsampler: a `LoadedUpsampler` or an images -> images callable (optional).
      task, split: a SeqIO pixels task (or its registered name) and split, or
        "shapes_world" / None for the built-in world drawn at the needed size.
      num_images, batch_size: images evaluated, images per batch.
      data_seed: the task pipeline's or the shapes world's seed.
      lpips_net: 'vgg16', 'alexnet' or None (no LPIPS); lpips_fn replaces the network.
      report_images: images shown in report.html.
    """
    if skipped := S.process_0_only(NAME, process_index):
        return skipped
    check_counts(NAME, num_images=num_images, batch_size=batch_size)
    check_counts(NAME, low=0, report_images=report_images)
    size = tokenizer_size(tokenizer, "image_size")
    hi = upsampler_output_size(upsampler, size) if upsampler is not None else size
    if task is None or task == SHAPES_WORLD:
        images = shapes_world_images(
            image_size=hi, split=split, seed=data_seed, batch_size=batch_size
        )
        name = SHAPES_WORLD
    else:
        batches = S.task_batches(
            task, split=split, batch_size=batch_size, image_size=hi, seed=data_seed
        )
        images = (batch["image"] for batch in batches)  # TensorFlow via parti_jax.data
        name = getattr(task, "name", task)
    return evaluate_reconstruction(
        tokenizer,
        out_dir,
        images,
        upsampler=upsampler,
        num_images=num_images,
        lpips_net=lpips_net,
        lpips_fn=lpips_fn,
        report_images=report_images,
        source={"task": str(name), "split": split, "seed": data_seed},
    )
