"""Rotary tables (cos, sin) computed as an outer product, laid out (batch, position, dim) from the start.

Some transformers releases (5.17 among them) compute the rotary angles as a batched matrix product of the
inverse frequencies (batch, dim/2, 1) with the positions (batch, 1, T), then transpose the (batch, dim/2, T)
result. Under ``torch.compile`` the cos/sin work is fused into every layer's rotary kernel, forward and
backward, and those kernels then read the angles along the transposed dimension: a stride of T floats between
neighbouring threads. On an H200 that made the rotary backward of Llama-1B (8 x 2048) about 5.8 ms per step,
several times what its memory traffic needs.

``use_outer_rotary(model)`` gives each standard rotary module an instance ``forward`` that computes the same
angles as ``positions[..., None] * inv_freq`` (one float32 product per angle, as the matrix product with an inner
dimension of 1 computes it), so the angles are (batch, T, dim/2) and contiguous. Newer transformers releases
compute it this way themselves. A module is switched only if its own forward returns bit-identical tables on
a probe (float32, bfloat16 and float16 inputs); dynamic and long-context rotary types (which change their
frequencies with the sequence length), modules with parameters and modules with another signature keep their
own forward.

The tables come from one custom op (``nested_learning::rotary_tables``), which ``torch.compile`` treats as opaque:
they are computed once per forward and read by every layer, instead of inductor inlining the cos/sin into each
layer's rotary kernels and recomputing four transcendentals per element, forward and backward. Eager, the op runs
the same ATen calls as the module's own forward.
"""

from __future__ import annotations

import inspect
import logging
import types

import torch

__all__ = ["rotary_modules", "use_outer_rotary"]

log = logging.getLogger("nested_learning.speed")
_DYNAMIC = {"dynamic", "longrope"}


@torch.library.custom_op("nested_learning::rotary_tables", mutates_args=())
def rotary_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) of shape (*position_ids.shape, 2 * len(inv_freq)), times ``scaling``."""
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


@rotary_tables.register_fake
def _(position_ids, inv_freq, scaling):
    shape = (*position_ids.shape, 2 * inv_freq.shape[0])
    return (torch.empty(shape, dtype=torch.float32, device=position_ids.device),
            torch.empty(shape, dtype=torch.float32, device=position_ids.device))


def _outer_forward(self, x, position_ids):
    """The rotary module's ``forward`` once switched (bound to the module, so copies carry their own)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        cos, sin = rotary_tables(position_ids, self.inv_freq, float(self.attention_scaling))
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _candidate(module) -> bool:
    if not type(module).__name__.endswith("RotaryEmbedding") or "forward" in vars(module):
        return False
    if next(module.parameters(), None) is not None:  # learned terms (e.g. a trained scale) are not in the formula
        return False
    if not isinstance(getattr(module, "inv_freq", None), torch.Tensor) or module.inv_freq.dim() != 1:
        return False
    if not isinstance(getattr(module, "attention_scaling", None), (int, float)):
        return False
    rope_type = getattr(module, "rope_type", "default")
    if not isinstance(rope_type, str) or rope_type in _DYNAMIC:
        return False
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["x", "position_ids"]


def _same_tables(module, forward) -> bool:
    """Bit-identical (cos, sin), values and dtype, from the module's own forward and ``forward`` on a probe of
    positions, for float32, bfloat16 and float16 inputs (some modules return float32 tables whatever the input)."""
    device = module.inv_freq.device
    positions = torch.stack([torch.arange(64, device=device), torch.arange(1000, 1064, device=device)])
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.zeros(2, 1, device=device, dtype=dtype)
            ref, new = module(x, positions), forward(x, positions)
            if not all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ref, new)):
                return False
    return True


def rotary_modules(model) -> list:
    """The standard rotary modules of ``model`` (a transformers or PEFT model) whose own forward gives the same
    tables as the outer product, bit for bit: those :func:`use_outer_rotary` switches."""
    found = []
    for name, module in model.named_modules():
        if not _candidate(module):
            continue
        if not _same_tables(module, types.MethodType(_outer_forward, module)):
            log.info("outer_rotary: %s (%s) gives other tables; keeping its forward", name, type(module).__name__)
            continue
        found.append(module)
    return found


def use_outer_rotary(model) -> int:
    """Switch every module of :func:`rotary_modules` to the outer-product tables, in place; returns how many.
    ``speed.outer_rotary`` in the config."""
    modules = rotary_modules(model)
    for module in modules:
        module.forward = types.MethodType(_outer_forward, module)
    return len(modules)
