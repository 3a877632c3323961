"""Gin configuration files shipped with parti_jax (installed as `parti_jax.gin`)."""
