"""The training loss, in one function so a fused / chunked implementation can replace it.

The trainer divides the summed token loss of a whole optimizer step by the step's loss-token count, so
splitting a batch into micro-batches, padding it or packing it never changes the loss or its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_loss_sum"]


def token_loss_sum(model, batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over loss tokens, number of loss tokens) for one ``Batch``.

    Labels are unshifted (position t predicts label t+1); -100 marks positions that carry no loss.
    The sum is float32 and stays on the device: the caller decides when to read it back.
    """
    logits = model(**batch.model_inputs()).logits  # (B, T, V)
    logits = logits[:, :-1, :].float()  # (B, T-1, V): position t predicts token t+1
    targets = batch.labels[:, 1:].to(logits.device)  # (B, T-1)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss_sum, int(batch.num_loss_tokens)
