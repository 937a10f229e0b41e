"""Tier-aware gradient sync for data-parallel training: what each optimizer step sums over ranks, and clips.

Micro-batches never communicate: each rank's backward accumulates its own gradients. Once per optimizer step
``GradSync.reduce_and_clip`` runs between the backward passes and ``NestedAdamW.step`` and sums over ranks, one
all-reduce per tier (a flat tier is one buffer; otherwise the tier's tensors are packed into one):

- ``every_step``: every tier's gradient, every step. The summed gradient is one process's, and the loop's clip
  (``clip_grad_norm_`` over all trainable tensors) is exactly one process's.
- ``deferred``: a period-1 tier's gradient every step; a tier of period p > 1 only at its due steps. With
  ``accumulate: mean | sum`` its local gradients go into its local accumulator and, at a due step, the local sum
  (accumulator + this step's gradient) is summed over ranks; the optimizer takes that sum through its
  ``chunk_hook``. With ``last`` only the due step's gradient is summed (the others are never applied).
  Communication of a slow tier falls to 1/p.

Clipping under ``deferred`` (docs/distributed.md): the clipped quantity is what the step applies, with its exact
global norm: the summed gradients of the tiers reduced this step, and each due slow tier's summed chunk counted
per step (divided by its period, so a chunk of p gradients weighs like one step's gradient). One coefficient
``min(1, max_norm / norm)`` scales all of them. Gradients a slow tier accumulates between its due steps are
not clipped one by one (their global value is not known yet); the tier's chunk is clipped when it is applied. An
end-of-training flush clips each tier's partial chunk by its own per-step norm.

Besides the tiers, one two-number all-reduce per step sums the step loss and the squared norm of the gradients
kept local this step, so every rank sees the same loss and skips the same non-finite steps.
"""

from __future__ import annotations

from typing import Any

import torch

from nested_learning.optim.adamw import NestedAdamW
from nested_learning.tiers import is_due
from nested_learning.train.distributed import DistContext

__all__ = ["GradSync", "TIER_SYNC_MODES"]

TIER_SYNC_MODES = ("deferred", "every_step")

# What a tier reduces at a step: its gradient, its accumulated chunk, nothing (gradient kept in the local
# accumulator, or discarded by `last`).
GRAD, CHUNK, LOCAL, NONE = "grad", "chunk", "local", "none"


def _flatten(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """One new contiguous buffer holding ``tensors`` back to back."""
    if len(tensors) == 1:
        flat = tensors[0].reshape(-1)
        return flat.to(dtype) if dtype is not None and flat.dtype != dtype else flat.clone()
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])


def _views_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t.numel() for t in like]
    if sum(sizes) != flat.numel():
        raise RuntimeError(f"grad sync: a tier's summed chunk has {flat.numel()} values, its accumulators "
                           f"{sum(sizes)}")
    return [piece.view_as(t) for piece, t in zip(torch.split(flat, sizes), like)]


class GradSync:
    """The data-parallel side of one run's optimizer steps (see the module docstring)."""

    def __init__(self, ctx: DistContext, optimizer: NestedAdamW, mode: str = "deferred",
                 max_norm: float = float("inf")):
        if mode not in TIER_SYNC_MODES:
            raise ValueError(f"distributed.tier_sync must be one of {', '.join(TIER_SYNC_MODES)}, got {mode!r}")
        self.ctx, self.opt, self.mode = ctx, optimizer, mode
        self.max_norm = max_norm  # optim.max_grad_norm (inf: no clipping)
        self._chunks: dict[int, tuple[int, torch.Tensor]] = {}  # tier -> (due step, summed chunk) for the hook
        optimizer.chunk_hook = self._chunk

    # -- the schedule ---------------------------------------------------------------------------------
    def _accumulates(self, group: dict[str, Any]) -> bool:
        return group["period"] > 1 and self.opt.accumulate != "last"

    def schedule(self, step: int) -> list[str]:
        """What each tier sums over ranks at optimizer step ``step`` (1-based): ``grad``, ``chunk`` (its
        accumulated gradients), ``local`` (kept in the rank's accumulator) or ``none``."""
        plan = []
        for group in self.opt.param_groups:
            period = group["period"]
            if self.mode == "every_step" or period == 1:
                plan.append(GRAD)
            elif not is_due(step, period):
                plan.append(LOCAL if self._accumulates(group) else NONE)
            else:
                plan.append(CHUNK if self._accumulates(group) else GRAD)
        return plan

    # -- one step ---------------------------------------------------------------------------------------
    def _reduce_grads(self, grads: list[torch.Tensor], what: str) -> None:
        """Sum ``grads`` over ranks in place with one all-reduce."""
        if len(grads) == 1:
            self.ctx.all_reduce(grads[0], what)
            return
        flat = _flatten(grads)
        self.ctx.all_reduce(flat, what)
        torch._foreach_copy_(grads, _views_like(flat, grads))

    def _local_chunk(self, index: int) -> torch.Tensor:
        """This rank's accumulated gradients of tier ``index`` plus this step's, as one float32 buffer."""
        grads, accs = self.opt.tier_buffers(index)
        parts = [g.float() if a is None else a + g for g, a in zip(grads, accs)]
        return parts[0].reshape(-1) if len(parts) == 1 else torch.cat([t.reshape(-1) for t in parts])

    def reduce_and_clip(self, step_loss: torch.Tensor,
                        trainable: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum this step's gradients over ranks and clip them; returns (global step loss, gradient norm).

        The norm is that of the clipped quantity (see the module docstring), made non-finite when a gradient
        kept local on any rank is not finite, so the non-finite guard skips the step on every rank."""
        for p in trainable:  # a parameter no rank's loss reached still takes part in the sums
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        step = self.opt.global_step + 1
        self._chunks.clear()
        reduced, chunks, local = [], [], []
        for index, (group, what) in enumerate(zip(self.opt.param_groups, self.schedule(step))):
            if not group["params"]:
                continue
            if what == GRAD:
                grads, _ = self.opt.tier_buffers(index)
                self._reduce_grads(grads, f"tier {index} gradient")
                reduced += grads
            elif what == CHUNK:
                chunk = self._local_chunk(index)
                self.ctx.all_reduce(chunk, f"tier {index} chunk")
                self._chunks[index] = (step, chunk)
                chunks.append((chunk, group["period"]))
            elif what == LOCAL:
                local += self.opt.tier_buffers(index)[0]
        zero = torch.zeros((), device=step_loss.device)
        local_sq = torch.stack(torch._foreach_norm(local)).float().pow(2).sum() if local else zero
        stats = torch.stack([step_loss.float(), local_sq.to(step_loss.device)])
        self.ctx.all_reduce(stats, "step loss")
        if self.mode == "every_step":
            norm = torch.nn.utils.clip_grad_norm_(trainable, self.max_norm, foreach=True)
        else:
            norm = self._clip(reduced, chunks, self.max_norm, zero)
        norm = torch.where(torch.isfinite(stats[1]), norm, stats[1].to(norm.device))
        return stats[0], norm

    @staticmethod
    def _clip(grads: list[torch.Tensor], chunks: list[tuple[torch.Tensor, int]], max_norm: float,
              zero: torch.Tensor) -> torch.Tensor:
        """Scale ``grads`` and the chunks by ``min(1, max_norm / norm)``, ``norm`` counting each chunk per step
        (divided by its period); as ``clip_grad_norm_``: the same 1e-6 guard, coefficient clamped at 1."""
        norms = list(torch._foreach_norm(grads)) if grads else []
        norms += [torch.linalg.vector_norm(c) / period for c, period in chunks]
        if not norms:
            return zero
        norm = torch.linalg.vector_norm(torch.stack([n.float().to(zero.device) for n in norms]))
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        for c, _ in chunks:
            c.mul_(coef.to(c.device))
        return norm

    def _chunk(self, index: int, sums: list[torch.Tensor], step: int | None) -> list[torch.Tensor]:
        """``NestedAdamW.chunk_hook``: the tier's chunk summed over ranks instead of this rank's."""
        if self.mode == "every_step":
            return sums  # every rank accumulated the summed gradients already
        prepared = self._chunks.pop(index, None)
        if step is not None and prepared is not None and prepared[0] == step:
            return _views_like(prepared[1], sums)
        # A flush (or a due step nothing was prepared for): sum the partial chunk now, clip it per step.
        flat = _flatten(sums, torch.float32)
        self.ctx.all_reduce(flat, f"tier {index} chunk")
        group = self.opt.param_groups[index]
        steps = group["period"] if step is not None else max(1, group["pending"])  # gradients in the chunk
        self._clip([], [(flat, steps)], self.max_norm, torch.zeros((), device=flat.device))
        return _views_like(flat, sums)

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict with every accumulator summed over ranks (call on every rank; rank 0
        saves it): a resume on any number of ranks then holds the whole sum once (see ``after_load``)."""
        sd = self.opt.state_dict()
        if self.mode == "every_step":
            return sd
        for group, saved in zip(self.opt.param_groups, sd["param_groups"]):
            if not self._accumulates(group) or group["pending"] == 0:
                continue
            keys = [k for k in saved["params"] if "acc" in sd["state"].get(k, {})]
            accs = [sd["state"][k]["acc"] for k in keys]
            if not accs:
                continue
            flat = _flatten(accs, torch.float32)
            self.ctx.all_reduce(flat, "accumulators")
            for k, total in zip(keys, _views_like(flat, accs)):
                sd["state"][k] = {**sd["state"][k], "acc": total.clone()}
        return sd

    def after_load(self) -> None:
        """After a resume: under ``deferred`` rank 0 keeps the saved (summed) accumulators and the other ranks
        start theirs from zero, so the sum over ranks is the saved one; under ``every_step`` every rank keeps
        them (each holds the summed gradients)."""
        if self.mode == "every_step" or self.ctx.is_main:
            return
        for st in self.opt.state.values():
            if "acc" in st:
                st["acc"].zero_()
