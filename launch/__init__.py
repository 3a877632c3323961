"""Launch builders for TPU VM pods, GKE, SLURM and local multi-process runs
(installed as `parti_jax.launch`)."""
