"""parti_jax.models"""
