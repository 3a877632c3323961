"""parti_jax.upsampler"""
