"""Instruments that look inside a trained encoder-decoder (`parti-jax inspect`).

Five views, each a plain function of loaded models that returns JSON-ready
dicts (`inspection_report.py` draws them as one self-contained HTML page):

- `scene_views`: for sampled images, every caption word's cross-attention over
  the image grid (per decoder layer and averaged over layers and heads), and per
  position the probability the model gave the chosen code, its entropy and its
  top alternatives, decoded as patches (`alternative_patches`).
- `teacher_forced_probes`: on scenes whose true image is known (the shapes
  world), the true image's codes are fed to the decoder; where in raster order
  the first object patch the model would get wrong sits, what it preferred
  there (the preferred patch's colour read back by the judge's colour rule)
  and how much probability the true code had.
- `linear_probes`: logistic-regression probes on the text encoder's states, trained on
  captions of seen (colour, shape) pairs, read "colour / shape of object k"
  back on captions of seen pairs and of held-out pairs.
- `tokenizer_check`: the VQGAN's reconstructions of held-out scenes judged
  against their captions, and how many codes of held-out images never occur as
  targets in the encoder-decoder's training codes.

Decoder slot t holds the code of cell t - 1 and predicts cell t, so slot t's
cross-attention row is where the model looked while choosing cell t: every
per-position view here is indexed by cell.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# Cells whose true patch has a pixel brighter than this (the world's background is
# black) hold part of an object.
OBJECT_PIXEL = 0.2


@dataclasses.dataclass
class Inspector:
    """A loaded encoder-decoder + VQGAN with the teacher-forced instrumented pass jitted."""

    models: Any  # loading.LoadedModels
    mesh: Any

    def __post_init__(self) -> None:
        import jax

        from parti_jax import loading
        from parti_jax.models.transformer import EncoderDecoder

        self.config = self.models.model_config
        self.rules = loading.rule_table("data_parallel")
        model = EncoderDecoder(self.config)

        def run(params, text, decoder_in):
            encoded, logits, attention = model.apply(
                {"params": params}, text, decoder_in, method=EncoderDecoder.inspect
            )
            codes = self.config.codebook_size
            log_probs = jax.nn.log_softmax(logits.astype("float32")[..., 1 : codes + 1], axis=-1)
            return encoded.astype("float32"), log_probs, attention

        self._run = jax.jit(run)

    @classmethod
    def load(
        cls, t2i_workdir: str | os.PathLike, vqgan_workdir: str | os.PathLike, **kw: Any
    ) -> Inspector:
        """Loads the work dirs with `loading.load_models` (float32 on the local devices)."""
        from parti_jax import loading
        from parti_jax.vqgan.tokenizer import local_mesh

        mesh = local_mesh()
        models = loading.load_models(
            t2i_workdir, vqgan_workdir, mesh=mesh, fingerprint=False,
            config_overrides={"dtype": "float32", "attention_impl": "xla"}, **kw,
        )  # fmt: skip
        return cls(models, mesh)

    @property
    def text_tokenizer(self) -> Any:
        return self.models.text_tokenizer

    @property
    def image_tokenizer(self) -> Any:
        return self.models.image_tokenizer

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        return self.text_tokenizer.encode_batch(list(captions), self.models.text_length)[0]

    def teacher_forced(
        self, captions: Sequence[str], codes: np.ndarray, *, batch: int = 64
    ) -> dict[str, np.ndarray]:
        """The instrumented pass over `codes` [B, h, w] (0-based) given `captions`.

        Returns text ids [B, Lt], encoded [B, Lt, D], log-probabilities over the
        codebook [B, N, K] (index = code) and cross-attention [L, B, heads, N, Lt].
        """
        from parti_jax import partitioning

        text = self.encode_text(captions)
        flat = np.asarray(codes, np.int32).reshape(len(captions), -1)
        decoder_in = np.concatenate([np.zeros_like(flat[:, :1]), flat[:, :-1] + 1], axis=1)
        parts: list[tuple[np.ndarray, ...]] = []
        for s in range(0, len(captions), batch):
            with partitioning.with_sharding_rules(self.mesh, self.rules):
                out = self._run(self.models.params, text[s : s + batch], decoder_in[s : s + batch])
            parts.append(tuple(np.asarray(o) for o in out))
        encoded, log_probs, attention = (
            np.concatenate([p[i] for p in parts], axis=1 if i == 2 else 0) for i in range(3)
        )
        return {"text": text, "encoded": encoded, "log_probs": log_probs, "attention": attention}

    def sample(
        self, captions: Sequence[str], *, temperature: float, guidance_scale: float | None,
        seed: int, prompt_ids: Sequence[int] | None = None,
    ) -> np.ndarray:  # fmt: skip
        """One draw per caption, as `parti-jax sample` draws it: codes int32 [B, h, w]."""
        from parti_jax import decoding
        from parti_jax.sampling import Generator

        if not hasattr(self, "_generator"):
            self._generator = Generator(self.models, mesh=self.mesh)
        cfg = decoding.SamplingConfig(
            temperature=temperature, guidance_scale=guidance_scale, num_samples=1, seed=seed
        )
        results = self._generator.generate(
            list(captions), sampling_config=cfg, scorer="none", prompt_ids=prompt_ids
        )
        return np.stack([r.codes[0] for r in results])


# ----------------------------------------------------------------- caption words
def caption_words(tokenizer: Any, ids: Sequence[int]) -> tuple[list[str], list[int]]:
    """(words, word index of each token) for one caption's ids (EOS is its own word
    '</s>'; padding gets -1). A SentencePiece piece starting with '▁' starts a word."""
    words: list[str] = []
    owner: list[int] = []
    for i in ids:
        i = int(i)
        if i == 0:
            owner.append(-1)
            continue
        if i == tokenizer.eos_id:
            words.append("</s>")
            owner.append(len(words) - 1)
            continue
        piece = tokenizer.id_to_piece(i)
        if piece.startswith("▁") or not words or words[-1] == "</s>":
            words.append(piece.lstrip("▁"))
        else:
            words[-1] += piece
        owner.append(len(words) - 1)
    # A bare '▁' piece followed by the word's pieces makes an empty word: merge it on.
    return words, owner


def word_attention(attention: np.ndarray, owner: Sequence[int], num_words: int) -> np.ndarray:
    """Cross-attention of one caption [L, heads, N, Lt] -> per word [L, W, N] (heads
    averaged, a word's pieces summed)."""
    per_token = attention.mean(axis=1)  # [L, N, Lt]
    out = np.zeros((per_token.shape[0], num_words, per_token.shape[1]), np.float32)
    for t, w in enumerate(owner):
        if w >= 0:
            out[:, w] += per_token[:, :, t]
    return out


# ------------------------------------------------------------------ scene views
def position_stats(log_probs: np.ndarray, chosen: np.ndarray, top: int = 3) -> dict[str, Any]:
    """Per cell of one image: p(chosen code), entropy (nats), the `top` most likely codes."""
    p = np.exp(log_probs)
    n = np.arange(len(chosen))
    entropy = -(p * log_probs).sum(-1)
    order = np.argsort(-p, axis=-1)[:, :top]
    return {
        "p_chosen": p[n, chosen].astype(float).round(4).tolist(),
        "entropy": entropy.astype(float).round(4).tolist(),
        "top_codes": order.astype(int).tolist(),
        "top_p": np.take_along_axis(p, order, -1).astype(float).round(4).tolist(),
    }


def alternative_patches(
    image_tokenizer: Any,
    codes: np.ndarray,
    cells: Sequence[int],
    alternatives: Sequence[Sequence[int]],
) -> np.ndarray:
    """Decoded patches [len(cells), A, ph, pw, 3]: the image `codes` [h, w] with cell c's
    code replaced by each alternative, cropped to that cell (the decoder's local
    attention sees the neighbours, so the patch is drawn in context)."""
    h, w = codes.shape
    variants = []
    for c, alts in zip(cells, alternatives, strict=True):
        for a in alts:
            v = codes.copy().reshape(-1)
            v[c] = a
            variants.append(v.reshape(h, w))
    if not variants:
        return np.zeros((0, 0, 0, 0, 3), np.float32)
    images = image_tokenizer.decode(np.stack(variants))
    ph, pw = images.shape[1] // h, images.shape[2] // w
    patches = [
        images[i, (c // w) * ph : (c // w + 1) * ph, (c % w) * pw : (c % w + 1) * pw]
        for i, c in enumerate(c for c, alts in zip(cells, alternatives) for _ in alts)
    ]
    return np.stack(patches).reshape(len(cells), -1, ph, pw, 3)


def scene_views(
    inspector: Inspector,
    captions: Sequence[str],
    codes: np.ndarray,
    *,
    num_alternative_cells: int = 6,
) -> list[dict[str, Any]]:
    """For each caption and its sampled codes [B, h, w]: the decoded image, per-word
    cross-attention [L, W, N] and its layer mean, position stats, and for the
    `num_alternative_cells` least likely chosen cells the top-3 alternatives as patches."""
    tf = inspector.teacher_forced(captions, codes)
    images = inspector.image_tokenizer.decode(codes)
    out = []
    for b, caption in enumerate(captions):
        words, owner = caption_words(inspector.text_tokenizer, tf["text"][b])
        att = word_attention(tf["attention"][:, b], owner, len(words))
        chosen = codes[b].reshape(-1)
        stats = position_stats(tf["log_probs"][b], chosen)
        cells = np.argsort(stats["p_chosen"])[:num_alternative_cells].tolist()
        alts = [stats["top_codes"][c] for c in cells]
        patches = alternative_patches(inspector.image_tokenizer, codes[b], cells, alts)
        out.append({
            "caption": caption, "words": words, "image": images[b],
            "attention": att, "attention_mean": att.mean(axis=0), "positions": stats,
            "alternatives": {"cells": cells, "codes": alts, "patches": patches},
        })  # fmt: skip
    return out


# ------------------------------------------------------------ teacher-forced probes
def patch_color(patch: np.ndarray) -> str | None:
    """The judge's colour name of a patch's object pixels (None: background only)."""
    from parti_jax.data.judge import JudgeConfig, _classify_color

    pixels = patch.reshape(-1, 3)
    bright = pixels[pixels.max(axis=-1) > OBJECT_PIXEL]
    if len(bright) == 0:
        return None
    return _classify_color(bright.mean(axis=0), JudgeConfig())


def code_colors(image_tokenizer: Any) -> list[str | None]:
    """Each code's colour name: the judge's colour of the middle patch of an image whose
    every cell holds that code (None: background or no palette colour)."""
    h, w = image_tokenizer.grid
    k = image_tokenizer.codebook_size
    names: list[str | None] = []
    for start in range(0, k, 256):
        codes = np.arange(start, min(k, start + 256))
        images = image_tokenizer.decode(np.broadcast_to(codes[:, None, None], (len(codes), h, w)))
        ph, pw = images.shape[1] // h, images.shape[2] // w
        r, c = h // 2, w // 2
        names += [patch_color(im[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]) for im in images]
    return names


def object_cells(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """bool [h * w]: cells of `image` [H, W, 3] in [0, 1] holding object pixels."""
    h, w = grid
    ph, pw = image.shape[0] // h, image.shape[1] // w
    cells = image[: h * ph, : w * pw].reshape(h, ph, w, pw, 3).max(axis=(1, 3, 4))
    return (cells > OBJECT_PIXEL).reshape(-1)


def teacher_forced_probes(
    inspector: Inspector, scenes: Sequence[Any], images: np.ndarray,
    colors: Sequence[str | None] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per scene (an object with `caption` and `spec`) and its true image [B, H, W, 3]
    in [0, 1]: the first object cell, the first object cell whose true code is not
    the model's argmax, the code it preferred there with both patches' colours, and
    p(true code) along the raster order. With `colors` (`code_colors`), the model's
    probability mass at the first object cell on codes of the caption's first colour,
    on background codes and on other colours."""
    tok = inspector.image_tokenizer
    codes = tok.encode(images)
    grid = tuple(codes.shape[1:])
    tf = inspector.teacher_forced([s.caption for s in scenes], codes)
    recon = tok.decode(codes)
    out = []
    preferred_images = {}
    for b, scene in enumerate(scenes):
        true = codes[b].reshape(-1)
        lp = tf["log_probs"][b]
        argmax = lp.argmax(-1)
        objects = object_cells(recon[b], grid)
        wrong = objects & (argmax != true)
        first_object = int(np.argmax(objects)) if objects.any() else None
        first_wrong = int(np.argmax(wrong)) if wrong.any() else None
        p_true = np.exp(lp[np.arange(len(true)), true])
        looks = None
        stated = caption_objects(scene.caption)
        if first_object is not None and stated:
            words, owner = caption_words(inspector.text_tokenizer, tf["text"][b])
            att = word_attention(tf["attention"][:, b], owner, len(words)).mean(0)
            _, _, ci, si = stated[0]
            looks = {"color_word": float(att[ci, first_object]),
                     "shape_word": float(att[si, first_object])}  # fmt: skip
        mass = None
        if colors is not None and first_object is not None:
            p = np.exp(lp[first_object])
            stated = caption_objects(scene.caption)
            want = stated[0][0] if stated else None
            mass = {
                "stated_color": float(p[[c == want for c in colors]].sum()) if want else None,
                "background": float(p[[c is None for c in colors]].sum()),
            }
            mass["other_color"] = 1.0 - (mass["stated_color"] or 0.0) - mass["background"]
        row = {
            "caption": scene.caption,
            "first_object_cell": first_object,
            "first_wrong_object_cell": first_wrong,
            "wrong_at_first_object_cell": first_wrong is not None and first_wrong == first_object,
            "p_true_first_object_cell": None
            if first_object is None
            else float(p_true[first_object]),
            "first_object_cell_mass": mass,
            # Cross-attention (layers and heads averaged) of the first object cell on the
            # first object's colour word and shape word.
            "first_object_cell_attention": looks,
            "object_cell_accuracy": float((argmax == true)[objects].mean())
            if objects.any()
            else None,
            "p_true": p_true.astype(float).round(4).tolist(),
            "objects": objects.astype(int).tolist(),
        }
        if first_wrong is not None:
            v = true.copy()
            v[first_wrong] = argmax[first_wrong]
            preferred_images[b] = (first_wrong, v.reshape(grid))
            row["preferred_code"] = int(argmax[first_wrong])
            row["true_code"] = int(true[first_wrong])
        out.append(row)
    if preferred_images:
        keys = sorted(preferred_images)
        decoded = tok.decode(np.stack([preferred_images[k][1] for k in keys]))
        h, w = grid
        ph, pw = decoded.shape[1] // h, decoded.shape[2] // w
        for k, image in zip(keys, decoded, strict=True):
            c = preferred_images[k][0]
            r0, c0 = (c // w) * ph, (c % w) * pw
            preferred, truth = (
                image[r0 : r0 + ph, c0 : c0 + pw],
                recon[k][r0 : r0 + ph, c0 : c0 + pw],
            )
            out[k]["preferred_color"] = patch_color(preferred)
            out[k]["true_color"] = patch_color(truth)
            out[k]["patches"] = {"preferred": preferred, "true": truth}
    return out


def summarize_probes(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rates over probe rows: where the first error sits, what the model preferred."""
    n = len(rows)
    wrong = [r for r in rows if r["first_wrong_object_cell"] is not None]
    with_color = [r for r in wrong if r.get("true_color") is not None]

    def mean(values: Iterable[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "scenes": n,
        "scenes_with_an_object_error": len(wrong),
        "first_error_at_first_object_cell": mean(
            float(r["wrong_at_first_object_cell"]) for r in wrong
        ),
        "mean_p_true_first_object_cell": mean(r["p_true_first_object_cell"] for r in rows),
        "object_cell_accuracy": mean(r["object_cell_accuracy"] for r in rows),
        "preferred_color_is_true_color": mean(
            float(r["preferred_color"] == r["true_color"]) for r in with_color
        ),
        "mean_first_error_cell": mean(r["first_wrong_object_cell"] for r in wrong),
        "preferred_background": mean(float(r["preferred_color"] is None) for r in with_color),
        **{
            f"first_object_cell_mass_{k}": mean(
                (r["first_object_cell_mass"] or {}).get(k) for r in rows
            )
            for k in ("stated_color", "background", "other_color")
        },
        **{
            f"first_object_cell_attention_{k}": mean(
                (r["first_object_cell_attention"] or {}).get(k) for r in rows
            )
            for k in ("color_word", "shape_word")
        },
    }


# ------------------------------------------------------------------- linear probes
def caption_objects(caption: str) -> list[tuple[str, str, int, int]]:
    """(colour, shape, colour word index, shape word index) of each object in mention
    order: the k-th colour word and the k-th shape word of the caption."""
    from parti_jax.data.shapes import COLORS, SHAPES

    words = [w.strip(",.:;") for w in caption.split()]
    colors = [(i, w) for i, w in enumerate(words) if w in COLORS]
    shapes = [(i, w) for i, w in enumerate(words) if w in SHAPES]
    return [(c, s, ci, si) for (ci, c), (si, s) in zip(colors, shapes)]


def _probe_fit(x: np.ndarray, labels: np.ndarray, classes: int, *, l2: float = 1e-3,
               steps: int = 300, lr: float = 0.5):  # fmt: skip
    """A multinomial logistic-regression probe (standardised features, L2, full-batch
    gradient descent): returns predict(features) -> class indices."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], axis=1)
    y = np.eye(classes)[labels]
    w = np.zeros((z.shape[1], classes))
    for _ in range(steps):
        logits = z @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= lr * (z.T @ (p - y) / len(z) + l2 * w)
    return lambda q: (np.concatenate([(q - mu) / sd, np.ones((len(q), 1))], axis=1) @ w).argmax(1)


def _features(inspector: Inspector, captions: Sequence[str]) -> list[dict[str, Any]]:
    """Per caption: mean-pooled encoder state, and per object the state at its colour
    word and at its shape word (the last piece of each)."""
    ids = inspector.encode_text(captions)
    encoded = _encode(inspector, ids)
    out = []
    for b, caption in enumerate(captions):
        words, owner = caption_words(inspector.text_tokenizer, ids[b])
        valid = np.asarray(owner) >= 0
        last_piece = {w: t for t, w in enumerate(owner) if w >= 0}
        objs = []
        for color, shape, ci, si in caption_objects(caption):
            if ci not in last_piece or si not in last_piece or words[si].strip(",.:;") != shape:
                continue  # the caption's words and the pieces disagree: skip the object
            objs.append({
                "color": color, "shape": shape,
                "at_color": encoded[b, last_piece[ci]], "at_shape": encoded[b, last_piece[si]],
            })  # fmt: skip
        out.append({"pooled": encoded[b][valid].mean(0), "objects": objs})
    return out


def _encode(inspector: Inspector, ids: np.ndarray) -> np.ndarray:
    import jax

    from parti_jax.models.transformer import EncoderDecoder

    if not hasattr(inspector, "_encode_fn"):
        model = EncoderDecoder(inspector.config)
        inspector._encode_fn = jax.jit(
            lambda p, t: model.apply({"params": p}, t, method=EncoderDecoder.encode)
        )
    return np.concatenate([
        np.asarray(inspector._encode_fn(inspector.models.params, ids[s : s + 256]), np.float32)
        for s in range(0, len(ids), 256)
    ])  # fmt: skip


def linear_probes(
    inspector: Inspector, *, num_train: int = 1500, num_test: int = 400, world_seed: int = 0,
    heldout_pairs: Sequence[tuple[str, str]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Is 'colour / shape of object k' linearly decodable from the text encoding?

    Logistic-regression probes are fitted on `num_train` 'train' captions (seen pairs only)
    and read back on `num_test` 'validation' captions (seen pairs) and on objects
    of 'heldout' captions whose (colour, shape) pair was never seen. Features: the
    mean-pooled states, and the states at the object's colour word and shape word.
    Object k is the k-th object the caption mentions.
    """
    from parti_jax.data import shapes

    world = shapes.ShapesWorldConfig()
    held = set(heldout_pairs or world.heldout_pairs())
    colors, shape_names = list(shapes.COLORS), list(shapes.SHAPES)

    def captions(split: str, n: int, offset: int = 0) -> list[str]:
        return [shapes.generate_scene(offset + i, split, world_seed, world)[1] for i in range(n)]

    train = _features(inspector, captions("train", num_train, offset=50_000))
    tests = {
        "seen_pairs": _features(inspector, captions("validation", num_test, offset=50_000)),
        "heldout_pairs": _features(inspector, captions("heldout", num_test, offset=50_000)),
    }
    results: dict[str, Any] = {}
    for k in (0, 1):
        for attribute, names in (("color", colors), ("shape", shape_names)):
            for feature in ("pooled", "at_color", "at_shape"):

                def rows(feats, pick=None, k=k, feature=feature, attribute=attribute, names=names):
                    xs, ys = [], []
                    for f in feats:
                        if len(f["objects"]) <= k:
                            continue
                        o = f["objects"][k]
                        if pick is not None and not pick(o):
                            continue
                        xs.append(f["pooled"] if feature == "pooled" else o[feature])
                        ys.append(names.index(o[attribute]))
                    return np.asarray(xs), np.asarray(ys, int)

                x, y = rows(train)
                if len(x) < 20:
                    continue
                predict = _probe_fit(x, y, len(names))
                name = f"object{k + 1}_{attribute}_from_{feature}"
                entry: dict[str, Any] = {"train": len(x)}
                for group, feats in tests.items():
                    pick = None
                    if group == "heldout_pairs":
                        pick = lambda o: (o["color"], o["shape"]) in held  # noqa: E731
                    xt, yt = rows(feats, pick)
                    entry[group] = float((predict(xt) == yt).mean()) if len(xt) else None
                    entry[f"{group}_n"] = int(len(xt))
                results[name] = entry
    return {"probes": results, "chance": {"color": 1 / len(colors), "shape": 1 / len(shape_names)}}


# ----------------------------------------------------------------- tokenizer check
def training_code_usage(codes_dir: str, codebook_size: int, num_cells: int) -> np.ndarray:
    """int64 [N, K]: how often each code is the target at each cell in the
    encoder-decoder's training codes (`parti-jax precompute-codes` output)."""
    from parti_jax.data.codes import read_codes

    counts = np.zeros((num_cells, codebook_size), np.int64)
    cells = np.arange(num_cells)
    for record in read_codes(codes_dir):
        np.add.at(counts, (cells, np.asarray(record.image_codes).reshape(-1)), 1)
    return counts


def tokenizer_check(
    inspector: Inspector, scenes: Sequence[Any], images: np.ndarray, usage: np.ndarray | None
) -> dict[str, Any]:
    """Judge acceptance of the VQGAN's reconstructions of `scenes` (captions + true
    images), and with `usage` (training_code_usage) the share of their object codes
    (and (cell, code) pairs) never seen as training targets."""
    from parti_jax.data.judge import judge

    tok = inspector.image_tokenizer
    codes = tok.encode(images)
    recon = tok.decode(codes)
    accepted = [judge(r, s.caption).match for r, s in zip(recon, scenes, strict=True)]
    out: dict[str, Any] = {
        "scenes": len(scenes),
        "reconstruction_accepted": float(np.mean(accepted)),
    }
    if usage is not None:
        seen_code = usage.sum(0) > 0
        flat = codes.reshape(len(scenes), -1)
        objects = np.stack([object_cells(r, codes.shape[1:]) for r in recon])
        cells = np.broadcast_to(np.arange(flat.shape[1]), flat.shape)
        unseen = ~seen_code[flat]
        unseen_at = usage[cells, flat] == 0
        out.update(
            object_codes_never_a_target=float(unseen[objects].mean()),
            object_cell_codes_never_a_target_there=float(unseen_at[objects].mean()),
            images_with_an_unseen_code=float(unseen.any(1).mean()),
            distinct_training_codes=int(seen_code.sum()),
        )
    return out


# ------------------------------------------------------------------------- runner
def scene_set(num_in_distribution: int, num_heldout: int, *, world_seed: int = 0, image_size: int):
    """Eval scenes (as the shapes suite picks them) and their true images in [0, 1]."""
    from parti_jax.data import shapes
    from parti_jax.eval.shapes_suite import shapes_scenes

    # Scenes do not depend on the resolution they are drawn at (a lattice of fractions).
    scenes = shapes_scenes(num_in_distribution, num_heldout, world_seed=world_seed)
    images = np.stack([shapes.render(s.spec, image_size) for s in scenes]).astype(np.float32)
    return scenes, images / 255.0
