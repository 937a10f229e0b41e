"""One chunk of the chunked cross-entropy as a Triton kernel: loss and logits-gradient in two passes over a row.

``chunked_loss._ce_chunk`` states the math: per row, ``lse = logsumexp(x)`` in float32, loss ``lse - x[target]``, and
(with ``want_grad``) the gradient ``softmax(x) - onehot(target)`` written over the logits in their dtype; rows
whose target is -100 add no loss and get a zero gradient. Compiled by inductor, that is a logsumexp kernel
that reads each row twice (maximum, then sum of exponentials) and a gradient kernel that reads it once more
and writes it: three reads and a write of the (rows x vocab) logits.

Here one program owns one row. Pass 1 keeps a running maximum and a running sum of exponentials rescaled to
that maximum (per lane, combined at the end), so the row is read once for ``lse``; pass 2 reads it again and
writes the gradient in place. Two reads and a write: at a 128k-152k vocabulary the logits of a 2048-row chunk
are 0.5-0.6 GB, and this is memory-bound work.

CUDA only (Triton); ``available()`` says whether it can run here. The caller keeps the compiled (or eager)
chunk as its fallback.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from nested_learning.data.records import IGNORE_INDEX

__all__ = ["available", "ce_chunk"]

BLOCK = 4096
NUM_WARPS = 8


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows(logits_ptr, targets_ptr, loss_ptr, stride, V, ignore_index,
                WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        target = tl.load(targets_ptr + row)
        # Out-of-range targets read nothing and add nothing (their input ids already failed the embedding lookup).
        valid = (target != ignore_index) & (target >= 0) & (target < V)
        cols = tl.arange(0, BLOCK)
        # Finite start: a lane that only sees masked (-inf) entries keeps sum 0 instead of exp(-inf - -inf).
        run_max = tl.full([BLOCK], -1.0e30, tl.float32)
        run_sum = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, x)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))
        safe = tl.where(valid, target, 0)
        x_target = tl.load(base + safe).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
        if WANT_GRAD:
            keep = tl.where(valid, 1.0, 0.0)
            for start in tl.range(0, V, BLOCK):
                idx = start + cols
                inside = idx < V
                x = tl.load(base + idx, mask=inside, other=0.0).to(tl.float32)
                grad = (tl.exp(x - lse) - tl.where(idx == safe, 1.0, 0.0)) * keep
                tl.store(base + idx, grad.to(logits_ptr.dtype.element_ty), mask=inside)

    return ce_rows


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def available(logits: torch.Tensor) -> bool:
    """Whether ``ce_chunk`` can take these logits: CUDA, a float type Triton stores, rows contiguous."""
    return (logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and logits.dim() == 2 and logits.stride(1) == 1 and _triton_importable())


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """Summed cross-entropy (float32 scalar) of ``logits`` (n, V) against ``targets`` (n,), -100 ignored; with
    ``want_grad`` the logits are overwritten by d(sum)/d(logits). Same contract as ``chunked_loss._ce_chunk``."""
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        # Triton launches on the current device and its stream, so make that the logits' device.
        with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
            _kernel()[(n,)](logits, targets.contiguous(), loss, logits.stride(0), vocab, IGNORE_INDEX,
                            WANT_GRAD=bool(want_grad), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return loss.sum()
