"""Tiered optimizers with one semantics: ``optim.adamw.NestedAdamW`` (PyTorch, with ``optim.flat`` tier buffers)
and ``optim.mlx.NestedAdamW`` (MLX); ``optim.schedule`` is the learning-rate schedule."""
