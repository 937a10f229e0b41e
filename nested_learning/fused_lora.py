"""Grouped LoRA: projections that read the same input run as one GEMM (base) plus one low-rank pair.

A decoder layer feeds one tensor into ``q_proj``, ``k_proj`` and ``v_proj``, and another into ``gate_proj``
and ``up_proj``. Under PEFT each of those is its own frozen GEMM plus two skinny LoRA GEMMs (rank r) and an
add, forward and backward: per Llama layer 7 large and ~35 small launches, most of them memory-bound on
the same input. ``fuse_lora_groups`` makes each group one computation:

    y = x @ W_cat^T (+ b_cat)  +  (x @ A_cat^T) @ B_blk^T          (one output, split per projection)

``W_cat`` is the members' frozen weights stacked along the output dimension; the members' ``weight``
parameters become views into it, so no memory is added. ``A_cat`` stacks the members' ``lora_A`` (ranks add
up), ``B_blk`` is block-diagonal in the members' ``lora_B`` times their scaling, rebuilt each call from the
trainable parameters (a few hundred KiB), so gradients flow to PEFT's own parameters: checkpoints, the
optimizer and ``save_pretrained`` see nothing new. The low-rank product is added by ``addmm`` into the base
GEMM's output (the add is the GEMM epilogue); everything is plain differentiable ops, so autograd, autocast
and ``torch.compile`` handle it as they handle ``nn.Linear``.

Mechanics: the first member's ``forward`` computes the whole group and hands the other members their slices
when they are called next with the *same* input tensor (the order every supported architecture uses). Any
member called on another input, or while the group cannot be fused (merged, adapters disabled, dropout,
DoRA, several active adapters, extra arguments), runs PEFT's own forward, so results never depend on this
module being right about the model's call order; only speed does.

The math is PEFT's, up to where rounding happens: the low-rank term is added inside the GEMM in float32
rather than rounded to bf16 first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["GROUPS", "LoraGroup", "fuse_lora_groups", "unfuse_lora_groups"]

log = logging.getLogger("nested_learning.fused_lora")

# Sibling projections that read the same input, in the order the model calls them.
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(eq=False)
class LoraGroup:
    """One fused group: its PEFT LoRA layers, the stacked frozen weight and bias, and the pending split."""

    names: tuple[str, ...]
    members: list  # peft.tuners.lora.layer.Linear, in call order
    weight: torch.Tensor  # (sum out, in) frozen, members' weights are views into it
    bias: torch.Tensor | None
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
        """All members' outputs for input ``x`` (..., in), as views of one (..., sum out) tensor.

        Plain differentiable ops, so autograd, autocast and ``torch.compile`` treat them like any linear layer:
        the frozen GEMM, the (M, R) bottleneck, and ``addmm`` adding the low-rank product into the GEMM's
        output (cuBLAS does the add in the GEMM epilogue). Backward is autograd's: ``dy @ W_cat``,
        ``dy @ B_blk``, the two small weight gradients, no gradient for the frozen weight."""
        adapters = [m.active_adapters[0] for m in self.members]
        a = torch.cat([m.lora_A[n].weight for m, n in zip(self.members, adapters)], 0)
        b = torch.block_diag(*[m.lora_B[n].weight * m.scaling[n] for m, n in zip(self.members, adapters)])
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, self.weight, self.bias)
        y = torch.addmm(y, F.linear(x2, a), b.t())
        return y.view(*lead, y.shape[-1]).split(self.sizes, dim=-1)

    def install(self) -> LoraGroup:
        """Give each member the group's forward (PEFT's own stays the fallback)."""
        for i, m in enumerate(self.members):
            m.forward = MemberForward(self, i, type(m).forward.__get__(m))
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
    """Yield ``(names, members)`` for each group of sibling LoRA linears in ``model`` not yet fused or folded."""
    for parent in model.modules():
        for names in groups:
            members = _lora_linear_children(parent, names)
            if members is not None and not any("forward" in vars(m) for m in members):
                yield names, members


def fuse_lora_groups(model, groups: tuple[tuple[str, ...], ...] = GROUPS) -> list[LoraGroup]:
    """Fuse every group of sibling LoRA projections found in ``model`` (a PEFT model); returns the groups.

    Idempotent: already fused modules are skipped. ``unfuse_lora_groups`` restores PEFT's forwards.
    """
    fused = []
    for names, members in list(unfused_groups(model, groups)):
        bases = [m.get_base_layer() for m in members]
        with torch.no_grad():
            weight = torch.cat([b.weight for b in bases], 0)
            bias = None if bases[0].bias is None else torch.cat([b.bias for b in bases], 0)
            start = 0
            for b in bases:  # the members' frozen weights become views of the stacked copy
                n = b.out_features
                b.weight.data = weight[start : start + n]
                if bias is not None:
                    b.bias.data = bias[start : start + n]
                start += n
        fused.append(LoraGroup(names, members, weight, bias, [b.out_features for b in bases]).install())
    log_groups("fused", fused)
    return fused


def log_groups(verb: str, groups: list) -> None:
    if groups:
        log.info("%s LoRA groups: %d (%s)", verb, len(groups), ", ".join(sorted({"+".join(g.names) for g in groups})))


def unfuse_lora_groups(model) -> int:
    """Give every fused member PEFT's forward and its own contiguous weight again; returns how many."""
    n = 0
    for m in model.modules():
        if "forward" in vars(m) and hasattr(m, "lora_A") and hasattr(m, "get_base_layer"):
            del m.forward
            base = m.get_base_layer()
            with torch.no_grad():
                base.weight.data = base.weight.data.clone()
                base._buffers.pop("lora_fold_weight", None)  # nested_learning.folded_lora's [W | S]
                if base.bias is not None:
                    base.bias.data = base.bias.data.clone()
            n += 1
    return n
