"""Loading trained models: work directories into (config, params), checked to belong together.

    models = load_models("/runs/t2i", "/runs/vqgan", "/runs/upsampler")  # the trio + vocabulary
    upsampler = load_upsampler("/runs/upsampler")

A work directory is known by its record (docs/DESIGN.md §3): `model_config.json`,
`vqgan_meta.json` (read by `ImageTokenizer.load`) or `upsampler_meta.json`;
another kind's directory is an error naming both. Configs come from
`config_from_record`, parameters from an orbax checkpoint restored onto
`abstract_params` on a mesh, and `check_compatibility` names both values and
files of every disagreement. The Generator, eval, export and the bundle (which
reads safetensors instead) load through here; orbax and the training code are
imported only by the work-directory restores. Work directories and vocabularies
may be URLs (gs://...): records are read through parti_jax/storage.py, arrays by
orbax/TensorStore.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from parti_jax.data.vocab import SentencePieceTokenizer, VocabularyError, default_vocab_path
from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder
from parti_jax.upsampler.config import UpsamplerConfig
from parti_jax.upsampler.inference import META_FILE as UPSAMPLER_META_FILE
from parti_jax.upsampler.inference import LoadedUpsampler
from parti_jax.upsampler.model import Upsampler
from parti_jax.vqgan import tokenizer as vqgan_tokenizer
from parti_jax.vqgan.vit_vqgan import ViTVQGAN

PyTree = Any
Record = tuple[Mapping[str, Any], str]  # (a record's contents, its file)
GENERATOR = "generator"  # the checkpoint collection of the VQGAN's / upsampler's weights


class LoadError(ValueError):
    """A work directory or record that cannot be loaded (the message names the file and fix)."""


class CompatibilityError(ValueError):
    """The encoder-decoder, VQGAN and upsampler (or vocabulary) do not belong together."""


@dataclasses.dataclass(frozen=True)
class WorkdirKind:
    """A kind of work directory: the record file its trainer writes, and the config in it."""

    key: str  # 't2i', 'vqgan', 'upsampler'
    name: str  # 'an encoder-decoder'
    file: str
    command: str  # the subcommand that writes it
    config_key: str


T2I = WorkdirKind("t2i", "an encoder-decoder", "model_config.json", "parti-jax train",
                  "model_config")  # fmt: skip
VQGAN = WorkdirKind("vqgan", "a VQGAN", vqgan_tokenizer.META_FILE, "parti-jax train-vqgan",
                    "config")  # fmt: skip
UPSAMPLER = WorkdirKind("upsampler", "an upsampler", UPSAMPLER_META_FILE,
                        "parti-jax train-upsampler", "upsampler_config")  # fmt: skip
CONTRASTIVE = WorkdirKind("contrastive", "a contrastive model", "contrastive_meta.json",
                          "parti-jax train-contrastive", "config")  # fmt: skip
KINDS = (T2I, VQGAN, UPSAMPLER, CONTRASTIVE)


# ------------------------------------------------------------------ records and configs


def read_record(workdir: str | os.PathLike, kind: WorkdirKind) -> tuple[dict[str, Any], str]:
    """(contents, path) of a work directory's record; another kind's directory is named."""
    root = storage.path(workdir)
    path = root / kind.file
    if not path.is_file():
        other = next((k for k in KINDS if (root / k.file).is_file()), None)
        found = f"; it holds {other.file}, a `{other.command}` work directory" if other else ""
        raise LoadError(
            f"{workdir}: not {kind.name} work directory (no {kind.file}{found}); pass the "
            f"--workdir of `{kind.command}`"
        )
    try:
        info = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or kind.config_key not in info:
        raise LoadError(f"{path}: no {kind.config_key!r} entry; not written by `{kind.command}`")
    return info, str(path)


def config_from_record(cls: type, fields: Mapping[str, Any], where: str) -> Any:
    """`cls(**fields)` for a config dataclass; unknown fields and bad values name `where`."""
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise LoadError(
            f"{where}: unknown {cls.__name__} field(s) {unknown} (written by another parti_jax "
            "version?); remove them or load it with the version that wrote it"
        )
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{where}: bad {cls.__name__} ({e})") from None


@dataclasses.dataclass(frozen=True)
class T2IRecord:
    """An encoder-decoder's model_config.json: its config (with overrides) and contents."""

    config: ModelConfig
    info: dict[str, Any]  # the file's contents: model_config, text_length, codes_meta, ...
    path: str

    @property
    def text_length(self) -> int:
        return int(self.info.get("text_length", self.config.max_text_length))


def t2i_record(
    info: dict[str, Any], path: str, config_overrides: Mapping[str, Any] | None = None
) -> T2IRecord:
    """The T2IRecord of a model_config.json's contents (a work directory's or a bundle's)."""
    config = config_from_record(ModelConfig, info["model_config"], f"{path}: model_config")
    if config_overrides:
        fields = dict(dataclasses.asdict(config), **config_overrides)
        config = config_from_record(ModelConfig, fields, f"config_overrides for {path}")
    return T2IRecord(config, info, path)


# ------------------------------------------------------------------ parameters


def rule_table(rules: Any) -> tuple:
    """A rule table from its name ('data_parallel', ...) or the table itself."""
    return partitioning.get_rules(rules) if isinstance(rules, str) else tuple(rules)


def abstract_params(
    module: nn.Module, *inputs: Any, mesh: Mesh | None = None, rules: Any = "data_parallel"
) -> PyTree:
    """ShapeDtypeStructs of `module.init(key, *inputs)['params']` (inputs: arrays or
    ShapeDtypeStructs; nothing is allocated), with a mesh carrying the shardings
    their logical axes get under `rules`: the target of a restore or of `place`."""
    boxed = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    if mesh is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(boxed))
    rules = rule_table(rules)
    with partitioning.with_sharding_rules(mesh, rules):
        shardings = partitioning.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )


def t2i_abstract_params(config: ModelConfig, text_length: int, **mesh_rules: Any) -> PyTree:
    """`abstract_params` of the encoder-decoder (`mesh=`, `rules=` as there)."""
    text = jax.ShapeDtypeStruct((1, text_length), jnp.int32)
    codes = jax.ShapeDtypeStruct((1, config.num_image_tokens), jnp.int32)
    return abstract_params(EncoderDecoder(config), text, codes, **mesh_rules)


def vqgan_abstract_params(config: Any, **mesh_rules: Any) -> PyTree:
    """`abstract_params` of the ViT-VQGAN (encoder, quantizer and decoder)."""
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return abstract_params(ViTVQGAN(config), images, **mesh_rules)


def upsampler_abstract_params(config: UpsamplerConfig) -> PyTree:
    """`abstract_params` of the upsampler's generator (host arrays: no mesh)."""
    low = jax.ShapeDtypeStruct((1, config.input_size, config.input_size, 3), jnp.float32)
    return abstract_params(Upsampler(config), low)


def place(params: PyTree, target: PyTree) -> PyTree:
    """Host arrays -> device arrays with the dtypes and shardings of `target`."""
    return jax.tree.map(
        lambda a, t: jax.device_put(np.asarray(a, t.dtype), t.sharding), params, target
    )


def restore_params(
    workdir: str | os.PathLike, target: PyTree, record_path: str, step: int | None = None
) -> tuple[PyTree, str]:
    """(params, checkpoint dir): every leaf of `target` (the checkpoint's params; the
    upsampler keeps them under 'generator') from the latest (or `step`) checkpoint,
    onto its shardings (host numpy without); errors name both files."""
    from parti_jax.train import checkpoints

    step_dir = checkpoints.resolve_checkpoint_dir(workdir, step)
    try:
        params, _ = checkpoints.restore_params_from(
            step_dir, target, fix=f"use the work directory whose {record_path} wrote it"
        )
    except checkpoints.CheckpointError as e:
        raise checkpoints.CheckpointError(f"{step_dir}: does not fit {record_path}: {e}") from None
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    missing = [
        jax.tree_util.keystr(p, simple=True, separator="/")
        for p, x in leaves
        if isinstance(x, jax.ShapeDtypeStruct)
    ]
    if missing:
        raise checkpoints.CheckpointError(
            f"{step_dir}: the checkpoint lacks {', '.join(missing[:5])} of the model in "
            f"{record_path}; it was written by another model configuration"
        )
    return params, str(step_dir)


def params_fingerprint(params: PyTree) -> str | None:
    """sha256 (16 hex digits) of every parameter's path, shape, dtype and bytes (None when
    an array is not fully addressable here)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{array.shape}{array.dtype}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def load_upsampler(
    path: str | os.PathLike, *, step: int | None = None, record: Record | None = None
) -> LoadedUpsampler:
    """The generator of a `parti-jax train-upsampler` work directory (latest step), on the
    host; `record`: its upsampler_meta.json (contents, path) when already read."""
    meta, meta_path = record or read_record(path, UPSAMPLER)
    where = f"{meta_path}: upsampler_config"
    config = config_from_record(UpsamplerConfig, meta["upsampler_config"], where)
    target = {GENERATOR: upsampler_abstract_params(config)}
    params, step_dir = restore_params(path, target, meta_path, step)
    step = int(storage.path(step_dir).name)
    return LoadedUpsampler(config, params[GENERATOR], meta, step, step_dir, meta_path)


# ------------------------------------------------------------------ compatibility


def check_compatibility(
    t2i: T2IRecord,
    vqgan: Record,
    upsampler: Record | None = None,
    vocab: tuple[int, str] | None = None,
) -> None:
    """Raises CompatibilityError listing every disagreement, each with both values and files.

    `t2i` is the encoder-decoder's record (its codes_meta: the codes it was trained
    on); `vqgan`, `upsampler` are (meta contents, file); `vocab` is (size, file).
    """
    vq_meta, vq_file = vqgan
    up_meta, up_file = upsampler or ({}, "")
    vq, up, cfg = f"{vq_file}: ", f"{up_file}: ", t2i.config
    t2i_at, codes = f"{t2i.path}: ", t2i.info.get("codes_meta") or {}
    vq_hash, vq_res = vq_meta.get("codebook_hash"), int(vq_meta["image_size"])
    # (what, value a, where a, value b, where b); compared when both are known.
    pairs = [
        ("codebook size", cfg.codebook_size, t2i_at + "model_config.codebook_size",
         int(vq_meta["codebook_size"]), vq + "codebook_size"),
        ("grid", list(cfg.image_grid), t2i_at + "model_config.image_grid",
         [int(v) for v in np.broadcast_to(vq_meta["grid"], 2)], vq + "grid"),
        ("codebook hash", codes.get("codebook_hash"),
         t2i_at + "codes_meta.codebook_hash (the codes it was trained on)",
         vq_hash, vq + "codebook_hash"),
        ("resolution", codes.get("image_size"), t2i_at + "codes_meta.image_size",
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
    if vocab is not None and vocab[0] > cfg.text_vocab_size:
        problems.append(
            f"text vocabulary size: {vocab[0]} ({vocab[1]}) > "
            f"{cfg.text_vocab_size} ({t2i_at}model_config.text_vocab_size)"
        )
    if problems:
        raise CompatibilityError(
            "the checkpoints do not belong together: "
            + "; ".join(problems)
            + ". Use the encoder-decoder trained on this VQGAN's codes, the upsampler trained "
            "on its reconstructions, and the vocabulary the encoder-decoder was trained with"
        )


# ------------------------------------------------------------------ the trio


@dataclasses.dataclass
class LoadedModels:
    """The encoder-decoder, VQGAN, upsampler and vocabulary: what a Generator samples with."""

    model_config: ModelConfig
    params: PyTree  # the encoder-decoder's 'params' (on the mesh it was loaded onto)
    text_length: int  # encoder input length (longer prompts are truncated)
    text_tokenizer: SentencePieceTokenizer  # the vocabulary it was trained with
    image_tokenizer: Any  # a vqgan.tokenizer.ImageTokenizer (decode)
    upsampler: LoadedUpsampler | None = None
    records: dict[str, Any] = dataclasses.field(default_factory=dict)  # manifests' sources
    t2i_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # model_config.json


def _workdir(path: str | os.PathLike) -> str:
    return os.fspath(storage.path(path))


def read_vocabulary(vocab: str | os.PathLike) -> SentencePieceTokenizer:
    """The SentencePiece model at a local path or a URL (read through storage)."""
    if not storage.is_url(vocab):
        return SentencePieceTokenizer(vocab)
    try:
        data = storage.read_bytes(vocab)
    except OSError as e:
        raise VocabularyError(f"{vocab}: cannot read the SentencePiece model ({e})") from None
    tokenizer = SentencePieceTokenizer(model_bytes=data)
    tokenizer.model_path = os.fspath(vocab)
    return tokenizer


def load_models(
    t2i_workdir: str | os.PathLike,
    vqgan_path: str | os.PathLike,
    upsampler_path: str | os.PathLike | None = None,
    *,
    mesh: Mesh,
    rules: Any = "data_parallel",
    vocab_path: str | None = None,
    t2i_step: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    fingerprint: bool = True,
) -> LoadedModels:
    """Loads and cross-checks the encoder-decoder, VQGAN, optional upsampler and vocabulary.

    Args:
      t2i_workdir: `parti-jax train` work directory (model_config.json + checkpoints).
      vqgan_path: `parti-jax train-vqgan` work directory.
      upsampler_path: `parti-jax train-upsampler` work directory (None: no upsampling).
      mesh, rules: where the encoder-decoder's parameters go (the VQGAN: this mesh,
        'data_parallel').
      vocab_path: SentencePiece model; default the one recorded in
        model_config.json ('vocab_path'), else the shipped shapes vocabulary.
      t2i_step: encoder-decoder checkpoint step (default the latest).
      config_overrides: ModelConfig fields to change for sampling (e.g.
        {'attention_impl': 'xla', 'dtype': 'float32'} on a CPU).
      fingerprint: record a sha256 of the encoder-decoder's and upsampler's
        parameters in `records` (reads every parameter once).
    """
    t2i = t2i_record(*read_record(t2i_workdir, T2I), config_overrides)
    image_tokenizer = vqgan_tokenizer.ImageTokenizer.load(vqgan_path, mesh=mesh)
    vocab = vocab_path or t2i.info.get("vocab_path") or default_vocab_path()
    tokenizer = read_vocabulary(vocab)
    up_record = read_record(upsampler_path, UPSAMPLER) if upsampler_path is not None else None
    # Check before restoring any weights: a mismatch costs nothing to find.
    vq_file = str(vqgan_tokenizer.meta_path(vqgan_path))
    vocab_record = (tokenizer.vocab_size, str(vocab))
    check_compatibility(t2i, (image_tokenizer.meta, vq_file), up_record, vocab_record)
    target = t2i_abstract_params(t2i.config, t2i.text_length, mesh=mesh, rules=rules)
    params, t2i_ckpt = restore_params(t2i_workdir, target, t2i.path, t2i_step)
    upsampler = None if up_record is None else load_upsampler(upsampler_path, record=up_record)
    vq = image_tokenizer.meta
    records = {
        "encoder_decoder": {
            "workdir": _workdir(t2i_workdir),
            "checkpoint": t2i_ckpt,
            "step": int(storage.path(t2i_ckpt).name),
            "params_hash": params_fingerprint(params) if fingerprint else None,
            "codes_codebook_hash": (t2i.info.get("codes_meta") or {}).get("codebook_hash"),
        },
        "vqgan": {"workdir": _workdir(vqgan_path)}
        | {k: vq.get(k) for k in ("checkpoint", "step", "codebook_hash", "image_size")},
        "upsampler": None
        if upsampler is None
        else {
            "workdir": _workdir(upsampler_path),
            "checkpoint": upsampler.checkpoint,
            "step": upsampler.step,
            "params_hash": params_fingerprint(upsampler.params) if fingerprint else None,
            "codebook_hash": upsampler.codebook_hash,
            "output_size": upsampler.config.output_size,
        },
        "vocabulary": {"path": str(vocab), "sha256": tokenizer.fingerprint},
        "codebook_hash": vq.get("codebook_hash"),
    }
    return LoadedModels(
        t2i.config, params, t2i.text_length, tokenizer, image_tokenizer, upsampler,
        records, t2i.info,
    )  # fmt: skip
