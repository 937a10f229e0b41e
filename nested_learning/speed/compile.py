"""``torch.compile`` of the training forward, the activation budget and the eager stance for evaluation."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["compile_model", "eager_stance", "set_activation_memory_budget"]


def compile_model(model, *, cuda_graphs: bool, memory_budget: float, decoder_only: bool):
    """``torch.compile`` the model for training; returns the module the loss calls.

    ``decoder_only`` (the chunked loss calls the decoder and runs head + cross-entropy chunk by chunk outside the
    graph): the decoder is compiled in place and ``model`` returned. CUDA graphs (mode ``reduce-overhead``)
    record one graph per batch shape, so the speed plan asks for them only when the shape is fixed."""
    from nested_learning.speed.chunked_loss import decoder_and_head
    from nested_learning.speed.compile_cache import tag_compile_caches

    tag_compile_caches()
    set_activation_memory_budget(memory_budget)
    options = {"mode": "reduce-overhead"} if cuda_graphs else {}
    parts = decoder_and_head(model) if decoder_only else None
    if parts is not None:
        parts[0].compile(**options)
        return model
    return torch.compile(model, **options)


def eager_stance(enabled: bool):
    """Run compiled modules eagerly inside this block (``torch.compiler.set_stance``) when ``enabled``: padded eval
    batches vary in shape and must not record a CUDA graph each."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if not enabled or set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def set_activation_memory_budget(budget: float) -> None:
    """``speed.activation_memory_budget``: torch's partitioner keeps at most this share of the activations it
    would keep for speed and recomputes the rest in backward. Process-wide; read when a graph is compiled."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "activation_memory_budget"):  # pragma: no cover - torch < 2.4
        if budget < 1.0:
            raise ValueError("speed.activation_memory_budget: needs torch >= 2.4")
        return
    functorch_config.activation_memory_budget = float(budget)
