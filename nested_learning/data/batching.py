"""Token samples -> micro-batches: padded (length-grouped) or packed rows, in a seeded, resumable order.

Two layouts (see ``collate``): padded rows with an attention mask, or packed rows where several samples share
a row, ``position_ids`` restart at 0 for each sample and no attention mask is passed (transformers then keeps
attention within each sample).
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch

from nested_learning.data.records import IGNORE_INDEX, DataError, Sample

__all__ = ["Batch", "BatchPlan", "collate", "iterate_batches"]

# Micro-batches per length-sorted chunk under group_by_length: large enough to cut padding, small enough
# that one epoch still mixes short and long batches.
GROUP_CHUNK_BATCHES = 32


@dataclass
class Batch:
    """One micro-batch. ``labels`` are unshifted (position t is predicted from tokens < t), -100 = no loss.

    Padded layout (one sample per row): ``attention_mask`` (B, T) marks real tokens, ``position_ids`` are
    0..T-1 in every row, and ``one_sample_per_row`` is True. Padding follows every real token and carries no
    loss, so plain causal attention is exact for every token that matters: the loss functions let attention
    run with no mask tensor (``nested_learning.speed.causal_mask.causal_rows``).
    Packed layout (some row holds several samples): ``attention_mask`` is None and ``position_ids`` restart
    at 0 for each sample (the padding at the end of a row is its own short sequence with labels -100);
    transformers turns this into a block-diagonal causal mask, which it does only when no attention mask and
    no KV cache are passed.
    """

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    num_tokens: int  # real (non-pad) tokens
    num_loss_tokens: int  # labels[:, 1:] != -100: the tokens a next-token loss is computed on
    one_sample_per_row: bool = False
    # Packed layout: int32 offsets of each sample in the flattened tokens (``speed.varlen.sample_offsets``), found
    # on the host so attention that keeps samples apart without a mask never syncs to find them.
    sample_offsets: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        device = torch.device(device)
        pin = non_blocking and device.type == "cuda" and torch.cuda.is_available()

        def move(t):
            if t is None:
                return None
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

        return replace(
            self, input_ids=move(self.input_ids), labels=move(self.labels),
            attention_mask=move(self.attention_mask), position_ids=move(self.position_ids),
            sample_offsets=move(self.sample_offsets),
        )

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for ``model(**inputs)``: ids, mask or position ids, and ``use_cache=False``.

        ``use_cache=False`` matters beyond memory: with a cache, transformers ignores packed position ids.
        Labels are not included; compute the loss from the logits and ``self.labels``.
        """
        inputs: dict[str, Any] = {"input_ids": self.input_ids, "use_cache": False}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs

    def flattened(self) -> "Batch":
        """The batch as one (1, B*T) row with no attention mask: what flash-attention's varlen path needs (it
        reads sequence boundaries from ``position_ids`` only when the batch has a single row). Each row's
        padding stays at the end of its own sequence and each row's first label is dropped, so the loss is the
        same as ``self``'s."""
        if self.position_ids is None:
            raise ValueError("flattened() needs position_ids (collate makes them)")
        labels = self.labels.clone()
        labels[:, 0] = IGNORE_INDEX  # a row's first label never carries loss; joined to the row before, it would
        return replace(
            self, input_ids=self.input_ids.reshape(1, -1), labels=labels.reshape(1, -1),
            attention_mask=None, position_ids=self.position_ids.reshape(1, -1),
            one_sample_per_row=self.one_sample_per_row and self.input_ids.size(0) == 1,
        )


def _next_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Split positions 0..n-1, in order, into rows whose lengths sum to <= capacity, starting a row only when
    the next sample does not fit. No split of the sequence into contiguous rows uses fewer rows."""
    rows: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit a packed row of max_length={capacity}")
        if not rows or n > room:
            rows.append([])
            room = capacity
        rows[-1].append(i)
        room -= n
    return rows


def collate(samples: Sequence[Sample], pad_id: int, *, packing: bool = False, max_length: int | None = None,
            width: int | None = None, offsets_len: int | None = None) -> Batch:
    """Samples -> ``Batch``, right-padded with ``pad_id`` (labels -100 at padding).

    ``packing=True``: samples are laid, in order, into as few rows of <= ``max_length`` tokens as possible;
    T is the longest row. Each sample's ``position_ids`` start at 0 and its first label is -100 (it has
    no in-sample predecessor), so the summed loss equals the padded layout's on the same samples. When no row
    ends up holding two samples, the batch takes the padded layout (see ``Batch``).
    ``width``: pad rows to at least this many tokens (a fixed batch shape); ``offsets_len``: the length of the
    packed layout's ``sample_offsets`` (a fixed shape for them too; default: a power of two).
    """
    if not samples:
        raise ValueError("collate: no samples")
    if packing:
        if max_length is None:
            raise ValueError("collate: packing needs max_length")
        groups = [[samples[i] for i in row] for row in _next_fit([len(s) for s in samples], max_length)]
    else:
        groups = [[s] for s in samples]

    width = max(max(sum(len(s) for s in g) for g in groups), width or 0)
    ids_rows, label_rows, pos_rows = [], [], []
    for group in groups:
        ids, labels, pos = [], [], []
        for s in group:
            ids += s.input_ids
            labels += s.labels
            if packing and len(s):
                labels[len(labels) - len(s)] = IGNORE_INDEX  # not predicted from the previous sample
                pos += range(len(s))
        pad = width - len(ids)
        ids_rows.append(ids + [pad_id] * pad)
        label_rows.append(labels + [IGNORE_INDEX] * pad)
        if packing:
            pos_rows.append(pos + list(range(pad)))  # the padding tail is a sequence of its own

    input_ids = torch.tensor(ids_rows, dtype=torch.long)  # (B, T)
    labels = torch.tensor(label_rows, dtype=torch.long)  # (B, T)
    one_sample_per_row = all(len(g) == 1 for g in groups)
    if one_sample_per_row:  # the padded layout, whether or not packing was asked for
        lengths = torch.tensor([len(g[0]) for g in groups])
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, T)
        position_ids = torch.arange(width).expand(len(groups), width).contiguous()
        offsets = None
    else:
        from nested_learning.speed.varlen import sample_offsets

        attention_mask, position_ids = None, torch.tensor(pos_rows, dtype=torch.long)
        offsets = sample_offsets(position_ids, size=offsets_len)
    return Batch(
        input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
        num_tokens=sum(len(s) for s in samples), num_loss_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
        one_sample_per_row=one_sample_per_row, sample_offsets=offsets,
    )


def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of <= capacity tokens: longest first, each into the fullest row it fits."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            rows.append([])
            room, r = capacity, len(rows) - 1
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


class BatchPlan:
    """Which samples form each micro-batch of an epoch: a pure function of (seed, epoch).

    Padded mode: ``batch_size`` samples per micro-batch (the last may be smaller). Shuffled each epoch; with
    ``group_by_length`` the shuffled order is cut into chunks of ``GROUP_CHUNK_BATCHES`` micro-batches,
    each chunk sorted by length so its micro-batches hold similar lengths, and the micro-batch order is
    shuffled again.

    Packing mode: ``batch_size`` counts packed rows of ``max_length`` tokens, so a micro-batch holds up to
    ``batch_size * max_length`` real tokens whatever the sample lengths. Samples are packed into rows once
    (best-fit decreasing, independent of seed and epoch, which keeps ``len(plan)`` fixed); each epoch
    shuffles the rows and takes ``batch_size`` rows per micro-batch. ``group_by_length`` has no effect.
    ``collate(..., packing=True)`` on a micro-batch's samples rebuilds at most ``batch_size`` rows.
    ``fixed_width`` (packing only): every row is padded to ``max_length``, so all full micro-batches have one
    shape (what CUDA graph replay needs); padding carries no loss.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = True,
        packing: bool = False,
        max_length: int | None,
        fixed_width: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not samples:
            raise DataError("no samples to batch")
        if packing and max_length is None:
            raise ValueError("BatchPlan: packing needs max_length")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_by_length, self.packing, self.max_length = group_by_length, packing, max_length
        self.fixed_width = fixed_width and packing
        self.lengths = [len(s) for s in samples]
        self.rows = _best_fit_decreasing(self.lengths, max_length) if packing else None
        units = len(self.rows) if packing else len(self.lengths)
        self._len = math.ceil(units / batch_size)
        # The most samples ``batch_size`` packed rows can hold, each with at most one padding tail (offsets_len).
        fullest = sorted((len(row) for row in self.rows), reverse=True)[:batch_size] if packing else []
        self._most_samples = sum(fullest) + batch_size

    @property
    def offsets_len(self) -> int | None:
        """With ``fixed_width``: one length for every micro-batch's ``sample_offsets``, so they too keep one shape.
        A micro-batch holds ``batch_size`` packed rows, each its samples and at most one padding tail: the
        ``batch_size`` fullest rows bound its samples, plus one offset for the end; rounded up to a power of two."""
        if not self.fixed_width:
            return None
        return max(8, 1 << self._most_samples.bit_length())

    def __len__(self) -> int:
        return self._len

    def epoch(self, e: int) -> list[list[int]]:
        rng = random.Random(f"nested-learning/batches/{self.seed}/{e}")
        bs = self.batch_size
        if self.packing:
            rows = list(self.rows)
            if self.shuffle:
                rng.shuffle(rows)
            return [[i for row in rows[k : k + bs] for i in row] for k in range(0, len(rows), bs)]
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            chunk = bs * GROUP_CHUNK_BATCHES
            order = [
                i for c in range(0, len(order), chunk)
                for i in sorted(order[c : c + chunk], key=lambda i: -self.lengths[i])
            ]
        batches = [order[k : k + bs] for k in range(0, len(order), bs)]
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches


def iterate_batches(samples: Sequence[Sample], plan: BatchPlan, pad_id: int, *, start: int = 0) -> Iterator[Batch]:
    """Endless micro-batches following ``plan``, epoch after epoch, beginning at global micro-batch ``start``.

    Micro-batch ``k`` is always micro-batch ``k % len(plan)`` of epoch ``k // len(plan)``, so resuming with
    ``start=k`` yields exactly what an uninterrupted run yields from its ``k``-th micro-batch on.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    epoch, offset = divmod(start, len(plan))
    width = plan.max_length if plan.fixed_width else None  # fixed_width implies packing
    offsets_len = plan.offsets_len
    while True:
        for indices in plan.epoch(epoch)[offset:]:
            yield collate([samples[i] for i in indices], pad_id, packing=plan.packing, max_length=plan.max_length,
                          width=width, offsets_len=offsets_len)
        epoch, offset = epoch + 1, 0
