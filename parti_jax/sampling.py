"""Prompts -> images: text tokens -> encoder-decoder -> codes -> VQGAN -> rerank -> upsampler.

    gen = Generator.load("/runs/t2i", "/runs/vqgan", "/runs/upsampler")
    results = gen.generate(["a red circle above a blue square"], num_samples=16, keep_top_k=4)
    results[0].images        # float32 [4, 1024, 1024, 3] in [0, 1], best first

`generate` runs prompts x samples (prompt-major) in batches of rows through one
jitted prefill + `decoding.sample` that takes the parameters as arguments
(compiled once per batch shape; the last batch padded), decodes each finished
prompt's codes with the VQGAN, scores them at its resolution, keeps the best
`keep_top_k` and upsamples only those. A sample's randomness is
fold_in(fold_in(seed, prompt_id), sample_index), so a seed gives the same
images whatever the batch size or layout. One process samples on its local
devices; several hosts split the prompt list. No TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parti_jax import decoding, loading, partitioning, rerank, storage
from parti_jax.data.vocab import EOS_ID, text_lines, text_problem
from parti_jax.loading import LoadedModels
from parti_jax.models.chunked import chunked_token_sums
from parti_jax.models.transformer import EncoderDecoder, make_tokens_to_logits, sampler_options
from parti_jax.vqgan.tokenizer import local_mesh

PyTree = Any
SCORERS = ("likelihood", "pmi", "contrastive", "shapes_judge", "none")
_DEFAULT_MAX_ROWS = 64
# Bytes of float32 logits one scoring chunk may hold (`score_chunk_size`): 128 MiB.
SCORE_CHUNK_BYTES = 2**27


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


def resolve_scorer(
    scorer: Any, *, likelihood: Callable[[float], rerank.Scorer], contrastive: Any = None
) -> Any:
    """A Scorer object from a name (SCORERS), None or an object.

    `likelihood(unconditional_weight)` builds the model's own scorer:
    'likelihood' (None too) is weight 0, 'pmi' weight 1 (`rerank.LikelihoodScorer`).
    'contrastive' scores with `contrastive` (a loaded `ContrastiveModel`).
    """
    check_scorer(scorer)
    if scorer is None or scorer in ("likelihood", "pmi"):
        return likelihood(1.0 if scorer == "pmi" else 0.0)
    if scorer == "contrastive":
        if contrastive is None:
            raise ValueError(
                "scorer='contrastive' needs a contrastive model: pass the work directory of "
                "`parti-jax train-contrastive` (sample.contrastive_path, eval.contrastive_dir, "
                "Generator.load(contrastive_path=...)) or load a bundle exported with one"
            )
        from parti_jax.contrastive.scorer import ContrastiveScorer

        return ContrastiveScorer(contrastive)
    if scorer == "shapes_judge":
        from parti_jax.data.judge import ShapesJudgeScorer

        return ShapesJudgeScorer()
    return None if scorer == "none" else scorer


def check_scorer(scorer: Any) -> None:
    """Raises ValueError unless `scorer` is None, one of SCORERS or has a `score` method."""
    if isinstance(scorer, str):
        known = scorer in SCORERS
    else:
        known = scorer is None or callable(getattr(scorer, "score", None))
    if not known:
        raise ValueError(
            f"scorer={scorer!r}: expected one of {SCORERS} or an object with a "
            "score(images, prompts, *, image_tokens=None) method"
        )


def check_prompts(
    prompts: Sequence[str], where: str = "prompt", *, allow_empty: bool = True
) -> list[str]:
    """`prompts` as a list; a ValueError names `where` and the prompt's number when one is
    not a string, not valid Unicode or (unless `allow_empty`) empty: the empty prompt
    samples unconditionally, which must be asked for."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: pass at least one prompt")
    for i, text in enumerate(prompts, 1):
        if not isinstance(text, str):
            raise ValueError(f"{where} {i}: {text!r} is not a string")
        check_text(text, f"{where} {i}")
        if not allow_empty and not text.strip():
            raise ValueError(
                f"{where} {i}: empty prompt (it samples unconditionally); pass "
                "--allow_empty_prompt (sample_to_folder(allow_empty_prompt=True)) to mean it"
            )
    return prompts


def check_text(text: str, where: str) -> str:
    """`text` if it is valid Unicode, else a ValueError naming `where` (`text_problem`)."""
    problem = text_problem(text)
    if problem:
        raise ValueError(f"{where}: {problem}; use UTF-8 text")
    return text


def sample_tokens(
    model: EncoderDecoder,
    params: PyTree,
    text: jax.Array,
    prompt_ids: jax.Array,
    sample_indices: jax.Array,
    *,
    seed: Any,
    guidance_scale: Any = None,
    unconditional_text: jax.Array | None = None,
    **sampling: Any,
) -> jax.Array:
    """Decoder tokens int32 [B, N] (codes + 1) for text tokens [B, L]: prefill, then
    `decoding.sample` (`sampling`: temperature, top_k, top_p, mesh). With guidance the
    unconditional rows are appended here: the empty prompt, [EOS], or
    `unconditional_text` [B, L] (a negative prompt per row) in its place. Pure: jit it."""
    if guidance_scale is not None:
        if unconditional_text is None:
            empty = jnp.zeros_like(text).at[:, 0].set(EOS_ID)
        else:
            empty = jnp.asarray(unconditional_text, text.dtype)
        text = jnp.concatenate([text, empty], axis=0)
    elif unconditional_text is not None:
        raise ValueError(
            "unconditional_text (a negative prompt) needs classifier-free guidance; set "
            "guidance_scale (SamplingConfig.guidance_scale, e.g. 1.2)"
        )
    tokens_to_logits, cache = make_tokens_to_logits(model, params, text)
    cfg = model.config
    out = decoding.sample(
        tokens_to_logits, cache, num_steps=cfg.num_image_tokens, prompt_ids=prompt_ids,
        sample_indices=sample_indices, seed=seed, guidance_scale=guidance_scale,
        num_valid_tokens=cfg.codebook_size + 1, **sampler_options(cfg), **sampling,
    )  # fmt: skip
    return out.tokens


def score_chunk_size(
    rows: int, num_tokens: int, vocab: int, budget: int = SCORE_CHUNK_BYTES
) -> int:
    """The largest divisor of `num_tokens` whose float32 logits [rows, chunk, vocab] fit in
    `budget` bytes (1 when none does)."""
    most = min(num_tokens, max(1, budget // (rows * vocab * 4)))
    return max(c for c in range(1, most + 1) if num_tokens % c == 0)


def token_scores(
    model: EncoderDecoder,
    params: PyTree,
    text: jax.Array,
    image_tokens: jax.Array,
    unconditional_text: jax.Array | None = None,
    unconditional_weight: Any = 1.0,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
    """Each row's mean log p(image_tokens | text) over the grid, float32 [B], minus
    `unconditional_weight` times that given `unconditional_text` when it is given (1: PMI).

    Teacher-forced on decoder tokens (codes + 1) [B, N] with ids 0 and the
    vocabulary padding masked as in sampling. The log-softmax runs `chunk_size`
    image tokens at a time (default `score_chunk_size`) through the training
    loss's `chunked_token_sums`, so the [B, N, V] logits never exist at once and
    only [B] floats leave the device. Pure: jit it.
    """
    cfg = model.config
    rows, length = image_tokens.shape
    ids = jnp.arange(cfg.decoder_vocab_size)
    valid = (ids > 0) & (ids <= cfg.codebook_size)
    chunk = chunk_size or score_chunk_size(rows, length, cfg.decoder_vocab_size)
    decoder_input = jnp.pad(image_tokens[:, :-1], ((0, 0), (1, 0)))  # BOS = 0 first
    variables = {"params": params}

    def project(hidden: jax.Array) -> jax.Array:
        return model.apply(variables, hidden, method=EncoderDecoder.logits_from_hidden)

    def row_sums(logits: jax.Array, targets: jax.Array) -> jax.Array:
        logits = jnp.where(valid, logits.astype(jnp.float32), -jnp.inf)
        chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(chosen - jax.nn.logsumexp(logits, axis=-1), axis=-1)

    def mean_log_prob(text: jax.Array) -> jax.Array:
        hidden = model.apply(variables, text, decoder_input, method=EncoderDecoder.hidden_states)
        sums = chunked_token_sums(hidden, project, (image_tokens,), row_sums, chunk, "chunk_size")
        return sums / length

    score = mean_log_prob(text)
    if unconditional_text is not None:
        score = score - unconditional_weight * mean_log_prob(unconditional_text)
    return score


def load_contrastive(path: str | os.PathLike | None) -> Any:
    """A `ContrastiveModel` from a train-contrastive work dir (None: None); its record
    goes into the generator's records."""
    if path is None:
        return None
    from parti_jax.contrastive.scorer import ContrastiveModel

    return ContrastiveModel.load(path)


# ------------------------------------------------------------------ generator


class Generator:
    """The loaded text-to-image pipeline; see the module docstring."""

    def __init__(
        self,
        models: LoadedModels,
        *,
        mesh: Mesh | None = None,
        rules: Any = "data_parallel",
        contrastive: Any = None,
    ) -> None:
        """Wraps `loading.LoadedModels` (the encoder-decoder's params on `mesh`; made by
        `Generator.load` or `parti_jax.load_bundle`); `mesh, rules`: where the
        encoder-decoder runs (default: local devices on 'data'); `contrastive`: a
        `ContrastiveModel` for scorer='contrastive'."""
        self.model_config, self.params = models.model_config, models.params
        # The reranker of scorer='contrastive' (a ContrastiveModel), when one was loaded.
        self.contrastive = contrastive
        self.text_tokenizer, self.image_tokenizer = models.text_tokenizer, models.image_tokenizer
        self.text_length, self.upsampler = int(models.text_length), models.upsampler
        self.records = dict(models.records)
        if contrastive is not None:
            self.records["contrastive"] = contrastive.record()
        self.mesh = mesh or local_mesh()
        self.rules = loading.rule_table(rules)
        self._model = EncoderDecoder(self.model_config)
        self._batch_devices = partitioning.batch_devices(self.mesh)
        self._rows = partitioning.batch_sharding(self.mesh)
        self._sample_fns: dict[tuple, Callable] = {}
        self._score_fn = jax.jit(functools.partial(token_scores, self._model))
        self._upsample_fn = None  # (images) -> images, with the upsampler's params replicated
        if self.upsampler is not None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            params = jax.device_put(self.upsampler.params, replicated)
            self._upsample_fn = functools.partial(self.upsampler.make_upsample_fn(), params)

    @classmethod
    def load(
        cls,
        t2i_workdir: str | os.PathLike,
        vqgan_path: str | os.PathLike,
        upsampler_path: str | os.PathLike | None = None,
        *,
        mesh: Mesh | None = None,
        rules: Any = "data_parallel",
        contrastive_path: str | os.PathLike | None = None,
        **options: Any,
    ) -> Generator:
        """The Generator of three work directories, loaded and cross-checked by
        `parti_jax.loading.load_models` (its Args: vocab_path, t2i_step,
        config_overrides, fingerprint); mesh default: local devices on 'data';
        `contrastive_path`: a `parti-jax train-contrastive` work dir (scorer='contrastive')."""
        mesh = mesh or local_mesh()
        models = loading.load_models(
            t2i_workdir, vqgan_path, upsampler_path, mesh=mesh, rules=rules, **options
        )
        return cls(models, mesh=mesh, rules=rules, contrastive=load_contrastive(contrastive_path))

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

    def sample_function(
        self, sampling_config: decoding.SamplingConfig, *, seed: int | None = None
    ) -> tuple[Callable, tuple[jax.Array, ...]]:
        """(fn, scalars): the jitted sampler for `sampling_config` and its scalar arguments.

        `fn(params, text [B, L], prompt_ids [B], sample_indices [B], seed, temperature,
        top_p, guidance_scale[, negative_text [B, L]]) -> decoder tokens int32 [B, N]`
        (codes + 1): which filters are on is compiled in, their values are arguments;
        `negative_text` (guided only) replaces the empty prompt of the unconditional
        rows. Call it under `partitioning.with_sharding_rules(self.mesh, self.rules)`.
        """
        cfg = sampling_config
        guided, greedy, top_p = cfg.guidance_scale is not None, cfg.temperature == 0, cfg.top_p
        key = (guided, greedy, cfg.top_k, top_p is not None)
        if key not in self._sample_fns:

            def fn(params, text, prompt_ids, sample_indices, seed, temperature, p, scale,
                   negative_text=None):  # fmt: skip
                return sample_tokens(
                    self._model, params, text, prompt_ids, sample_indices, seed=seed,
                    temperature=0.0 if greedy else temperature, top_k=cfg.top_k,
                    top_p=None if top_p is None else p, guidance_scale=scale if guided else None,
                    unconditional_text=negative_text, mesh=self.mesh,
                )  # fmt: skip

            self._sample_fns[key] = jax.jit(fn)
        scalars = (
            jnp.asarray(cfg.seed if seed is None else seed, jnp.int32),
            jnp.asarray(cfg.temperature if cfg.temperature else 1.0, jnp.float32),
            jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
            jnp.asarray(cfg.guidance_scale if guided else 1.0, jnp.float32),
        )
        return self._sample_fns[key], scalars

    def _padded(self, fn: Callable, rows: int, *arrays: np.ndarray) -> np.ndarray:
        """Runs fn(*row_arrays) on `rows`-row chunks (the last padded); host numpy out."""
        outs = []
        for start in range(0, arrays[0].shape[0], rows):
            part = [a[start : start + rows] for a in arrays]
            n = part[0].shape[0]
            part = [np.concatenate([a, np.repeat(a[-1:], rows - n, 0)]) for a in part]
            with partitioning.with_sharding_rules(self.mesh, self.rules):
                out = fn(*[jax.device_put(a, self._rows) for a in part])
            outs.append(np.asarray(jax.device_get(out))[:n])
        return np.concatenate(outs, axis=0)

    def likelihood_scorer(
        self, rows: int, *, unconditional_weight: float = 0.0
    ) -> rerank.LikelihoodScorer:
        """The model's own mean log-likelihood of its tokens given the prompt, minus
        `unconditional_weight` times that given the empty prompt (1: PMI), computed on
        the devices `rows` rows per call (`token_scores`)."""

        def score_fn(text, image_tokens, unconditional_text=None, weight=0.0):
            weight = jnp.asarray(weight, jnp.float32)
            arrays = [a for a in (text, image_tokens, unconditional_text) if a is not None]
            return self._padded(
                lambda t, x, u=None: self._score_fn(self.params, t, x, u, weight), rows, *arrays
            )

        return rerank.LikelihoodScorer(
            score_fn,
            lambda ps: self.encode_prompts(ps)[0],
            num_valid_tokens=self.model_config.codebook_size + 1,
            unconditional_weight=unconditional_weight,
        )

    def upsample(self, images: np.ndarray) -> np.ndarray:
        """VQGAN-resolution images -> upsampled (identity without an upsampler)."""
        if self._upsample_fn is None or images.shape[0] == 0:
            return images
        return self._padded(self._upsample_fn, self._batch_devices, images.astype(np.float32))

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
        progress: bool | Callable[[int, int], None] = False,
        negative_prompts: Sequence[str] | None = None,
    ) -> list[PromptResult]:
        """Samples, reranks and upsamples images for `prompts`; one PromptResult per prompt.

        Args:
          prompts: the texts (an empty list is an error).
          num_samples: draws per prompt (default sampling_config.num_samples).
          keep_top_k: how many of them to keep, best first.
          sampling_config: temperature, top-k/top-p, guidance_scale, num_samples, seed.
          seed: overrides sampling_config.seed.
          scorer: 'likelihood' (default), 'pmi', 'contrastive' (the loaded
            contrastive model), 'shapes_judge', 'none' (keep draw order) or an
            object with `score(images, prompts, *, image_tokens)`.
          batch_size: rows (prompt x sample draws) per device call, rounded up
            to a multiple of the mesh's batch devices; does not change the images.
          prompt_ids: global id of each prompt (default 0..P-1); the key of
            its randomness, so a prompt keeps its images in any batch or list.
          progress: show a tqdm bar over batches (True), or a callable called with
            (rows sampled, total rows) after each batch (a server's progress).
          negative_prompts: one per prompt (or one for all): the text whose
            unconditional rows guidance steers away from, in place of the empty
            prompt; needs guidance. "" is the empty prompt (the default's images).
            The 'pmi' scorer still subtracts the empty prompt's likelihood.
        """
        prompts = check_prompts(prompts)
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
        negative = self._negative_text(negative_prompts, prompts, cfg)
        total = len(prompts) * num_samples
        rows = self.rows_per_call(total, batch_size)
        row_prompt, row_sample = decoding.sample_ids(len(prompts), num_samples)
        scorer = resolve_scorer(
            scorer,
            likelihood=lambda w: self.likelihood_scorer(rows, unconditional_weight=w),
            contrastive=self.contrastive,
        )
        fn, scalars = self.sample_function(cfg, seed=seed)
        mc = self.model_config
        tokens = np.zeros((total, mc.num_image_tokens), np.int32)

        def finish(which: range) -> list[PromptResult]:
            """Decodes, scores and reranks the samples of prompts `which`; upsamples the kept."""
            toks = tokens[which.start * num_samples : which.stop * num_samples]
            codes = decoding.tokens_to_codes(toks, mc.codebook_size).reshape(-1, *mc.image_grid)
            low = self.image_tokenizer.decode(codes)
            keep, scores = rerank.score_and_rerank(
                scorer, low, [prompts[p] for p in which for _ in range(num_samples)],
                num_samples=num_samples, keep_top_k=keep_top_k, image_tokens=toks,
            )  # fmt: skip
            final = self.upsample(low[keep.reshape(-1)])
            final = final.reshape((len(which), keep_top_k, *final.shape[1:]))
            return [
                PromptResult(
                    prompt=prompts[p],
                    prompt_id=int(ids[p]),
                    seed=seed,
                    images=final[j],
                    low_res_images=low[keep[j]],
                    scores=np.asarray(scores[keep[j]], np.float32),
                    codes=codes[keep[j]],
                    sample_indices=(keep[j] % num_samples).astype(np.int32),
                    truncated=p in truncated,
                )
                for j, p in enumerate(which)
            ]

        batches = range(0, total, rows)
        report = progress if callable(progress) else None
        if progress and report is None:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-total // rows), unit="batch", desc="sampling")
        results: list[PromptResult] = []
        for start in batches:
            sl = slice(start, min(start + rows, total))
            row_arrays = [text[row_prompt[sl]], ids[row_prompt[sl]].astype(np.int32),
                          row_sample[sl]]  # fmt: skip
            if negative is not None:
                row_arrays.append(negative[row_prompt[sl]])
            tokens[sl] = self._padded(
                lambda *a: fn(self.params, *a[:3], *scalars, *a[3:]), rows, *row_arrays
            )
            if sl.stop // num_samples > len(results):  # prompts finished
                results += finish(range(len(results), sl.stop // num_samples))
            if report is not None:
                report(sl.stop, total)
        return results

    def _negative_text(
        self, negative_prompts: Sequence[str] | None, prompts: list[str], cfg: Any
    ) -> np.ndarray | None:
        """int32 [P, text_length] tokens of the negative prompts (one for all is repeated);
        None without any. Checked: strings, valid Unicode, guidance on."""
        if negative_prompts is None:
            return None
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts]
        negative = list(negative_prompts)
        if len(negative) == 1:
            negative = negative * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(
                f"negative_prompts: {len(negative)} given for {len(prompts)} prompts; pass one "
                "per prompt or a single one for all"
            )
        for i, text in enumerate(negative, 1):
            if not isinstance(text, str):
                raise ValueError(f"negative prompt {i}: {text!r} is not a string")
            check_text(text, f"negative prompt {i}")
        if cfg.guidance_scale is None:
            raise ValueError(
                "negative_prompts need classifier-free guidance (they replace its empty "
                "prompt): set SamplingConfig.guidance_scale (e.g. 1.2)"
            )
        tokens, truncated = self.encode_prompts(negative)
        if truncated:
            warnings.warn(
                f"{len(truncated)} negative prompt(s) longer than the encoder's "
                f"{self.text_length} text tokens were truncated",
                PromptTruncatedWarning,
                stacklevel=3,
            )
        return tokens.astype(np.int32)


# ------------------------------------------------------------------ output folder


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line (a UTF-8 BOM dropped, blank lines skipped); a file that cannot
    be read, is not UTF-8 or holds no prompt is an error naming it (and the line); a URL's
    file is read through storage."""
    prompts = []
    try:
        with storage.fetched(path, kind="file") as local:
            for line, text, problem in text_lines(local):
                if problem is None:
                    problem = text_problem(text)
                if problem:
                    raise ValueError(f"{path}:{line}: {problem}; write UTF-8, one prompt per line")
                if text.strip():
                    prompts.append(text.strip())
    except OSError as e:
        raise FileNotFoundError(
            f"{path}: cannot read the prompts file ({e.strerror or e})"
        ) from None
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
    """Writes `<out>/<prompt_id>_<rank>.png` (+ `low_res/` copies) and `manifest.json` (a
    folder or a URL: parti_jax/storage.py); returns the manifest: the models' records, the
    sampling settings and one entry per image."""
    from PIL import Image

    out = storage.path(out_dir)
    storage.makedirs(out)

    def save_png(name: str, image: np.ndarray) -> None:
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
        storage.write_bytes(out / name, buffer.getvalue())

    images = []
    for r in results:
        for rank in range(len(r.sample_indices)):
            name = f"{r.prompt_id}_{rank}.png"
            save_png(name, r.images[rank])
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
                save_png(low, r.low_res_images[rank])
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
    storage.write_json(out / "manifest.json", manifest, default=str)  # atomic
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
    allow_empty_prompt: bool = False,
    contrastive_path: str | None = None,
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
      scorer: 'likelihood', 'pmi', 'contrastive', 'shapes_judge', 'none' or a scorer object.
      save_low_res: also write the VQGAN's images to `low_res/`.
      vocab_path, t2i_step, config_overrides: see Generator.load.
      progress: tqdm progress bar.
      allow_empty_prompt: accept empty prompts (unconditional samples); else an error.
      contrastive_path: a `parti-jax train-contrastive` work dir: scorer='contrastive'
        needs it.
    Returns:
      The manifest written to `<workdir>/manifest.json`.
    """
    if (prompts is None) == (prompts_file is None):
        raise ValueError("pass exactly one of prompts or prompts_file")
    if prompts_file is not None:
        prompts = read_prompts_file(prompts_file)
    prompts = check_prompts(prompts, "prompt", allow_empty=allow_empty_prompt)
    cfg = sampling_config or decoding.SamplingConfig()
    # Checked before any model is loaded (generate checks them again).
    if not 1 <= keep_top_k <= cfg.num_samples:
        raise ValueError(
            f"sample.keep_top_k={keep_top_k} must be in [1, SamplingConfig.num_samples="
            f"{cfg.num_samples}]"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"sample.batch_size={batch_size} must be >= 1")
    check_scorer(scorer)
    if scorer == "contrastive" and contrastive_path is None:
        raise ValueError(
            "sample.scorer='contrastive' needs sample.contrastive_path (the work directory of "
            "`parti-jax train-contrastive`)"
        )
    generator = Generator.load(t2i_path, vqgan_path, upsampler_path, vocab_path=vocab_path,
                               t2i_step=t2i_step, config_overrides=config_overrides,
                               contrastive_path=contrastive_path)  # fmt: skip
    results = generator.generate(prompts, keep_top_k=keep_top_k, sampling_config=cfg,
                                 scorer=scorer, batch_size=batch_size, prompt_ids=prompt_ids,
                                 progress=progress)  # fmt: skip
    settings = dict(dataclasses.asdict(cfg), keep_top_k=keep_top_k, scorer=rerank.name_of(scorer))
    return write_results(
        results, workdir, records=generator.records, sampling=settings, save_low_res=save_low_res
    )
