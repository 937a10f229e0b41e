"""Folded LoRA: the low-rank product rides inside the frozen GEMM's reduction instead of being a tensor.

PEFT computes a LoRA projection as ``x @ W^T + s * (x @ A^T) @ B^T``. The second term is a full (tokens x out)
tensor: written by a rank-r GEMM, read again by whatever adds it, and in backward the output gradient is read
once more by ``dy @ B``. For gate/up (out = 4-5x hidden) that is most of the LoRA cost. Written as one GEMM,

    y_i = [x | x A_cat^T] @ [W_i | S_i]^T          S_i: (out_i, n*r), s_i * B_i in block i, zeros elsewhere

for the n projections that read the same ``x``, the low-rank term costs r extra steps of the reduction, and in
backward ``dy_i @ [W_i | S_i]`` yields the input gradient and ``dy @ B`` from one GEMM. ``[W_i | S_i]`` is a
non-persistent buffer whose left block *is* the frozen weight (the base layer's ``weight`` becomes a view into it,
no extra memory); each call writes the current ``s_i * B_i`` into its block before the GEMM, so a stale block
cannot be read. The op is opaque to ``torch.compile`` (``nested_learning::lora_fold``) so the block write stays
an in-place write of a few KiB instead of a functional copy of the weight.

Gradients go to PEFT's own ``lora_A`` / ``lora_B`` parameters through the cast and scale that feed the op, so
checkpoints, the optimizer and ``save_pretrained`` see nothing new. The math is PEFT's up to where rounding
happens: the low-rank term is summed in the GEMM's float32 accumulator, not rounded to bf16 on its own first.
Calls that cannot fold (merged, adapters off, dropout, DoRA, several adapters, a trainable bias, another
input) run PEFT's forward (the hand-off of the group's outputs from the first member's call to its siblings is
:mod:`nested_learning.speed.lora_groups`). That hand-off is state kept between calls, which
``torch.compile`` cannot trace inside a gradient-checkpointed layer, so the trainer does not fold there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nested_learning.speed.lora_groups import GROUPS, LoraGroup, log_groups, unfused_groups

__all__ = ["FoldedGroup", "fold_lora_groups"]

BUFFER = "lora_fold_weight"  # non-persistent buffer on each member's base layer: [W | S]


@torch.library.custom_op("nested_learning::lora_fold", mutates_args=())
def lora_fold(x: torch.Tensor, a: torch.Tensor, sbs: list[torch.Tensor], wps: list[torch.Tensor],
              biases: list[torch.Tensor]) -> list[torch.Tensor]:
    """[xa, y_1 .. y_n]: the bottleneck ``xa = x a^T`` (kept for backward) and each member's output.

    Declared without mutations on purpose: the write of ``sbs[i]`` into block i of ``wps[i]`` stores the values
    this call uses, the same for every call between two adapter updates, and keeps the buffer's version
    counter. So ``torch.compile`` keeps it an in-place write, and a backward reads the block its forward wrote
    as long as the adapter weights do not change in between (as in any training step). The GEMM input
    ``[x | xa]`` is a temporary: backward keeps ``x``, which the compiler may recompute from the norm before
    it, and the (M, n*r) ``xa``."""
    k, r = x.shape[1], a.shape[0] // len(wps)
    for i, (sb, wp) in enumerate(zip(sbs, wps)):
        # A second forward before an earlier one's backward (an eval pass, two losses summed) must not make
        # autograd reject the buffer that backward reads.
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(wp):
            wp[:, k + i * r : k + (i + 1) * r].copy_(sb)
    xa = x @ a.t()
    xp = torch.cat([x, xa], 1)
    ys = [F.linear(xp, wp, biases[i] if biases else None) for i, wp in enumerate(wps)]
    return [xa, *ys]


@lora_fold.register_fake
def _(x, a, sbs, wps, biases):
    return [x.new_empty(x.shape[0], a.shape[0])] + [x.new_empty(x.shape[0], w.shape[0]) for w in wps]


@torch.library.custom_op("nested_learning::lora_fold_backward", mutates_args=())
def lora_fold_backward(dys: list[torch.Tensor], x: torch.Tensor, xa: torch.Tensor, a: torch.Tensor,
                       wps: list[torch.Tensor]) -> list[torch.Tensor]:
    """[d, e, da, dsb_1 .. dsb_n] for :func:`lora_fold`. ``d = sum_i dy_i @ [W_i | S_i]`` is one (M, K + n*r)
    GEMM chain: its left block is the frozen path's input gradient, its right block the bottleneck's gradient
    ``dxa``; ``e = dxa @ a`` is the low-rank path's input gradient. The caller adds ``d[:, :K] + e`` as a plain
    op, so under ``torch.compile`` the add lands in the next kernel instead of a strided copy here."""
    k, r = a.shape[1], a.shape[0] // len(wps)
    d = dys[0] @ wps[0]
    for dy, wp in zip(dys[1:], wps[1:]):
        d.addmm_(dy, wp)
    dxa = d[:, k:]
    e = dxa @ a
    da = dxa.t() @ x
    dsbs = [dy.t() @ xa[:, i * r : (i + 1) * r] for i, dy in enumerate(dys)]
    return [d, e, da, *dsbs]


@lora_fold_backward.register_fake
def _(dys, x, xa, a, wps):
    m, k = x.shape[0], a.shape[1]
    r = a.shape[0] // len(wps)
    return [x.new_empty(m, k + a.shape[0]), x.new_empty(m, k), a.new_empty(a.shape)] + [
        x.new_empty(w.shape[0], r) for w in wps]


def _setup(ctx, inputs, output):
    x, a, _, wps, biases = inputs
    ctx.save_for_backward(x, output[0], a, *wps)
    ctx.mark_non_differentiable(output[0])  # xa is handed out for backward's sake, not to be used
    ctx.n_bias = len(biases)


def _backward(ctx, grads):
    x, xa, a, *wps = ctx.saved_tensors
    dys = [g if g is not None else x.new_zeros(x.shape[0], w.shape[0]) for g, w in zip(grads[1:], wps)]
    d, e, da, *dsbs = lora_fold_backward(dys, x, xa, a, wps)
    return d[:, : a.shape[1]] + e, da, dsbs, [None] * len(wps), [None] * ctx.n_bias


lora_fold.register_autograd(_backward, setup_context=_setup)


class FoldedGroup(LoraGroup):
    """A :class:`LoraGroup` whose members each hold a ``[W_i | S_i]`` buffer (``BUFFER`` on the base layer)."""

    def fusable(self) -> bool:
        if not super().fusable():
            return False
        rank = {m.lora_A[m.active_adapters[0]].weight.shape[0] for m in self.members}
        return len(rank) == 1 and rank.pop() * len(self.members) == self.span  # ranks as when folded

    def accepts(self, x: torch.Tensor) -> bool:
        """The buffers hold the compute dtype (a float32 model under bf16 autocast runs PEFT's path), and,
        eager, each frozen weight is still the left block of its buffer: ``.to()`` or a safe merge give the
        weight new storage, which is then copied back into the buffer and the weight made a view again."""
        wps = [getattr(m.get_base_layer(), BUFFER) for m in self.members]
        if any(wp.dtype != _compute_dtype(x, wp) or wp.device != x.device for wp in wps):
            return False
        if not torch.compiler.is_compiling():
            for m, wp in zip(self.members, wps):
                base = m.get_base_layer()
                if base.weight.data_ptr() != wp.data_ptr() or base.weight.stride() != wp.stride():
                    with torch.no_grad():
                        wp[:, : base.in_features].copy_(base.weight)
                    base.weight.data = wp[:, : base.in_features]
        return True

    @property
    def span(self) -> int:
        return getattr(self.members[0].get_base_layer(), BUFFER).shape[1] - self.members[0].in_features

    def _biases(self):
        return [m.get_base_layer().bias for m in self.members]

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        names = [m.active_adapters[0] for m in self.members]
        wps = [getattr(m.get_base_layer(), BUFFER) for m in self.members]
        dtype = _compute_dtype(x, wps[0])
        a = torch.cat([m.lora_A[n].weight for m, n in zip(self.members, names)], 0).to(dtype)
        sbs = [(m.lora_B[n].weight * m.scaling[n]).to(dtype) for m, n in zip(self.members, names)]
        biases = [b.to(dtype) for b in self._biases()] if self.has_bias else []
        lead = x.shape[:-1]
        _, *ys = lora_fold(x.reshape(-1, x.shape[-1]).to(dtype), a, sbs, wps, biases)
        return tuple(y.view(*lead, y.shape[-1]) for y in ys)


def _compute_dtype(x: torch.Tensor, wp: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else wp.dtype


def fold_lora_groups(model, groups: tuple[tuple[str, ...], ...] = GROUPS) -> list[FoldedGroup]:
    """Fold every group of sibling LoRA projections in ``model`` (a PEFT model); returns the groups.

    Idempotent; :func:`nested_learning.speed.lora_groups.unfold_lora_groups` restores PEFT's forwards and weights."""
    folded = []
    for names, members in list(unfused_groups(model, groups)):
        adapters = [m.active_adapters[0] if m.active_adapters else None for m in members]
        if any(n not in m.lora_A for m, n in zip(members, adapters)):
            continue  # the active adapter does not cover every member
        ranks = {m.lora_A[n].weight.shape[0] for m, n in zip(members, adapters)}
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
        sizes = [b.out_features for b in bases]
        folded.append(FoldedGroup(names, members, bases[0].bias is not None, sizes).install())
    log_groups("folded", folded)
    return folded
