"""Slow copies of the trained weights, kept in the optimizer's state: consolidation and an EMA.

Two readings of "a slow memory fed by a fast one" (``tiers.consolidate`` and ``tiers.ema``):

- **consolidation** (``every=k, alpha=a``; the Lookahead rule): the trained weights are the fast memory and
  ``slow`` a copy of them, starting at the weights before the first step. After every ``k``-th optimizer step
  ``slow += a * (fast - slow)``, then ``fast <- slow``: the fast weights are written into the slow ones and
  reset to them. Adam's moments are kept. At the end of a completed run one last consolidation takes in the
  steps since the previous one, so the final adapter is the slow memory.
- **EMA** (``decay=d``): ``ema`` starts at the weights before the first step and after every optimizer step
  becomes ``d * ema + (1 - d) * fast``. Training continues on the fast weights; evaluation and saved adapters
  use the EMA (:meth:`WeightAverages.swapped_in`). Its weight on the start is ``d**steps`` (0.55 after 120
  steps at 0.995), so it also acts as a pull back toward the start.

Both act on every trainable tensor, whatever its tier: the slow copy is a memory of the whole adapter, and a
tier's period already sets how often its fast weights move between consolidations.

The copies are per-parameter optimizer state (``slow``, ``ema``; float32, or the parameter's dtype when wider),
so checkpoints carry them and a resume continues bit-exactly. Because a checkpoint's adapter then holds the EMA
weights, an EMA optimizer's state dict also carries the fast weights (``fast``), which ``load_state_dict`` writes
back into the parameters. The updates run at every step the optimizer counts, a step skipped for non-finite
gradients included (its fast weights did not move). Under data parallelism every rank holds the same weights
after each step, so the same update on every rank keeps them identical: nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from nested_learning.tiers import validate_weight_averages

__all__ = ["WeightAverages"]


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _like(ps: list[torch.Tensor], copies: list[torch.Tensor]) -> list[torch.Tensor]:
    """``ps`` in the dtypes of ``copies`` (the parameters themselves where they agree: no copy)."""
    return [p if p.dtype == c.dtype else p.to(c.dtype) for p, c in zip(ps, copies)]


class WeightAverages:
    """The consolidation and EMA settings of one optimizer and the updates they make to its state."""

    def __init__(self, ema: float | None = None, consolidate: tuple[int, float] | None = None) -> None:
        self.ema, self.consolidate = validate_weight_averages(ema, consolidate)

    @property
    def active(self) -> bool:
        return self.ema is not None or self.consolidate is not None

    def _copies(self, params: list[torch.Tensor], state: dict, key: str) -> list[torch.Tensor]:
        """Each parameter's ``key`` copy, made from its current value where missing (before the first step)."""
        out = []
        for p in params:
            st = state[p]
            if key not in st:
                st[key] = p.detach().to(_state_dtype(p), copy=True)
            out.append(st[key])
        return out

    def before_step(self, params: list[torch.Tensor], state: dict) -> None:
        """Start the copies at the weights before the first step (a no-op once they exist)."""
        if self.ema is not None:
            self._copies(params, state, "ema")
        if self.consolidate is not None:
            self._copies(params, state, "slow")

    def after_step(self, params: list[torch.Tensor], state: dict, step: int) -> None:
        """After optimizer step ``step``: move the EMA; consolidate when ``step`` is a multiple of ``every``."""
        if self.ema is not None:
            self.update_ema(params, state)
        if self.consolidate is not None and step % self.consolidate[0] == 0:
            self.consolidate_now(params, state)

    def update_ema(self, params: list[torch.Tensor], state: dict) -> None:
        if params:
            emas = self._copies(params, state, "ema")
            torch._foreach_lerp_(emas, _like(params, emas), 1.0 - self.ema)

    def consolidate_now(self, params: list[torch.Tensor], state: dict) -> None:
        """``slow += alpha * (fast - slow)``, then ``fast <- slow`` (in place: flat buffers keep their views)."""
        if params:
            slows = self._copies(params, state, "slow")
            torch._foreach_lerp_(slows, _like(params, slows), self.consolidate[1])
            torch._foreach_copy_(params, _like(slows, params))

    @contextmanager
    def swapped_in(self, params: list[torch.Tensor], state: dict) -> Iterator[None]:
        """The EMA weights in the parameters for the ``with`` block (evaluation, saving), the fast ones after it,
        bit for bit. A no-op without EMA, or before the first step (the EMA would equal the weights)."""
        if self.ema is None or not params or any("ema" not in state.get(p, {}) for p in params):
            yield
            return
        with torch.no_grad():
            fast = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, _like([state[p]["ema"] for p in params], params))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, fast)

    def add_fast_weights(self, params: list[torch.Tensor], packed: dict[int | str, dict[str, Any]],
                         keys: list[int | str]) -> None:
        """With EMA, a saved state carries the fast weights (``fast``) next to each ``ema``: the adapter
        written with it holds the EMA weights, and a resume must continue from the fast ones."""
        if self.ema is None:
            return
        for p, key in zip(params, keys):
            if key in packed and "ema" in packed[key]:
                packed[key] = {**packed[key], "fast": p.detach().clone()}


STATE_KEYS = ("ema", "slow")  # kept at their own precision on load (torch casts state to the parameter dtype)
