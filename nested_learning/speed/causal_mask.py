"""Causal attention with no mask tensor for rows that need none, also under ``torch.compile``.

Training batches whose rows each hold one sample from position 0, right-padded (``Batch.one_sample_per_row``),
need plain causal attention and nothing else: padding follows every real token and carries no loss. SDPA's
causal kernels (``is_causal``) then skip the blocks above the diagonal. transformers passes a mask whenever a row
has padding, and under ``torch.compile`` it cannot read the padding mask to find out there is none, so it builds
a (B, 1, T, T) mask and the kernel computes the whole T x T square.

``CAUSAL_SDPA`` is transformers' own SDPA attention under a name of its own. Its mask builder is transformers'
SDPA mask builder, except inside ``causal_rows()`` (which the loss functions enter for such batches), where
transformers' plain causal mask becomes ``None``. The attention function is the same, so only the mask changes.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["CAUSAL_SDPA", "causal_rows", "causal_sdpa_blocker", "use_causal_sdpa"]

CAUSAL_SDPA = "nl_causal_sdpa"
_registered = False


class _RowsState(threading.local):
    """Per thread: set by ``causal_rows`` around a forward, read while transformers builds masks."""

    def __init__(self) -> None:
        self.start_at_zero = False  # present on every thread, so a compiled read never misses
        self.segments = False  # set by ``varlen.packed_rows``: the attention function keeps samples apart itself


_rows = _RowsState()


@contextlib.contextmanager
def causal_rows(enabled: bool = True) -> Iterator[None]:
    """Within: every row of the batch is one sample starting at position 0, followed only by padding that
    carries no loss (``Batch.one_sample_per_row``), so plain causal attention is exact for every token that
    matters and ``CAUSAL_SDPA`` passes no mask. Per thread (two trainings in one process do not see each other's
    batches); ``torch.compile`` guards on it, so a compiled model keeps one graph with and one without."""
    previous, _rows.start_at_zero = _rows.start_at_zero, bool(enabled)
    try:
        yield
    finally:
        _rows.start_at_zero = previous


def _causal_mask_or_none(*args, **kwargs):
    """transformers' SDPA mask builder, except inside ``causal_rows`` when transformers asks for its plain causal
    mask over whole rows (padding aside): then ``None``, and SDPA runs its causal kernel (``is_causal``).

    Anything else goes to ``sdpa_mask`` as it came: another mask function (sliding windows, bidirectional or
    prefix attention, packed rows, extra and/or masks), a local window, queries that do not start at the first
    key (a KV cache), positional calls."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if args or not (_rows.start_at_zero or _rows.segments):
        return sdpa_mask(*args, **kwargs)
    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:  # older transformers' signature
        q_length = kwargs["cache_position"].shape[0]
    whole_rows = (
        kwargs.get("local_size") is None
        and q_length is not None
        and q_length == kwargs.get("kv_length")
        and not kwargs.get("kv_offset", 0)
        and not kwargs.get("q_offset", 0)
    )
    if whole_rows and _rows.segments:  # packed rows: the samples' boundaries reach the attention function instead
        return None
    plain = (whole_rows and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
             and kwargs.get("allow_is_causal_skip", True))
    return None if plain else sdpa_mask(**kwargs)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_SDPA, _causal_mask_or_none)
    _registered = True


def causal_sdpa_blocker(model) -> str | None:
    """Why ``use_causal_sdpa`` cannot switch this model, or None when it can."""
    from nested_learning.model.loading import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", CAUSAL_SDPA, "nl_varlen_sdpa"):  # the last: speed/varlen.py
        return f"the model runs {implementation} attention, not sdpa"
    try:
        import transformers.masking_utils  # noqa: F401
        from transformers import AttentionInterface, AttentionMaskInterface  # noqa: F401
    except ImportError:
        return "this transformers has no attention-mask interface"
    return None


def use_causal_sdpa(model) -> bool:
    """Switch a transformers model (or a PEFT model around one) that uses ``sdpa`` to ``CAUSAL_SDPA``, in place.
    Returns whether it did; models on another implementation (eager, flash-attention) are left alone."""
    from nested_learning.model.loading import unwrap_model

    if causal_sdpa_blocker(model) is not None:
        return False
    inner = unwrap_model(model)
    _register()
    inner.set_attn_implementation(CAUSAL_SDPA)
    return getattr(inner.config, "_attn_implementation", None) == CAUSAL_SDPA
