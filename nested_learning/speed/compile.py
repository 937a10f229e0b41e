"""``torch.compile`` of the training forward, the activation budget and the eager stance for evaluation.

Two scopes (``speed.compile_scope``): ``model`` compiles the decoder (or the whole model) as one graph; ``layers``
routes every decoder layer's forward through one compiled callable, ``layer_compiler()``, so dynamo and inductor
trace one layer and every other layer reuses that graph (the layers share their code and differ only in the
weights, which are graph inputs). The first layer gets a graph of its own when its input needs no gradient (a
frozen embedding's output): two graphs whatever the depth. The code between the layers (embedding, mask, rotary
tables, final norm, head and loss) runs eagerly.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["compile_layers", "compile_model", "decoder_layers", "eager_stance", "layer_compiler",
           "raise_recompile_limit", "set_activation_memory_budget"]


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


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def layer_compiler(backend: str = "inductor", **options):
    """One compiled callable for every decoder layer: ``compiled(layer_forward, *args, **kwargs)``. The layer's
    forward is an argument, not the compiled function, so all layers meet the same code object and its cache."""
    return torch.compile(_call, backend=backend, **options)


def decoder_layers(model) -> list:
    """The decoder layers of ``model`` (transformers' ``GradientCheckpointingLayer`` modules), in order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers without the common layer class
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model, *, memory_budget: float = 1.0, backend: str = "inductor") -> int:
    """``speed.compile_scope: layers``: every decoder layer of ``model`` (in place) calls its forward through one
    shared ``layer_compiler``; returns how many layers. Hooks and transformers' checkpointing around a layer stay
    eager (they run in ``Module.__call__``, outside ``forward``). Calling it again changes nothing."""
    from nested_learning.speed.compile_cache import tag_compile_caches

    tag_compile_caches()
    set_activation_memory_budget(memory_budget)
    compiled = layer_compiler(backend)
    layers = decoder_layers(model)
    raise_recompile_limit(layers)
    for layer in layers:
        if "forward" not in vars(layer):  # an instance attribute: this layer already runs compiled
            layer.forward = functools.partial(compiled, layer.forward)
    return len(layers)


def raise_recompile_limit(layers) -> None:
    """Dynamo stops compiling a code object after ``recompile_limit`` graphs (8) and runs it eagerly from then on,
    silently. Under ``layers`` the one shared callable holds every graph of every layer: per kind of layer (its
    class and attention type: sliding-window and full layers trace apart) one with and one without an input
    gradient, one for evaluation, each static and then dynamic in the row length and in the batch size. The
    limit (process-wide) is raised to 16 graphs per kind, never lowered."""
    import torch._dynamo.config as dynamo_config

    kinds = {(type(layer), getattr(layer, "attention_type", None)) for layer in layers}
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 16 * max(1, len(kinds))))


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
