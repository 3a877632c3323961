"""The input pipeline: the only package allowed to import tensorflow / seqio / tfds.

Nothing is imported here eagerly, so TensorFlow-free modules of this package
(the shapes world, its judge, the PartiPrompts reader, the SentencePiece
loader for inference) can be used on hosts without TensorFlow.
"""
