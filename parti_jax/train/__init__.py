"""parti_jax.train"""
