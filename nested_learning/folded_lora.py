"""Folded LoRA: the low-rank product rides inside the frozen GEMM's reduction instead of being a tensor.

PEFT computes a LoRA projection as ``x @ W^T + s * (x @ A^T) @ B^T``. The second term is a full (tokens x out)
tensor: written by a rank-r GEMM, read again by whatever adds it, and in backward the output gradient is read
once more by ``dy @ B``. For gate/up (out = 4-5x hidden) that is most of the LoRA cost. Written as one GEMM,

    y_i = [x | x A_cat^T] @ [W_i | S_i]^T          S_i: (out_i, n*r), s_i * B_i in block i, zeros elsewhere

for the n projections that read the same ``x``, the low-rank term costs r extra steps of the reduction, and in
backward ``dy_i @ [W_i | S_i]`` yields the input gradient and ``dy @ B`` from one GEMM. ``[W_i | S_i]`` is a
persistent buffer whose left block *is* the frozen weight (the base layer's ``weight`` becomes a view into it,
no extra memory); each call writes the current ``s_i * B_i`` into its block before the GEMM, so a stale block
cannot be read. That GEMM is an op opaque to ``torch.compile`` (``nested_learning::lora_fold``), so the block
write stays an in-place write of a few KiB instead of a functional copy of the weight.

Each member computes from its own input and caches nothing, so results never depend on the model's call order
and the forward has no side effects (gradient checkpointing traces and replays it under ``torch.compile``);
compiled, the siblings' identical ``[x | x A_cat^T]`` is computed once.

Gradients go to PEFT's own ``lora_A`` / ``lora_B`` parameters through the cast and scale that feed the op, so
checkpoints, the optimizer and ``save_pretrained`` see nothing new. The math is PEFT's up to where rounding
happens: the low-rank term is summed in the GEMM's float32 accumulator, not rounded to bf16 on its own first.
Calls that cannot fold (merged, adapters off, dropout, DoRA, several adapters, a trainable bias,
extra arguments) run PEFT's forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nested_learning.fused_lora import GROUPS, _lora_linear_children

__all__ = ["FoldedGroup", "fold_lora_groups"]

log = logging.getLogger("nested_learning.folded_lora")
BUFFER = "lora_fold_weight"  # non-persistent buffer on each member's base layer: [W | S]


class _FoldInput(torch.autograd.Function):
    """``xp = [x | x a^T]``, keeping only ``xp`` for backward (its left block is ``x``). Plain ops, so under
    ``torch.compile`` the input gradient's add lands in the next kernel."""

    @staticmethod
    def forward(ctx, x, a):
        xp = torch.cat([x, x @ a.t()], 1)
        ctx.save_for_backward(xp, a)
        return xp

    @staticmethod
    def backward(ctx, dxp):
        xp, a = ctx.saved_tensors
        k = a.shape[1]
        dxa = dxp[:, k:]
        return dxp[:, :k] + dxa @ a, dxa.t() @ xp[:, :k]


@torch.library.custom_op("nested_learning::lora_fold", mutates_args=())
def lora_fold(xp: torch.Tensor, sb: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None,
              start: int) -> torch.Tensor:
    """``xp @ wp^T (+ bias)`` after writing ``sb`` into ``wp[:, start : start + r]``.

    Declared without mutations on purpose: the write is idempotent (it stores the values this very call uses,
    and nothing else reads that block), so no reordering can observe it, and ``torch.compile`` keeps it a
    few-KiB in-place write instead of a functional copy of the whole weight."""
    with torch.no_grad():
        wp[:, start : start + sb.shape[1]].copy_(sb)
    return F.linear(xp, wp, bias)


@lora_fold.register_fake
def _(xp, sb, wp, bias, start):
    return xp.new_empty(xp.shape[0], wp.shape[0])


@torch.library.custom_op("nested_learning::lora_fold_backward", mutates_args=())
def lora_fold_backward(dy: torch.Tensor, xp: torch.Tensor, wp: torch.Tensor, start: int,
                       rank: int) -> list[torch.Tensor]:
    """``[dy @ wp, dy^T @ xp[:, start : start + rank]]``: one GEMM gives the frozen path's input gradient and
    the bottleneck's (``dy @ s B``) together; the second is the rank-r gradient of ``s B``."""
    return [dy @ wp, dy.t() @ xp[:, start : start + rank]]


@lora_fold_backward.register_fake
def _(dy, xp, wp, start, rank):
    return [dy.new_empty(dy.shape[0], wp.shape[1]), dy.new_empty(dy.shape[1], rank)]


def _setup(ctx, inputs, output):
    xp, sb, wp, bias, start = inputs
    ctx.save_for_backward(xp, wp)
    ctx.start, ctx.rank = start, sb.shape[1]


def _backward(ctx, dy):
    xp, wp = ctx.saved_tensors
    dxp, dsb = lora_fold_backward(dy, xp, wp, ctx.start, ctx.rank)
    return dxp, dsb, None, None, None


lora_fold.register_autograd(_backward, setup_context=_setup)


@dataclass(eq=False)
class FoldedGroup:
    """Sibling LoRA projections that read one input, each holding a ``[W_i | S_i]`` buffer."""

    names: tuple[str, ...]
    members: list  # peft.tuners.lora.layer.Linear
    rank: int

    def fusable(self) -> bool:
        for m in self.members:
            active = m.active_adapters
            if m.merged or m.disable_adapters or len(active) != 1:
                return False
            name = active[0]
            if name not in m.lora_A or name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name):
                return False
            if not isinstance(m.lora_dropout[name], torch.nn.Identity) or m.lora_A[name].weight.shape[0] != self.rank:
                return False
            bias = m.get_base_layer().bias
            if bias is not None and bias.requires_grad:
                return False
        return True

    def member_forward(self, index: int, original):
        """Member ``index``'s forward: ``y = lora_fold([x | x A_cat^T], s B, [W | S])``. Each member builds
        ``xp`` from its own input, so any call order is right; under ``torch.compile`` the siblings' identical
        ``xp`` computations are one (common-subexpression elimination), and nothing is cached between calls, so
        the forward has no side effects (gradient checkpointing can trace and replay it)."""
        member = self.members[index]
        start = member.in_features + index * self.rank

        def forward(x, *args, **kwargs):
            if args or kwargs or not self.fusable():
                return original(x, *args, **kwargs)
            base = member.get_base_layer()
            wp = getattr(base, BUFFER)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else wp.dtype
            a = torch.cat([m.lora_A[m.active_adapters[0]].weight for m in self.members], 0).to(dtype)
            name = member.active_adapters[0]
            sb = (member.lora_B[name].weight * member.scaling[name]).to(dtype)
            bias = None if base.bias is None else base.bias.to(dtype)
            xp = _FoldInput.apply(x.reshape(-1, x.shape[-1]).to(dtype), a)
            y = lora_fold(xp, sb, wp, bias, start)
            return y.view(*x.shape[:-1], y.shape[-1])

        return forward


def fold_lora_groups(model, groups: tuple[tuple[str, ...], ...] = GROUPS) -> list[FoldedGroup]:
    """Fold every group of sibling LoRA projections in ``model`` (a PEFT model); returns the groups.

    Idempotent; :func:`nested_learning.fused_lora.unfuse_lora_groups` restores PEFT's forwards and weights."""
    folded = []
    for parent in model.modules():
        for names in groups:
            members = _lora_linear_children(parent, names)
            if members is None or any("forward" in vars(m) for m in members):
                continue
            ranks = {m.lora_A[m.active_adapters[0]].weight.shape[0] for m in members}
            if len(ranks) != 1:
                continue
            span = ranks.pop() * len(members)
            bases = [m.get_base_layer() for m in members]
            for b in bases:
                w = b.weight
                buf = torch.zeros(w.shape[0], w.shape[1] + span, dtype=w.dtype, device=w.device)
                with torch.no_grad():
                    buf[:, : w.shape[1]].copy_(w)
                b.weight.data = buf[:, : w.shape[1]]  # the frozen weight is the buffer's left block
                b.register_buffer(BUFFER, buf, persistent=False)
            group = FoldedGroup(names, members, span // len(members))
            for i, m in enumerate(members):
                m.forward = group.member_forward(i, type(m).forward.__get__(m))
            folded.append(group)
    if folded:
        log.info("folded LoRA groups: %d (%s)", len(folded), ", ".join(sorted({"+".join(g.names) for g in folded})))
    return folded
