"""The contrastive image-text model (CoCa role): dual encoder, trainer, scorer, warm start."""
