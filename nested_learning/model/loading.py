"""Load a causal LM and its tokenizer: a hub id, a local directory or ``embedded:<name>``.

Device and dtype are decided here, so the trainer only sees a frozen model on a device and an ``autocast``
context to run its forward passes in.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from nested_learning.config import ModelConfig
from nested_learning.model.embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX, build_embedded, byte_tokenizer, is_embedded

__all__ = [
    "ModelError",
    "autocast_context",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "prepare_base",
    "resolve_device",
    "resolve_dtype",
    "unwrap_model",
]


class ModelError(ValueError):
    """The model or tokenizer named in the config cannot be loaded; the message names the field."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device: {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA (LoRA weights stay float32); nothing on CPU, so CPU runs are exact float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_source(name: str) -> None:
    """A name that looks like a filesystem path must exist: fail here, not deep inside the hub client."""
    looks_local = name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name or name.endswith(os.sep)
    if looks_local and not Path(name).expanduser().exists():
        raise ModelError(f"model.name_or_path: local model directory not found: {name}")


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer alone (cheap): the trainer loads data with it before it loads the model."""
    if is_embedded(cfg.name_or_path):
        key = cfg.name_or_path.removeprefix(EMBEDDED_PREFIX)
        if key not in EMBEDDED_MODELS:
            known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
            raise ModelError(f"model.name_or_path: unknown embedded model {cfg.name_or_path!r} (known: {known})")
        return byte_tokenizer()
    _check_source(cfg.name_or_path)
    from transformers import AutoTokenizer

    local = Path(cfg.name_or_path).expanduser().exists()
    try:
        tok = AutoTokenizer.from_pretrained(
            str(Path(cfg.name_or_path).expanduser()) if local else cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            # A local folder never needs the hub: without this, transformers may still list a hub repository
            # named like the folder, which on a machine without network waits for a timeout.
            local_files_only=local,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path: cannot load a tokenizer from {cfg.name_or_path!r}: {exc}") from None
    if tok.pad_token_id is None:
        # Causal LMs often ship without a pad token; padded positions never carry loss, so eos serves.
        tok.pad_token = tok.eos_token
    return tok


def unwrap_model(model):
    """The transformers model under a ``torch.compile`` wrapper and PEFT's ``PeftModel`` / ``LoraModel``
    (LoRA layers included): where its config, decoder and head live."""
    model = getattr(model, "_orig_mod", model)
    while callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def load_model(cfg: ModelConfig, seed: int = 0):
    """The base model on its device, frozen, in the configured dtype. ``seed`` only affects embedded weights."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if is_embedded(cfg.name_or_path):
        model, _ = build_embedded(cfg.name_or_path, seed=seed, attn_implementation=cfg.attn_implementation)
        model = model.to(dtype)
        model.name_or_path = cfg.name_or_path  # recorded by PEFT as base_model_name_or_path
    else:
        _check_source(cfg.name_or_path)
        from transformers import AutoModelForCausalLM

        source = cfg.name_or_path
        local = Path(source).expanduser().exists()
        if local:
            source = str(Path(source).expanduser())
            _refuse_mlx_quantised(Path(source))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                revision=cfg.revision,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                local_files_only=local,  # as for the tokenizer: a local folder never asks the hub
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ModelError(f"model.name_or_path: cannot load a causal LM from {cfg.name_or_path!r}: {exc}") from None
    return prepare_base(model, cfg).to(device)


def _refuse_mlx_quantised(folder: Path) -> None:
    """An mlx-lm quantised folder (``*-4bit-mlx``: ``quantization`` in config.json, no ``quant_method``) cannot
    load in transformers; say so and name the backend that trains it, instead of transformers' own error."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    quant = config.get("quantization") if isinstance(config, dict) else None
    if isinstance(quant, dict) and "quant_method" not in (config.get("quantization_config") or {}):
        raise ModelError(f"model.name_or_path: {folder} is an mlx-lm model quantised to {quant.get('bits', '?')} bits; "
                         "the torch backend cannot load it: train it with backend: mlx (--backend mlx)")


def prepare_base(model, cfg: ModelConfig):
    """What every base model gets, loaded here or built by the caller: frozen weights, no KV cache, and
    ``model.gradient_checkpointing``."""
    model.requires_grad_(False)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model) -> None:
    """transformers' gradient checkpointing on every decoder layer of ``model``, non-reentrant (it works with
    frozen inputs, so no input-grad hook is needed)."""
    with warnings.catch_warnings():  # renamed in newer transformers; the old name works on all we support
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_model_and_tokenizer(model_cfg: ModelConfig, seed: int = 0):
    """(base model, tokenizer), without LoRA. ``embedded:<name>`` builds from ``nested_learning.model.embedded``."""
    tokenizer = load_tokenizer(model_cfg)
    return load_model(model_cfg, seed=seed), tokenizer
