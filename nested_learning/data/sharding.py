"""Each rank's share of the global micro-batches, for data-parallel training.

Every rank walks the same global micro-batch stream: the ``BatchPlan`` of one process whose batch size is
``optim.batch_size × world`` (same order, same epochs, same resume position). A global micro-batch is cut into
``world`` contiguous parts, one per rank: samples in the padded layout, packed rows in the packed layout (the rows
one process would build, so every rank packs exactly as one process does). Parts differ by at most one unit; a
rank whose part is empty (a short last micro-batch) gets one row without loss tokens, which contributes zero loss
and zero gradient but keeps every rank's forward, backward and all-reduces in step.

The ``Batch`` a rank receives holds its own rows, while its ``num_tokens`` and ``num_loss_tokens`` count the
*global* micro-batch: the trainer divides each micro-batch's summed loss by the step's loss tokens, so with the
global count the gradients summed over ranks equal one process's gradient of the whole batch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence

import torch

from nested_learning.data.batching import Batch, BatchPlan, _next_fit, collate
from nested_learning.data.records import IGNORE_INDEX, Sample

__all__ = ["loss_tokens", "part_bounds", "shard_batches", "shard_micro_batch"]


def part_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``rank`` when ``n`` units are cut into ``world`` contiguous parts whose sizes
    differ by at most one (the first ``n % world`` parts take one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def loss_tokens(sample: Sample) -> int:
    """Loss tokens ``sample`` adds to a batch in either layout: a row's (or a packed sample's) first label is
    never predicted, the rest count where they are not ``IGNORE_INDEX``."""
    return sum(label != IGNORE_INDEX for label in sample.labels[1:])


def shard_micro_batch(members: Sequence[Sample], plan: BatchPlan, pad_id: int, rank: int, world: int) -> Batch:
    """Rank ``rank``'s ``Batch`` of the global micro-batch ``members`` (see the module docstring)."""
    if plan.packing:
        units = _next_fit([len(s) for s in members], plan.max_length)  # the rows collate would build
    else:
        units = [[k] for k in range(len(members))]
    start, stop = part_bounds(len(units), rank, world)
    mine = [members[k] for unit in units[start:stop] for k in unit]
    fixed = dict(width=plan.max_length, offsets_len=plan.offsets_len) if plan.fixed_width else {}
    if mine:
        batch = collate(mine, pad_id, packing=plan.packing, max_length=plan.max_length, **fixed)
    else:  # nothing left for this rank: one row that carries no loss
        batch = collate(members[:1], pad_id, packing=plan.packing, max_length=plan.max_length, **fixed)
        batch = replace(batch, labels=torch.full_like(batch.labels, IGNORE_INDEX))
    return replace(batch, num_tokens=sum(len(s) for s in members),
                   num_loss_tokens=sum(loss_tokens(s) for s in members))


def shard_batches(samples: Sequence[Sample], plan: BatchPlan, pad_id: int, *, rank: int, world: int,
                  start: int = 0) -> Iterator[Batch]:
    """Rank ``rank``'s share of every micro-batch ``iterate_batches(samples, plan, pad_id, start=start)`` yields,
    global micro-batch ``k`` at position ``k`` (so a resume at ``start`` continues exactly)."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    epoch, offset = divmod(start, len(plan))
    while True:
        for indices in plan.epoch(epoch)[offset:]:
            yield shard_micro_batch([samples[i] for i in indices], plan, pad_id, rank, world)
        epoch, offset = epoch + 1, 0
