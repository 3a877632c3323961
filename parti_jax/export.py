"""`parti-jax export`: write a self-contained inference bundle, or inspect weights.

    info = export_bundle("/models/shapes", t2i_path="/runs/t2i", vqgan_path="/runs/vqgan",
                         upsampler_path="/runs/upsampler", contrastive_path="/runs/clip")
    report = inspect_path("/runs/t2i")      # or a VQGAN / upsampler work dir, or a bundle
    print(format_inspection(report))

A bundle (layout: docs/EXPORT.md; read by `parti_jax.load_bundle`) holds the
encoder-decoder, the VQGAN decoder half, the upsampler and (optionally) the
contrastive reranker as safetensors with stable per-layer names, their JSON
configs, the SentencePiece model(s), a model card (README.md, parti_jax/model_card.py),
`bundle.json` (versions, sources, hashes and sizes of every file) and a
`jax.export` sampler for one batch shape taking the weights as arguments. The
models are loaded and cross-checked by `parti_jax.loading.load_models` before
anything is written; the bundle is written into a temporary sibling directory
and renamed into place, so an interrupted export leaves no half bundle, and an
existing bundle is replaced only with `overwrite=True` (a non-empty directory
that is not a bundle never is). A bundle for a URL (gs://...) is written into a
local temporary folder and uploaded through parti_jax/storage.py, `bundle.json`
last (an object store has no rename: a bundle is complete once its bundle.json
is there; an old bundle's bundle.json goes first when it is replaced).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parti_jax import bundle as bundle_lib
from parti_jax import loading, storage
from parti_jax.bundle import BUNDLE_FILE, WEIGHTS, BundleError
from parti_jax.decoding import SamplingConfig
from parti_jax.model_card import CARD_FILE, model_card

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FILE_ROLES = {
    BUNDLE_FILE: "index: versions, sources, hashes and sizes of the other files",
    bundle_lib.MODEL_CONFIG_FILE: "encoder-decoder ModelConfig, text length, training records",
    bundle_lib.VQGAN_CONFIG_FILE: "VQGANConfig, codebook size/hash, grid, image size",
    bundle_lib.UPSAMPLER_CONFIG_FILE: "UpsamplerConfig, input size, the codebook it was trained on",
    bundle_lib.SAMPLING_CONFIG_FILE: "SamplingConfig: Bundle.generate's default and the export's",
    bundle_lib.VOCAB_FILE: "SentencePiece model of the text encoder",
    WEIGHTS["t2i"][0]: "encoder-decoder weights",
    WEIGHTS["vqgan"][0]: "VQGAN quantizer + decoder weights (image tokens -> pixels)",
    WEIGHTS["upsampler"][0]: "upsampler weights",
    WEIGHTS["contrastive"][0]: "contrastive image-text model weights (scorer='contrastive')",
    bundle_lib.CONTRASTIVE_CONFIG_FILE: "ContrastiveConfig, text length, training record, "
    "the vocabulary file it reads",
    bundle_lib.CONTRASTIVE_VOCAB_FILE: "SentencePiece model of the contrastive model's text tower",
    bundle_lib.EXPORT_FILE: "jax.export sampler: text tokens -> (codes, images)",
    CARD_FILE: "model card: data, sizes, training steps, eval figures, intended use and limits",
}


# ------------------------------------------------------------------ export


def export_bundle(
    out_dir: str | os.PathLike,
    *,
    t2i_path: str,
    vqgan_path: str,
    upsampler_path: str | None = None,
    contrastive_path: str | None = None,
    vocab_path: str | None = None,
    t2i_step: int | None = None,
    sampling_config: SamplingConfig | None = None,
    jax_export: bool = True,
    export_batch_size: int | None = None,
    platforms: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes an inference bundle to `out_dir`; returns its bundle.json contents.

    Args:
      out_dir: the bundle directory (or URL): new, empty, or (with `overwrite`) a bundle.
      t2i_path, vqgan_path, upsampler_path: the work directories of `parti-jax train`,
        `train-vqgan` and `train-upsampler` (no upsampler: images at the VQGAN's size).
      contrastive_path: a `parti-jax train-contrastive` work directory (latest
        checkpoint): bundled with its config and vocabulary, so the loaded bundle
        reranks with scorer='contrastive'; None: no contrastive model.
      vocab_path, t2i_step: see `parti_jax.loading.load_models`.
      sampling_config: a `decoding.SamplingConfig`: stored as Bundle.generate's
        default, and what the jax.export sampler compiles in (top_k, and whether
        guidance / top-p / greedy are on).
      jax_export: also serialize the sampling function with jax.export.
      export_batch_size: rows B of the exported function (default num_samples).
      platforms: jax.export lowering platforms (default cpu, cuda, tpu).
      overwrite: replace an existing bundle at `out_dir`.
    """
    from parti_jax.vqgan.tokenizer import local_mesh

    out = storage.path(out_dir)
    check_destination(out, overwrite=overwrite)
    sampling = sampling_config or SamplingConfig()
    platforms = check_platforms(platforms)
    batch = int(export_batch_size or sampling.num_samples)
    if batch < 1:
        raise ValueError(f"export_batch_size={export_batch_size} must be >= 1")
    models = loading.load_models(t2i_path, vqgan_path, upsampler_path, mesh=local_mesh(),
                                 vocab_path=vocab_path, t2i_step=t2i_step)  # fmt: skip
    contrastive = None
    if contrastive_path is not None:
        from parti_jax.contrastive.scorer import ContrastiveModel

        contrastive = ContrastiveModel.load(contrastive_path)
        models.records["contrastive"] = {
            "workdir": os.fspath(storage.path(contrastive_path)),
            **contrastive.record(),
            "params_hash": loading.params_fingerprint(contrastive.params),
        }

    def write(tmp: Path) -> dict[str, Any]:
        info = _write_bundle(tmp, models, vqgan_path, sampling, contrastive)
        if jax_export:
            info["jax_export"] = _write_exported(tmp, models, sampling, batch, platforms)
            _add_file(tmp, info, bundle_lib.EXPORT_FILE)
        sources = {"t2i": t2i_path, "vqgan": vqgan_path, "upsampler": upsampler_path,
                   "contrastive": contrastive_path}  # fmt: skip
        card = model_card(info, models, sources=sources, contrastive=contrastive)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        _add_file(tmp, info, CARD_FILE)
        (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        return info

    return publish(out, write)


def publish(out: storage.Path, write: Callable[[Path], Any]) -> Any:
    """Fills a local staging folder with `write(folder)` and publishes it as `out`
    (`storage.path` of the destination, checked by `check_destination` first): moved into
    place whole on a local disk, uploaded with bundle.json last to a URL. The staging
    folder is always local (safetensors and jax.export write files). Returns what `write`
    returned."""
    if storage.is_url(os.fspath(out)):
        with tempfile.TemporaryDirectory(prefix="parti_jax_export_") as tmp:
            result = write(Path(tmp))
            _upload(Path(tmp), out)
        return result
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        result = write(tmp)
        _default_permissions(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def check_destination(out: Path | storage.Path, *, overwrite: bool) -> None:
    """Refuses a non-empty `out` unless overwrite is set and `out` holds a bundle."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; choose a new bundle directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / BUNDLE_FILE).is_file():
        raise BundleError(
            f"{out}: not empty and not a parti_jax bundle (no {BUNDLE_FILE}); refusing to write "
            "there even with --overwrite: choose a new or empty directory"
        )
    if not overwrite:
        raise BundleError(
            f"{out}: a bundle is already there; pass --overwrite to replace it, or choose "
            "another directory"
        )


def check_platforms(platforms: Sequence[str] | str | None) -> tuple[str, ...]:
    """Lowering platforms for jax.export, checked against the names it knows."""
    if platforms is None:
        return DEFAULT_PLATFORMS
    if isinstance(platforms, str):
        platforms = [p for p in platforms.split(",") if p.strip()]
    names = tuple(p.strip().lower() for p in platforms)
    bad = [p for p in names if p not in KNOWN_PLATFORMS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(
            f"platforms={list(platforms)}: expected distinct names from {list(KNOWN_PLATFORMS)}, "
            "e.g. --platforms=cpu,cuda,tpu"
        )
    return names


def _default_permissions(root: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a bundle gets the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for file in root.iterdir():
        file.chmod(0o666 & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Renames the finished bundle to `out`; an old bundle there is removed only after."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "bundle")
    elif out.is_dir():
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:  # put the old bundle back
            os.rename(old / "bundle", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _upload(local: Path, out: storage.Path) -> None:
    """Publishes the bundle in `local` at the URL `out`: an old bundle's bundle.json is
    removed first and its other files next, then the new files, bundle.json last; a
    reader meanwhile finds no bundle.json (an unfinished export), never a mix."""
    old = out / BUNDLE_FILE
    if old.exists():
        old.unlink()
    storage.rmtree(out)
    for file in sorted(local.iterdir(), key=lambda f: f.name == BUNDLE_FILE):
        with open(file, "rb") as src, storage.open(out / file.name, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)  # one object each, complete at close


def _add_file(root: Path, info: dict[str, Any], name: str) -> None:
    file = root / name
    info["files"][name] = {
        "role": FILE_ROLES.get(name, ""),
        "bytes": file.stat().st_size,
        "sha256": bundle_lib.file_sha256(file),
    }


def _write_json(root: Path, info: dict[str, Any], name: str, content: Any) -> None:
    (root / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
    _add_file(root, info, name)


def _host(tree: Any) -> Any:
    def fetch(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise BundleError(
                "export runs in one process: a parameter is not fully addressable here; "
                "export from a single host"
            )
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)


def _save_weights(root: Path, info: dict, group: str, params: Any, extra: dict) -> None:
    """One weight group as safetensors, one entry per layer (scanned stacks unstacked)."""
    from safetensors.numpy import save_file

    from parti_jax.models.transformer import scan_to_unscanned

    file, prefix = WEIGHTS[group]
    flat = bundle_lib.flatten(scan_to_unscanned(_host(params)), prefix)
    flat = {n: np.asarray(a, order="C") for n, a in sorted(flat.items())}  # 0-d stays 0-d
    metadata = {"format": bundle_lib.FORMAT, "group": group, "layout": "per-layer", **extra}
    save_file(flat, str(root / file), metadata={k: str(v) for k, v in metadata.items()})
    count = int(sum(a.size for a in flat.values()))
    info["weights"][group] = {"file": file, "prefix": prefix, "params": count,
                              "tensors": len(flat)}  # fmt: skip
    _add_file(root, info, file)


def _write_bundle(
    root: Path, models: loading.LoadedModels, vqgan_path: str, sampling: Any,
    contrastive: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Weights, configs and vocabulary into `root`; the bundle.json contents (without export)."""
    import flax

    from parti_jax.vqgan.tokenizer import load_vqgan_meta

    # The package's version from the package module (always loaded before this one),
    # not by importing it: parti_jax/__init__.py lazily imports the Pipeline, which
    # imports this module (tests/test_layering.py: no import cycles).
    version = sys.modules[__name__.partition(".")[0]].__version__

    records = models.records
    info: dict[str, Any] = {
        "format": bundle_lib.FORMAT,
        "format_version": bundle_lib.FORMAT_VERSION,
        "parti_jax_version": version,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "codebook_hash": records["codebook_hash"],
        "sources": records,
        "parameter_names": "'<group>/<module path>/<param>', one entry per layer "
        "(layers_<i>) whatever scan_layers the model trained with",
        "weights": {},
        "files": {},
        "jax_export": None,
    }
    # Encoder-decoder: the operative training record, with the portable attention path.
    model_config = models.model_config.replace(attention_impl="xla")
    t2i_info = dict(models.t2i_info, model_config=dataclasses.asdict(model_config),
                    text_length=models.text_length)  # fmt: skip
    _save_weights(root, info, "t2i", models.params, {"codebook_hash": records["codebook_hash"]})
    _write_json(root, info, bundle_lib.MODEL_CONFIG_FILE, t2i_info)

    tokenizer = models.image_tokenizer
    vq_config = dataclasses.replace(tokenizer.config, attention_impl="xla")
    vq_params = {k: tokenizer.params[k] for k in bundle_lib.VQGAN_DECODER_PARTS}
    _save_weights(root, info, "vqgan", vq_params, {"codebook_hash": tokenizer.codebook_hash})
    vq_meta = {k: v for k, v in load_vqgan_meta(vqgan_path).items() if k != "_path"}
    _write_json(root, info, bundle_lib.VQGAN_CONFIG_FILE, {
        "vqgan_config": dataclasses.asdict(vq_config),
        "codebook_size": tokenizer.codebook_size,
        "grid": list(tokenizer.grid),
        "image_size": tokenizer.image_size,
        "codebook_hash": tokenizer.codebook_hash,
        "step": records["vqgan"]["step"],
        "checkpoint": records["vqgan"]["checkpoint"],
        "training_meta": vq_meta,
    })  # fmt: skip

    up = models.upsampler
    if up is not None:
        _save_weights(root, info, "upsampler", up.params, {})
        _write_json(root, info, bundle_lib.UPSAMPLER_CONFIG_FILE, dict(
            up.meta, upsampler_config=dataclasses.asdict(up.config), step=up.step,
            checkpoint=up.checkpoint,
        ))  # fmt: skip

    if contrastive is not None:
        _write_contrastive(root, info, contrastive, models.text_tokenizer)
    (root / bundle_lib.VOCAB_FILE).write_bytes(models.text_tokenizer.model_bytes)
    _add_file(root, info, bundle_lib.VOCAB_FILE)
    _write_json(root, info, bundle_lib.SAMPLING_CONFIG_FILE, dataclasses.asdict(sampling))
    return info


def _write_contrastive(root: Path, info: dict[str, Any], model: Any, t2i_vocab: Any) -> None:
    """The contrastive model: weights, contrastive_config.json (its training record,
    config, step) and its vocabulary (the encoder-decoder's spm.model when the same)."""
    fingerprint = model.tokenizer.fingerprint
    vocab_file = bundle_lib.VOCAB_FILE
    if fingerprint != t2i_vocab.fingerprint:
        vocab_file = bundle_lib.CONTRASTIVE_VOCAB_FILE
        (root / vocab_file).write_bytes(model.tokenizer.model_bytes)
        _add_file(root, info, vocab_file)
    config = dataclasses.replace(  # the portable attention path, as for the encoder-decoder
        model.config, text=model.config.text.replace(attention_impl="xla")
    )
    _save_weights(root, info, "contrastive", model.params, {"vocab_sha256": fingerprint})
    _write_json(root, info, bundle_lib.CONTRASTIVE_CONFIG_FILE, dict(
        model.meta, config=config.to_json(), text_length=model.text_length, step=model.step,
        checkpoint=model.checkpoint, vocab_file=vocab_file, vocab_sha256=fingerprint,
    ))  # fmt: skip


# ------------------------------------------------------------------ jax.export


def export_sampler(
    root: Path, models: loading.LoadedModels, sampling: Any, *, batch_size: int,
    platforms: Sequence[str],
) -> Any:  # fmt: skip
    """`jax.export.Exported` of (t2i_weights, vqgan_weights, text [B, L], prompt_ids [B],
    sample_indices [B], seed, temperature, top_p, guidance_scale) -> (codes [B, N], images),
    the weights flat {name: array} dicts as in the safetensors files in `root`. Traced on
    one device with XLA attention, so one device of any listed platform runs it."""
    import jax.numpy as jnp

    from parti_jax import partitioning
    from parti_jax.sampling import Generator
    from parti_jax.vqgan.tokenizer import local_mesh
    from parti_jax.vqgan.vit_vqgan import ViTVQGAN

    mesh = local_mesh(jax.devices()[:1])
    model_config = models.model_config.replace(attention_impl="xla")
    bare = dataclasses.replace(
        models, model_config=model_config, params=None, image_tokenizer=None, upsampler=None
    )
    single = Generator(bare, mesh=mesh)
    sample_fn, _ = single.sample_function(sampling)
    vq_config = dataclasses.replace(models.image_tokenizer.config, attention_impl="xla")
    vqgan, grid = ViTVQGAN(vq_config), vq_config.grid

    def sample(t2i_weights, vqgan_weights, *rows_and_scalars):
        params = bundle_lib.unflatten(t2i_weights, WEIGHTS["t2i"][1], scan=model_config.scan_layers)
        tokens = sample_fn(params, *rows_and_scalars)
        codes = (tokens - 1).astype(jnp.int32)  # decoder ids are codes + 1
        vq_params = bundle_lib.unflatten(vqgan_weights, WEIGHTS["vqgan"][1],
                                         scan=vq_config.scan_layers)  # fmt: skip
        images = vqgan.apply({"params": vq_params}, codes.reshape(-1, grid, grid),
                             method=ViTVQGAN.decode_codes)  # fmt: skip
        return codes, images.astype(jnp.float32)

    spec = jax.ShapeDtypeStruct
    rows = spec((batch_size,), jnp.int32)  # prompt_ids, sample_indices
    weights = [  # {name: spec} of t2i.safetensors and vqgan_decoder.safetensors
        {e["name"]: spec(tuple(e["shape"]), e["dtype"]) for e in _safetensors_entries(root / f)}
        for f in (WEIGHTS["t2i"][0], WEIGHTS["vqgan"][0])
    ]
    args = (
        *weights,
        spec((batch_size, models.text_length), jnp.int32),
        rows,
        rows,
        spec((), jnp.int32),  # seed; then temperature, top_p, guidance_scale
        *[spec((), jnp.float32)] * 3,
    )
    with partitioning.with_sharding_rules(mesh, single.rules):
        return jax.export.export(jax.jit(sample), platforms=tuple(platforms))(*args)


def _write_exported(
    root: Path, models: loading.LoadedModels, sampling: Any, batch: int, platforms: Sequence[str]
) -> dict[str, Any]:
    exported = export_sampler(root, models, sampling, batch_size=batch, platforms=platforms)
    (root / bundle_lib.EXPORT_FILE).write_bytes(exported.serialize())
    cfg, length = models.model_config, models.text_length
    size = models.image_tokenizer.image_size
    return {
        "file": bundle_lib.EXPORT_FILE,
        "platforms": list(exported.platforms),
        "batch_size": batch,
        "text_length": length,
        "num_image_tokens": cfg.num_image_tokens,
        "compiled_in": {
            "top_k": sampling.top_k,
            "guidance": sampling.guidance_scale is not None,
            "top_p": sampling.top_p is not None,
            "greedy": sampling.temperature == 0,
            "attention_impl": "xla",
            "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
        },
        "inputs": [
            "t2i_weights: {name: array} of t2i.safetensors",
            "vqgan_weights: {name: array} of vqgan_decoder.safetensors",
            f"text_tokens: int32 [{batch}, {length}]",
            f"prompt_ids: int32 [{batch}]",
            f"sample_indices: int32 [{batch}]",
            "seed: int32 []",
            "temperature: float32 []",
            "top_p: float32 []",
            "guidance_scale: float32 []",
        ],
        "outputs": [
            f"codes: int32 [{batch}, {cfg.num_image_tokens}] in [0, {cfg.codebook_size})",
            f"images: float32 [{batch}, {size}, {size}, 3] in [0, 1] (VQGAN decoder)",
        ],
    }


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16",
                       "BF16": "bfloat16", "I64": "int64", "I32": "int32", "I16": "int16",
                       "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def _np_dtype(name: str) -> str:
    return _SAFETENSORS_DTYPES.get(name.upper(), name.lower())


# ------------------------------------------------------------------ inspect


def inspect_path(path: str | os.PathLike) -> dict[str, Any]:
    """Parameter names, shapes, dtypes and totals of a bundle, a work directory of any
    trainer (its latest checkpoint), a `checkpoints/<step>` folder or a .safetensors
    file (local or at a URL), from metadata only (safetensors headers, orbax array
    metadata)."""
    p = storage.path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: does not exist; pass a bundle, work directory or checkpoint")
    if p.suffix == ".safetensors" and p.is_file():
        return _report(str(p), "safetensors", _safetensors_entries(p))
    if (p / BUNDLE_FILE).is_file():
        info = bundle_lib.read_bundle_info(p)
        entries = []
        for group in info["weights"].values():
            entries += _safetensors_entries(p / group["file"])
        report = _report(str(p), "bundle", entries)
        report.update(created=info.get("created"), codebook_hash=info.get("codebook_hash"),
                      jax_export=info.get("jax_export"),
                      files={n: e["bytes"] for n, e in info["files"].items()})  # fmt: skip
        return report
    kind = next((k.key for k in loading.KINDS if (p / k.file).is_file()), "checkpoint")
    if kind == "checkpoint" and not (
        (p / "state").is_dir() or (p / "checkpoints").is_dir() or p.name == "checkpoints"
    ):
        raise FileNotFoundError(
            f"{p}: not a bundle (no {BUNDLE_FILE}), work directory (no model_config.json, "
            "vqgan_meta.json, upsampler_meta.json or contrastive_meta.json) or checkpoint "
            "(no state/); pass one of those"
        )
    from parti_jax.train import checkpoints

    step_dir = checkpoints.resolve_checkpoint_dir(os.fspath(p))
    meta = checkpoints.state_metadata(step_dir / "state")
    if meta is None or "params" not in meta:
        raise checkpoints.CheckpointError(
            f"{step_dir}: no readable state/params metadata; the checkpoint is incomplete "
            "or was not written by parti_jax"
        )
    entries = _tree_entries(meta["params"])
    other = [e for k, v in meta.items() if k != "params" for e in _tree_entries(v)]
    report = _report(str(p), kind, entries)
    report.update(
        checkpoint=str(step_dir),
        step=int(step_dir.name),
        other_state={"arrays": len(other), "params": sum(e["params"] for e in other),
                     "bytes": sum(e["bytes"] for e in other)},
    )  # fmt: skip
    return report


_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _safetensors_entries(file: Path | storage.Path) -> list[dict[str, Any]]:
    """The tensors of a .safetensors file (local or at a URL), sorted by name, from its
    header alone: a little-endian uint64 N, then N bytes of JSON {name: {dtype, shape,
    data_offsets}} (plus '__metadata__')."""
    try:
        with storage.open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
        return [
            _entry(name, header[name]["shape"], _np_dtype(header[name]["dtype"]))
            for name in sorted(header)
            if name != "__metadata__"
        ]
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise BundleError(f"{file}: not a readable safetensors file ({e})") from None


def _tree_entries(tree: Any) -> list[dict[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        _entry(jax.tree_util.keystr(path, simple=True, separator="/"), leaf.shape, leaf.dtype)
        for path, leaf in leaves
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    ]


def _entry(name: str, shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    shape, dtype = [int(d) for d in shape], np.dtype(jax.numpy.dtype(dtype))
    count = int(np.prod(shape, dtype=np.int64))
    return {"name": name, "shape": shape, "dtype": dtype.name, "params": count,
            "bytes": count * dtype.itemsize}  # fmt: skip


def _report(path: str, kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, int]] = {}
    for e in entries:
        g = groups.setdefault(e["name"].split("/")[0], {"params": 0, "bytes": 0})
        g["params"] += e["params"]
        g["bytes"] += e["bytes"]
    return {
        "path": path,
        "kind": kind,
        "parameters": entries,
        "groups": groups,
        "total_params": sum(e["params"] for e in entries),
        "total_bytes": sum(e["bytes"] for e in entries),
    }


def format_inspection(report: Mapping[str, Any]) -> str:
    """The report as an aligned text table with totals."""
    rows = [(e["name"], "x".join(map(str, e["shape"])) or "scalar", e["dtype"],
             f"{e['params']:,}") for e in report["parameters"]]  # fmt: skip
    width = [max([len(h), *(len(r[i]) for r in rows)])
             for i, h in enumerate(("name", "shape", "dtype", "params"))]  # fmt: skip
    head = f"{report['kind']} {report['path']}"
    if report.get("step") is not None:
        head += f" (step {report['step']}: {report['checkpoint']})"
    lines = [head]
    for r in [("name", "shape", "dtype", "params"), *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip())
    for name, g in report["groups"].items():
        lines.append(f"group {name}: {g['params']:,} params, {_human(g['bytes'])}")
    lines.append(
        f"total: {len(rows)} tensors, {report['total_params']:,} params, "
        f"{report['total_bytes']:,} bytes ({_human(report['total_bytes'])})"
    )
    if report.get("other_state"):
        o = report["other_state"]
        lines.append(f"other state (optimizer, step, ...): {o['arrays']} arrays, "
                     f"{_human(o['bytes'])}")  # fmt: skip
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
