"""Head + cross-entropy over chunks of rows, so the full (tokens x vocab) logits never exist.

``chunked_token_loss_sum`` runs the decoder to its last hidden states, then ``linear_cross_entropy_sum`` over
chunks of rows. Each chunk's logits exist only while that chunk is processed; the gradient with respect to the
hidden states is computed in the same pass (the head is frozen under LoRA), so backward keeps no logits either.
With a 152k vocabulary at 8 x 1024 tokens that is ~10 GiB of float32 logits, softmax and gradient never
allocated. Same value and gradients as ``train.loss.token_loss_sum`` to float32 rounding; models whose logits are
not a plain linear head on the decoder (soft-capping, logit scaling) take the full path (``decoder_and_head``).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from nested_learning.data.records import IGNORE_INDEX
from nested_learning.model.loading import unwrap_model
from nested_learning.speed.varlen import batch_attention

__all__ = ["chunked_token_loss_sum", "decoder_and_head", "head_blocker", "linear_cross_entropy_sum"]

log = logging.getLogger("nested_learning.speed")
def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """One chunk's summed CE in float32; with ``want_grad``, ``logits`` is overwritten by d(sum CE)/d(logits).

    ``logits`` (n, V) as the head produced them (bf16 under autocast); the softmax is taken in float32,
    exactly as ``token_loss_sum`` does after ``.float()``. The gradient, softmax minus the target's one-hot on
    rows that carry loss, is one element-wise expression written in place: compiled, it is a single pass that
    reads the logits and writes the gradient in their dtype, with no float32 (n, V) tensor and no second
    (n, V) buffer.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 (float64 stays float64)
    valid = targets != IGNORE_INDEX
    safe = targets.clamp_min(0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, safe).squeeze(1)) * valid).sum()
    if want_grad:
        columns = torch.arange(x.size(1), device=x.device)
        one_hot = (columns.unsqueeze(0) == safe).to(x.dtype)
        grad = (torch.exp(x - lse.unsqueeze(1)) - one_hot) * valid.unsqueeze(1)  # ignored rows: no gradient
        logits.copy_(grad)
    return loss


_compiled_chunk: Callable | None = None
CHUNK_KERNELS = ("triton", "compile")


def _compiled(device: torch.device) -> Callable:
    """On CUDA the chunk's element-wise work as fused kernels (torch.compile); eager elsewhere or if
    compilation is unavailable."""
    global _compiled_chunk
    if device.type != "cuda":
        return _ce_chunk
    if _compiled_chunk is None:
        from nested_learning.speed.compile_cache import tag_compile_caches

        tag_compile_caches()
        try:
            # dynamic=None: the last chunk of a step and packed widths vary, so after the first new row count
            # the chunk is recompiled once with a symbolic row count instead of once per count (which would
            # hit dynamo's recompile limit and fall back to eager).
            _compiled_chunk = torch.compile(_ce_chunk, dynamic=None)
        except Exception as exc:  # pragma: no cover - depends on the CUDA toolchain
            log.warning("chunked loss: torch.compile unavailable (%s); using the eager chunk", exc)
            _compiled_chunk = _ce_chunk
    return _compiled_chunk


def _chunk_fn(device: torch.device, kernel: str = "triton") -> Callable:
    """The per-chunk loss (and logits gradient): ``speed.loss_chunk_kernel``. ``triton`` is the two-pass row
    kernel of ``ce_kernel.py`` where it can run (CUDA, Triton installed), else the compiled chunk; ``compile``
    the compiled chunk. The CPU always runs the eager chunk."""
    compiled = _compiled(device)
    if kernel != "triton" or device.type != "cuda":
        return compiled
    from nested_learning.speed import ce_kernel

    def chunk(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool) -> torch.Tensor:
        if ce_kernel.available(logits):
            return ce_kernel.ce_chunk(logits, targets, want_grad)
        return compiled(logits, targets, want_grad)

    return chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, kernel: str):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        want_grad = want_h or want_w or want_b
        fn = _chunk_fn(hidden.device, kernel)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if want_b else None
        for start in range(0, hidden.size(0), chunk):
            h = hidden[start : start + chunk]
            logits = F.linear(h, weight, bias)  # (n, V): the only logits alive at any time
            total += fn(logits, targets[start : start + chunk], want_grad)
            if want_grad:
                g = logits  # now d(loss)/d(logits), in place
                if want_h:
                    grad_h[start : start + chunk] = g @ weight.to(g.dtype)
                if want_w:
                    grad_w += g.t() @ h.to(g.dtype)
                if want_b:
                    grad_b += g.sum(0)
            del logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # The loss is a scalar: its gradients were computed in forward; scale them by the incoming gradient.
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             bias: torch.Tensor | None = None, chunk: int = 2048,
                             kernel: str = "triton") -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100, reduction="sum")``
    without ever holding more than ``chunk`` rows of logits. ``hidden`` (N, H), ``weight`` (V, H), ``targets`` (N,).
    Same value and gradients as the full computation (to float32 rounding). ``kernel``: see ``_chunk_fn``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if kernel not in CHUNK_KERNELS:
        raise ValueError(f"kernel must be one of {CHUNK_KERNELS}, got {kernel!r}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, kernel)


def head_blocker(model) -> str | None:
    """Why the chunked loss cannot stand in for this model's own logits, or None when it can: the logits must be
    exactly ``head(decoder(...).last_hidden_state)`` with a plain linear head."""
    lm = unwrap_model(model)
    config = getattr(lm, "config", None)
    if config is None:
        return "the model has no config"
    for field in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, field, None):
            return f"{field} in the model config"
    get_decoder, get_head = getattr(lm, "get_decoder", None), getattr(lm, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return "no separate decoder and head"
    decoder, head = get_decoder(), get_head()
    if decoder is None or decoder is lm:
        return "no separate decoder"
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        return "the head carries a LoRA adapter (lora.target_modules includes it)"
    if type(head) is not torch.nn.Linear:
        return f"the head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear"
    return None


def decoder_and_head(model):
    """(decoder returning last hidden states, linear head), or None when ``head_blocker`` names a reason."""
    if head_blocker(model) is not None:
        return None
    lm = unwrap_model(model)
    return lm.get_decoder(), lm.get_output_embeddings()


def chunked_token_loss_sum(model, batch, chunk: int = 2048, kernel: str = "triton") -> tuple[torch.Tensor, int]:
    """``token_loss_sum`` without the full logits (see the module docstring); falls back to it for models
    whose head is not a plain linear layer on the decoder's output."""
    parts = decoder_and_head(model)
    if parts is None:
        from nested_learning.train.loss import token_loss_sum

        return token_loss_sum(model, batch)
    decoder, head = parts
    with batch_attention(decoder, batch) as inputs:
        hidden = decoder(**inputs).last_hidden_state  # (B, T, H)
    hidden = hidden[:, :-1, :].reshape(-1, hidden.size(-1))
    targets = batch.labels[:, 1:].to(hidden.device).reshape(-1)
    loss_sum = linear_cross_entropy_sum(hidden, head.weight, targets, bias=head.bias, chunk=chunk, kernel=kernel)
    return loss_sum, int(batch.num_loss_tokens)
