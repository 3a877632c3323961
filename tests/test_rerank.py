"""Tests for parti_jax.rerank: keep-top-k ordering and the likelihood scorer.

`mean_log_probs_reference` is the float64 host computation the scorer used to
run on whole logits; tests/test_sampling.py checks the device scorer
(`sampling.token_scores`) against it.
"""

from __future__ import annotations

import numpy as np
import pytest

from parti_jax import rerank

VOCAB = 8
NUM_VALID = 6  # ids 1..5 are image tokens, 6..7 pad the vocabulary
PROMPTS = {"a red circle": 0, "a blue square": 1}


def test_rerank_keeps_the_best_per_prompt_best_first():
    scores = np.array([0.1, 0.9, 0.5, 0.9, -1.0, np.nan, 3.0, 2.0])  # 2 prompts x 4 samples
    idx = rerank.rerank(scores, num_samples=4, keep_top_k=3)
    # prompt 0: 0.9 (row 1) and 0.9 (row 3) tie -> lower sample first, then 0.5
    # prompt 1: 3.0 (row 6), 2.0 (row 7), -1.0 (row 4); NaN (row 5) ranks last
    np.testing.assert_array_equal(idx, [[1, 3, 2], [6, 7, 4]])
    np.testing.assert_array_equal(
        rerank.rerank(scores, num_samples=4, keep_top_k=4)[1], [6, 7, 4, 5]
    )
    np.testing.assert_array_equal(
        rerank.rerank(scores, num_samples=2, keep_top_k=1), [[1], [3], [4], [6]]
    )


def test_rerank_rejects_bad_layouts():
    with pytest.raises(ValueError, match="num_samples=3"):
        rerank.rerank(np.zeros(8), num_samples=3, keep_top_k=1)
    with pytest.raises(ValueError, match="keep_top_k=5"):
        rerank.rerank(np.zeros(8), num_samples=4, keep_top_k=5)
    with pytest.raises(ValueError, match="prompt-major"):
        rerank.rerank(np.zeros(4), num_samples=2, keep_top_k=1, prompts=["a", "b", "a", "b"])


class MeanBrightness:
    """A pixel scorer: brighter is better (stands in for a contrastive model)."""

    def score(self, images, prompts, *, image_tokens=None):
        return np.asarray(images).mean(axis=(1, 2, 3))


def test_score_and_rerank_with_a_pixel_scorer():
    scorer = MeanBrightness()
    assert isinstance(scorer, rerank.Scorer)
    brightness = np.array([0.2, 0.8, 0.5, 0.1, 0.3, 0.6])
    images = np.ones((6, 4, 4, 3), np.float32) * brightness[:, None, None, None]
    prompts = ["a"] * 3 + ["b"] * 3
    idx, scores = rerank.score_and_rerank(scorer, images, prompts, num_samples=3, keep_top_k=2)
    np.testing.assert_array_equal(idx, [[1, 2], [5, 4]])
    np.testing.assert_allclose(scores, brightness, rtol=1e-6)


def _tables():
    rng = np.random.default_rng(0)
    bigram = rng.normal(size=(VOCAB, VOCAB))
    prompt = rng.normal(size=(2, VOCAB)) * 0.5
    prompt[0, 2] += 4.0  # "red" favours id 2, "blue" id 4
    prompt[1, 4] += 4.0
    prompt[:, NUM_VALID:] += 6.0  # padding ids are likely, but masked out
    return bigram, prompt


def mean_log_probs_reference(logits, tokens, num_valid_tokens):
    """Each row's mean log-softmax of its tokens over ids 1..num_valid_tokens - 1, in float64
    (logits [B, N, V], tokens [B, N])."""
    logits = np.asarray(logits, np.float64)
    ids = np.arange(logits.shape[-1])
    logits = np.where((ids > 0) & (ids < num_valid_tokens), logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return (chosen - log_z).mean(-1)


def score_fn_of(logits_fn, num_valid_tokens=NUM_VALID):
    """A LikelihoodScorer `score_fn` over a host logits model [B, N, V], by the reference."""

    def mean_log_prob(text, tokens):
        decoder_input = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
        return mean_log_probs_reference(logits_fn(text, decoder_input), tokens, num_valid_tokens)

    def score_fn(text, tokens, unconditional_text=None, unconditional_weight=0.0):
        score = mean_log_prob(text, tokens)
        if unconditional_text is None:
            return score
        return score - unconditional_weight * mean_log_prob(unconditional_text, tokens)

    return score_fn


def _logits_fn(encoder_input_tokens, decoder_input_tokens):
    """A prompt-conditioned bigram model: logits [B, N, V]."""
    bigram, prompt = _tables()
    return bigram[decoder_input_tokens] + prompt[encoder_input_tokens[:, 0]][:, None]


_score_fn = score_fn_of(_logits_fn)


def _encode(prompts):
    return np.array([[PROMPTS[p], 1, 0] for p in prompts], np.int32)  # id, EOS, pad


def _greedy_path(prompt_id, length):
    bigram, prompt = _tables()
    valid = (np.arange(VOCAB) > 0) & (np.arange(VOCAB) < NUM_VALID)
    path, prev = [], 0
    for _ in range(length):
        prev = int(np.argmax(np.where(valid, bigram[prev] + prompt[prompt_id], -np.inf)))
        path.append(prev)
    return path


def test_likelihood_scorer_prefers_the_likelier_tokens():
    scorer = rerank.LikelihoodScorer(_score_fn, _encode, num_valid_tokens=NUM_VALID)
    assert isinstance(scorer, rerank.Scorer)
    red = _greedy_path(0, 5)
    blue = _greedy_path(1, 5)
    assert red != blue
    prompts = ["a red circle", "a red circle", "a blue square", "a blue square"]
    tokens = np.array([blue, red, red, blue], np.int32)
    images = np.zeros((4, 2, 2, 3), np.float32)
    scores = scorer.score(images, prompts, image_tokens=tokens)
    assert scores.shape == (4,) and scores.dtype == np.float32
    # Each prompt prefers its own greedy path, which the other prompt ranks lower.
    assert scores[1] > scores[0] and scores[3] > scores[2]
    idx, _ = rerank.score_and_rerank(
        scorer, images, prompts, num_samples=2, keep_top_k=1, image_tokens=tokens
    )
    np.testing.assert_array_equal(idx, [[1], [3]])

    # The score is the mean log-probability over valid ids, by hand for row 1.
    bigram, prompt = _tables()
    prev, total = 0, 0.0
    for tok in red:
        logits = (bigram[prev] + prompt[0])[1:NUM_VALID]
        total += logits[tok - 1] - np.log(np.exp(logits).sum())
        prev = tok
    assert scores[1] == pytest.approx(total / 5, rel=1e-5)
    # Scoring 3 rows per call gives the same numbers.
    chunked = rerank.LikelihoodScorer(_score_fn, _encode, num_valid_tokens=NUM_VALID, batch_size=3)
    np.testing.assert_allclose(
        chunked.score(images, prompts, image_tokens=tokens), scores, rtol=1e-6
    )


def test_likelihood_scorer_errors_name_the_fix():
    scorer = rerank.LikelihoodScorer(_score_fn, _encode, num_valid_tokens=NUM_VALID)
    images = np.zeros((1, 2, 2, 3), np.float32)
    with pytest.raises(ValueError, match="needs image_tokens"):
        scorer.score(images, ["a red circle"])
    with pytest.raises(ValueError, match="codes \\+ 1"):
        scorer.score(images, ["a red circle"], image_tokens=np.array([[0, 1]]))
    with pytest.raises(ValueError, match="num_valid_tokens"):
        scorer.score(images, ["a red circle"], image_tokens=np.array([[1, NUM_VALID]]))
    per_prompt = rerank.LikelihoodScorer(lambda text, tokens: np.zeros(1), _encode)
    with pytest.raises(ValueError, match=r"score_fn returned shape \(1,\), expected \[2\]"):
        per_prompt.score(None, ["a red circle"] * 2, image_tokens=np.ones((2, 3), np.int32))


def test_pmi_scorer_prefers_what_the_prompt_adds_over_what_any_prompt_favours():
    # A unigram model: every prompt, the empty one too, strongly favours the
    # "background" id 1; "a red circle" also raises id 2, which the empty prompt
    # makes unlikely. The plain likelihood keeps the all-background draw, the
    # pointwise mutual information the draw that shows what the prompt says.
    prompts_ids = {"a red circle": 0, "": 1}

    def logits_fn(encoder_input_tokens, decoder_input_tokens):
        table = np.zeros((2, VOCAB))
        table[:, 1] = 5.0
        table[0, 2] = 3.0
        table[1, 2] = -3.0
        rows = table[encoder_input_tokens[:, 0]]
        return np.repeat(rows[:, None], decoder_input_tokens.shape[1], axis=1)

    def encode(prompts):
        return np.array([[prompts_ids[p], 1, 0] for p in prompts], np.int32)

    prompts = ["a red circle"] * 2
    tokens = np.array([[1, 1, 1, 1], [1, 2, 2, 1]], np.int32)
    images = np.zeros((2, 2, 2, 3), np.float32)
    plain = rerank.LikelihoodScorer(score_fn_of(logits_fn), encode, num_valid_tokens=NUM_VALID)
    pmi = rerank.LikelihoodScorer(
        score_fn_of(logits_fn), encode, num_valid_tokens=NUM_VALID, unconditional_weight=1.0
    )
    likelihood = plain.score(images, prompts, image_tokens=tokens)
    assert likelihood[0] > likelihood[1]
    scores = pmi.score(images, prompts, image_tokens=tokens)
    assert scores[1] > scores[0]
    unconditional = plain.score(images, ["", ""], image_tokens=tokens)
    np.testing.assert_allclose(scores, likelihood - unconditional, rtol=1e-5)
    with pytest.raises(ValueError, match="unconditional_weight=2"):
        rerank.LikelihoodScorer(score_fn_of(logits_fn), encode, unconditional_weight=2.0)
