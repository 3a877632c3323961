"""Loading trained models for inference, and checking that they belong together.

`load_t2i` restores an encoder-decoder from its `parti-jax train` work
directory (model_config.json + the latest orbax checkpoint) straight onto a
mesh. `check_compatibility` compares the compatibility records of the trio
(docs/DESIGN.md §3): the encoder-decoder's model_config.json (and the
codes_meta it was trained on), the VQGAN's vqgan_meta.json and the
upsampler's upsampler_meta.json, and fails naming both values of every
disagreement and the files they come from. Used by `parti_jax.sampling`
and by export. TensorFlow-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from parti_jax import partitioning
from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder

PyTree = Any
MODEL_CONFIG_FILE = "model_config.json"


class CompatibilityError(ValueError):
    """The encoder-decoder, VQGAN and upsampler (or vocabulary) do not belong together."""


def params_fingerprint(params: PyTree) -> str | None:
    """sha256 (first 16 hex digits) over every parameter's path, shape, dtype and bytes.

    None when some array is not fully addressable from this process.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{array.shape}{array.dtype}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def read_t2i_info(workdir: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(model_config.json contents, its path) of a `parti-jax train` work directory."""
    path = Path(workdir).expanduser() / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{workdir}: not an encoder-decoder work directory (no {MODEL_CONFIG_FILE}); pass "
            "the --workdir of `parti-jax train`"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "model_config" not in info:
        raise ValueError(f"{path}: no 'model_config' entry; not written by `parti-jax train`")
    return info, str(path)


def default_mesh() -> Mesh:
    """This process's devices, all on 'data' (each host samples its own prompts)."""
    devices = np.asarray(jax.local_devices(), dtype=object).reshape(-1, 1, 1)
    auto = (jax.sharding.AxisType.Auto,) * len(partitioning.MESH_AXES)
    return Mesh(devices, partitioning.MESH_AXES, axis_types=auto)


def mesh_batch_devices(mesh: Mesh) -> int:
    """Devices along the batch axes ('data' x 'fsdp'): rows must be a multiple of it."""
    return int(np.prod([mesh.shape[a] for a in partitioning.BATCH_MESH_AXES if a in mesh.shape]))


def _grid(value: Any) -> tuple[int, int]:
    if isinstance(value, int | np.integer):
        return (int(value), int(value))
    return tuple(int(v) for v in value)


def check_compatibility(
    *,
    model_config: ModelConfig,
    t2i_info: Mapping[str, Any],
    t2i_file: str,
    vqgan_meta: Mapping[str, Any],
    vqgan_file: str,
    upsampler_meta: Mapping[str, Any] | None = None,
    upsampler_file: str | None = None,
    text_vocab_size: int | None = None,
    vocab_file: str | None = None,
) -> None:
    """Raises CompatibilityError listing every disagreement, each with both values and files."""
    vq = f"{vqgan_file}: "
    vq_hash, vq_res = vqgan_meta.get("codebook_hash"), int(vqgan_meta["image_size"])
    t2i, codes = f"{t2i_file}: ", t2i_info.get("codes_meta") or {}
    up, up_meta = f"{upsampler_file}: ", upsampler_meta or {}
    # (what, value a, where a, value b, where b); compared when both are known.
    pairs = [
        ("codebook size", model_config.codebook_size, t2i + "model_config.codebook_size",
         int(vqgan_meta["codebook_size"]), vq + "codebook_size"),
        ("grid", list(model_config.image_grid), t2i + "model_config.image_grid",
         list(_grid(vqgan_meta["grid"])), vq + "grid"),
        ("codebook hash", codes.get("codebook_hash"),
         t2i + "codes_meta.codebook_hash (the codes it was trained on)",
         vq_hash, vq + "codebook_hash"),
        ("resolution", codes.get("image_size"), t2i + "codes_meta.image_size",
         vq_res, vq + "image_size"),
        ("resolution", up_meta.get("input_size"), up + "input_size (the upsampler's input)",
         vq_res, vq + "image_size (the VQGAN's output)"),
        ("codebook hash", up_meta.get("codebook_hash"),
         up + "codebook_hash (the VQGAN it was trained on)", vq_hash, vq + "codebook_hash"),
    ]  # fmt: skip
    problems = [
        f"{what}: {a} ({a_where}) != {b} ({b_where})"
        for what, a, a_where, b, b_where in pairs
        if a is not None and b is not None and a != b
    ]
    if text_vocab_size is not None and text_vocab_size > model_config.text_vocab_size:
        problems.append(
            f"text vocabulary size: {text_vocab_size} ({vocab_file or 'the vocabulary'}) > "
            f"{model_config.text_vocab_size} ({t2i}model_config.text_vocab_size)"
        )
    if problems:
        raise CompatibilityError(
            "the checkpoints do not belong together: "
            + "; ".join(problems)
            + ". Use the encoder-decoder trained on this VQGAN's codes, the upsampler trained "
            "on its reconstructions, and the vocabulary the encoder-decoder was trained with"
        )


def t2i_params_target(
    config: ModelConfig, text_length: int, *, mesh: Mesh | None = None, rules: Any = None
) -> PyTree:
    """ShapeDtypeStructs of the encoder-decoder's 'params' (abstract: nothing is allocated).

    With a mesh, each carries the sharding its logical axes get under `rules`
    (what a restore or a `jax.device_put` of loaded weights should target).
    """
    model = EncoderDecoder(config)

    def init(key):
        text = jnp.ones((1, text_length), jnp.int32)
        return model.init(key, text, jnp.zeros((1, config.num_image_tokens), jnp.int32))

    boxed = jax.eval_shape(init, jax.random.key(0))
    if mesh is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(boxed))[
            "params"
        ]
    with partitioning.with_sharding_rules(mesh, rules):
        shardings = partitioning.logical_shardings(boxed, mesh, rules)["params"]
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(boxed)["params"],
        shardings,
    )


def load_t2i(
    workdir: str | os.PathLike,
    *,
    mesh: Mesh,
    rules: Any,
    step: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> tuple[ModelConfig, PyTree, dict[str, Any], str, str]:
    """(config, params placed on `mesh`, model_config.json info, its path, checkpoint dir)."""
    from parti_jax.train import checkpoints

    info, info_path = read_t2i_info(workdir)
    fields = dict(info["model_config"])
    fields.update(config_overrides or {})
    try:
        config = ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{info_path}: bad model_config ({e})") from None
    step_dir = checkpoints.resolve_checkpoint_dir(workdir, step)
    text_length = int(info.get("text_length", config.max_text_length))
    target = t2i_params_target(config, text_length, mesh=mesh, rules=rules)
    params, _ = checkpoints.restore_params_from(step_dir, target)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    missing = [jax.tree_util.keystr(p) for p, x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
        raise checkpoints.CheckpointError(
            f"{step_dir}: the checkpoint lacks {', '.join(missing[:5])} of the model in "
            f"{info_path}; it was written by another model configuration"
        )
    return config, params, info, info_path, str(step_dir)
