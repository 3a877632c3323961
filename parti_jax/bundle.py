"""Loading an inference bundle written by `parti-jax export` (see docs/EXPORT.md).

    bundle = parti_jax.load_bundle("/models/parti_shapes")
    results = bundle.generate(["a red circle above a blue square"], num_samples=8)
    results[0].images            # float32 [1, H, W, 3] in [0, 1]

    sampler = ExportedSampler("/models/parti_shapes")   # no model code at all
    codes, images = sampler(sampler.encode_prompts(prompts), seed=0)

`load_bundle` checks the safetensors weights, JSON configs and SentencePiece
model against `bundle.json` and each other (with the configs, checks and
abstract parameters of `parti_jax.loading`) and builds the Generator of
`parti-jax sample`: a bundle draws its checkpoints' images for a seed, with no
TensorFlow, orbax or training code. `ExportedSampler` calls the `jax.export`
artefact with the weights as arguments and imports no parti_jax model code
(flax and the models are imported only inside `load_bundle`). Weights are
stored per layer ('layers_<i>') and restacked when the stored config scans.
A bundle may be at a URL (gs://...): every file is read through
parti_jax/storage.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from parti_jax import storage

BUNDLE_FILE = "bundle.json"
FORMAT = "parti_jax.bundle"
FORMAT_VERSION = 2  # 2: VQGAN layers named layers_<i>, its config keeps scan_layers
MODEL_CONFIG_FILE = "model_config.json"
VQGAN_CONFIG_FILE = "vqgan_config.json"
UPSAMPLER_CONFIG_FILE = "upsampler_config.json"
SAMPLING_CONFIG_FILE = "sampling_config.json"
CONFIG_FILES = (MODEL_CONFIG_FILE, VQGAN_CONFIG_FILE, UPSAMPLER_CONFIG_FILE)
VOCAB_FILE = "spm.model"
# The optional contrastive model (scorer='contrastive'): its record and, when it was
# trained with another vocabulary than the encoder-decoder's, that vocabulary.
CONTRASTIVE_CONFIG_FILE = "contrastive_config.json"
CONTRASTIVE_VOCAB_FILE = "contrastive_spm.model"
EXPORT_FILE = "sample.jax_export"
# Weight groups: name -> (file, name prefix). The prefix is the first path
# component of every tensor name, e.g. 't2i/decoder/layers_0/self_attention/query/kernel'.
WEIGHTS = {
    "t2i": ("t2i.safetensors", "t2i"),
    "vqgan": ("vqgan_decoder.safetensors", "vqgan"),
    "upsampler": ("upsampler.safetensors", "upsampler"),
    "contrastive": ("contrastive.safetensors", "contrastive"),
}
# The VQGAN parts a bundle keeps: image tokens -> pixels needs no encoder.
VQGAN_DECODER_PARTS = ("quantizer", "decoder")

PyTree = Any


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupt or inconsistent (the message names the file)."""


# ------------------------------------------------------------------ names

Specs = dict[str, tuple[tuple[int, ...], str]]


def flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Nested parameters -> {'prefix/a/b/kernel': leaf} (leaves untouched)."""
    from flax import traverse_util

    return traverse_util.flatten_dict({prefix: dict(tree)}, sep="/")


def unflatten(flat: Mapping[str, Any], prefix: str, *, scan: bool = False) -> dict[str, Any]:
    """{'prefix/a/b/kernel': leaf} -> nested parameters without the prefix; with `scan`,
    the per-layer entries are stacked into the scanned layout ('layers')."""
    from flax import traverse_util

    params = traverse_util.unflatten_dict(dict(flat), sep="/")[prefix]
    if scan:
        from parti_jax.models.transformer import unscanned_to_scan

        params = unscanned_to_scan(params)
    return params


def specs(flat: Mapping[str, Any]) -> Specs:
    """{name: (shape, dtype name)} of a flat {name: array or ShapeDtypeStruct} dict."""
    return {n: (tuple(int(d) for d in a.shape), np.dtype(a.dtype).name) for n, a in flat.items()}


def check_tensors(found: Specs, expected: Specs, where: str) -> None:
    """Raises BundleError naming missing, unexpected and misshapen tensors of `where`."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [
        f"{n}: {found[n][0]} in the file, {expected[n][0]} in the config"
        for n in sorted(set(found) & set(expected))
        if tuple(found[n][0]) != tuple(expected[n][0])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:4])})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) ({', '.join(extra[:4])})")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:4]))
    if problems:
        raise BundleError(
            f"{where}: does not match the bundle's config: " + "; ".join(problems) + ". The "
            "weights and configs come from different exports; export the bundle again"
        )


# ------------------------------------------------------------------ files


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with storage.open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def read_bundle_info(path: str | os.PathLike) -> dict[str, Any]:
    """The checked contents of `<path>/bundle.json`."""
    root = storage.path(path)
    file = root / BUNDLE_FILE
    if not file.is_file():
        hint = (
            " (it is a directory without bundle.json: an interrupted export, or not a bundle)"
            if root.is_dir()
            else ""
        )
        raise BundleError(
            f"{file}: not found{hint}; pass the directory written by `parti-jax export`"
        )
    info = read_json(file)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise BundleError(f"{file}: 'format' is not {FORMAT!r}; not a parti_jax bundle")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{file}: format_version {version!r}, this parti_jax reads {FORMAT_VERSION}; "
            "export the bundle again with this version"
        )
    for key in ("files", "weights"):
        if not isinstance(info.get(key), dict):
            raise BundleError(f"{file}: no {key!r} table; export the bundle again")
    return info


def verify_files(path: str | os.PathLike, info: Mapping[str, Any]) -> None:
    """Checks that every file listed in bundle.json exists with its recorded size and sha256."""
    root = storage.path(path)
    for name, entry in info["files"].items():
        file = root / name
        if not file.is_file():
            raise BundleError(
                f"{file}: missing (listed in {root / BUNDLE_FILE}); copy the whole bundle "
                "directory or export it again"
            )
        size = file.stat().length
        if size != entry.get("bytes"):
            raise BundleError(
                f"{file}: {size} bytes, {entry.get('bytes')} recorded in bundle.json; the file "
                "is truncated or was replaced: copy it again or export the bundle again"
            )
        if entry.get("sha256") and file_sha256(file) != entry["sha256"]:
            raise BundleError(
                f"{file}: sha256 differs from the one recorded in bundle.json; the file is "
                "corrupt or was replaced: copy it again or export the bundle again"
            )


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file of a bundle, with an error naming it."""
    file = storage.path(path)
    try:
        return json.loads(storage.read_text(file))
    except FileNotFoundError:
        raise BundleError(f"{file}: missing; export the bundle again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{file}: not valid JSON ({e}); export the bundle again") from None


def read_weights(path: str | os.PathLike, info: Mapping[str, Any], group: str) -> dict:
    """{name: numpy array} of one weight group ('t2i', 'vqgan', 'upsampler', 'contrastive')."""
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    entry = info["weights"].get(group)
    if entry is None:
        raise BundleError(
            f"{storage.path(path) / BUNDLE_FILE}: the bundle has no {group!r} weights"
        )
    file = storage.path(path) / entry["file"]
    if not file.is_file():
        raise BundleError(f"{file}: missing; copy the whole bundle directory or export it again")
    try:
        # A URL's file is read into memory (storage); a local one is read by safetensors.
        tensors = load(storage.read_bytes(file)) if storage.is_url(file) else load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(
            f"{file}: not a readable safetensors file ({e}); the file is corrupt or "
            "truncated: copy it again or export the bundle again"
        ) from None
    prefix = entry["prefix"] + "/"
    stray = [n for n in tensors if not n.startswith(prefix)]
    if stray:
        raise BundleError(f"{file}: tensor {stray[0]!r} lacks the {prefix!r} prefix")
    return tensors


# ------------------------------------------------------------------ exported


class ExportedSampler:
    """The bundle's `jax.export` sampler: text tokens [B, L] -> (codes [B, N], images).

    Calls `sample.jax_export` with the weights of `t2i.safetensors` and
    `vqgan_decoder.safetensors` (no parti_jax model code). B, L, top-k and
    whether guidance / top-p / greedy are on were fixed at export
    (`self.signature`); seed, temperature, top_p and guidance_scale are arguments.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        import jax

        self.path = storage.path(path)
        self.info = read_bundle_info(self.path)
        if verify:
            verify_files(self.path, self.info)
        self.signature = self.info.get("jax_export")
        if not self.signature:
            raise BundleError(
                f"{self.path / BUNDLE_FILE}: the bundle was exported without a jax.export "
                "sampler (--no_jax_export); export it again without that flag"
            )
        file = self.path / self.signature["file"]
        try:
            self.exported = jax.export.deserialize(bytearray(storage.read_bytes(file)))
        except FileNotFoundError:
            raise BundleError(f"{file}: missing; export the bundle again") from None
        except Exception as e:  # noqa: BLE001 - any decoding failure means a bad file
            raise BundleError(f"{file}: cannot deserialize ({type(e).__name__}: {e})") from None
        platform = _jax_platform()
        if platform not in self.exported.platforms:
            raise BundleError(
                f"{file}: exported for platforms {list(self.exported.platforms)}, this process "
                f"runs on {platform!r}; export again with --platforms={platform},..."
            )
        self._t2i = jax.device_put(read_weights(self.path, self.info, "t2i"))
        self._vqgan = jax.device_put(read_weights(self.path, self.info, "vqgan"))
        self._tokenizer = None

    @property
    def batch_size(self) -> int:
        return int(self.signature["batch_size"])

    @property
    def text_length(self) -> int:
        return int(self.signature["text_length"])

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 [len(prompts), text_length] text tokens with the bundle's SentencePiece model."""
        from parti_jax.data.vocab import SentencePieceTokenizer

        if self._tokenizer is None:
            file = self.path / VOCAB_FILE
            self._tokenizer = SentencePieceTokenizer(model_bytes=storage.read_bytes(file))
            self._tokenizer.model_path = os.fspath(file)
        return self._tokenizer.encode_batch(list(prompts), self.text_length)[0]

    def __call__(
        self,
        text_tokens: Any,
        prompt_ids: Any = None,
        sample_indices: Any = None,
        *,
        seed: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        guidance_scale: float = 1.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(codes int32 [B, N] in [0, K), images float32 [B, H, W, 3] in [0, 1]).

        Rows default to prompt_ids 0..B-1 and sample index 0. Row randomness is
        fold_in(fold_in(seed, prompt_id), sample_index), as in Generator.generate.
        """
        b, length = self.batch_size, self.text_length
        text = np.asarray(text_tokens)
        if text.shape != (b, length) or text.dtype.kind not in "iu":
            raise ValueError(
                f"text_tokens: integer [{b}, {length}] expected (the batch shape fixed at "
                f"export), got {text.dtype} {list(text.shape)}; pad the batch or export again "
                "with --export_batch_size"
            )
        ids = np.arange(b) if prompt_ids is None else np.asarray(prompt_ids)
        samples = np.zeros((b,)) if sample_indices is None else np.asarray(sample_indices)
        for name, value in (("prompt_ids", ids), ("sample_indices", samples)):
            if value.shape != (b,):
                raise ValueError(f"{name}: shape [{b}] expected, got {list(value.shape)}")
        rows = (text.astype(np.int32), ids.astype(np.int32), samples.astype(np.int32))
        scalars = (np.int32(seed), *map(np.float32, (temperature, top_p, guidance_scale)))
        codes, images = self.exported.call(self._t2i, self._vqgan, *rows, *scalars)
        return np.asarray(codes), np.asarray(images)


def _jax_platform() -> str:
    """This process's platform as jax.export names it ('cpu', 'cuda', 'rocm', 'tpu')."""
    import jax

    device = jax.devices()[0]
    if device.platform == "gpu":
        return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"
    return device.platform


# ------------------------------------------------------------------ bundle


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: `generate` (the Generator of `parti-jax sample`) plus its records.

    A bundle exported with a contrastive model has it loaded as
    `generator.contrastive`, so `generate(..., scorer='contrastive')` reranks with it.
    """

    path: storage.Path
    info: dict[str, Any]  # bundle.json
    generator: Any
    sampling_config: Any  # sampling_config.json: generate's default

    @property
    def records(self) -> dict[str, Any]:
        """Source checkpoints, steps and hashes (as in a `parti-jax sample` manifest)."""
        return self.generator.records

    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[Any]:
        """`Generator.generate`; `sampling_config` defaults to the one stored at export."""
        kwargs.setdefault("sampling_config", self.sampling_config)
        return self.generator.generate(prompts, **kwargs)

    def exported_sampler(self, *, verify: bool = False) -> ExportedSampler:
        """The bundle's jax.export sampler (files were verified when the bundle loaded)."""
        return ExportedSampler(self.path, verify=verify)


def load_bundle(
    path: str | os.PathLike,
    *,
    mesh: Any = None,
    rules: Any = "data_parallel",
    config_overrides: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> Bundle:
    """Loads a bundle written by `parti-jax export` onto `mesh` (default: local devices).

    Args:
      path: the bundle directory.
      mesh, rules: where the encoder-decoder runs (as in `Generator.load`).
      config_overrides: ModelConfig fields to change, e.g. {'attention_impl': 'cudnn'}
        on GPUs or {'dtype': 'float32'} (the bundle stores attention_impl='xla').
      verify: check every file's size and sha256 against bundle.json first (reads
        each file once more; False skips it for very large bundles).

    A contrastive model in the bundle (`parti-jax export --contrastive`) is loaded
    too (host arrays): the Generator's `contrastive`, for scorer='contrastive'.
    """
    from parti_jax import loading
    from parti_jax.decoding import SamplingConfig
    from parti_jax.sampling import Generator
    from parti_jax.upsampler.config import UpsamplerConfig
    from parti_jax.upsampler.inference import LoadedUpsampler
    from parti_jax.vqgan.tokenizer import local_mesh

    root = storage.path(path)
    info = read_bundle_info(root)
    if verify:
        verify_files(root, info)
    sampling_file = str(root / SAMPLING_CONFIG_FILE)  # read first: a bad key fails fast
    sampling = loading.config_from_record(SamplingConfig, read_json(sampling_file), sampling_file)
    mesh = mesh or local_mesh()
    t2i_file, vq_file, up_file = (str(root / f) for f in CONFIG_FILES)
    t2i = loading.t2i_record(read_json(t2i_file), t2i_file, config_overrides)
    vq_info = read_json(vq_file)
    up_info = read_json(up_file) if "upsampler" in info["weights"] else None
    text_tokenizer = loading.read_vocabulary(root / VOCAB_FILE)
    loading.check_compatibility(
        t2i, (vq_info, vq_file), (up_info, up_file) if up_info else None,
        (text_tokenizer.vocab_size, str(root / VOCAB_FILE)),
    )  # fmt: skip

    t2i_abstract = functools.partial(loading.t2i_abstract_params, text_length=t2i.text_length)
    params = _read_group(root, info, "t2i", t2i_abstract, t2i.config, mesh, rules)
    upsampler = None
    if up_info:
        config = loading.config_from_record(
            UpsamplerConfig, up_info["upsampler_config"], f"{up_file}: upsampler_config"
        )
        up_params = _read_group(root, info, "upsampler", loading.upsampler_abstract_params, config)
        upsampler = LoadedUpsampler(config, up_params, dict(up_info), up_info.get("step"),
                                    up_info.get("checkpoint"), up_file)  # fmt: skip
    contrastive = _load_contrastive(root, info) if "contrastive" in info["weights"] else None
    records = dict(info.get("sources") or {})
    records["bundle"] = {"path": os.fspath(root), "created": info.get("created")}
    models = loading.LoadedModels(
        t2i.config, params, t2i.text_length, text_tokenizer,
        _load_vqgan_decoder(root, info, vq_info, mesh, rules), upsampler, records, t2i.info,
    )  # fmt: skip
    generator = Generator(models, mesh=mesh, rules=rules, contrastive=contrastive)
    if contrastive is not None:  # the source's record (work dir, params hash) and the model's
        generator.records["contrastive"] = dict(
            records.get("contrastive") or {}, **contrastive.record()
        )
    return Bundle(root, info, generator, sampling)


def _load_contrastive(root: storage.Path, info: dict) -> Any:
    """The bundle's contrastive model (`ContrastiveModel`, host arrays) from
    contrastive.safetensors, contrastive_config.json and the vocabulary it names."""
    import jax

    from parti_jax import loading
    from parti_jax.contrastive.model import ContrastiveConfig
    from parti_jax.contrastive.scorer import ContrastiveModel, abstract_params
    from parti_jax.models.transformer import unscanned_to_scan

    file = root / CONTRASTIVE_CONFIG_FILE
    record = read_json(file)
    missing = [k for k in ("config", "text_length") if k not in record]
    if missing:
        raise BundleError(f"{file}: no {missing} entry; export the bundle again")
    config = loading.config_from_record(ContrastiveConfig, record["config"], f"{file}: config")
    text_length = int(record["text_length"])
    vocab_file = root / record.get("vocab_file", CONTRASTIVE_VOCAB_FILE)
    tokenizer = loading.read_vocabulary(vocab_file)
    if record.get("vocab_sha256") and tokenizer.fingerprint != record["vocab_sha256"]:
        raise BundleError(
            f"{vocab_file}: sha256 {tokenizer.fingerprint[:12]}…, but {file} records the "
            f"contrastive model's vocabulary as {record['vocab_sha256'][:12]}…; the file was "
            "replaced: export the bundle again"
        )
    # Stored per layer: read as unrolled, then the text tower restacked when it scans.
    unrolled = dataclasses.replace(config, text=dataclasses.replace(config.text, scan_layers=False))
    params = _read_group(root, info, "contrastive", lambda c: abstract_params(c, text_length),
                         unrolled)  # fmt: skip
    if config.text.scan_layers:
        tower = jax.tree.map(np.asarray, unscanned_to_scan(params["text_encoder"]))
        params = dict(params, text_encoder=tower)
    step = record.get("step")
    return ContrastiveModel(config, params, tokenizer, text_length, dict(record),
                            int(step) if step is not None else -1,
                            str(record.get("checkpoint", file)))  # fmt: skip


def _read_group(
    root: storage.Path, info: dict, group: str, abstract: Any, config: Any, mesh: Any = None,
    rules: Any = None,
) -> Any:  # fmt: skip
    """One weight group's parameters for `config`, on `mesh` (host numpy without one):
    its per-layer names and shapes are checked against `abstract(config, mesh=,
    rules=)` without scan_layers, and stacked when `config` scans its layers."""
    from parti_jax import loading

    scan = bool(getattr(config, "scan_layers", False))
    per_layer = abstract(dataclasses.replace(config, scan_layers=False) if scan else config)
    file, prefix = WEIGHTS[group]
    flat = read_weights(root, info, group)
    check_tensors(specs(flat), specs(flatten(per_layer, prefix)), str(root / file))
    params = unflatten(flat, prefix, scan=scan)
    if mesh is None:
        return params
    return loading.place(params, abstract(config, mesh=mesh, rules=rules))


def _load_vqgan_decoder(
    root: storage.Path, info: dict, vq_info: dict, mesh: Any, rules: Any
) -> Any:
    """An ImageTokenizer over the stored VQGAN decoder half; the codebook hash is checked."""
    from parti_jax import loading
    from parti_jax.vqgan.config import VQGANConfig
    from parti_jax.vqgan.tokenizer import ImageTokenizer

    class DecoderOnlyTokenizer(ImageTokenizer):
        """ImageTokenizer without the encoder: decode works, encode names what is missing."""

        def encode(self, images: Any) -> np.ndarray:
            raise BundleError(
                f"{root}: a bundle holds only the VQGAN decoder; encode images with the "
                "`parti-jax train-vqgan` work directory (ImageTokenizer.load)"
            )

    def decoder_abstract(config: Any, **mesh_rules: Any) -> dict[str, Any]:
        params = loading.vqgan_abstract_params(config, **mesh_rules)
        return {k: params[k] for k in VQGAN_DECODER_PARTS}

    where = f"{root / VQGAN_CONFIG_FILE}: vqgan_config"
    config = loading.config_from_record(VQGANConfig, vq_info["vqgan_config"], where)
    params = _read_group(root, info, "vqgan", decoder_abstract, config, mesh, rules)
    source = info.get("sources", {}).get("vqgan")
    tokenizer = DecoderOnlyTokenizer(config, params, meta=source, mesh=mesh, rules=rules)
    if tokenizer.codebook_hash != vq_info.get("codebook_hash"):
        raise BundleError(
            f"{root / WEIGHTS['vqgan'][0]}: codebook hash {tokenizer.codebook_hash} differs from "
            f"{vq_info.get('codebook_hash')} in {root / VQGAN_CONFIG_FILE}; the VQGAN weights "
            "were replaced or are corrupt: export the bundle again"
        )
    return tokenizer
