"""parti_jax.vqgan"""
