"""SeqIO task and mixture registrations (installed as `parti_jax.tasks`).

Importing a module here registers its tasks with seqio's TaskRegistry.
"""
