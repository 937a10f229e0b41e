"""nested-learning: nested (multi-frequency) LoRA fine-tuning of causal language models.

The top-level names load lazily, so ``from nested_learning import NestedAdamW`` needs only torch, and
``import nested_learning.tiers`` needs no tensor library at all.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "NestedAdamW": "nested_learning.optim.adamw",
    "assign_tiers": "nested_learning.tiers",
    "format_plan": "nested_learning.tiers",
    "TrainConfig": "nested_learning.config",
    "load_config": "nested_learning.config",
    "build_run": "nested_learning.train.setup",
    "train_loop": "nested_learning.train.loop",
    "run_training": "nested_learning.train.loop",
    "TrainerState": "nested_learning.train.state",
    "Callback": "nested_learning.train.state",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nested_learning' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
