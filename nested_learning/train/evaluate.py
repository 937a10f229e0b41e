"""Evaluation over a list of samples: loss and perplexity, exact match, and the retain sets of ``eval.retain``.

No RNG is consumed, so evaluating never changes what training does next.

Exact match is scored by teacher forcing: a sample matches when, at every position that carries loss, the
model's most likely next token is the target token. That is the same verdict as greedy decoding of the
completion from the prompt (greedy decoding reproduces the target exactly iff each of its steps picks the target
token given the target prefix; the first wrong pick is where both disagree), computed in one batched forward
pass instead of one generation per sample. The completion's EOS carries loss, so a match also stops where
the target stops.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from nested_learning.data.records import IGNORE_INDEX
from nested_learning.model.loading import autocast_context
from nested_learning.train.loss import make_loss_fn

__all__ = ["evaluate_exact_match", "evaluate_loss", "evaluate_samples", "load_eval_file", "load_retain_sets",
           "perplexity"]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _batches(samples: Sequence, pad_id: int, batch_size: int, max_batches: int | None, device: torch.device):
    from nested_learning.data import collate

    for k, start in enumerate(range(0, len(samples), batch_size)):
        if max_batches is not None and k >= max_batches:
            return
        yield collate(samples[start : start + batch_size], pad_id).to(device)


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
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = 0
    try:
        for batch in _batches(samples, pad_id, batch_size, max_batches, device):
            with autocast_context(device):
                loss_sum, n = loss_fn(model, batch)
            total += loss_sum.double()
            count += n
            batches += 1
    finally:
        model.train(was_training)
    loss = float(total) / max(count, 1)
    return {"loss": loss, "ppl": perplexity(loss), "tokens": count, "batches": batches}


@torch.no_grad()
def evaluate_exact_match(
    model,
    samples: list,
    pad_id: int,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Share of samples whose every loss-carrying token is the model's greedy pick (see the module doc):
    ``{exact_match, matched, scored}``. Samples with no loss token are not scored. ``model`` must return logits
    (the PEFT model, not a compiled decoder-only forward)."""
    from nested_learning.speed.causal_mask import causal_rows

    device = torch.device(device)
    was_training = model.training
    model.eval()
    matched = scored = 0
    try:
        for batch in _batches(samples, pad_id, batch_size, max_batches, device):
            with autocast_context(device), causal_rows(batch.one_sample_per_row):
                logits = model(**batch.model_inputs()).logits
            picks = logits[:, :-1, :].argmax(dim=-1)  # (B, T-1): position t's greedy choice for token t+1
            targets = batch.labels[:, 1:]
            carries = targets != IGNORE_INDEX
            rows_ok = ((picks == targets) | ~carries).all(dim=1)
            has_loss = carries.any(dim=1)
            matched += int((rows_ok & has_loss).sum())
            scored += int(has_loss.sum())
    finally:
        model.train(was_training)
    return {"exact_match": matched / scored if scored else float("nan"), "matched": matched, "scored": scored}


def evaluate_samples(
    model,
    samples: list,
    pad_id: int,
    *,
    metric: str = "loss",
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    loss_fn: Callable | None = None,
    logits_model=None,
) -> dict[str, float]:
    """``evaluate_loss``, plus ``exact_match`` when ``metric == "exact_match"`` (scored on ``logits_model``,
    default ``model``)."""
    res = evaluate_loss(model, samples, pad_id, batch_size=batch_size, max_batches=max_batches, device=device,
                        loss_fn=loss_fn)
    if metric == "exact_match":
        em = evaluate_exact_match(logits_model if logits_model is not None else model, samples, pad_id,
                                  batch_size=batch_size, max_batches=max_batches, device=device)
        res["exact_match"] = em["exact_match"]
    return res


def load_eval_file(path: str | Path, tokenizer, *, max_length: int, mask_prompt: bool = True,
                   chat_template: str | None = None) -> list:
    """One JSONL file (any data format) -> samples; problems raise ``DataError`` naming ``path:line``."""
    from nested_learning.data import detect_format, encode_records, read_jsonl

    records = read_jsonl(path)
    fmt = detect_format(records, path)
    samples, _ = encode_records(records, tokenizer, fmt, max_length=max_length, mask_prompt=mask_prompt,
                                chat_template=chat_template, source=str(path))
    return samples


def load_retain_sets(retain: Mapping[str, str], data_cfg, tokenizer) -> dict[str, list]:
    """``eval.retain`` (name -> JSONL path) -> name -> samples, encoded like the training data."""
    return {
        name: load_eval_file(path, tokenizer, max_length=data_cfg.max_length, mask_prompt=data_cfg.mask_prompt,
                             chat_template=data_cfg.chat_template)
        for name, path in retain.items()
    }
