"""The image tokenizer the rest of parti_jax uses: a trained ViT-VQGAN, loaded and jitted.

    tok = ImageTokenizer.load("/runs/vqgan")           # a train-vqgan work directory
    codes = tok.encode(images)    # float32 [B, H, W, 3] in [0, 1] -> int32 [B, h, w]
    images = tok.decode(codes)    # int32 [B, h, w] -> float32 [B, H, W, 3] in [0, 1]
    tok.check_codes_meta(codes_meta)   # codes made by this VQGAN? (error names both values)

`encode` / `decode` run host numpy in padded chunks of a power of two times
the mesh's batch devices (up to `batch_size`): a handful of compiles serve every
input size, and an image's codes do not depend on its batch. The default mesh
holds this process's devices, so hosts encode independently (precompute-codes
relies on that); with a multi-process mesh every process passes as many rows.
`vqgan_meta.json` (docs/DESIGN.md §3) records the config, codebook size and
hash, grid, image size and steps; `load` restores only the generator
parameters and checks the codebook hash recomputed from them. Work directories
may be URLs (gs://...; parti_jax/storage.py). TensorFlow-free.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from parti_jax import partitioning, storage
from parti_jax.vqgan.config import VQGANConfig
from parti_jax.vqgan.quantizer import codebook_hash
from parti_jax.vqgan.vit_vqgan import ViTVQGAN

META_FILE = "vqgan_meta.json"
# 2: VQGANConfig.decoder_tanh_ffn is recorded (format 1 predates it: the 'before' layout).
META_FORMAT_VERSION = 2
GENERATOR = "generator"


# ------------------------------------------------------------------ meta


def meta_path(path: str | os.PathLike) -> storage.Path:
    """`<workdir>/vqgan_meta.json` (or `path` itself when it names a .json file)."""
    p = storage.path(path)
    return p if p.suffix == ".json" else p / META_FILE


def load_vqgan_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a train-vqgan work directory's `vqgan_meta.json`."""
    file = meta_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: not found; pass the work directory of `parti-jax train-vqgan` (it writes "
            f"{META_FILE} with every checkpoint)"
        )
    try:
        meta = json.loads(storage.read_text(file))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    required = ("config", "codebook_size", "grid", "codebook_hash", "image_size", "step")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{file}: missing key(s) {missing}; not a parti_jax VQGAN meta")
    meta["_path"] = str(file)
    return meta


def write_vqgan_meta(workdir: str | os.PathLike, meta: Mapping[str, Any]) -> storage.Path:
    """Atomically (re)writes `<workdir>/vqgan_meta.json`."""
    file = meta_path(workdir)
    storage.write_json(file, {k: v for k, v in meta.items() if k != "_path"})
    return file


def config_from_meta(meta: Mapping[str, Any]) -> VQGANConfig:
    """The VQGANConfig recorded in a meta (unknown fields are an error naming them); one
    without `decoder_tanh_ffn` (format 1) had it before the decoder's blocks: 'before'."""
    fields = {f.name for f in dataclasses.fields(VQGANConfig)}
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise ValueError(
            f"{meta.get('_path', META_FILE)}: config has unknown VQGANConfig field(s) {unknown} "
            "(written by another parti_jax version?)"
        )
    return VQGANConfig(**{"decoder_tanh_ffn": "before", **meta["config"]})


def config_differences(saved: VQGANConfig, given: VQGANConfig) -> list[str]:
    """'field: saved X, given Y' for every field that differs."""
    pairs = [
        (f.name, getattr(saved, f.name), getattr(given, f.name)) for f in dataclasses.fields(saved)
    ]
    return [f"VQGANConfig.{n}: checkpoint {a!r}, given {b!r}" for n, a, b in pairs if a != b]


# ------------------------------------------------------------------ helpers


def _check_fits(step_dir: Any, target: Any, meta_file: str) -> None:
    """Raises ValueError when a parameter of `target` (built from the meta's config) is
    missing from the checkpoint or has another shape there: the meta file and the
    checkpoint are not of the same run."""
    from parti_jax.train import checkpoints

    saved = checkpoints.state_metadata(step_dir / "state")
    if not saved or "params" not in saved:
        return  # not a parti_jax checkpoint: restore_params_from says so
    have = checkpoints.flat_tree(saved["params"])
    for name, want in checkpoints.flat_tree(target).items():
        found = "missing" if name not in have else f"of shape {tuple(have[name].shape)}"
        if name not in have or tuple(have[name].shape) != tuple(want.shape):
            raise ValueError(
                f"{meta_file}: its VQGANConfig does not fit the checkpoint {step_dir}: "
                f"parameter {name} is {found} there but has shape {tuple(want.shape)} under "
                "that config; the meta file was edited or comes from another run: use the "
                "train-vqgan work directory that wrote the checkpoint, with its own "
                f"{META_FILE}"
            )


def local_mesh(devices: list[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh of this process's devices, all on 'data' (the
    default for encoding and sampling: each host works on its own rows)."""
    devices = list(jax.local_devices() if devices is None else devices)
    array = np.asarray(devices, dtype=object).reshape(len(devices), 1, 1)
    auto = (jax.sharding.AxisType.Auto,) * len(partitioning.MESH_AXES)
    return Mesh(array, partitioning.MESH_AXES, axis_types=auto)


def _as_images(images: Any, size: int) -> np.ndarray:
    """float32 [B, size, size, 3] in [0, 1] (uint8 is scaled), or an error naming both shapes."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"image batch has shape {tuple(images.shape)} but this VQGAN takes "
            f"[B, {size}, {size}, 3] (VQGANConfig.image_size={size}); resize the images to "
            f"{size}x{size} or load the VQGAN trained for this resolution"
        )
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if images.dtype.kind != "f":
        raise ValueError(f"images must be float32 in [0, 1] or uint8, got dtype {images.dtype}")
    images = images.astype(np.float32)
    if images.size and (float(images.max()) > 1.0 + 1e-3 or float(images.min()) < -1e-3):
        raise ValueError(
            f"image values range over [{float(images.min()):.3f}, {float(images.max()):.3f}]; "
            "the VQGAN takes float images in [0, 1] (divide uint8 pixels by 255)"
        )
    return images


def check_codes(codes: Any, config: VQGANConfig) -> np.ndarray:
    """int32 [B, grid, grid] image tokens (accepts [B, grid*grid]); errors name shape or range."""
    codes = np.asarray(codes)
    g = config.grid
    if codes.dtype.kind not in "iu":
        raise ValueError(f"image tokens must be integers, got dtype {codes.dtype}")
    if codes.ndim == 2 and codes.shape[1] == g * g:
        codes = codes.reshape(codes.shape[0], g, g)
    if codes.ndim != 3 or codes.shape[1:] != (g, g):
        raise ValueError(
            f"image tokens have shape {tuple(codes.shape)} but this VQGAN's grid is {g}x{g} "
            f"(expects [B, {g}, {g}] or [B, {g * g}]); pass codes made by this VQGAN"
        )
    if codes.size:
        lo, hi = int(codes.min()), int(codes.max())
        k = config.codebook_size
        if lo < 0 or hi >= k:
            raise ValueError(
                f"image tokens range over [{lo}, {hi}] (max {hi}) but the codebook has "
                f"K={k} entries; codes must lie in [0, {k - 1}] (decoder token ids are "
                "codes + 1: subtract the offset), or these codes come from another VQGAN"
            )
    return codes.astype(np.int32)


# ------------------------------------------------------------------ tokenizer


class ImageTokenizer:
    """Jitted, batched, mesh-sharded encode/decode of a ViT-VQGAN with its compatibility meta."""

    def __init__(
        self,
        config: VQGANConfig,
        params: Any,
        *,
        meta: Mapping[str, Any] | None = None,
        mesh: Mesh | None = None,
        rules: Any = "data_parallel",
        batch_size: int = 64,
    ) -> None:
        """Wraps the VQGAN's unboxed 'params' (on `mesh`, as `load` places them; a bundle's
        quantizer and decoder only: decode-only); `meta`: records (step, checkpoint,
        ...) for `self.meta`; `mesh, rules`: where encode/decode run (default: local
        devices on 'data'); `batch_size`: the largest chunk of rows per jitted call."""
        self.config, self.params = config, params
        self._model = ViTVQGAN(config)
        self.mesh = mesh or local_mesh()
        self.rules = partitioning.get_rules(rules) if isinstance(rules, str) else tuple(rules)
        self._num_batch_devices = n = partitioning.batch_devices(self.mesh)
        self.batch_size = max(n, -(-int(batch_size) // n) * n)
        self._row_sharding = partitioning.batch_sharding(self.mesh)
        self._meta = {
            "codebook_size": config.codebook_size,
            "grid": [config.grid, config.grid],
            "image_size": config.image_size,
            "step": None,
            "checkpoint": None,
            **(meta or {}),
            "codebook_hash": codebook_hash(params),  # of these weights, whatever `meta` says
        }
        self._encode_fn = jax.jit(
            lambda p, x: self._model.apply({"params": p}, x, method=ViTVQGAN.encode),
            out_shardings=self._row_sharding,
        )
        self._decode_fn = jax.jit(
            lambda p, c: self._model.apply({"params": p}, c, method=ViTVQGAN.decode_codes),
            out_shardings=self._row_sharding,
        )

    # -------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        step: int | None = None,
        mesh: Mesh | None = None,
        rules: Any = "data_parallel",
        config: VQGANConfig | None = None,
        batch_size: int = 64,
    ) -> ImageTokenizer:
        """The VQGAN of a train-vqgan work directory (latest checkpoint, or `step`); a given
        `config` must equal the recorded one (the error lists each differing field)."""
        from parti_jax.train import checkpoints

        meta = load_vqgan_meta(path)
        saved = config_from_meta(meta)
        if config is not None and config != saved:
            raise ValueError(
                f"{meta['_path']}: the checkpoint was trained with another VQGAN configuration: "
                + "; ".join(config_differences(saved, config))
                + "; load it without a config or pass the matching one"
            )
        step_dir = checkpoints.resolve_checkpoint_dir(path, step)
        loaded_step = int(step_dir.name)
        tok_mesh = mesh or local_mesh()
        tok_rules = partitioning.get_rules(rules) if isinstance(rules, str) else rules
        # The restore target: the parameters' shapes with their shardings on the mesh.
        images = jax.ShapeDtypeStruct((1, saved.image_size, saved.image_size, 3), jnp.float32)
        abstract = jax.eval_shape(ViTVQGAN(saved).init, jax.random.key(0), images)["params"]
        with partitioning.with_sharding_rules(tok_mesh, tok_rules):
            shardings = partitioning.logical_shardings(abstract, tok_mesh, tok_rules)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nn.unbox(abstract),
            shardings,
        )
        _check_fits(step_dir, {GENERATOR: target}, meta["_path"])
        try:
            restored, _ = checkpoints.restore_params_from(
                step_dir, {GENERATOR: target}, include=f"^{GENERATOR}/"
            )
        except checkpoints.CheckpointError as e:
            raise ValueError(
                f"{step_dir}: does not fit the VQGANConfig in {meta['_path']}: {e}"
            ) from None
        params = restored[GENERATOR]
        expected = meta.get("codebook_hashes", {}).get(str(loaded_step))
        actual = codebook_hash(params)
        if expected is not None and expected != actual:
            raise ValueError(
                f"{step_dir}: codebook hash {actual} differs from {expected} recorded in "
                f"{meta['_path']} for step {loaded_step}; the checkpoint was overwritten or is "
                "corrupt"
            )
        info = {
            "step": loaded_step,
            "checkpoint": str(step_dir),
            "workdir": os.fspath(storage.path(path)),
            "config": dataclasses.asdict(saved),
        }
        return cls(saved, params, meta=info, mesh=tok_mesh, rules=tok_rules, batch_size=batch_size)

    # ---------------------------------------------------------- properties

    @property
    def meta(self) -> dict[str, Any]:
        """codebook_size, grid [h, w], codebook_hash, image_size, step, checkpoint (+ config)."""
        return dict(self._meta)

    @property
    def codebook_hash(self) -> str:
        return self._meta["codebook_hash"]

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return (self.config.grid, self.config.grid)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # -------------------------------------------------------------- checks

    def check_codes_meta(self, codes_meta: Mapping[str, Any]) -> None:
        """Raises ValueError (naming both values) unless the codes were made by this VQGAN."""
        where = codes_meta.get("_path", "codes_meta.json")
        mine = {"codebook_size": self.codebook_size, "grid": list(self.grid),
                "codebook_hash": self.codebook_hash, "image_size": self.image_size}  # fmt: skip
        given = {
            "codebook_size": int(codes_meta.get("codebook_size", -1)),
            "grid": [int(g) for g in codes_meta.get("grid", [])],
            "codebook_hash": str(codes_meta.get("codebook_hash")),
            "image_size": int(codes_meta.get("image_size", self.image_size)),  # optional
        }
        problems = [
            f"{k} {given[k] if k == 'grid' else codes_meta.get(k)} != this VQGAN's {mine[k]}"
            for k in mine
            if given[k] != mine[k]
        ]
        if problems:
            raise ValueError(
                f"{where}: the codes were not made by this VQGAN ({self._meta.get('checkpoint')}): "
                + "; ".join(problems)
                + "; decode them with the VQGAN that made them, or recompute the codes "
                "(parti-jax precompute-codes)"
            )

    # -------------------------------------------------------------- compute

    def chunk_size(self, num_rows: int) -> int:
        """Rows per jitted call for an input of `num_rows`: the smallest power of two
        times the batch devices that holds them, at most `batch_size`."""
        size = self._num_batch_devices
        while size < num_rows and size < self.batch_size:
            size *= 2
        return min(size, self.batch_size)

    def _run(self, fn: Any, rows: np.ndarray, out_dtype: Any) -> np.ndarray:
        total = rows.shape[0]
        if total == 0:
            raise ValueError("empty batch: pass at least one row")
        chunk = self.chunk_size(total)
        outs = []
        with partitioning.with_sharding_rules(self.mesh, self.rules):
            for start in range(0, total, chunk):
                part = rows[start : start + chunk]
                n = part.shape[0]
                # The last chunk is padded with copies of its first row.
                part = np.concatenate([part, np.repeat(part[:1], chunk - n, axis=0)])
                out = fn(self.params, self._put(part))
                outs.append(self._fetch(out)[:n])
        return np.concatenate(outs, axis=0).astype(out_dtype)

    def _put(self, rows: np.ndarray) -> jax.Array:
        if self.mesh.is_multi_process:
            global_shape = (rows.shape[0] * jax.process_count(),) + rows.shape[1:]
            return jax.make_array_from_process_local_data(self._row_sharding, rows, global_shape)
        return jax.device_put(rows, self._row_sharding)

    def _fetch(self, out: jax.Array) -> np.ndarray:
        if self.mesh.is_multi_process:
            from jax.experimental.multihost_utils import global_array_to_host_local_array

            return np.asarray(
                global_array_to_host_local_array(out, self.mesh, self._row_sharding.spec)
            )
        return np.asarray(jax.device_get(out))

    def encode(self, images: Any) -> np.ndarray:
        """Images float32 [B, H, W, 3] in [0, 1] (or uint8) -> image tokens int32 [B, h, w]."""
        images = _as_images(images, self.image_size)
        return self._run(self._encode_fn, images, np.int32)

    def decode(self, codes: Any) -> np.ndarray:
        """Image tokens int [B, h, w] (or [B, h*w]) in [0, K) -> images float32 [B, H, W, 3] in [0, 1]."""
        codes = check_codes(codes, self.config)
        return self._run(self._decode_fn, codes, np.float32)


def code_decoder(codes_meta: Mapping[str, Any]) -> Any:
    """`decode` of the VQGAN that made a set of codes: codes_meta.json's
    `vqgan_checkpoint` (`<vqgan workdir>/checkpoints/<step>`), or the work dir's latest
    step when that one was deleted (keep-N) and its codebook is the same. The encoder-
    decoder trainer's eval sample grid (`t2i.train(code_decoder_loader=...)`). Raises
    ValueError (or OSError) saying why not."""
    from parti_jax.train import checkpoints

    checkpoint = codes_meta.get("vqgan_checkpoint")
    if not checkpoint:
        raise ValueError("codes_meta.json records no vqgan_checkpoint")
    step_dir = storage.path(checkpoint)
    workdir = step_dir.parent.parent
    try:
        tokenizer = ImageTokenizer.load(workdir, step=int(step_dir.name))
    except (OSError, ValueError, checkpoints.CheckpointError):
        tokenizer = ImageTokenizer.load(workdir)
    tokenizer.check_codes_meta(codes_meta)
    return tokenizer.decode
