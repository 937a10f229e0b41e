"""Training data: JSONL records -> token samples -> padded or packed micro-batches.

``records``: formats (text, prompt/completion, chat), validation with ``file:line`` errors, prompt masking,
train/valid splits. ``batching``: ``Batch``, ``collate`` (padded or packed), ``BatchPlan`` (seeded,
length-grouped order) and ``iterate_batches`` (endless, resumable at any micro-batch).
"""

from nested_learning.data.batching import GROUP_CHUNK_BATCHES, Batch, BatchPlan, collate, iterate_batches
from nested_learning.data.records import (
    IGNORE_INDEX,
    DataError,
    Sample,
    detect_format,
    encode_records,
    load_splits,
    read_jsonl,
)

__all__ = [
    "GROUP_CHUNK_BATCHES",
    "IGNORE_INDEX",
    "Batch",
    "BatchPlan",
    "DataError",
    "Sample",
    "collate",
    "detect_format",
    "encode_records",
    "iterate_batches",
    "load_splits",
    "read_jsonl",
]
