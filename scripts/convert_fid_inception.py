#!/usr/bin/env python
"""Converts pytorch-fid's FID Inception weights into parti_jax's .npz format.

Run where torch (and, for --check, torchvision + pytorch-fid) are installed and
the official weights file exists (pytorch-fid downloads it to
~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth):

    python scripts/convert_fid_inception.py \\
        --pth ~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth \\
        --out fid_inception.npz --check

Writes:
- `<out>`: one float32 array per parameter, keyed by the torch state_dict name,
  in torch layout (format: parti_jax/eval/inception.py, `expected_params()`);
- `<out>.provenance.json`: the source file's sha256, the .npz's array digest
  and, with --check, the largest difference between pytorch-fid's pool3
  features and parti_jax's Flax features on the same images. FID computed
  with weights whose record shows the official source and a passed check is
  reported as "validated"; anything else as "unvalidated".

This file is a standalone tool; tests only compile it (it imports torch).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

OFFICIAL_NAME = "pt_inception-2015-12-05-6726825d.pth"
PARITY_TOLERANCE = 1e-3  # max |torch - flax| / max(1, max |torch feature|)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: expected a state_dict (a dict of tensors), got {type(state)}")
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def torch_fid_model(state: dict[str, np.ndarray]):
    """pytorch-fid's FID Inception (torchvision Inception3 patched with FID blocks)."""
    import torch
    import torchvision
    from pytorch_fid import inception as pf

    net = torchvision.models.inception.Inception3(
        num_classes=1008, aux_logits=False, init_weights=False
    )
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return net.eval()


def torch_features(net, images_nhwc: np.ndarray) -> np.ndarray:
    """pool3 features as pytorch-fid computes them (resize, scale to [-1, 1], blocks 0-3)."""
    import torch
    import torch.nn.functional as F

    names = [
        "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
        "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
        "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
        "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
    ]  # fmt: skip
    with torch.no_grad():
        x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in names:
            x = getattr(net, name)(x)
        return x.mean(dim=(2, 3)).numpy()


def parity_check(state: dict[str, np.ndarray], npz_path: Path) -> dict:
    """Compares torch and Flax features on seeded random images at 299 and 256 px."""
    import jax

    from parti_jax.eval import inception

    jax.config.update("jax_default_matmul_precision", "highest")
    net = torch_fid_model(state)
    variables = inception.load_params(npz_path)
    rng = np.random.default_rng(0)
    worst, scale = 0.0, 1.0
    for size in (299, 256):
        images = (rng.integers(0, 256, (2, size, size, 3)) / 255.0).astype(np.float32)
        ref = torch_features(net, images)
        got = np.asarray(inception.inception_features(variables, images))
        worst = max(worst, float(np.max(np.abs(ref - got))))
        scale = max(scale, float(np.max(np.abs(ref))))
    return {
        "max_abs_diff": worst,
        "max_abs_feature": scale,
        "tolerance": PARITY_TOLERANCE,
        "passed": worst <= PARITY_TOLERANCE * scale,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", required=True, type=Path, help=f"the official {OFFICIAL_NAME}")
    parser.add_argument("--out", required=True, type=Path, help="the .npz to write")
    parser.add_argument(
        "--check", action="store_true", help="compare features with pytorch-fid (needs jax too)"
    )
    args = parser.parse_args(argv)

    from parti_jax.eval import fid, inception

    source_sha = sha256_file(args.pth)
    official = source_sha.startswith(fid.OFFICIAL_SHA256_PREFIX)
    if not official:
        print(
            f"warning: {args.pth} has sha256 {source_sha[:16]}..., not the official "
            f"{OFFICIAL_NAME}; FID with these weights will be reported as unvalidated",
            file=sys.stderr,
        )
    state = load_state_dict(args.pth)
    arrays = inception.torch_state_to_npz_arrays(state)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    inception.validate_npz(args.out)
    record = {
        "converter": "scripts/convert_fid_inception.py",
        "source": args.pth.name,
        "source_sha256": source_sha,
        "official_source": official,
        "npz_digest": fid.weights_digest(args.out),
        "num_arrays": len(arrays),
        "num_values": int(sum(a.size for a in arrays.values())),
        "parity_check": parity_check(state, args.out) if args.check else None,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    provenance = Path(str(args.out) + fid.PROVENANCE_SUFFIX)
    provenance.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))
    if args.check and not record["parity_check"]["passed"]:
        print("parity check FAILED: the Flax network does not match pytorch-fid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
