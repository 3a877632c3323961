"""`parti_prompts`: the 1632 PartiPrompts as an eval-only SeqIO task (split 'test').

Features: text (the prompt exactly as published), inputs (prompt tokens with
EOS), text_truncated, category, challenge, note, index (row number).
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from parti_jax.data import features, preprocessors, prompts

SPLIT = "test"


def register_parti_prompts_task(
    name: str = "parti_prompts", *, vocab_path: str | None = None, path: str | None = None
) -> seqio.Task:
    """Registers the PartiPrompts task (`path`: a PartiPrompts.tsv, default the shipped one)."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del split
        rows = prompts.load_parti_prompts(path)
        ds = tf.data.Dataset.from_tensor_slices(
            {
                "text": [p.prompt for p in rows],
                "category": [p.category for p in rows],
                "challenge": [p.challenge for p in rows],
                "note": [p.note for p in rows],
                "index": [p.index for p in rows],
            }
        )
        return ds.shuffle(len(rows), seed=seed) if shuffle_files else ds

    vocabulary = features.text_vocabulary(vocab_path)
    passthrough = seqio.PassThroughVocabulary(size=0, eos_id=None)
    return features.add_task(
        name,
        source=seqio.FunctionDataSource(
            dataset_fn, splits=[SPLIT], num_input_examples={SPLIT: prompts.NUM_PROMPTS}
        ),
        output_features={
            "inputs": features.text_feature(vocabulary),
            "text": seqio.Feature(passthrough, add_eos=False, dtype=tf.string, rank=0),
        },
        preprocessors=[preprocessors.tokenize_text],
        shuffle_buffer_size=None,
    )


register_parti_prompts_task()
