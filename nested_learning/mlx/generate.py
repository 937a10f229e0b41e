"""Inference on MLX checkpoints: load (base + adapter through mlx-lm's own ``load_adapters``), generate, merge.

``nested-learning generate`` and ``merge`` send a checkpoint here when its ``config.yaml`` says ``backend: mlx``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from nested_learning.config import ModelConfig, load_config
from nested_learning.train.checkpoint import CONFIG_FILE, CheckpointError

__all__ = ["generate_mlx", "load_mlx_checkpoint", "merge_mlx"]


def load_mlx_checkpoint(adapter: str | Path, base: str | None = None, *, with_config: bool = False):
    """(model with the adapter, tokenizer[, base config dict]): the base named by the checkpoint's
    ``config.yaml`` (or ``base``), the adapter applied by mlx-lm's own ``load_adapters``."""
    from mlx_lm.tuner.utils import load_adapters

    from nested_learning.mlx.model import load_base
    from nested_learning.model.loading import load_tokenizer

    adapter = Path(adapter)
    if base is None:
        if not (adapter / CONFIG_FILE).is_file():
            raise CheckpointError(f"--adapter: {adapter} has no {CONFIG_FILE}; name the base model with --model")
        model_cfg = load_config(adapter / CONFIG_FILE).model
    else:
        model_cfg = ModelConfig(name_or_path=base)
    model, config = load_base(model_cfg)
    load_adapters(model, str(adapter))
    model.eval()
    tokenizer = load_tokenizer(model_cfg)
    return (model, tokenizer, config) if with_config else (model, tokenizer)


def generate_mlx(model, tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
    """Greedy (temperature 0) or sampled continuation, laid out as in training; stops at an end-of-turn token."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    from nested_learning.inference.generate import _stop_ids, encode_prompt

    stop = set(_stop_ids(model, tokenizer))
    mx.random.seed(seed)
    out: list[int] = []
    ids = mx.array(encode_prompt(tokenizer, prompt=prompt, messages=messages))
    for token, _ in generate_step(ids, model, max_tokens=max_new_tokens, sampler=make_sampler(temp=temperature)):
        token = int(token)
        if token in stop:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def merge_mlx(adapter: str | Path, out: str | Path, *, base: str | None = None, overwrite: bool = False) -> Path:
    """Fold the adapter into the base weights (``mlx_lm.fuse``'s way: each LoRA / DoRA layer's ``fuse()``;
    quantised bases stay quantised) and write an mlx-lm model folder."""
    from mlx.utils import tree_unflatten

    from nested_learning.mlx.model import save_model_dir

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"--out: {out} already exists and is not empty (pass --overwrite to replace it)")
    model, tokenizer, config = load_mlx_checkpoint(adapter, base, with_config=True)
    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return save_model_dir(model, config, tokenizer, out)
