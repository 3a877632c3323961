"""`parti_jax.Pipeline`: prompts in, PIL images out, in the style of diffusers.

    pipe = parti_jax.Pipeline.from_pretrained("/models/shapes")       # a bundle (or gs://)
    out = pipe("a red circle above a blue square", num_images=16, rerank="likelihood")
    out.images[0][0].save("best.png")      # prompt 0's images, best first
    pipe.save_pretrained("/models/copy")   # the `parti-jax export` format

Sources `from_pretrained` accepts, the first that fits:

- an export bundle (a folder or URL holding bundle.json: `parti-jax export`);
- a run folder holding `t2i/` and `vqgan/` work directories, plus `upsampler/`
  and `contrastive/` when present (the layout of `parti-jax demo`);
- a `parti-jax train` work directory, with `vqgan=` (default: the VQGAN whose
  codes it trained on, recorded in its model_config.json) and optionally
  `upsampler=`, `contrastive=`;
- a dict {'t2i', 'vqgan', 'upsampler', 'contrastive'} of work directories.

A call is `Generator.generate` (parti_jax/sampling.py) with the pipeline's
`sampling_config` (a bundle's `sampling_config.json`, else SamplingConfig())
as the default of each setting, so a seed draws exactly the codes of
`parti-jax sample` and `Bundle.generate` with the same settings.
`save_pretrained` writes with parti_jax/export.py: from work directories it
exports them; a bundle is copied file by file, each checked against the sha256
in its bundle.json. Loading never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parti_jax import bundle as bundle_lib
from parti_jax import storage

RERANKERS = ("likelihood", "pmi", "contrastive", "shapes_judge")
OUTPUT_TYPES = ("pil", "np")
PARTS = ("t2i", "vqgan", "upsampler", "contrastive")
# The work-directory record of each part (parti_jax/loading.py's KINDS).
_RECORDS = {
    "t2i": "model_config.json",
    "vqgan": "vqgan_meta.json",
    "upsampler": "upsampler_meta.json",
    "contrastive": "contrastive_meta.json",
}


@dataclasses.dataclass
class PipelineOutput:
    """What a Pipeline call returns; every field is per prompt, in prompt order."""

    # 'pil': one list of PIL images per prompt; 'np': float32 [P, k, H, W, 3] in [0, 1].
    # Best first when reranked, else in draw order.
    images: list[list[Any]] | np.ndarray
    scores: np.ndarray | None  # float32 [P, k], higher is better; None without reranking
    codes: np.ndarray  # int32 [P, k, grid_h, grid_w] codebook indices
    sample_indices: np.ndarray  # int32 [P, k]: which draw of the prompt each image is
    prompts: list[str]
    seed: int


class Pipeline:
    """A loaded text-to-image pipeline (see the module docstring); call it with prompts."""

    def __init__(
        self,
        generator: Any,
        *,
        sampling_config: Any = None,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        """Wraps a `sampling.Generator`; `sampling_config` is each call's default
        (None: SamplingConfig()); `source` records where it came from (`save_pretrained`
        writes from it: {'bundle': path} or the work directories)."""
        from parti_jax.decoding import SamplingConfig

        self.generator = generator
        self._sampling_config = sampling_config or SamplingConfig()
        self.source = dict(source or {})

    @property
    def sampling_config(self) -> Any:
        """The default settings of a call (a bundle's sampling_config.json)."""
        return self._sampling_config

    @property
    def records(self) -> dict[str, Any]:
        """Source checkpoints, steps and hashes (as in a `parti-jax sample` manifest)."""
        return self.generator.records

    # ------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | Mapping[str, Any],
        *,
        vqgan: str | os.PathLike | None = None,
        upsampler: str | os.PathLike | bool | None = None,
        contrastive: str | os.PathLike | bool | None = None,
        sampling_config: Any = None,
        t2i_step: int | None = None,
        vocab: str | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        mesh: Any = None,
        verify: bool = True,
    ) -> Pipeline:
        """Loads a bundle, a run folder, a t2i work directory or a dict of work directories.

        Args:
          path: see the module docstring (local or gs://).
          vqgan, upsampler, contrastive: work directories of those parts (not with a
            bundle, which holds its own). None: found in a run folder when there;
            False: leave the upsampler or contrastive model out.
          sampling_config: the calls' defaults (a `decoding.SamplingConfig`); a bundle's
            default is its sampling_config.json.
          t2i_step, vocab: the encoder-decoder's checkpoint step (default the latest)
            and SentencePiece model (default the one it trained with); work dirs only.
          config_overrides: ModelConfig fields to change, e.g. {'attention_impl': 'cudnn'}.
          mesh: where the encoder-decoder runs (default: the local devices).
          verify: a bundle's files are checked against bundle.json's sha256 first.
        """
        from parti_jax.sampling import Generator

        if not isinstance(path, Mapping) and (storage.path(path) / bundle_lib.BUNDLE_FILE).exists():
            given = [n for n, v in (("vqgan", vqgan), ("upsampler", upsampler),
                                    ("contrastive", contrastive), ("t2i_step", t2i_step),
                                    ("vocab", vocab)) if v not in (None, False)]  # fmt: skip
            if given:
                raise ValueError(
                    f"{path}: a bundle holds its own models; {', '.join(given)} apply to work "
                    "directories only: drop them, or pass the work directories"
                )
            bundle = bundle_lib.load_bundle(
                path, mesh=mesh, config_overrides=config_overrides, verify=verify
            )
            return cls(
                bundle.generator,
                sampling_config=sampling_config or bundle.sampling_config,
                source={"bundle": os.fspath(bundle.path)},
            )
        parts = _workdirs(path, vqgan=vqgan, upsampler=upsampler, contrastive=contrastive)
        generator = Generator.load(
            parts["t2i"], parts["vqgan"], parts["upsampler"], mesh=mesh,
            contrastive_path=parts["contrastive"], vocab_path=vocab, t2i_step=t2i_step,
            config_overrides=config_overrides,
        )  # fmt: skip
        source = dict(parts, vocab=vocab, t2i_step=t2i_step)
        return cls(generator, sampling_config=sampling_config, source=source)

    # ------------------------------------------------------------- calling

    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images: int | None = None,
        *,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        seed: int | None = None,
        rerank: str | Any | None = None,
        keep: int | None = None,
        output_type: str = "pil",
        sampling_config: Any = None,
        batch_size: int | None = None,
        progress: bool | Callable[[int, int], None] = False,
    ) -> PipelineOutput:
        """Draws `num_images` images per prompt; returns them (reranked when asked).

        Args:
          prompt: one prompt or a list of them (sampled together, in batches).
          num_images: draws per prompt (default sampling_config.num_samples).
          guidance_scale, temperature, top_k, top_p, seed: override the defaults
            (`sampling_config`, else the pipeline's). Guidance off:
            sampling_config=SamplingConfig(guidance_scale=None).
          negative_prompt: text guidance steers away from, in place of the empty
            prompt of classifier-free guidance (one for all prompts, or one per
            prompt); "" is the default.
          rerank: None (draw order), 'likelihood', 'pmi', 'contrastive' (a bundle or
            work dir with a contrastive model), 'shapes_judge', or a scorer object.
          keep: how many images to return per prompt, best first (default all).
          output_type: 'pil' (PIL images) or 'np' (float32 arrays in [0, 1]).
          sampling_config: a `decoding.SamplingConfig` in place of the pipeline's default.
          batch_size: rows per device call (does not change the images).
          progress: a tqdm bar (True) or a callable (rows done, total rows).
        """
        from parti_jax.decoding import SamplingConfig

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        base = sampling_config or self._sampling_config
        if not isinstance(base, SamplingConfig):
            raise TypeError(f"sampling_config: a decoding.SamplingConfig, got {type(base)}")
        given = {"guidance_scale": guidance_scale, "temperature": temperature, "top_k": top_k,
                 "top_p": top_p, "seed": seed, "num_samples": num_images}  # fmt: skip
        _check_numbers(given)
        cfg = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
        draws = cfg.num_samples
        keep = draws if keep is None else keep
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= draws:
            raise ValueError(f"keep={keep!r}: an integer in [1, num_images={draws}]")
        if rerank is not None and isinstance(rerank, str) and rerank not in RERANKERS:
            raise ValueError(f"rerank={rerank!r}: expected None or one of {RERANKERS}")
        if negative_prompt is not None and cfg.guidance_scale is None:
            raise ValueError(
                "negative_prompt needs classifier-free guidance (it replaces the guidance's "
                "empty prompt): pass guidance_scale=, e.g. 1.2"
            )
        results = self.generator.generate(
            prompts, num_samples=draws, keep_top_k=keep, sampling_config=cfg,
            scorer="none" if rerank is None else rerank, batch_size=batch_size,
            progress=progress, negative_prompts=negative_prompt,
        )  # fmt: skip
        if output_type == "pil":
            images = [[_to_pil(x) for x in r.images] for r in results]
        else:
            images = np.stack([r.images for r in results]).astype(np.float32)
        return PipelineOutput(
            images=images,
            scores=None if rerank is None else np.stack([r.scores for r in results]),
            codes=np.stack([r.codes for r in results]),
            sample_indices=np.stack([r.sample_indices for r in results]),
            prompts=prompts,
            seed=cfg.seed,
        )

    # ------------------------------------------------------------- saving

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        jax_export: bool = True,
        platforms: Sequence[str] | None = None,
        export_batch_size: int | None = None,
    ) -> dict[str, Any]:
        """Writes the pipeline as a bundle (`parti-jax export`'s format) to `directory`
        (a folder or a URL); returns its bundle.json. `from_pretrained(directory)` loads
        it back and draws the same images for a seed.

        From work directories this is `export.export_bundle` of them, with this
        pipeline's `sampling_config` (`jax_export`, `platforms`, `export_batch_size`
        as there). From a bundle the bundle's files are copied, each checked
        against its sha256 (the export options do not apply: it is the same bundle).
        """
        from parti_jax import export

        if "bundle" in self.source:
            return _copy_bundle(self.source["bundle"], directory, overwrite=overwrite)
        s = self.source
        return export.export_bundle(
            directory, t2i_path=s["t2i"], vqgan_path=s["vqgan"], upsampler_path=s["upsampler"],
            contrastive_path=s["contrastive"], vocab_path=s.get("vocab"),
            t2i_step=s.get("t2i_step"), sampling_config=self._sampling_config,
            jax_export=jax_export, platforms=platforms, export_batch_size=export_batch_size,
            overwrite=overwrite,
        )  # fmt: skip

    def __repr__(self) -> str:
        where = self.source.get("bundle") or self.source.get("t2i")
        return f"Pipeline({where!r}, sampling_config={self._sampling_config})"


# ------------------------------------------------------------------ helpers


def _check_numbers(given: Mapping[str, Any]) -> None:
    """Each given setting is a number of the right kind (the error names the argument)."""
    for name, value in given.items():
        if value is None:
            continue
        integral = name in ("top_k", "seed", "num_samples")
        ok = not isinstance(value, bool) and isinstance(
            value, (int, np.integer) if integral else (int, float, np.integer, np.floating)
        )
        if not ok or (not integral and not np.isfinite(value)):
            shown = "num_images" if name == "num_samples" else name
            kind = "an integer" if integral else "a finite number"
            raise ValueError(f"{shown}={value!r}: expected {kind}")
    if given.get("num_samples") is not None and given["num_samples"] < 1:
        raise ValueError(f"num_images={given['num_samples']}: must be >= 1")


def _to_pil(image: np.ndarray) -> Any:
    from PIL import Image

    from parti_jax.sampling import to_uint8

    return Image.fromarray(to_uint8(image))


def _is_workdir(path: storage.Path, part: str) -> bool:
    return (path / _RECORDS[part]).is_file()


def _workdirs(
    path: str | os.PathLike | Mapping[str, Any], *, vqgan: Any, upsampler: Any, contrastive: Any
) -> dict[str, str | None]:
    """{'t2i', 'vqgan', 'upsampler', 'contrastive'} work directories (None: absent)."""
    keywords = {"vqgan": vqgan, "upsampler": upsampler, "contrastive": contrastive}
    if isinstance(path, Mapping):
        unknown = sorted(set(path) - set(PARTS))
        if unknown or "t2i" not in path:
            raise ValueError(
                f"from_pretrained: the dict's keys are {list(PARTS)} ('t2i' and 'vqgan' "
                f"required); got {sorted(path)}"
            )
        found = {k: path.get(k) for k in PARTS}
        for k, v in keywords.items():
            if v not in (None, False) and found[k] is not None:
                raise ValueError(f"from_pretrained: {k} given twice (in the dict and as {k}=)")
            found[k] = v if found[k] is None else found[k]
    else:
        root = storage.path(path)
        if _is_workdir(root / "t2i", "t2i"):  # a run folder (the demo's layout)
            found = {"t2i": root / "t2i"}
            for part in ("vqgan", "upsampler", "contrastive"):
                inside = root / part
                found[part] = keywords[part]
                if found[part] is None and _is_workdir(inside, part):
                    found[part] = inside
        elif _is_workdir(root, "t2i"):
            found = {"t2i": root, **keywords}
            if vqgan is None:
                found["vqgan"] = _trained_on_vqgan(root)
        else:
            raise FileNotFoundError(
                f"{root}: not a bundle (no {bundle_lib.BUNDLE_FILE}), a run folder (no "
                f"t2i/{_RECORDS['t2i']}) or a `parti-jax train` work directory (no "
                f"{_RECORDS['t2i']}); pass the folder written by `parti-jax export`, "
                "`parti-jax demo` or `parti-jax train`"
            )
    out: dict[str, str | None] = {}
    for part in PARTS:
        value = found.get(part)
        if value is False or value is None:
            if part in ("t2i", "vqgan"):
                raise ValueError(
                    f"from_pretrained: no {part} work directory; pass {part}= (the work "
                    f"directory of `parti-jax {'train' if part == 't2i' else 'train-vqgan'}`)"
                )
            out[part] = None
        else:
            out[part] = os.fspath(value)
    return out


def _trained_on_vqgan(t2i: storage.Path) -> storage.Path:
    """The VQGAN work directory whose codes the encoder-decoder trained on (its
    model_config.json's codes_meta.vqgan_checkpoint is `<vqgan>/checkpoints/<step>`)."""
    from parti_jax import loading

    info, record = loading.read_record(t2i, loading.T2I)
    checkpoint = (info.get("codes_meta") or {}).get("vqgan_checkpoint")
    if checkpoint:
        workdir = storage.path(checkpoint).parent.parent
        if _is_workdir(workdir, "vqgan"):
            return workdir
    raise ValueError(
        f"{record}: its codes_meta names no VQGAN work directory that exists here "
        f"({checkpoint!r}); pass vqgan= (the work directory of `parti-jax train-vqgan`)"
    )


def _copy_bundle(
    source: str | os.PathLike, directory: str | os.PathLike, *, overwrite: bool
) -> dict[str, Any]:
    """Copies the bundle at `source` to `directory` (a folder or a URL) the way export
    publishes one: into a temporary folder, every listed file checked against its
    sha256, then moved into place (a URL: uploaded, bundle.json last)."""
    from parti_jax import export

    src = storage.path(source)
    info = bundle_lib.read_bundle_info(src)
    out = storage.path(directory)
    if os.fspath(out) == os.fspath(src):
        raise ValueError(f"{out}: the pipeline was loaded from there; save to another directory")
    export.check_destination(out, overwrite=overwrite)

    def fill(tmp: Path) -> None:
        for name in [*info["files"], bundle_lib.BUNDLE_FILE]:
            with storage.open(src / name, "rb") as f, open(tmp / name, "wb") as g:
                shutil.copyfileobj(f, g, 16 << 20)
        bundle_lib.verify_files(tmp, info)  # what was read is what export wrote

    export.publish(out, fill)
    return info
