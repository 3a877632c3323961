"""parti_jax.eval"""
