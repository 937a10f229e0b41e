"""Validation loss and perplexity over a list of samples (no RNG is consumed, so evaluating never
changes what training does next)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from nested_learning.loss import make_loss_fn
from nested_learning.model import autocast_context

__all__ = ["evaluate_loss", "perplexity"]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def evaluate_loss(
    model,
    samples: list,
    pad_id: int,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    loss_fn: Callable | None = None,
) -> dict[str, float]:
    """Token-weighted mean loss over ``samples`` (in their given order): ``{loss, ppl, tokens, batches}``.

    ``loss_fn`` defaults to the chunked head + cross-entropy, so a large vocabulary never materialises full logits.
    """
    loss_fn = loss_fn or make_loss_fn(2048)
    from nested_learning.data import collate

    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = 0
    try:
        for start in range(0, len(samples), batch_size):
            if max_batches is not None and batches >= max_batches:
                break
            batch = collate(samples[start : start + batch_size], pad_id).to(device)
            with autocast_context(device):
                loss_sum, n = loss_fn(model, batch)
            total += loss_sum.double()
            count += n
            batches += 1
    finally:
        model.train(was_training)
    loss = float(total) / max(count, 1)
    return {"loss": loss, "ppl": perplexity(loss), "tokens": count, "batches": batches}
