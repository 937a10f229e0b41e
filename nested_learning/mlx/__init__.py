"""The MLX backend: ``nested-learning train --backend mlx`` (config ``backend: mlx``).

mlx-lm models (local folders, hub ids, the embedded tiny models' MLX twins), mlx-lm's LoRA / DoRA layers, quantised
bases (QLoRA), the tiered optimizer of :mod:`nested_learning.optim.mlx`, and checkpoints in mlx-lm's adapter format.
The data pipeline, tier plans, schedule, metrics log, callbacks and ``TrainerState`` are the torch backend's own.

Importing this package imports nothing heavy: :mod:`nested_learning.mlx.fields` checks configs without mlx, and
:func:`require_mlx` turns a missing install into one line saying how to get it. The torch path never imports it.
"""

from __future__ import annotations

INSTALL_HINT = 'pip install "nested-learning[mlx]"'

__all__ = ["INSTALL_HINT", "is_mlx_run_checkpoint", "require_mlx"]


def require_mlx() -> None:
    """Raise ``ConfigError`` (one line, with the install command) unless mlx and mlx-lm import."""
    from nested_learning.config import ConfigError

    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"backend mlx: {exc.name or 'mlx'} is not installed; install it with: {INSTALL_HINT}") from None


def is_mlx_run_checkpoint(path) -> bool:
    """A checkpoint written by an MLX run (its ``config.yaml`` says ``backend: mlx``); imports no mlx."""
    from pathlib import Path

    import yaml

    f = Path(path) / "config.yaml" if path is not None else None
    if f is None or not f.is_file():
        return False
    try:
        data = yaml.safe_load(f.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("backend") == "mlx"
