"""Prompts -> images: text tokens -> encoder-decoder -> codes -> VQGAN -> rerank -> upsampler.

    gen = Generator.load("/runs/t2i", "/runs/vqgan", "/runs/upsampler")
    results = gen.generate(["a red circle above a blue square"], num_samples=16, keep_top_k=4)
    results[0].images        # float32 [4, 1024, 1024, 3] in [0, 1], best first

`Generator.load` restores the three models from their work directories and
checks that they belong together (grid, codebook size and hash, resolution,
text vocabulary), with errors naming both values and the files they come from.
`generate` lays prompts x samples out prompt-major, runs them in batches of
`batch_size` rows (a multiple of the mesh's batch devices; the last batch is
padded), each batch through one jitted prefill + `decoding.sample` function
that takes the parameters as arguments (compiled once per batch shape), then
decodes the codes of each finished prompt with the VQGAN, scores them at the
VQGAN's resolution, keeps the best `keep_top_k` and upsamples only those.
A sample's randomness is fold_in(fold_in(seed, prompt_id), sample_index), so
the same seed gives the same images whatever the batch size or batch layout.

One process samples its own prompts on its local devices (the default mesh);
several hosts split the prompt list between them. No TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parti_jax import decoding, partitioning, rerank
from parti_jax.data.vocab import EOS_ID, SentencePieceTokenizer, default_vocab_path
from parti_jax.loading import (  # CompatibilityError: re-exported for callers
    CompatibilityError,
    check_compatibility,
    default_mesh,
    load_t2i,
    mesh_batch_devices,
    params_fingerprint,
    read_t2i_info,
)
from parti_jax.models.config import ModelConfig
from parti_jax.models.transformer import EncoderDecoder, make_tokens_to_logits

__all__ = [
    "CompatibilityError",
    "Generator",
    "PromptResult",
    "PromptTruncatedWarning",
    "read_prompts_file",
    "sample_to_folder",
    "write_results",
]
PyTree = Any
SCORERS = ("likelihood", "pmi", "shapes_judge", "none")
_DEFAULT_MAX_ROWS = 64


class PromptTruncatedWarning(UserWarning):
    """Prompts longer than the encoder's text length were cut."""


@dataclasses.dataclass
class PromptResult:
    """The kept samples of one prompt, best first."""

    prompt: str
    prompt_id: int
    seed: int
    images: np.ndarray  # float32 [k, H, W, 3]: upsampled when there is an upsampler
    low_res_images: np.ndarray  # float32 [k, h, w, 3]: the VQGAN's output
    scores: np.ndarray  # float32 [k] (higher is better)
    codes: np.ndarray  # int32 [k, grid_h, grid_w] codebook indices
    sample_indices: np.ndarray  # int32 [k]: which of the num_samples draws each one is
    truncated: bool  # the prompt was cut to the encoder's text length


def resolve_scorer(scorer: Any, *, likelihood: Callable[[float], rerank.Scorer]) -> Any:
    """A Scorer object from a name (SCORERS), None or an object.

    `likelihood(unconditional_weight)` builds the model's own scorer:
    'likelihood' (None too) is weight 0, 'pmi' weight 1 (`rerank.LikelihoodScorer`).
    """
    if scorer is None or scorer == "likelihood":
        return likelihood(0.0)
    if scorer == "pmi":
        return likelihood(1.0)
    if scorer == "shapes_judge":
        from parti_jax.data.judge import ShapesJudgeScorer

        return ShapesJudgeScorer()
    if scorer == "none":
        return None
    if isinstance(scorer, str) or not callable(getattr(scorer, "score", None)):
        raise ValueError(
            f"scorer={scorer!r}: expected one of {SCORERS} or an object with a "
            "score(images, prompts, *, image_tokens=None) method"
        )
    return scorer


# ------------------------------------------------------------------ generator


class Generator:
    """The loaded text-to-image pipeline; see the module docstring."""

    def __init__(
        self,
        *,
        model_config: ModelConfig,
        params: PyTree,
        text_tokenizer: SentencePieceTokenizer,
        image_tokenizer: Any,
        text_length: int,
        upsampler: Any = None,
        mesh: Mesh | None = None,
        rules: Any = "data_parallel",
        records: Mapping[str, Any] | None = None,
    ) -> None:
        """Wraps loaded pieces; most callers use `Generator.load`.

        Args:
          model_config, params: the encoder-decoder and its 'params' (on `mesh`).
          text_tokenizer: the SentencePiece vocabulary it was trained with.
          image_tokenizer: a `parti_jax.vqgan.tokenizer.ImageTokenizer` (decode).
          text_length: encoder input length (longer prompts are truncated).
          upsampler: a `parti_jax.upsampler.train.LoadedUpsampler` or None.
          mesh, rules: where the encoder-decoder runs (default: local devices on 'data').
          records: checkpoint paths/steps/hashes for manifests.
        """
        self.model_config = model_config
        self.params = params
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.text_length = int(text_length)
        self.upsampler = upsampler
        self.mesh = mesh or default_mesh()
        self.rules = partitioning.get_rules(rules) if isinstance(rules, str) else tuple(rules)
        self.records = dict(records or {})
        self._model = EncoderDecoder(model_config)
        self._batch_devices = mesh_batch_devices(self.mesh)
        axes = tuple(a for a in partitioning.BATCH_MESH_AXES if a in self.mesh.axis_names)
        self._rows = NamedSharding(self.mesh, PartitionSpec(axes))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._sample_fns: dict[tuple, Callable] = {}
        self._logits_fn = jax.jit(lambda p, e, d: self._model.apply({"params": p}, e, d))
        self._upsample_fn = None
        self._upsampler_params = None
        if upsampler is not None:
            self._upsample_fn = upsampler.make_upsample_fn()
            self._upsampler_params = jax.device_put(upsampler.params, self._replicated)

    # ------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        t2i_workdir: str | os.PathLike,
        vqgan_path: str | os.PathLike,
        upsampler_path: str | os.PathLike | None = None,
        *,
        vocab_path: str | None = None,
        mesh: Mesh | None = None,
        rules: Any = "data_parallel",
        t2i_step: int | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        fingerprint: bool = True,
    ) -> Generator:
        """Loads and cross-checks the encoder-decoder, VQGAN, optional upsampler and vocabulary.

        Args:
          t2i_workdir: `parti-jax train` work directory (model_config.json + checkpoints).
          vqgan_path: `parti-jax train-vqgan` work directory.
          upsampler_path: `parti-jax train-upsampler` work directory (None: no upsampling).
          vocab_path: SentencePiece model; default the one recorded in
            model_config.json ('vocab_path'), else the shipped shapes vocabulary.
          mesh: where to sample (default: this process's devices, all on 'data').
          rules: rule table for the encoder-decoder's parameters.
          t2i_step: encoder-decoder checkpoint step (default the latest).
          config_overrides: ModelConfig fields to change for sampling (e.g.
            {'attention_impl': 'xla', 'dtype': 'float32'} on a CPU).
          fingerprint: record a sha256 of the encoder-decoder's and upsampler's
            parameters for the manifest (reads every parameter once).
        """
        from parti_jax.upsampler.train import load_upsampler, read_upsampler_meta
        from parti_jax.vqgan.tokenizer import ImageTokenizer, meta_path

        mesh = mesh or default_mesh()
        rule_table = partitioning.get_rules(rules) if isinstance(rules, str) else tuple(rules)
        info, info_path = read_t2i_info(t2i_workdir)
        vqgan_meta_file = str(meta_path(vqgan_path))
        image_tokenizer = ImageTokenizer.load(vqgan_path, mesh=mesh)
        vocab = vocab_path or info.get("vocab_path") or default_vocab_path()
        text_tokenizer = SentencePieceTokenizer(vocab)
        up_meta, up_file = (None, None)
        if upsampler_path is not None:
            up_meta, up_file = read_upsampler_meta(upsampler_path)
        fields = dict(info["model_config"], **(config_overrides or {}))
        try:
            model_config = ModelConfig(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{info_path}: bad model_config ({e})") from None
        # Check before restoring any weights: a mismatch costs nothing to find.
        check_compatibility(
            model_config=model_config,
            t2i_info=info,
            t2i_file=info_path,
            vqgan_meta=image_tokenizer.meta,
            vqgan_file=vqgan_meta_file,
            upsampler_meta=up_meta,
            upsampler_file=up_file,
            text_vocab_size=text_tokenizer.vocab_size,
            vocab_file=vocab,
        )
        model_config, params, info, info_path, t2i_ckpt = load_t2i(
            t2i_workdir, mesh=mesh, rules=rule_table, step=t2i_step,
            config_overrides=config_overrides,
        )  # fmt: skip
        upsampler = load_upsampler(upsampler_path) if upsampler_path is not None else None
        vq = image_tokenizer.meta
        records = {
            "encoder_decoder": {
                "workdir": str(Path(t2i_workdir).expanduser().absolute()),
                "checkpoint": t2i_ckpt,
                "step": int(Path(t2i_ckpt).name),
                "params_hash": params_fingerprint(params) if fingerprint else None,
                "codes_codebook_hash": (info.get("codes_meta") or {}).get("codebook_hash"),
            },
            "vqgan": {
                "workdir": str(Path(vqgan_path).expanduser().absolute()),
                "checkpoint": vq.get("checkpoint"),
                "step": vq.get("step"),
                "codebook_hash": vq.get("codebook_hash"),
                "image_size": vq.get("image_size"),
            },
            "upsampler": None
            if upsampler is None
            else {
                "workdir": str(Path(upsampler_path).expanduser().absolute()),
                "checkpoint": upsampler.checkpoint,
                "step": upsampler.step,
                "params_hash": params_fingerprint(upsampler.params) if fingerprint else None,
                "codebook_hash": upsampler.codebook_hash,
                "output_size": upsampler.config.output_size,
            },
            "vocabulary": {"path": str(vocab), "sha256": text_tokenizer.fingerprint},
            "codebook_hash": vq.get("codebook_hash"),
        }
        return cls(
            model_config=model_config,
            params=params,
            text_tokenizer=text_tokenizer,
            image_tokenizer=image_tokenizer,
            text_length=int(info.get("text_length", model_config.max_text_length)),
            upsampler=upsampler,
            mesh=mesh,
            rules=rule_table,
            records=records,
        )

    # ------------------------------------------------------------- pieces

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """int32 [B, text_length] ids (EOS last, zero padded) and the indices truncated."""
        return self.text_tokenizer.encode_batch(list(prompts), self.text_length)

    def rows_per_call(self, total_rows: int, batch_size: int | None = None) -> int:
        """Rows per jitted call: `batch_size` (default min(total, 64)) rounded up to a
        multiple of the mesh's batch devices."""
        n = self._batch_devices
        want = batch_size if batch_size is not None else min(total_rows, _DEFAULT_MAX_ROWS)
        if want < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        return -(-want // n) * n

    def _sample_fn(self, *, guided: bool, greedy: bool, top_k: int | None, top_p: bool):
        key = (guided, greedy, top_k, top_p)
        if key not in self._sample_fns:
            model, cfg, mesh = self._model, self.model_config, self.mesh

            def fn(params, text, prompt_ids, sample_indices, seed, temperature, p, scale):
                if guided:
                    empty = jnp.zeros_like(text).at[:, 0].set(EOS_ID)
                    text = jnp.concatenate([text, empty], axis=0)
                tokens_to_logits, cache = make_tokens_to_logits(model, params, text)
                out = decoding.sample(
                    tokens_to_logits,
                    cache,
                    num_steps=cfg.num_image_tokens,
                    prompt_ids=prompt_ids,
                    sample_indices=sample_indices,
                    seed=seed,
                    temperature=0.0 if greedy else temperature,
                    top_k=top_k,
                    top_p=p if top_p else None,
                    guidance_scale=scale if guided else None,
                    num_valid_tokens=cfg.codebook_size + 1,
                    mesh=mesh,
                )
                return out.tokens

            self._sample_fns[key] = jax.jit(fn)
        return self._sample_fns[key]

    def sample_function(
        self, sampling_config: decoding.SamplingConfig, *, seed: int | None = None
    ) -> tuple[Callable, tuple[jax.Array, ...]]:
        """(fn, scalars): the jitted sampler for `sampling_config` and its scalar arguments.

        `fn(params, text [B, L], prompt_ids [B], sample_indices [B], *scalars)
        -> decoder tokens int32 [B, N]` (codes + 1), where scalars are (seed,
        temperature, top_p, guidance_scale). Greedy/top-k/top-p/guidance on or
        off are compiled in; the scalar values are arguments. Call it under
        `partitioning.with_sharding_rules(self.mesh, self.rules)`; export
        traces it with the parameters as arguments.
        """
        cfg = sampling_config
        guided = cfg.guidance_scale is not None
        fn = self._sample_fn(
            guided=guided,
            greedy=cfg.temperature == 0,
            top_k=cfg.top_k,
            top_p=cfg.top_p is not None,
        )
        scalars = (
            jnp.asarray(cfg.seed if seed is None else seed, jnp.int32),
            jnp.asarray(cfg.temperature if cfg.temperature else 1.0, jnp.float32),
            jnp.asarray(cfg.top_p if cfg.top_p is not None else 1.0, jnp.float32),
            jnp.asarray(cfg.guidance_scale if guided else 1.0, jnp.float32),
        )
        return fn, scalars

    def _padded(self, fn: Callable, rows: int, *arrays: np.ndarray) -> np.ndarray:
        """Runs fn(*row_arrays) on `rows`-row chunks (the last padded); host numpy out."""
        total = arrays[0].shape[0]
        outs = []
        for start in range(0, total, rows):
            part = [a[start : start + rows] for a in arrays]
            n = part[0].shape[0]
            if n < rows:
                part = [np.concatenate([a, np.repeat(a[-1:], rows - n, 0)]) for a in part]
            with partitioning.with_sharding_rules(self.mesh, self.rules):
                out = fn(*[jax.device_put(a, self._rows) for a in part])
            outs.append(np.asarray(jax.device_get(out))[:n])
        return np.concatenate(outs, axis=0)

    def likelihood_scorer(
        self, rows: int, *, unconditional_weight: float = 0.0
    ) -> rerank.LikelihoodScorer:
        """The model's own mean log-likelihood of its tokens given the prompt, minus
        `unconditional_weight` times that given the empty prompt (1: PMI)."""

        def logits_fn(encoder_input, decoder_input):
            fn = functools.partial(self._logits_fn, self.params)
            return self._padded(fn, rows, encoder_input, decoder_input)

        return rerank.LikelihoodScorer(
            logits_fn,
            lambda ps: self.encode_prompts(ps)[0],
            num_valid_tokens=self.model_config.codebook_size + 1,
            unconditional_weight=unconditional_weight,
        )

    def upsample(self, images: np.ndarray) -> np.ndarray:
        """VQGAN-resolution images -> upsampled (identity without an upsampler)."""
        if self._upsample_fn is None or images.shape[0] == 0:
            return images
        fn = functools.partial(self._upsample_fn, self._upsampler_params)
        return self._padded(fn, self._batch_devices, images.astype(np.float32))

    # ------------------------------------------------------------- generate

    def generate(
        self,
        prompts: Sequence[str],
        *,
        num_samples: int | None = None,
        keep_top_k: int = 1,
        sampling_config: decoding.SamplingConfig | None = None,
        seed: int | None = None,
        scorer: Any = None,
        batch_size: int | None = None,
        prompt_ids: Sequence[int] | None = None,
        progress: bool = False,
    ) -> list[PromptResult]:
        """Samples, reranks and upsamples images for `prompts`; one PromptResult per prompt.

        Args:
          prompts: the texts (an empty list is an error).
          num_samples: draws per prompt (default sampling_config.num_samples).
          keep_top_k: how many of them to keep, best first.
          sampling_config: temperature, top-k/top-p, guidance_scale, num_samples, seed.
          seed: overrides sampling_config.seed.
          scorer: 'likelihood' (default), 'shapes_judge', 'none' (keep draw
            order) or an object with `score(images, prompts, *, image_tokens)`.
          batch_size: rows (prompt x sample draws) per device call, rounded up
            to a multiple of the mesh's batch devices; does not change the images.
          prompt_ids: global id of each prompt (default 0..P-1); the key of
            its randomness, so a prompt keeps its images in any batch or list.
          progress: show a tqdm bar over batches.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts: pass at least one prompt")
        cfg = sampling_config or decoding.SamplingConfig()
        num_samples = int(num_samples if num_samples is not None else cfg.num_samples)
        seed = int(cfg.seed if seed is None else seed)
        if num_samples < 1 or not 1 <= keep_top_k <= num_samples:
            raise ValueError(f"keep_top_k={keep_top_k} must be in [1, num_samples={num_samples}]")
        ids = np.arange(len(prompts)) if prompt_ids is None else np.asarray(prompt_ids)
        if (
            ids.shape != (len(prompts),)
            or not np.issubdtype(ids.dtype, np.integer)
            or len(set(ids.tolist())) != len(prompts)
            or ids.min() < 0
        ):
            raise ValueError(
                f"prompt_ids must be {len(prompts)} distinct non-negative integers, got {ids!r}"
            )
        text, truncated = self.encode_prompts(prompts)
        if truncated:
            listed = ", ".join(f"#{int(ids[i])} {prompts[i][:60]!r}" for i in truncated)
            warnings.warn(
                f"{len(truncated)} prompt(s) longer than the encoder's {self.text_length} text "
                f"tokens were truncated: {listed}",
                PromptTruncatedWarning,
                stacklevel=2,
            )
        total = len(prompts) * num_samples
        rows = self.rows_per_call(total, batch_size)
        row_prompt = np.repeat(np.arange(len(prompts)), num_samples)
        row_sample = np.tile(np.arange(num_samples, dtype=np.int32), len(prompts))
        scorer_obj = resolve_scorer(
            scorer, likelihood=lambda w: self.likelihood_scorer(rows, unconditional_weight=w)
        )
        fn, scalars = self.sample_function(cfg, seed=seed)

        def run(text_rows, pid_rows, sample_rows):
            return fn(self.params, text_rows, pid_rows, sample_rows, *scalars)

        tokens = np.zeros((total, self.model_config.num_image_tokens), np.int32)
        batches = range(0, total, rows)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-total // rows), unit="batch", desc="sampling")
        results: list[PromptResult] = []
        done = 0  # prompts finished
        truncated_set = set(truncated)
        for start in batches:
            stop = min(start + rows, total)
            sl = slice(start, stop)
            tokens[sl] = self._padded(
                run,
                rows,
                text[row_prompt[sl]],
                ids[row_prompt[sl]].astype(np.int32),
                row_sample[sl],
            )
            finished = stop // num_samples
            if finished > done:
                results += self._finish(
                    prompts, ids, range(done, finished), tokens, num_samples, keep_top_k,
                    scorer_obj, seed, truncated_set,
                )  # fmt: skip
                done = finished
        return results

    def _finish(
        self,
        prompts: list[str],
        ids: np.ndarray,
        which: range,
        tokens: np.ndarray,
        num_samples: int,
        keep_top_k: int,
        scorer: Any,
        seed: int,
        truncated: set[int],
    ) -> list[PromptResult]:
        """Decodes, scores and reranks the samples of prompts `which`; upsamples the kept."""
        sl = slice(which.start * num_samples, which.stop * num_samples)
        cfg = self.model_config
        toks = tokens[sl]
        codes = decoding.tokens_to_codes(toks, cfg.codebook_size).reshape((-1, *cfg.image_grid))
        low = self.image_tokenizer.decode(codes)
        row_prompts = [prompts[p] for p in which for _ in range(num_samples)]
        if scorer is None:
            scores = np.zeros((len(row_prompts),), np.float32)
            keep = rerank.rerank(scores, num_samples=num_samples, keep_top_k=keep_top_k)
        else:
            keep, scores = rerank.score_and_rerank(
                scorer,
                low,
                row_prompts,
                num_samples=num_samples,
                keep_top_k=keep_top_k,
                image_tokens=toks,
            )
        kept = keep.reshape(-1)
        final = self.upsample(low[kept])
        final = final.reshape((len(which), keep_top_k, *final.shape[1:]))
        out = []
        for j, p in enumerate(which):
            rows = keep[j]
            out.append(
                PromptResult(
                    prompt=prompts[p],
                    prompt_id=int(ids[p]),
                    seed=seed,
                    images=final[j],
                    low_res_images=low[rows],
                    scores=np.asarray(scores[rows], np.float32),
                    codes=codes[rows],
                    sample_indices=(rows % num_samples).astype(np.int32),
                    truncated=p in truncated,
                )
            )
        return out


# ------------------------------------------------------------------ output folder


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line (blank lines skipped); an empty file is an error naming it."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(
            f"{path}: cannot read the prompts file ({e.strerror or e})"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); write one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty); write one prompt per line")
    return prompts


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> uint8 (rounded, clipped)."""
    return np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def write_results(
    results: Sequence[PromptResult],
    out_dir: str | os.PathLike,
    *,
    records: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
    save_low_res: bool = False,
) -> dict[str, Any]:
    """Writes `<out>/<prompt_id>_<rank>.png` (+ `low_res/` copies) and `manifest.json`.

    Returns the manifest: the models (checkpoints, steps, hashes), the
    sampling settings, and one entry per image (prompt, prompt_id, seed,
    sample_index, score, rank, file).
    """
    from PIL import Image

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if save_low_res:
        (out / "low_res").mkdir(exist_ok=True)
    images = []
    for r in results:
        for rank in range(len(r.sample_indices)):
            name = f"{r.prompt_id}_{rank}.png"
            Image.fromarray(to_uint8(r.images[rank])).save(out / name)
            entry = {
                "prompt": r.prompt,
                "prompt_id": r.prompt_id,
                "seed": r.seed,
                "sample_index": int(r.sample_indices[rank]),
                "score": float(r.scores[rank]),
                "rank": rank,
                "file": name,
                "size": list(r.images[rank].shape[:2]),
                "truncated": r.truncated,
            }
            if save_low_res:
                low = f"low_res/{name}"
                Image.fromarray(to_uint8(r.low_res_images[rank])).save(out / low)
                entry["low_res_file"] = low
            images.append(entry)
    records = dict(records or {})
    manifest = {
        "format_version": 1,
        "models": {k: v for k, v in records.items() if k != "codebook_hash"},
        "codebook_hash": records.get("codebook_hash"),
        "sampling": dict(sampling or {}),
        "num_prompts": len(results),
        "images": images,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
    return manifest


def sample_to_folder(
    *,
    workdir: str,
    t2i_path: str,
    vqgan_path: str,
    upsampler_path: str | None = None,
    prompts: Sequence[str] | None = None,
    prompts_file: str | None = None,
    prompt_ids: Sequence[int] | None = None,
    sampling_config: decoding.SamplingConfig | None = None,
    keep_top_k: int = 1,
    batch_size: int | None = None,
    scorer: Any = "likelihood",
    save_low_res: bool = False,
    vocab_path: str | None = None,
    t2i_step: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`parti-jax sample`: prompts -> reranked (upsampled) PNGs and manifest.json in `workdir`.

    Args:
      workdir: output folder.
      t2i_path, vqgan_path, upsampler_path: the three work directories (see Generator.load).
      prompts / prompts_file: the prompts (exactly one of them).
      prompt_ids: ids of the prompts (default 0..P-1; file prompts: their order).
      sampling_config: decoding.SamplingConfig (temperature, top_k, top_p,
        guidance_scale, num_samples, seed).
      keep_top_k: images kept (and written) per prompt.
      batch_size: rows per device call (see Generator.generate).
      scorer: 'likelihood', 'shapes_judge', 'none' or a scorer object.
      save_low_res: also write the VQGAN's images to `low_res/`.
      vocab_path, t2i_step, config_overrides: see Generator.load.
      progress: tqdm progress bar.
    Returns:
      The manifest written to `<workdir>/manifest.json`.
    """
    if (prompts is None) == (prompts_file is None):
        raise ValueError("pass exactly one of prompts or prompts_file")
    prompts = read_prompts_file(prompts_file) if prompts_file is not None else list(prompts)
    if not prompts:
        raise ValueError("no prompts: pass at least one prompt")
    cfg = sampling_config or decoding.SamplingConfig()
    generator = Generator.load(
        t2i_path,
        vqgan_path,
        upsampler_path,
        vocab_path=vocab_path,
        t2i_step=t2i_step,
        config_overrides=config_overrides,
    )
    results = generator.generate(
        prompts,
        keep_top_k=keep_top_k,
        sampling_config=cfg,
        scorer=scorer,
        batch_size=batch_size,
        prompt_ids=prompt_ids,
        progress=progress,
    )
    settings = dict(dataclasses.asdict(cfg), keep_top_k=keep_top_k)
    settings["scorer"] = (
        scorer if isinstance(scorer, str) or scorer is None else type(scorer).__name__
    )
    return write_results(
        results, workdir, records=generator.records, sampling=settings, save_low_res=save_low_res
    )
