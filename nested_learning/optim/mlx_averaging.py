"""Slow copies of the trained weights for the MLX optimizer: consolidation (``tiers.consolidate``) and an EMA
(``tiers.ema``).

The rules are those of :mod:`nested_learning.optim.averaging` (the torch optimizer's), read there and in
docs/tiers.md "Slow weights fed by fast ones":

- ``ema`` and ``slow`` start at the weights before the first step;
- after optimizer step ``s`` the EMA moves toward the new (fast) weights, ``ema = d * ema + (1 - d) * fast``;
  then, when ``s`` is a multiple of ``every``, ``slow += alpha * (fast - slow)`` and ``fast <- slow``;
- evaluation and saved adapters use the EMA; at the end of a completed run one more consolidation.

The copies are entries of each parameter's leaf of the optimizer state (``ema``, ``slow``; float32, or the
parameter's dtype when wider), so ``optimizer.safetensors`` carries them and a resume continues exactly. The
step update is array ops only ("is it due" included), so it runs inside ``mx.compile`` like the rest of the
optimizer step. Interpolations use ``torch.lerp``'s formula, so both backends round alike.

Like :mod:`nested_learning.optim.mlx`, this module imports ``mlx``.
"""

from __future__ import annotations

import mlx.core as mx

from nested_learning.tiers import validate_weight_averages

__all__ = ["FAST", "MlxWeightAverages", "copy_dtype", "lerp"]

FAST = "fast"  # the key of the fast weights in a saved EMA state (they are not kept in the live state)


def lerp(start: mx.array, end: mx.array, weight: float) -> mx.array:
    """``start + weight * (end - start)``, written as ``torch.lerp`` computes it (the far end for weight >= 0.5)."""
    diff = end - start
    return start + weight * diff if weight < 0.5 else end - diff * (1.0 - weight)


def copy_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype of a slow copy: float32, or the parameter's when wider."""
    return dtype if dtype == mx.float64 else mx.float32


class MlxWeightAverages:
    """The ``ema`` and ``consolidate`` settings of one MLX optimizer and the updates they make to a leaf."""

    def __init__(self, ema: float | None = None, consolidate: tuple[int, float] | None = None) -> None:
        self.ema, self.consolidate = validate_weight_averages(ema, consolidate)

    @property
    def active(self) -> bool:
        return self.ema is not None or self.consolidate is not None

    def start(self, leaf: dict, param: mx.array) -> None:
        """The copies a leaf lacks, from ``param``: the weights before the first step (or before the first
        step of a resume whose checkpoint had none)."""
        for key, on in (("ema", self.ema is not None), ("slow", self.consolidate is not None)):
            if on and key not in leaf:
                leaf[key] = param.astype(copy_dtype(param.dtype))

    def after_step(self, leaf: dict, fast: mx.array, step: mx.array) -> mx.array:
        """After optimizer step ``step`` (an array): move the leaf's EMA toward ``fast`` (the stepped weights),
        then consolidate where ``step`` is a multiple of ``every``. Returns the weights to keep."""
        if self.ema is not None:
            leaf["ema"] = lerp(leaf["ema"], fast.astype(leaf["ema"].dtype), 1.0 - self.ema)
        if self.consolidate is not None:
            every, alpha = self.consolidate
            due = (step % every) == 0
            slow = lerp(leaf["slow"], fast.astype(leaf["slow"].dtype), alpha)
            leaf["slow"] = mx.where(due, slow, leaf["slow"])
            fast = mx.where(due, slow.astype(fast.dtype), fast)
        return fast

    def move_ema(self, leaf: dict, fast: mx.array) -> None:
        """One EMA step toward ``fast`` (the end-of-training flush's extra one)."""
        if self.ema is not None and "ema" in leaf:
            leaf["ema"] = lerp(leaf["ema"], fast.astype(leaf["ema"].dtype), 1.0 - self.ema)

    def consolidate_now(self, leaf: dict, fast: mx.array) -> mx.array:
        """``slow += alpha * (fast - slow)``; returns the new fast weights (the slow ones, in ``fast``'s dtype)."""
        leaf["slow"] = lerp(leaf["slow"], fast.astype(leaf["slow"].dtype), self.consolidate[1])
        return leaf["slow"].astype(fast.dtype)
