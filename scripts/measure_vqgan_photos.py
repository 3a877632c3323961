#!/usr/bin/env python
"""Real-photo reconstruction of a ViT-VQGAN trained briefly on CPU (README "Measured").

    python scripts/measure_vqgan_photos.py [--out /tmp/vqgan_photos] [--num_steps N]

1. Builds a folder task from the photos shipped with scikit-image (astronaut,
   coffee, rocket, chelsea) and scikit-learn (china, flower): chelsea and
   flower are held out whole ('validation' split: their non-overlapping
   64x64 crops); the other four are cut into 64x64 crops at stride 32, at
   full size and at half size ('train' split). Captions are the photo names.
2. Trains `gin/runs/photos_vqgan.gin` with `parti-jax train-vqgan` (timed).
3. Reconstructs every held-out crop with the trained VQGAN (ImageTokenizer)
   and prints one JSON line: PSNR and LPIPS (VGG16 and AlexNet) over the
   held-out crops, codebook usage, training wall time, steps, machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "china")
HELDOUT_PHOTOS = ("chelsea", "flower")
CROP = 64


def photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        index = [Path(f).stem for f in data.filenames].index(name)
        return np.asarray(data.images[index])
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def crops(image: np.ndarray, stride: int) -> list[np.ndarray]:
    h, w = image.shape[:2]
    return [
        image[y : y + CROP, x : x + CROP]
        for y in range(0, h - CROP + 1, stride)
        for x in range(0, w - CROP + 1, stride)
    ]


def build_folder(folder: Path) -> dict[str, int]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows, counts = [], {"train": 0, "validation": 0}
    for name in TRAIN_PHOTOS + HELDOUT_PHOTOS:
        split = "validation" if name in HELDOUT_PHOTOS else "train"
        image = photo(name)
        versions = [image]
        if split == "train":
            h, w = image.shape[:2]
            versions.append(
                np.asarray(Image.fromarray(image).resize((w // 2, h // 2), Image.BICUBIC))
            )
        for v, version in enumerate(versions):
            for i, crop in enumerate(crops(version, 32 if split == "train" else CROP)):
                file = f"{name}_{v}_{i:04d}.png"
                Image.fromarray(crop).save(folder / file)
                rows.append({"file": file, "caption": f"a photo: {name}", "split": split})
                counts[split] += 1
    with open(folder / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return counts


def heldout_crops() -> np.ndarray:
    return (
        np.stack([c for n in HELDOUT_PHOTOS for c in crops(photo(n), CROP)]).astype(np.float32)
        / 255.0
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/vqgan_photos")
    parser.add_argument(
        "--num_steps", type=int, default=None, help="override train_vqgan/LoopConfig.num_steps"
    )
    parser.add_argument("--skip_training", action="store_true", help="only evaluate --out/vqgan")
    args = parser.parse_args()
    out = Path(args.out)
    folder, workdir = out / "photos", out / "vqgan"
    counts = build_folder(folder)
    load_before = os.getloadavg()
    train_s = None
    if not args.skip_training:
        cmd = [
            sys.executable, "-m", "parti_jax", "train-vqgan", "--gin_file=runs/photos_vqgan.gin",
            f"--workdir={workdir}", f"--gin.register_folder_task.folder='{folder}'",
        ]  # fmt: skip
        if args.num_steps:
            cmd.append(f"--gin.train_vqgan/LoopConfig.num_steps={args.num_steps}")
        start = time.time()
        subprocess.run(cmd, check=True)
        train_s = time.time() - start
    load_after = os.getloadavg()

    import jax.numpy as jnp

    from parti_jax.vqgan.lpips import make_lpips_fn
    from parti_jax.vqgan.tokenizer import ImageTokenizer

    tok = ImageTokenizer.load(workdir)
    images = heldout_crops()
    codes = tok.encode(images)
    recon = tok.decode(codes)
    mse = np.mean((recon.astype(np.float64) - images) ** 2, axis=(1, 2, 3))
    result = {
        "heldout_photos": list(HELDOUT_PHOTOS),
        "num_heldout_crops": len(images),
        "train_crops": counts["train"],
        "psnr_db": float(np.mean(10 * np.log10(1.0 / mse))),
        "codebook_usage": len(np.unique(codes)) / tok.codebook_size,
        "step": tok.meta["step"],
        "train_wall_s": None if train_s is None else round(train_s, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    for net in ("vgg16", "alexnet"):
        fn = make_lpips_fn(net)
        distances = [
            np.asarray(fn(jnp.asarray(images[i : i + 32]), jnp.asarray(recon[i : i + 32])))
            for i in range(0, len(images), 32)
        ]
        result[f"lpips_{net}"] = float(np.mean(np.concatenate(distances)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
