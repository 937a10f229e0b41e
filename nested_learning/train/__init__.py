"""Training: ``build_run(config, resume) -> Run`` (``setup``), then ``train_loop(run, callbacks, stop)`` (``loop``);
``run_training`` does both. ``state`` (TrainerState, Callback, TrainingError) needs no torch, and nothing here is
imported until asked for, so ``from nested_learning.train.state import Callback`` stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Run": "setup", "build_run": "setup", "train_loop": "loop", "run_training": "loop",
    "Callback": "state", "TrainerState": "state", "TrainingError": "state",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nested_learning.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nested_learning.train.{module}"), name)
