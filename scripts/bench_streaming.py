"""Streaming input benchmark: examples/s of decode + resize + tokenize from WebDataset tar
shards (and, for comparison, a captions folder of the same JPEGs), and how long it takes
to register a 100k-example source (tar shards; a folder with 100k caption lines).

    .venv/bin/python scripts/bench_streaming.py [--workdir /tmp/parti_jax_bench_streaming]

Generates its data once into --workdir (about 1.4 GB; kept for reruns):
  photos/       10,000 JPEGs (quality 90), random crops of the scikit-image sample photos
                resized to a shorter side of 448-576 px, aspect 3:4 to 4:3; captions.jsonl
  shards/       the same 10,000 examples as 20 tar shards x 500 (img2dataset's layout:
                <key>.jpg, <key>.txt, <key>.json)
  tiny_shards/  100 tar shards x 1,000 examples of 64 px JPEGs (100k examples)
  tiny_folder/  100,000 64 px JPEG files and 100,000 caption lines
Prints one JSON line per measurement. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

NUM_SHARDS, PER_SHARD = 20, 500
TINY_SHARDS, TINY_PER_SHARD = 100, 1000
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
           "hubble_deep_field", "retina", "colorwheel", "camera", "moon")  # fmt: skip
WORDS = {
    "adjective": [
        "red",
        "small",
        "old",
        "shiny",
        "wooden",
        "quiet",
        "bright",
        "dusty",
        "tall",
        "striped",
    ],
    "noun": [
        "cat",
        "astronaut",
        "cup",
        "rocket",
        "cell",
        "galaxy",
        "eye",
        "wheel",
        "camera",
        "crater",
    ],
    "place": ["on a table", "in space", "near the sea", "in a lab", "at night", "on the moon"],
    "style": ["photograph", "oil painting", "sketch", "close-up photo", "watercolor"],
}


def _caption(rng: np.random.Generator) -> str:
    pick = {k: v[rng.integers(len(v))] for k, v in WORDS.items()}
    return f"a {pick['style']} of a {pick['adjective']} {pick['noun']} {pick['place']}"


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _photo(rng: np.random.Generator, sources: list[np.ndarray]) -> np.ndarray:
    """A random crop of a sample photo, resized to a shorter side of 448-576 px."""
    from PIL import Image

    image = sources[rng.integers(len(sources))]
    h, w = image.shape[:2]
    aspect = rng.uniform(0.75, 4 / 3)
    ch = int(rng.uniform(0.5, 1.0) * min(h, w / aspect))
    cw = int(ch * aspect)
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    scale = int(rng.integers(448, 577)) / min(ch, cw)
    crop = Image.fromarray(image[top : top + ch, left : left + cw])
    return np.asarray(crop.resize((round(cw * scale), round(ch * scale)), Image.BICUBIC))


def generate(workdir: str) -> None:
    """Writes the benchmark data (skipped for the parts that exist)."""
    import skimage.data

    from parti_jax.data import webdataset

    rng = np.random.default_rng(0)
    photos = os.path.join(workdir, "photos")
    if not os.path.exists(os.path.join(photos, "captions.jsonl")):
        os.makedirs(photos, exist_ok=True)
        sources = []
        for name in SAMPLES:
            image = getattr(skimage.data, name)()
            sources.append(np.dstack([image] * 3) if image.ndim == 2 else image[..., :3])
        rows = []
        for i in range(NUM_SHARDS * PER_SHARD):
            with open(os.path.join(photos, f"{i:09d}.jpg"), "wb") as f:
                f.write(_jpeg(_photo(rng, sources)))
            rows.append(json.dumps({"file": f"{i:09d}.jpg", "caption": _caption(rng)}))
        with open(os.path.join(photos, "captions.jsonl"), "w") as f:
            f.write("\n".join(rows) + "\n")
    shards = os.path.join(workdir, "shards")
    if not os.path.exists(os.path.join(shards, f"{NUM_SHARDS - 1:05d}.tar")):
        os.makedirs(shards, exist_ok=True)
        with open(os.path.join(photos, "captions.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        for s in range(NUM_SHARDS):
            members = []
            for row in rows[s * PER_SHARD : (s + 1) * PER_SHARD]:
                key = row["file"][:-4]
                with open(os.path.join(photos, row["file"]), "rb") as f:
                    members.append((f"{key}.jpg", f.read()))
                members.append((f"{key}.txt", row["caption"].encode()))
                meta = {"key": key, "caption": row["caption"], "status": "success"}
                members.append((f"{key}.json", json.dumps(meta).encode()))
            with open(os.path.join(shards, f"{s:05d}.tar"), "wb") as f:
                f.write(webdataset.tar_bytes(members))
    tiny = [_jpeg(rng.integers(0, 256, (64, 64, 3), np.uint8), 80) for _ in range(16)]
    tiny_shards = os.path.join(workdir, "tiny_shards")
    if not os.path.exists(os.path.join(tiny_shards, f"{TINY_SHARDS - 1:05d}.tar")):
        os.makedirs(tiny_shards, exist_ok=True)
        for s in range(TINY_SHARDS):
            members = []
            for i in range(s * TINY_PER_SHARD, (s + 1) * TINY_PER_SHARD):
                members += [
                    (f"{i:09d}.jpg", tiny[i % 16]),
                    (f"{i:09d}.txt", _caption(rng).encode()),
                ]
            with open(os.path.join(tiny_shards, f"{s:05d}.tar"), "wb") as f:
                f.write(webdataset.tar_bytes(members))
    tiny_folder = os.path.join(workdir, "tiny_folder")
    if not os.path.exists(os.path.join(tiny_folder, "captions.jsonl")):
        rows = []
        for i in range(TINY_SHARDS * TINY_PER_SHARD):
            sub = os.path.join(tiny_folder, f"{i // 1000:03d}")
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"{i:09d}.jpg"), "wb") as f:
                f.write(tiny[i % 16])
            file = f"{i // 1000:03d}/{i:09d}.jpg"
            rows.append(json.dumps({"file": file, "caption": _caption(rng)}))
        with open(os.path.join(tiny_folder, "captions.jsonl"), "w") as f:
            f.write("\n".join(rows) + "\n")


def _context() -> dict:
    import seqio
    import tensorflow as tf

    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "tensorflow": tf.__version__,
        "seqio": getattr(seqio, "__version__", "unknown"),
    }


def _emit(**fields) -> None:
    print(json.dumps({**fields, **_context()}), flush=True)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def throughput(task: str, *, batch_size: int, batches: int, warmup: int, **kwargs) -> dict:
    """examples/s of make_pixels_iterator (256 px float32 batches, tokenized captions) after
    `warmup` batches."""
    from parti_jax.data import pipeline

    it = pipeline.make_pixels_iterator(task, batch_size=batch_size, image_size=256, **kwargs)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    seconds = time.perf_counter() - start
    assert batch["image"].shape == (batch_size, 256, 256, 3)
    it.close()
    return {"examples": batch_size * batches, "seconds": round(seconds, 2),
            "examples_per_s": round(batch_size * batches / seconds, 1)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/parti_jax_bench_streaming")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip_eager", action="store_true", help="skip the eager-verify timings")
    args = parser.parse_args(argv)
    _, seconds = _timed(lambda: generate(args.workdir))
    print(f"data ready in {seconds:.0f} s under {args.workdir}", file=sys.stderr)

    from parti_jax.tasks import register_folder_task, register_webdataset_task

    w = args.workdir
    # Registration: what a host does at start-up before it reads anything.
    task, seconds = _timed(
        lambda: register_webdataset_task("bench_tiny", f"{w}/tiny_shards", image_size=256)
    )
    _emit(benchmark="register", source="tar shards (folder)", examples=100_000,
          shards=len(task.source.list_shards("train")), seconds=round(seconds, 3))  # fmt: skip
    pattern = f"{w}/tiny_shards/{{00000..{TINY_SHARDS - 1:05d}}}.tar"
    _, seconds = _timed(lambda: register_webdataset_task("bench_tiny", pattern, image_size=256))
    _emit(benchmark="register", source="tar shards (brace pattern)", examples=100_000,
          seconds=round(seconds, 3))  # fmt: skip
    task, seconds = _timed(
        lambda: register_folder_task("bench_folder", f"{w}/tiny_folder", image_size=256)
    )
    _emit(benchmark="register", source="folder, verify_images='auto' (lazy above 1000 rows)",
          examples=len(task.source.index.records), seconds=round(seconds, 2))  # fmt: skip
    if not args.skip_eager:
        task, seconds = _timed(lambda: register_folder_task(
            "bench_folder", f"{w}/tiny_folder", image_size=256, verify_images=True))  # fmt: skip
        _emit(benchmark="register", source="folder, verify_images=True (64 px JPEGs)",
              examples=len(task.source.index.records), seconds=round(seconds, 2))  # fmt: skip
        task, seconds = _timed(lambda: register_folder_task(
            "bench_photos", f"{w}/photos", image_size=256, verify_images=True))  # fmt: skip
        n = len(task.source.index.records)
        _emit(benchmark="register", source="folder, verify_images=True (~512 px JPEGs)",
              examples=n, seconds=round(seconds, 2),
              extrapolated_100k_seconds=round(seconds * 100_000 / n))  # fmt: skip

    # Throughput: decode + resize to 256 + tokenize, as train-vqgan and precompute read.
    register_webdataset_task("bench_tars", f"{w}/shards", image_size=256)
    register_folder_task("bench_photos", f"{w}/photos", image_size=256)
    runs = [
        ("tar shards, shuffled (training)", "bench_tars_pixels", {"shuffle": True}),
        ("tar shards, in order (precompute-codes)", "bench_tars_pixels",
         {"shuffle": False, "repeat": False}),
        ("folder of the same JPEGs, shuffled", "bench_photos_pixels", {"shuffle": True}),
    ]  # fmt: skip
    for what, task_name, kwargs in runs:
        result = throughput(task_name, batch_size=args.batch_size, batches=args.batches,
                            warmup=args.warmup, **kwargs)  # fmt: skip
        _emit(benchmark="decode_resize_tokenize_256", source=what, batch_size=args.batch_size,
              **result)  # fmt: skip


if __name__ == "__main__":
    main()
