"""Sibling LoRA projections (q/k/v, gate/up) found in a PEFT model and run as one group.

A decoder layer feeds one tensor into ``q_proj``, ``k_proj`` and ``v_proj``, and another into ``gate_proj``
and ``up_proj``. A :class:`LoraGroup` gives each member a forward that lets the *first* member compute the
whole group (:meth:`LoraGroup.run`, defined by :mod:`nested_learning.speed.lora_fold`) and hands the other
members their outputs when they are called next with the *same* input tensor, the order every supported
architecture uses. Any member called on another input, or while the group cannot run as one (merged,
adapters disabled, dropout, DoRA, several active adapters, extra arguments), runs PEFT's own forward, so
results never depend on this module being right about the model's call order; only speed does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

__all__ = ["GROUPS", "LoraGroup", "log_groups", "unfold_lora_groups", "unfused_groups"]

log = logging.getLogger("nested_learning.speed")

# Sibling projections that read the same input, in the order the model calls them.
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(eq=False)
class LoraGroup:
    """Sibling LoRA projections run as one computation: their PEFT layers, output sizes, the pending split.
    Subclasses define :meth:`run`."""

    names: tuple[str, ...]
    members: list  # peft.tuners.lora.layer.Linear, in call order
    has_bias: bool
    sizes: list[int]
    _pending: tuple | None = field(default=None, repr=False)

    def fusable(self) -> bool:
        for m in self.members:
            active = m.active_adapters
            if m.merged or m.disable_adapters or len(active) != 1:
                return False
            name = active[0]
            if name not in m.lora_A or name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name):
                return False
            if not isinstance(m.lora_dropout[name], torch.nn.Identity) or getattr(m, "lora_bias", {}).get(name):
                return False
            base = m.get_base_layer()
            if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
                return False
        return True

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether this call can take the grouped path (beyond :meth:`fusable`); subclasses add checks."""
        return True

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All members' outputs for input ``x`` (..., in)."""
        raise NotImplementedError

    def install(self) -> "LoraGroup":
        """Give each member the group's forward (PEFT's own stays the fallback)."""
        for i, m in enumerate(self.members):
            # The bound method, not the object: dynamo guards a callable object by identity, which would give
            # every decoder layer its own graph under speed.compile_scope layers; a bound method is guarded by
            # its function, which all members share.
            m.forward = MemberForward(self, i, type(m).forward.__get__(m)).__call__
        return self


class MemberForward:
    """A member's forward: the first member checks the group and computes it for the others, who take their
    output when called next with the *same* input tensor; anything else runs PEFT's forward (``original``).

    An object rather than a closure so that ``copy.deepcopy`` of the model copies the group along with its
    modules (a closure would keep pointing at the original's)."""

    def __init__(self, group: LoraGroup, index: int, original):
        self.group, self.index, self.original = group, index, original

    def __call__(self, x, *args, **kwargs):
        group, index = self.group, self.index
        if args or kwargs:
            return self.original(x, *args, **kwargs)
        if index == 0:  # the leader checks the group once and computes it for the others
            if not (group.fusable() and group.accepts(x)):
                group._pending = None
                return self.original(x)
            parts = group.run(x)
            group._pending = (x, parts)
            return parts[0]
        pending = group._pending
        if pending is not None and pending[0] is x:
            if index == len(group.members) - 1:
                group._pending = None
            return pending[1][index]
        return self.original(x)


def _lora_linear_children(parent, names):
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    found = [getattr(parent, n, None) for n in names]
    if not all(isinstance(m, LoraLinear) for m in found):
        return None
    bases = [m.get_base_layer() for m in found]
    if not all(type(b) is torch.nn.Linear for b in bases):
        return None
    w0 = bases[0].weight
    if any(b.in_features != bases[0].in_features or b.weight.dtype != w0.dtype or b.weight.device != w0.device
           for b in bases):
        return None
    if len({b.bias is None for b in bases}) != 1:
        return None
    return found


def unfused_groups(model, groups: tuple[tuple[str, ...], ...] = GROUPS):
    """Yield ``(names, members)`` for each group of sibling LoRA linears in ``model`` not yet grouped."""
    for parent in model.modules():
        for names in groups:
            members = _lora_linear_children(parent, names)
            if members is not None and not any("forward" in vars(m) for m in members):
                yield names, members


def log_groups(verb: str, groups: list) -> None:
    if groups:
        log.info("%s LoRA groups: %d (%s)", verb, len(groups), ", ".join(sorted({"+".join(g.names) for g in groups})))


def unfold_lora_groups(model) -> int:
    """Give every grouped member PEFT's forward and its own contiguous weight again; returns how many."""
    n = 0
    for m in model.modules():
        if "forward" in vars(m) and hasattr(m, "lora_A") and hasattr(m, "get_base_layer"):
            del m.forward
            base = m.get_base_layer()
            with torch.no_grad():
                base.weight.data = base.weight.data.clone()
                base._buffers.pop("lora_fold_weight", None)  # lora_fold's [W | S]
                if base.bias is not None:
                    base.bias.data = base.bias.data.clone()
            n += 1
    return n
