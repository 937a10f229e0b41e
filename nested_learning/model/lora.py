"""Wrap a frozen base model with PEFT LoRA adapters."""

from __future__ import annotations

import warnings

import torch

from nested_learning.config import LoraConfig
from nested_learning.model.loading import ModelError

__all__ = ["wrap_lora"]


def wrap_lora(model, cfg: LoraConfig, seed: int):
    """Add LoRA adapters (PEFT). The adapter init is seeded here so it does not depend on what ran before."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.init_seed if cfg.init_seed is not None else seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            peft_model = get_peft_model(model, peft_cfg)
        except ValueError as exc:
            raise ModelError(f"lora.target_modules: {exc}") from None
    return peft_model
