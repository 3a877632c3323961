"""Stand-in generators with `parti_jax.sampling.Generator.generate`'s interface, for suite tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from parti_jax.data import shapes
from parti_jax.eval import shapes_suite


@dataclasses.dataclass
class Result:
    prompt: str
    prompt_id: int
    images: list[np.ndarray]
    scores: list[float] | None
    sample_indices: list[int] | None = None  # which draw each kept image is


class RecordingGenerator:
    """Deterministic images per (seed, prompt_id, sample); records every call."""

    def __init__(self, size: int = 8):
        self.size = size
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompts, *, num_samples, keep_top_k, sampling_config, seed, scorer=None,
                 batch_size=None, prompt_ids=None):  # fmt: skip
        self.calls.append(
            dict(prompts=list(prompts), prompt_ids=list(prompt_ids), num_samples=num_samples,
                 keep_top_k=keep_top_k, seed=seed, scorer=scorer, batch_size=batch_size)
        )  # fmt: skip
        out = []
        for prompt, pid in zip(prompts, prompt_ids):
            samples = []
            for s in range(num_samples):
                rng = np.random.default_rng([seed, pid, s])
                samples.append(rng.uniform(size=(self.size, self.size, 3)).astype(np.float32))
            scores = [float(im.mean()) for im in samples]
            order = np.argsort(scores)[::-1][:keep_top_k]
            kept = [int(i) for i in order]
            out.append(
                Result(prompt, pid, [samples[i] for i in kept], [scores[i] for i in kept], kept)
            )
        return out

    @property
    def prompt_ids(self) -> list[int]:
        return [p for c in self.calls for p in c["prompt_ids"]]


class SceneGenerator:
    """Draws each shapes caption's own scene (the "perfect generator"), or a recoloured one."""

    def __init__(self, scenes: Sequence[shapes_suite.ShapesScene], *, resolution: int = 64,
                 wrong_color: bool = False):  # fmt: skip
        self.by_id = {s.prompt_id: s for s in scenes}
        self.resolution = resolution
        self.wrong_color = wrong_color
        self.calls = 0

    def _spec(self, scene: shapes_suite.ShapesScene) -> shapes.SceneSpec:
        spec = scene.spec
        if not self.wrong_color:
            return spec
        used = {o.color for o in spec.objects}
        spare = [c for c in shapes.COLORS if c not in used]
        objects = tuple(dataclasses.replace(o, color=spare[i]) for i, o in enumerate(spec.objects))
        return dataclasses.replace(spec, objects=objects)

    def generate(self, prompts, *, num_samples, keep_top_k, sampling_config, seed, scorer=None,
                 batch_size=None, prompt_ids=None):  # fmt: skip
        self.calls += 1
        out = []
        for prompt, pid in zip(prompts, prompt_ids):
            scene = self.by_id[pid]
            assert scene.caption == prompt
            image = shapes.render(self._spec(scene), self.resolution).astype(np.float32) / 255.0
            out.append(Result(prompt, pid, [image] * keep_top_k, None))
        return out
