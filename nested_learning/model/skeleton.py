"""A causal LM's skeleton on the meta device: every module, parameter and buffer with its shape and dtype, no data.

``distributed.strategy: fsdp`` builds one on every rank from the model's config alone (``config.json``, or an
embedded model's settings), shards it, and fills the shards from the weights rank 0 read
(``nested_learning.train.fsdp``), so no other rank reads the weight files or holds the whole base.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from nested_learning.config import ModelConfig
from nested_learning.model.embedded import byte_tokenizer, embedded_model_config, is_embedded
from nested_learning.model.loading import ModelError, _check_source, prepare_base

__all__ = ["build_skeleton"]


def build_skeleton(cfg: ModelConfig, dtype: torch.dtype):
    """The model ``load_model(cfg)`` would load, on the meta device, frozen and prepared the same way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_embedded(cfg.name_or_path):
        config = embedded_model_config(cfg.name_or_path, vocab_size=len(byte_tokenizer()),
                                       attn_implementation=cfg.attn_implementation)
        options = {}
    else:
        _check_source(cfg.name_or_path)
        source = cfg.name_or_path
        if Path(source).expanduser().exists():
            source = str(Path(source).expanduser())
        try:
            config = AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.name_or_path: cannot read the model config of {cfg.name_or_path!r}: {exc}") \
                from None
        options = dict(attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # initialisers warn that meta tensors hold no values
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **options)
    if is_embedded(cfg.name_or_path):
        model.name_or_path = cfg.name_or_path  # as load_model records it, for PEFT's base_model_name_or_path
    return prepare_base(model, cfg)
