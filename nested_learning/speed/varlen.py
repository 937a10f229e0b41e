"""Packed rows without a T x T mask: attention runs sample by sample over the flattened tokens.

A packed row holds several samples whose ``position_ids`` restart at 0; none may attend to another. transformers
builds that rule as a dense (B, 1, T, T) mask for SDPA, which rules out the flash kernel and computes every
block of the square (``docs/speed.md``, "Packed rows"). Here the batch carries the samples' boundaries instead:
``cu_seqlens``, the offsets of each sample in the (B * T) flattened tokens (``collate`` computes them on the host,
so no device sync finds them), with ``max_len`` = T as the bound on any sample's length.

``VARLEN_SDPA`` is ``CAUSAL_SDPA`` (``causal_mask.py``) plus this: inside ``packed_rows()`` transformers' packed
mask becomes ``None``, and the attention function, handed the boundaries as ``cu_seq_lens_q`` / ``max_length_q``
(the keyword arguments transformers' own flash-attention path reads), runs

- on CUDA in half precision: torch's ``varlen_attn`` (flash attention over variable-length sequences, causal
  within each sample), one kernel for the whole batch, blocks of other samples never computed;
- elsewhere: causal SDPA on each sample's slice in turn, the reference path the CUDA kernel is tested against.

Padding at the end of a row is a sample of its own (``collate`` restarts its positions) and carries no loss.
``cu_seqlens`` is padded by repeating its last offset (empty samples): with fixed-width batches (CUDA graphs) to one
length for the whole run (``BatchPlan.offsets_len``), so a replayed step keeps one shape; otherwise to a power of
two, so a compiled step sees few.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn.functional as F

from nested_learning.speed import causal_mask

__all__ = ["VARLEN_SDPA", "batch_attention", "packed_kwargs", "packed_rows", "sample_offsets", "segment_attention",
           "use_varlen_sdpa", "varlen_blocker", "varlen_kernel"]

VARLEN_SDPA = "nl_varlen_sdpa"
_registered = False


def sample_offsets(position_ids: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """int32 offsets of every sample's first token in the flattened (B * T) tokens, then B * T, padded with
    repeats of B * T to ``size`` entries (default: a power of two, at least 8). A sample starts where its position
    is 0; every row starts one."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        raise ValueError("sample_offsets: position_ids must start every row at 0")
    offsets = starts + [flat.numel()]
    if size is not None and size < len(offsets):
        raise ValueError(f"sample_offsets: {len(offsets)} offsets do not fit size={size}")
    size = size or max(8, 1 << (len(offsets) - 1).bit_length())
    return torch.tensor(offsets + [flat.numel()] * (size - len(offsets)), dtype=torch.int32)


@contextlib.contextmanager
def packed_rows(enabled: bool = True) -> Iterator[None]:
    """Within: transformers' mask for packed rows is skipped (``VARLEN_SDPA`` keeps samples apart itself from the
    boundaries in its keyword arguments). Per thread, like ``causal_rows``."""
    previous, causal_mask._rows.segments = causal_mask._rows.segments, bool(enabled)
    try:
        yield
    finally:
        causal_mask._rows.segments = previous


def packed_kwargs(model, batch) -> dict:
    """The keyword arguments that carry ``batch``'s sample boundaries to ``VARLEN_SDPA``; empty for batches with
    none (one sample per row) or models on another attention function (which would ignore or refuse them)."""
    offsets = getattr(batch, "sample_offsets", None)
    if offsets is None or not uses_varlen(model):
        return {}
    width = batch.input_ids.size(1)
    # One compiled graph for every offsets length: without this, the second distinct length recompiles the whole
    # step. Fixed-width plans (CUDA graphs) keep one length per run; others round to powers of two, so few.
    torch._dynamo.maybe_mark_dynamic(offsets, 0)
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": width, "max_length_k": width}


@contextlib.contextmanager
def batch_attention(model, batch) -> Iterator[dict]:
    """Yields ``model``'s keyword arguments for ``batch`` and, within, the attention rules its layout allows:
    one-sample rows run SDPA's causal kernel with no mask (``causal_rows``), packed rows on ``VARLEN_SDPA`` run
    sample by sample with no mask (``packed_rows``). Every forward of a training or evaluation batch goes
    through here."""
    extra = packed_kwargs(model, batch)
    with causal_mask.causal_rows(batch.one_sample_per_row), packed_rows(bool(extra)):
        yield {**batch.model_inputs(), **extra}


def uses_varlen(model) -> bool:
    from nested_learning.model.loading import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) == VARLEN_SDPA


def _find_kernel():
    """torch's ``varlen_attn``, how it is told "causal" (torch 2.10: ``is_causal``; later: a window) and whether
    it takes grouped K/V heads itself; None where torch has none. Looked up once, at import: the attention
    function reads the result inside compiled graphs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


_KERNEL = _find_kernel()


def varlen_kernel():
    """``(varlen_attn, causal keyword, takes grouped heads)``, or None where this torch has no such kernel."""
    return _KERNEL


def _kernel_fits(query: torch.Tensor) -> bool:
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.size(-1) % 8 == 0
            and query.size(-1) <= 256 and _KERNEL is not None)


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor,
                      max_len: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each sample of flattened tokens: ``query`` (N, H, D), ``key`` / ``value``
    (N, H_kv, D) with H a multiple of H_kv, ``offsets`` as ``sample_offsets`` gives. Returns (N, H, D)."""
    groups = query.size(1) // key.size(1)
    if _kernel_fits(query):
        kernel, causal, gqa = _KERNEL
        offsets = offsets.to(query.device, torch.int32)
        if groups > 1 and not gqa:  # older kernels want as many key heads as query heads
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        extra = {"enable_gqa": True} if groups > 1 and gqa else {}
        return kernel(query, key, value, offsets, offsets, max_len, max_len, scale=scale, **causal, **extra)
    out = torch.empty_like(query)
    bounds = offsets.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:  # the power-of-two padding repeats the end: empty samples
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (H, L, D)
            out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                            enable_gqa=groups > 1).transpose(0, 1)
    return out


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
               **kwargs):
    """transformers' attention-function signature: ``query`` (B, H, T, D), ``key``/``value`` (B, H_kv, T, D);
    returns ((B, T, H, D), None). Without sample boundaries: transformers' SDPA attention, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    offsets = kwargs.get("cu_seq_lens_q")
    if offsets is None or query.size(2) != key.size(2):  # no boundaries, or a KV cache: SDPA as usual
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout and module.training:
        raise ValueError("speed.varlen_attention cannot apply attention dropout")
    b, h, t, d = query.shape
    flat = [x.transpose(1, 2).reshape(b * t, x.size(1), d) for x in (query, key, value)]
    out = segment_attention(*flat, offsets, kwargs.get("max_length_q") or t, scale=scaling)
    return out.view(b, t, h, d), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, _attention)
    AttentionMaskInterface.register(VARLEN_SDPA, causal_mask._causal_mask_or_none)
    _registered = True


def varlen_blocker(model) -> str | None:
    """Why this model cannot run ``VARLEN_SDPA``, or None when it can: it must run SDPA (or ``CAUSAL_SDPA``)
    with full causal attention in every layer (no sliding windows, soft-capped scores or attention dropout)."""
    from nested_learning.model.loading import unwrap_model

    why = causal_mask.causal_sdpa_blocker(model)
    if why is not None:
        return why
    config = unwrap_model(model).config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layers with {', '.join(sorted(kinds - {'full_attention'}))}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "soft-capped attention scores"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    return None


def use_varlen_sdpa(model) -> bool:
    """Switch a model on SDPA to ``VARLEN_SDPA``, in place (one-sample rows keep ``CAUSAL_SDPA``'s behaviour).
    Returns whether it did."""
    from nested_learning.model.loading import unwrap_model

    if varlen_blocker(model) is not None:
        return False
    inner = unwrap_model(model)
    _register()
    inner.set_attn_implementation(VARLEN_SDPA)
    return uses_varlen(inner)
