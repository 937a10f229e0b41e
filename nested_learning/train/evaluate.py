"""Evaluation over a list of samples: loss and perplexity, exact match, and the retain sets of ``eval.retain``.

No RNG is consumed, so evaluating never changes what training does next.

Exact match is scored by teacher forcing: a sample matches when, at every position that carries loss, the
model's most likely next token is the target token. That is the same verdict as greedy decoding of the
completion from the prompt (greedy decoding reproduces the target exactly iff each of its steps picks the target
token given the target prefix; the first wrong pick is where both disagree), computed in one batched forward
pass instead of one generation per sample. The completion's EOS carries loss, so a match also stops where
the target stops.

Under data parallelism (``ranks``: the run's ``DistContext``) each rank scores every world-th batch from its rank
on, and the sums (loss, loss tokens, matches) are summed over ranks, so every rank gets the number one process
gets. Every rank runs the same number of forwards: a rank with no batch left in the last round runs one more
whose result it discards, because under ``distributed.strategy: fsdp`` every forward all-gathers the layers with
the other ranks.
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


def _batches(samples: Sequence, pad_id: int, batch_size: int, max_batches: int | None, device: torch.device,
             ranks=None):
    """(batch, counts) pairs: this rank's share of the evaluation batches (all of them for one process);
    ``counts`` is False for a rank's filler forward (see the module doc)."""
    from nested_learning.data import collate

    total = -(-len(samples) // batch_size)
    if max_batches is not None:
        total = min(total, max_batches)
    rank, world = (ranks.rank, ranks.world) if ranks is not None and ranks.active else (0, 1)
    for k in range(rank, -(-total // world) * world, world):
        counts = k < total
        start = (k if counts else total - 1) * batch_size  # a filler repeats the last batch
        yield collate(samples[start : start + batch_size], pad_id).to(device), counts


def _sum_over_ranks(values: list[float | int], ranks, device: torch.device, what: str) -> list[float]:
    """``values`` summed over the ranks of ``ranks`` (float64: exact for counts below 2**53)."""
    if ranks is None or not ranks.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    ranks.all_reduce(t, what)
    return t.tolist()


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
    ranks=None,
) -> dict[str, float]:
    """Token-weighted mean loss over ``samples`` (in their given order): ``{loss, ppl, tokens, batches}``.

    ``loss_fn`` defaults to the chunked head + cross-entropy, so a large vocabulary never materialises full logits.
    ``ranks``: a ``DistContext`` whose ranks share the batches (module doc).
    """
    loss_fn = loss_fn or make_loss_fn(2048)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = 0
    try:
        for batch, counts in _batches(samples, pad_id, batch_size, max_batches, device, ranks):
            with autocast_context(device):
                loss_sum, n = loss_fn(model, batch)
            if counts:
                total += loss_sum.double()
                count += n
                batches += 1
    finally:
        model.train(was_training)
    summed, count, batches = _sum_over_ranks([float(total), count, batches], ranks, device, "summing the evaluation")
    count, batches = int(count), int(batches)
    loss = summed / max(count, 1)
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
    ranks=None,
) -> dict[str, float]:
    """Share of samples whose every loss-carrying token is the model's greedy pick (see the module doc):
    ``{exact_match, matched, scored}``. Samples with no loss token are not scored. ``model`` must return logits
    (the PEFT model, not a compiled decoder-only forward)."""
    from nested_learning.speed.varlen import batch_attention

    device = torch.device(device)
    was_training = model.training
    model.eval()
    matched = scored = 0
    try:
        for batch, counts in _batches(samples, pad_id, batch_size, max_batches, device, ranks):
            with autocast_context(device), batch_attention(model, batch) as inputs:
                logits = model(**inputs).logits
            if not counts:
                continue
            picks = logits[:, :-1, :].argmax(dim=-1)  # (B, T-1): position t's greedy choice for token t+1
            targets = batch.labels[:, 1:]
            carries = targets != IGNORE_INDEX
            rows_ok = ((picks == targets) | ~carries).all(dim=1)
            has_loss = carries.any(dim=1)
            matched += int((rows_ok & has_loss).sum())
            scored += int(has_loss.sum())
    finally:
        model.train(was_training)
    matched, scored = (int(v) for v in _sum_over_ranks([matched, scored], ranks, device, "summing exact matches"))
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
    ranks=None,
) -> dict[str, float]:
    """``evaluate_loss``, plus ``exact_match`` when ``metric == "exact_match"`` (scored on ``logits_model``,
    default ``model``). ``ranks``: a ``DistContext`` whose ranks share the batches (module doc)."""
    res = evaluate_loss(model, samples, pad_id, batch_size=batch_size, max_batches=max_batches, device=device,
                        loss_fn=loss_fn, ranks=ranks)
    if metric == "exact_match":
        em = evaluate_exact_match(logits_model if logits_model is not None else model, samples, pad_id,
                                  batch_size=batch_size, max_batches=max_batches, device=device, ranks=ranks)
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
