"""The non-finite guard: every step's loss and gradient norm checked on the device, without a host sync.

Each step the guard turns ``isfinite(loss) & isfinite(grad_norm)`` into the ``found_inf`` flag the optimizer
takes (``NestedAdamW.step(found_inf=...)``): a flagged step changes no weight and no optimizer state. The host
reads the guard only where the loop syncs anyway (loss read-back, evaluation, checkpoint):

- ``stop``: the first bad step halts the run; every later step is flagged too, so the weights stay those before
  the bad step until the next read-back raises ``TrainingError`` naming the step and the values;
- ``skip``: bad steps are skipped; more than ``max_skipped`` in a row halt the run the same way.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from nested_learning.train.state import TrainerState, TrainingError

__all__ = ["NonFiniteGuard"]

log = logging.getLogger("nested_learning.train")


class NonFiniteGuard:
    """Device-side counters for one run; ``counters()`` / ``restore`` carry them through checkpoints."""

    def __init__(self, device: torch.device, mode: str, max_skipped: int, step: int,
                 counters: dict[str, int] | None = None):
        self.mode, self.max_skipped = mode, max_skipped
        counters = counters or {}

        def scalar(value, dtype):
            return torch.tensor(value, dtype=dtype, device=device)

        self.step = scalar(step, torch.int64)  # the step being taken, counted on the device
        self.halted = scalar(False, torch.bool)
        self.consecutive = scalar(counters.get("consecutive", 0), torch.int64)
        self.skipped = scalar(counters.get("skipped", 0), torch.int64)
        # The latest bad step before the halt (the halting one, once halted) and its values.
        self.bad_step = scalar(-1, torch.int64)
        self.bad_loss = scalar(0.0, torch.float32)
        self.bad_norm = scalar(0.0, torch.float32)
        self._reported_skips = int(counters.get("skipped", 0))

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Account one step; returns its ``found_inf`` flag (a float32 scalar on the device, 1.0 = do not apply)."""
        self.step += 1
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        was_halted = self.halted.clone()
        if self.mode == "stop":
            self.halted |= bad
        else:
            self.consecutive = torch.where(bad, self.consecutive + 1, 0)
            self.halted |= self.consecutive > self.max_skipped
            self.skipped += bad & ~self.halted
        record = bad & ~was_halted
        self.bad_step = torch.where(record, self.step, self.bad_step)
        self.bad_loss = torch.where(record, loss.float(), self.bad_loss)
        self.bad_norm = torch.where(record, grad_norm.float(), self.bad_norm)
        return (bad | self.halted).float()

    def _read(self) -> tuple[bool, int, int, int, float, float]:
        # Called at points that sync anyway: after the first read the rest are plain copies.
        return (bool(self.halted.item()), int(self.skipped.item()), int(self.consecutive.item()),
                int(self.bad_step.item()), float(self.bad_loss.item()), float(self.bad_norm.item()))

    def check(self, state: TrainerState) -> int:
        """At a sync point: raise ``TrainingError`` when the run is halted; warn about steps skipped since the
        last check. Returns the run's skipped steps so far."""
        halted, skipped, consecutive, step, loss, norm = self._read()
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        values = f"loss={loss}, grad_norm={norm}"
        if halted:
            why = "" if self.mode == "stop" else (
                f": {consecutive} consecutive non-finite steps, more than optim.max_skipped_steps={self.max_skipped}")
            raise TrainingError(f"non-finite {what} at step {step} ({values}){why}; training stopped, "
                                f"last good checkpoint: {state.last_checkpoint or 'none'}")
        if skipped > self._reported_skips:
            log.warning("skipped %d step(s) with a non-finite loss or gradient norm, the latest: step %d (%s)",
                        skipped - self._reported_skips, step, values)
            self._reported_skips = skipped
        return skipped

    def counters(self) -> dict[str, Any]:
        _, skipped, consecutive, *_ = self._read()
        return {"skipped": skipped, "consecutive": consecutive}
