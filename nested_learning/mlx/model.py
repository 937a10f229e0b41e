"""MLX models: the embedded tiny models' twins, mlx-lm folders (plain or quantised), LoRA / DoRA, the loss.

- ``embedded:<name>``: the same Llama config as :mod:`nested_learning.model.embedded`, built with
  ``mlx_lm.models.llama`` and given the torch model's own seeded weights, so both backends start from one model.
- anything else: ``mlx_lm.load`` (a local mlx-lm folder, 4-bit / 8-bit quantised ones included, or a hub id).
- LoRA: mlx-lm's own ``LoRALinear`` / ``DoRALinear`` (``linear_to_lora_layers``), so its adapters load in mlx-lm.
- the loss: summed next-token cross-entropy over the loss tokens, as :mod:`nested_learning.train.loss`. Packed
  rows attend within their own sample through a block-diagonal causal mask; rotary attention depends only on
  the distance between tokens, so positions need not restart at each sample.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from nested_learning.config import ConfigError, LoraConfig, ModelConfig
from nested_learning.data.records import IGNORE_INDEX

__all__ = ["MlxBatch", "adapter_config", "adapter_weights", "check_packing", "embedded_args", "embedded_twin", "forward",
           "load_base", "lora_scale", "save_model_dir", "to_mlx", "token_logits_and_targets", "token_loss_sum",
           "wrap_lora"]

_LINEAR = (nn.Linear, nn.QuantizedLinear)
# Decoders whose blocks take (h, mask, cache) between embed_tokens and norm: packed rows can pass their own mask.
PACKING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def embedded_args(name: str, vocab_size: int):
    """mlx-lm ``ModelArgs`` equal to the torch embedded model's ``LlamaConfig``."""
    from mlx_lm.models.llama import ModelArgs

    from nested_learning.model.embedded import embedded_model_config

    c = embedded_model_config(name, vocab_size=vocab_size)
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    return ModelArgs(model_type="llama", hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                     intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size,
                     head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rope_theta=float(theta),
                     tie_word_embeddings=bool(c.tie_word_embeddings))


def embedded_twin(name: str, seed: int = 0):
    """(MLX model, its config dict) for ``embedded:<name>``: the torch embedded model's weights (float32)."""
    from mlx_lm.models.llama import Model

    from nested_learning.model.embedded import build_embedded

    torch_model, tokenizer = build_embedded(name, seed=seed)
    args = embedded_args(name, len(tokenizer))
    model = Model(args)
    weights = {k: mx.array(v.detach().float().numpy()) for k, v in torch_model.state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    config = {k: v for k, v in vars(args).items() if v is not None}
    return model, config


def load_base(cfg: ModelConfig):
    """(frozen base model, its config dict) for ``model.name_or_path``; errors name the field."""
    from nested_learning.model.embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX, is_embedded

    if is_embedded(cfg.name_or_path):
        if cfg.name_or_path.removeprefix(EMBEDDED_PREFIX) not in EMBEDDED_MODELS:
            known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
            raise ConfigError(f"model.name_or_path: unknown embedded model {cfg.name_or_path!r} (known: {known})")
        model, config = embedded_twin(cfg.name_or_path)
    else:
        import mlx_lm

        source = cfg.name_or_path
        local = Path(source).expanduser()
        if local.exists():
            source = str(local)
        elif source.startswith(("/", "./", "../", "~")):
            raise ConfigError(f"model.name_or_path: local model directory not found: {cfg.name_or_path}")
        try:
            model, _, config = mlx_lm.load(source, return_config=True, revision=cfg.revision,
                                           trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise ConfigError(f"model.name_or_path: cannot load an mlx-lm model from {cfg.name_or_path!r}: "
                              f"{' '.join(str(exc).split())}") from None
    if cfg.dtype != "auto":
        model.set_dtype(_DTYPES[cfg.dtype])  # floating parameters only: quantised weights stay packed
    model.freeze()
    return model, config


def _lora_keys(model, targets) -> list[str]:
    """mlx-lm ``lora_parameters.keys``: paths inside a block (``self_attn.q_proj``) and top-level paths
    (``lm_head``) of the linear layers ``lora.target_modules`` names (``all-linear``: every block linear)."""
    block = model.layers[0]
    inside = [(p, m) for p, m in block.named_modules() if isinstance(m, _LINEAR)]
    if targets == "all-linear":
        return sorted(p for p, _ in inside)
    wanted = set(targets)
    keys = {p for p, _ in inside if p.rsplit(".", 1)[-1] in wanted}
    outside = [(p, m) for p, m in model.named_modules() if isinstance(m, _LINEAR) and ".layers." not in f".{p}."]
    keys |= {p for p, _ in outside if p.rsplit(".", 1)[-1] in wanted}
    found = {k.rsplit(".", 1)[-1] for k in keys}
    missing = sorted(wanted - found)
    if missing:
        raise ConfigError(f"lora.target_modules: the model has no linear layer named {', '.join(missing)}")
    return sorted(keys)


def lora_scale(lora: LoraConfig) -> float:
    return lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)


def adapter_config(num_layers: int, keys: list[str], lora: LoraConfig, base: str) -> dict[str, Any]:
    """``adapter_config.json`` in mlx-lm's format (``mlx_lm.load(..., adapter_path=...)`` reads it)."""
    return {
        "fine_tune_type": "dora" if lora.use_dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": lora.r, "scale": lora_scale(lora), "dropout": lora.dropout, "keys": keys},
        "model": base,
        "lora_alpha": lora.alpha, "use_rslora": lora.use_rslora,
    }


def wrap_lora(model, lora: LoraConfig, seed: int) -> list[str]:
    """Replace the targeted linear layers of ``model`` by mlx-lm LoRA (or DoRA) layers, in place; the adapter
    init is drawn from ``lora.init_seed`` (default: the run seed). Only the adapter stays trainable. Returns
    mlx-lm's ``lora_parameters.keys``."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys = _lora_keys(model, lora.target_modules)
    mx.random.seed(lora.init_seed if lora.init_seed is not None else seed)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers),
                          {"rank": lora.r, "scale": lora_scale(lora), "dropout": lora.dropout, "keys": keys},
                          use_dora=lora.use_dora)
    mx.eval(model.parameters())
    return keys


def adapter_weights(model) -> dict[str, mx.array]:
    """The trainable (adapter) tensors by their flattened names: what ``adapters.safetensors`` holds."""
    return dict(tree_flatten(model.trainable_parameters()))


# ------------------------------------------------------------------------------------------------- batches
class MlxBatch:
    """A ``nested_learning.data.Batch`` as MLX arrays: ids and labels (B, T) int32; ``segments`` (B, T) numbers
    the samples of packed rows (None for one sample per row, where plain causal attention is exact)."""

    __slots__ = ("ids", "labels", "segments", "num_tokens", "num_loss_tokens")

    def __init__(self, ids, labels, segments, num_tokens: int, num_loss_tokens: int):
        self.ids, self.labels, self.segments = ids, labels, segments
        self.num_tokens, self.num_loss_tokens = num_tokens, num_loss_tokens


def to_mlx(batch) -> MlxBatch:
    """One collated ``Batch`` (torch tensors on the CPU) -> ``MlxBatch``."""
    segments = None
    if not batch.one_sample_per_row:
        pos = batch.position_ids.numpy()
        segments = mx.array(np.cumsum(pos == 0, axis=1).astype(np.int32))
    return MlxBatch(mx.array(batch.input_ids.numpy().astype(np.int32)),
                    mx.array(batch.labels.numpy().astype(np.int32)), segments,
                    int(batch.num_tokens), int(batch.num_loss_tokens))


def check_packing(model, config: dict) -> None:
    kind = config.get("model_type")
    if kind not in PACKING_MODEL_TYPES:
        raise ConfigError(f"data.packing: on the mlx backend packed rows need a decoder of type "
                          f"{', '.join(PACKING_MODEL_TYPES)}; this model is {kind!r} (turn packing off)")


def forward(model, ids: mx.array, segments: mx.array | None = None) -> mx.array:
    """Logits (B, T, V). ``segments``: packed rows, each token attends to earlier tokens of its own sample."""
    if segments is None:
        return model(ids)
    inner = model.model
    t = ids.shape[1]
    causal = mx.tril(mx.ones((t, t), dtype=mx.bool_))
    mask = (causal[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]  # (B, 1, T, T)
    h = inner.embed_tokens(ids)
    for layer in inner.layers:
        h = layer(h, mask, None)
    h = inner.norm(h)
    return model.lm_head(h) if "lm_head" in model else inner.embed_tokens.as_linear(h)


def token_logits_and_targets(model, ids, labels, segments):
    logits = forward(model, ids, segments)[:, :-1, :].astype(mx.float32)  # position t predicts token t+1
    targets = labels[:, 1:]
    return logits, targets, targets != IGNORE_INDEX


def token_loss_sum(model, ids, labels, segments=None) -> mx.array:
    """Sum of next-token cross-entropy over the loss tokens (labels unshifted, -100 = no loss), float32."""
    logits, targets, valid = token_logits_and_targets(model, ids, labels, segments)
    ce = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0), reduction="none")
    return mx.where(valid, ce, 0.0).sum()


def save_model_dir(model, config: dict, tokenizer, path: str | Path, *, bits: int | None = None,
                   group_size: int = 64) -> Path:
    """Write ``model`` as an mlx-lm folder (config.json, weights, tokenizer); ``bits`` quantises it first
    (4 or 8: what ``*-4bit-mlx`` folders hold). Used to hand the embedded twins to mlx-lm itself."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    if bits is not None:
        model, config = quantize_model(model, config, group_size=group_size, bits=bits)
    save_model(path, model)
    save_config(config, path / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
