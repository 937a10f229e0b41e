"""Tiered optimizers: ``optim.torch.NestedAdamW`` (PyTorch) and ``optim.mlx.NestedAdamW`` (MLX)."""
