"""The training loss: summed next-token cross-entropy of a micro-batch and its loss-token count.

The trainer divides the summed token loss of a whole optimizer step by the step's loss-token count, so
splitting a batch into micro-batches, padding it or packing it never changes the loss or its gradient.
``make_loss_fn`` picks the implementation the speed plan chose: the model's full-logits forward
(``token_loss_sum``) or the chunked head + cross-entropy (:mod:`nested_learning.speed.chunked_loss`), which
compute the same number.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from nested_learning.data.records import IGNORE_INDEX
from nested_learning.speed.varlen import batch_attention

__all__ = ["make_loss_fn", "token_loss_sum"]


def token_loss_sum(model, batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over loss tokens, number of loss tokens) for one ``Batch``.

    Labels are unshifted (position t predicts label t+1); -100 marks positions that carry no loss.
    The sum is float32 and stays on the device: the caller decides when to read it back.
    """
    with batch_attention(model, batch) as inputs:
        logits = model(**inputs).logits  # (B, T, V)
    logits = logits[:, :-1, :].float()  # (B, T-1, V): position t predicts token t+1
    targets = batch.labels[:, 1:].to(logits.device)  # (B, T-1)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int(batch.num_loss_tokens)


def make_loss_fn(chunk_tokens: int, kernel: str = "triton") -> Callable:
    """The loss the trainer uses: chunked when ``chunk_tokens > 0`` (``speed.loss_chunk_tokens``, with
    ``speed.loss_chunk_kernel``), else full logits."""
    if chunk_tokens <= 0:
        return token_loss_sum

    def loss_fn(model, batch):
        return chunked_token_loss_sum(model, batch, chunk_tokens, kernel)

    from nested_learning.speed.chunked_loss import chunked_token_loss_sum


    loss_fn.__name__ = f"chunked_token_loss_sum[{chunk_tokens},{kernel}]"
    return loss_fn
