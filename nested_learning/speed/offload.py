"""``speed.offload_activations``: checkpointed decoder layers keep their input in host memory, not on the device.

With ``model.gradient_checkpointing`` each decoder layer keeps only its input for backward, which recomputes the
layer from it; at Llama-3.2-1B 8 x 2048 that is 16 inputs of 64 MiB held from the forward to the backward. Here
each checkpointed layer runs through ``HostCheckpoint`` instead of torch's checkpoint: the forward runs the layer
without recording a graph and copies its input to pinned host memory (on CUDA, on a side stream, so the copy
overlaps the next layers); the backward copies it back, reruns the layer with gradients under the same autocast
and random state, and back-propagates through it, which accumulates the LoRA gradients and returns the gradient of
the input. The arithmetic is the layer's own, run once more: losses and gradients equal torch's checkpoint.

The copy back does not wait for the layer's backward: each layer's backward first starts the copy of the layer
before it (the next one backward reaches) on the side stream, so that copy overlaps this layer's recompute and
backward. The device then holds at most two layer inputs at a time, not one, and no backward waits on the bus
(Llama-3.2-1B 8 x 2048: 16 copies of 64 MiB a step, about 2.5 ms each at 25 GB/s).

A layer called with a positional tensor beyond its input, or with a keyword tensor that needs a gradient, keeps
torch's checkpoint: only the input is offloaded and recomputed through.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["HostCheckpoint", "host_checkpoint", "use_host_checkpoint"]

_side_streams: dict[torch.device, Any] = {}


def _copy_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A host copy of ``x``. On CUDA the copy runs on a side stream once the producing kernels are done (the copy
    back runs later on the same stream, so in order); ``record_stream`` keeps the allocator from reusing ``x``
    before the copy has read it."""
    if x.device.type != "cuda":
        return x.detach().to("cpu", copy=True)
    host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
    stream = _copy_stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        host.copy_(x, non_blocking=True)
    x.record_stream(stream)
    return host


class _Slot:
    """One layer input kept on the host, and its copy back to the device once started. Each slot knows the slot of
    the layer run just before it (``prev``), which is the layer backward reaches next."""

    __slots__ = ("host", "device_copy", "ready", "prev")

    def __init__(self, host: torch.Tensor, prev: "_Slot | None") -> None:
        self.host, self.prev = host, prev
        self.device_copy = self.ready = None

    def prefetch(self, device: torch.device) -> None:
        """Start the copy back to ``device`` on the side stream (once; on CUDA only)."""
        if self.host is None or self.device_copy is not None or device.type != "cuda":
            return
        stream = _copy_stream(device)
        with torch.cuda.stream(stream):  # after the forward's copy to the host: the same stream, in order
            self.device_copy = self.host.to(device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self, device: torch.device) -> torch.Tensor:
        """The input back on ``device``, ready for the current stream; the slot lets go of both copies."""
        self.prefetch(device)
        if device.type != "cuda":
            out = self.host.to(device)
        else:
            current = torch.cuda.current_stream(device)
            current.wait_event(self.ready)
            out = self.device_copy
            out.record_stream(current)  # allocated on the side stream, used and freed on this one
        self.host = self.device_copy = self.ready = self.prev = None
        if _last_slot.get(device) is self:
            del _last_slot[device]
        return out


_last_slot: dict[torch.device, _Slot] = {}  # the slot of the layer that ran last, per device


def _autocast_state(device_type: str) -> dict:
    if not torch.is_autocast_enabled(device_type):
        return {"device_type": device_type, "enabled": False}
    return {"device_type": device_type, "enabled": True, "dtype": torch.get_autocast_dtype(device_type)}


class _Unsliceable(Exception):
    pass


def _rows_of(value, rows: slice, batch: int):
    """``value`` (a layer keyword argument) for the rows ``rows`` of a ``batch``-row micro-batch: tensors whose
    first dimension is the batch are sliced, broadcast ones (first dimension 1) and non-tensors pass as they are;
    anything else raises ``_Unsliceable``."""
    if torch.is_tensor(value):
        if value.dim() == 0 or value.size(0) == 1:
            return value
        if value.size(0) == batch:
            return value[rows]
        raise _Unsliceable
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: _rows_of(v, rows, batch) for k, v in value.items()}
    return value


def row_groups(hidden: torch.Tensor, kwargs: dict, max_tokens: int) -> list[slice] | None:
    """Groups of whole rows of at most ``max_tokens`` tokens (at least one row each) for recomputing a layer
    called with ``hidden`` (B, T, H) and ``kwargs``; None when the recompute must take the batch whole: one group,
    grouping off (0), or keyword arguments that cannot be split by rows (sample offsets of packed rows span the
    flattened batch)."""
    batch = hidden.size(0) if hidden.dim() == 3 else 1
    per_group = max(1, max_tokens // max(hidden.size(1), 1)) if max_tokens > 0 and hidden.dim() == 3 else batch
    if per_group >= batch or any(k.startswith(("cu_seq_lens", "max_length")) for k in kwargs):
        return None
    try:
        _rows_of(kwargs, slice(0, 1), batch)
    except _Unsliceable:
        return None
    return [slice(start, min(start + per_group, batch)) for start in range(0, batch, per_group)]


class HostCheckpoint(torch.autograd.Function):
    """``HostCheckpoint.apply(run, hidden, anchor, groups)``: ``run(hidden)`` with ``hidden`` kept on the host for
    backward. ``anchor``: an empty tensor that needs a gradient, so the output does even when ``hidden`` does not (the
    first layer's input comes from a frozen embedding, and the layer's LoRA tensors still need their gradients).
    ``groups``: None, or ``(rows, run_rows)``: backward recomputes and back-propagates the layer one group of rows at
    a time (``run_rows(hidden[r], r)`` for each slice ``r``), so only that group's activations exist at once. Rows
    never attend to each other, so each group's gradients are the whole batch's for those rows; the LoRA
    gradients add up over the groups."""

    @staticmethod
    def forward(ctx, run: Callable, hidden: torch.Tensor, anchor: torch.Tensor, groups=None):
        ctx.run, ctx.device, ctx.input_grad, ctx.groups = run, hidden.device, hidden.requires_grad, groups
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.device.type == "cuda" else None
        previous = _last_slot.get(hidden.device)
        ctx.slot = _Slot(_to_host(hidden), previous if previous is not None and previous.host is not None else None)
        _last_slot[hidden.device] = ctx.slot
        with torch.no_grad():
            out = run(hidden)
        ctx.single = torch.is_tensor(out)
        return out if ctx.single else tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        slot = ctx.slot
        if slot.prev is not None:  # the layer backward reaches next: its copy overlaps this layer's work
            slot.prev.prefetch(ctx.device)
        hidden = slot.take(ctx.device).requires_grad_(ctx.input_grad)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        if ctx.groups is not None and ctx.single and grads[0] is not None:
            hidden_grad = _grouped_backward(ctx, hidden.detach(), grads[0])
            ctx.run = ctx.slot = ctx.groups = None
            return None, hidden_grad, None, None
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.run(hidden)
        outs = [out] if ctx.single else list(out)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.run = ctx.slot = ctx.groups = None
        return None, hidden.grad if ctx.input_grad else None, None, None


def _grouped_backward(ctx, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
    """Recompute and back-propagate the layer one group of rows at a time; the input's gradient, row by row.
    (Grouping is only set up for layers without dropout, so the random state needs no replay.)"""
    rows_list, run_rows = ctx.groups
    hidden_grad = torch.empty_like(hidden) if ctx.input_grad else None
    for rows in rows_list:
        part = hidden[rows].requires_grad_(ctx.input_grad)
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            out = run_rows(part, rows)
        if out.requires_grad:
            torch.autograd.backward(out, grad[rows])
        if hidden_grad is not None:
            hidden_grad[rows] = part.grad
    return hidden_grad


def _needs_grad(value) -> bool:
    return torch.is_tensor(value) and value.requires_grad


def host_checkpoint(fn: Callable, *args, compiled: Callable | None = None, recompute_tokens: int = 0, **kwargs):
    """A ``_gradient_checkpointing_func`` for transformers' checkpointed layers: ``fn(*args, **kwargs)`` with the
    first argument kept on the host (``HostCheckpoint``); ``compiled(fn, hidden)``, when given, runs the layer in
    both the forward and the recompute. ``recompute_tokens`` > 0: backward recomputes groups of whole rows of at
    most that many tokens (``row_groups``)."""
    bound = getattr(fn, "keywords", None) or {}
    if (not args or not torch.is_tensor(args[0]) or len(args) > 1 or any(map(_needs_grad, bound.values()))
            or any(map(_needs_grad, kwargs.values()))):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    hidden = args[0]

    # transformers binds the layer's keyword arguments into ``fn`` (a functools.partial): take them out, so the
    # recompute by rows can hand each group its rows of them.
    layer_fn, layer_args = (fn.func, fn.args) if bound else (fn, ())
    layer_kwargs = {**bound, **kwargs}

    def run(part: torch.Tensor, layer_kw: dict = layer_kwargs):
        layer = functools.partial(layer_fn, *layer_args, **layer_kw)
        return compiled(layer, part) if compiled else layer(part)

    groups = None
    rows = row_groups(hidden, layer_kwargs, recompute_tokens) if recompute_tokens else None
    if rows is not None:
        batch = hidden.size(0)
        groups = (rows, lambda part, r: run(part, _rows_of(layer_kwargs, r, batch)))
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return HostCheckpoint.apply(run, hidden, anchor, groups)


def has_dropout(model) -> bool:
    """Whether any dropout in ``model`` draws random numbers in training (LoRA dropout, attention dropout)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def use_host_checkpoint(model, compile_layers: bool = False, backend: str = "inductor",
                        recompute_tokens: int = 0) -> int:
    """Route every checkpointed layer of ``model`` through ``host_checkpoint``; returns how many. With
    ``compile_layers`` the layer body is compiled (one graph with gradients, one without, shared by all layers).
    ``recompute_tokens``: see ``host_checkpoint`` (ignored for models with dropout: a group's recompute would
    draw other masks than the forward did)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from nested_learning.speed.compile import decoder_layers, layer_compiler, raise_recompile_limit

    tokens = 0 if has_dropout(model) else recompute_tokens
    func = functools.partial(host_checkpoint, recompute_tokens=tokens)
    if compile_layers:  # the same one graph as speed.compile_scope layers, and the same recompile limit
        raise_recompile_limit(decoder_layers(model))
        func = functools.partial(host_checkpoint, compiled=layer_compiler(backend), recompute_tokens=tokens)
    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = func
            count += 1
    return count


def checkpointable_layers(model) -> int:
    """How many layers of ``model`` transformers can checkpoint (``gradient_checkpointing_enable``)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers without checkpointed layers
        return 0
    return sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())


def checkpointed_layers(model) -> int:
    """How many layers of ``model`` transformers checkpoints (0 when gradient checkpointing is off)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers without checkpointed layers
        return 0
    return sum(isinstance(m, GradientCheckpointingLayer) and bool(m.gradient_checkpointing) for m in model.modules())
