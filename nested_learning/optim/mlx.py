"""Tiered (multi-frequency) AdamW for MLX.

``NestedAdamW`` subclasses :class:`mlx.optimizers.Optimizer`, so it drops into mlx-lm's own trainer
(``optimizer.update(model, grads)``, including inside ``mx.compile``). The semantics are those of
DESIGN.md "Tier semantics" and of :class:`nested_learning.optim.adamw.NestedAdamW`:

- the optimizer counts its own steps ``s = 1, 2, ...`` (``state["step"]``);
- tier ``k`` (period ``p_k``, ``lr_scale`` ``c_k``) is due at step ``s`` iff ``s % p_k == 0``;
- every step each tier's gradient is added into a float32 accumulator (not for period-1 tiers, not in
  ``accumulate="last"`` mode); at a due step the tier is updated with ``G`` (``mean``: ``acc / p_k``,
  ``sum``: ``acc``, ``last``: the current gradient) and the accumulator is reset;
- Adam moments move only at due steps, bias correction uses the tier's own update count ``n_k``;
- weight decay is decoupled (``θ ← θ − lr·wd·θ`` at due steps, as ``torch.optim.AdamW``);
- ``lr = learning_rate × lr_scale``; a callable learning rate is a schedule evaluated the MLX way, at the
  number of steps taken before this one (``schedule(s - 1)`` at step ``s``, which is also what a torch
  ``LambdaLR`` stepped after each optimizer step gives);
- parameters of tiers that are not due are returned unchanged (bit for bit).

Everything that changes from step to step is an ``mx.array`` in :attr:`state` and "is it due" is computed
with array ops, never with Python control flow on array values, so the update works unchanged when mlx-lm
compiles its step function (``mx.compile(inputs=state, outputs=state)``). Counters, moments and
accumulators are all in :attr:`state`, so ``tree_flatten(opt.state)`` / ``opt.state = tree_unflatten(...)``
(or :meth:`state_dict` / :meth:`load_state_dict`) resume exactly, also in the middle of a slow tier's chunk.

The layout of :attr:`state` (``step``, ``learning_rate``, per-tier ``tiers`` counters, and a ``params`` tree
of per-parameter ``tier`` / ``m`` / ``v`` / ``acc``) is documented, with the helpers that build and walk it, in
:mod:`nested_learning.optim.mlx_state`.

``ema`` and ``consolidate`` keep slow copies of the weights in the same leaves (``ema``, ``slow``;
:mod:`nested_learning.optim.mlx_averaging`, the rules of the torch optimizer's ``averaging`` module): an
exponential average for evaluation and saving (:meth:`NestedAdamW.averaged_weights`) and a Lookahead
consolidation (every ``k`` steps ``slow += alpha * (fast - slow)``, then ``fast <- slow``; one more in
:meth:`NestedAdamW.finish` / :meth:`NestedAdamW.consolidate_final`). The copies start at the weights before the
first update; under ``mx.compile`` take that first update eagerly, so they exist before the trace.

Tiers are assigned from flattened parameter names (``mlx.utils.tree_flatten``, e.g.
``model.layers.3.self_attn.q_proj.lora_a``) with :func:`nested_learning.tiers.assign_tiers`, or from an
explicit ``tier_map`` (name -> tier index). Trainable parameters that nothing maps go to the slowest tier,
with one warning listing them.

This module and its helper :mod:`nested_learning.optim.mlx_state` import ``mlx``; nothing else in
``nested_learning`` imports either, so mlx stays optional.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Mapping, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.optimizers import Optimizer
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from nested_learning.optim.mlx_averaging import FAST, MlxWeightAverages
from nested_learning.optim.mlx_state import (
    check_state,
    fresh_tier_state,
    get_path,
    has_path,
    is_param_state,
    numel,
    recorded_tiers,
    set_path,
)

__all__ = ["NestedAdamW"]

_ACCUMULATE_MODES = ("mean", "sum", "last")


class NestedAdamW(Optimizer):
    """AdamW whose parameters are split into tiers updated at different periods.

    Args:
        learning_rate: float or schedule ``step -> lr`` (MLX convention, see the module docstring).
        betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay is decoupled; default 0).
        accumulate: ``"mean"`` (default), ``"sum"`` or ``"last"``.
        periods: period of each tier, fastest first (default ``[1, 2, 4]``). Ignored when ``tiers`` is given.
        lr_scales: per-tier learning-rate multipliers (default all 1).
        strategy: tier assignment strategy passed to :func:`nested_learning.tiers.assign_tiers`.
        tier_map: explicit ``{flattened name: tier index}``; when given, ``strategy`` is not used.
        tiers: the output of ``assign_tiers`` (list of dicts with ``period``, ``lr_scale``,
            ``param_names``, optionally ``name``); fixes periods, lr_scales and the assignment.
        flush_on_end: read by the trainer: call :meth:`flush` at the end of training.
        ema: decay of an exponential average of the weights (``tiers.ema``), or None.
        consolidate: ``(every, alpha)`` of a Lookahead consolidation (``tiers.consolidate``), or None.
        **assign_options: further options for ``assign_tiers`` (``reverse``, ``rules``, ``manual``, ...).

    Call :meth:`init` with ``model.trainable_parameters()`` before training to fix the assignment early
    (and print the plan); otherwise it happens on the first update, from the gradient tree's names.
    """

    def __init__(
        self,
        learning_rate: Union[float, Callable[[mx.array], mx.array]] = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        accumulate: str = "mean",
        periods: Sequence[int] | None = None,
        lr_scales: Sequence[float] | None = None,
        strategy: str = "layer_depth",
        tier_map: Mapping[str, int] | None = None,
        tiers: Sequence[Mapping[str, Any]] | None = None,
        flush_on_end: bool = True,
        ema: float | None = None,
        consolidate: tuple[int, float] | None = None,
        **assign_options: Any,
    ):
        super().__init__()
        self.averages = MlxWeightAverages(ema, consolidate)
        b1, b2 = (float(b) for b in betas)
        for i, b in enumerate((b1, b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"beta{i + 1} must be in [0, 1), got {b}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if accumulate not in _ACCUMULATE_MODES:
            raise ValueError(f"accumulate must be one of {_ACCUMULATE_MODES}, got {accumulate!r}")

        self.betas = (b1, b2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.accumulate = accumulate
        self.flush_on_end = bool(flush_on_end)
        self.strategy = strategy
        self.assign_options = dict(assign_options)
        self._explicit_map = dict(tier_map) if tier_map is not None else None

        if tiers is not None:
            tiers = list(tiers)
            if not tiers:
                raise ValueError("tiers must not be empty")
            periods = [int(t["period"]) for t in tiers]
            lr_scales = [float(t.get("lr_scale", 1.0)) for t in tiers]
            names = [str(t.get("name", f"tier{k}")) for k, t in enumerate(tiers)]
            mapping: dict[str, int] = {}
            for k, t in enumerate(tiers):
                for n in t.get("param_names", ()):
                    mapping[n] = k
            if self._explicit_map is None:
                self._explicit_map = mapping
        else:
            periods = [1, 2, 4] if periods is None else [int(p) for p in periods]
            if not periods:
                raise ValueError("periods must not be empty")
            names = [f"tier{k}" for k in range(len(periods))]
        if any(p < 1 for p in periods):
            raise ValueError(f"every period must be >= 1, got {periods}")
        lr_scales = [1.0] * len(periods) if lr_scales is None else [float(c) for c in lr_scales]
        if len(lr_scales) != len(periods):
            raise ValueError(f"{len(lr_scales)} lr_scales for {len(periods)} tiers")
        if not all(c > 0 for c in lr_scales):
            raise ValueError(f"lr_scales must be positive numbers, got {lr_scales}")
        if self._explicit_map is not None:
            bad = {n: k for n, k in self._explicit_map.items() if not 0 <= int(k) < len(periods)}
            if bad:
                raise ValueError(f"tier_map names tiers that do not exist (0..{len(periods) - 1}): {bad}")

        self.periods: list[int] = periods
        self.lr_scales: list[float] = lr_scales
        self.tier_names: list[str] = names

        self._maybe_schedule("learning_rate", learning_rate)
        self._state["learning_rate"] = self._state["learning_rate"].astype(mx.float32)
        self._state["tiers"] = fresh_tier_state(self.periods)
        self._state["params"] = {}

        self._tier_of: dict[str, int] = {}  # flattened name -> tier (Python side, fixed at init)
        self._shape_of: dict[str, tuple[int, ...]] = {}
        self._warned_unmapped = False

    # ----------------------------------------------------------------------------------------------- helpers

    @property
    def num_tiers(self) -> int:
        return len(self.periods)

    @property
    def slowest_tier(self) -> int:
        """Index of the tier with the largest period (the last one among ties)."""
        longest = max(self.periods)
        return max(k for k, p in enumerate(self.periods) if p == longest)

    def _uses_acc(self, k: int) -> bool:
        return self.accumulate != "last" and self.periods[k] > 1

    def _assign(self, named: list[tuple[str, Any]]) -> dict[str, int]:
        """Tier index for each (name, array); unmapped -> slowest tier, one warning."""
        names = [n for n, _ in named]
        if self._explicit_map is not None:
            mapping = {n: int(self._explicit_map[n]) for n in names if n in self._explicit_map}
        else:
            from nested_learning.tiers import assign_tiers

            groups = assign_tiers(named, strategy=self.strategy, periods=list(self.periods),
                                  lr_scales=list(self.lr_scales), **self.assign_options)
            if len(groups) != self.num_tiers:
                raise ValueError(f"assign_tiers returned {len(groups)} tiers for periods {self.periods}")
            mapping = {}
            for k, g in enumerate(groups):
                if "name" in g:
                    self.tier_names[k] = str(g["name"])
                for n in g.get("param_names", ()):
                    mapping[n] = k
        unmapped = [n for n in names if n not in mapping]
        if unmapped:
            slow = self.slowest_tier
            for n in unmapped:
                mapping[n] = slow
            if not self._warned_unmapped:
                from nested_learning.tiers import UnmappedParametersWarning

                self._warned_unmapped = True
                shown = ", ".join(unmapped[:32]) + (f", ... ({len(unmapped) - 32} more)" if len(unmapped) > 32 else "")
                warnings.warn(f"{len(unmapped)} trainable parameter(s) matched no tier rule; placed in the slowest "
                              f"tier {slow} (period {self.periods[slow]}): {shown}",
                              UnmappedParametersWarning, stacklevel=4)
        return mapping

    # ----------------------------------------------------------------------------------------------- mlx API

    def init(self, parameters: dict) -> None:
        """Create the state of every array in ``parameters`` (gradients or trainable parameters) that has
        none yet, assigning its tier. Existing state (e.g. restored from a checkpoint) is kept, including
        its tier."""
        flat = [(n, a) for n, a in tree_flatten(parameters) if isinstance(a, mx.array)]
        pstate = self._state.setdefault("params", {})
        if "tiers" not in self._state:
            self._state["tiers"] = fresh_tier_state(self.periods)

        new: list[tuple[str, mx.array]] = []
        for name, arr in flat:
            self._shape_of[name] = tuple(arr.shape)
            if name not in self._tier_of:  # restored tiers are read by the state setter
                new.append((name, arr))
        if new:
            mapping = self._assign(new)
            for name, arr in new:
                self._tier_of[name] = mapping[name]
        for name, arr in flat:
            k = self._tier_of[name]
            if has_path(pstate, name) and is_param_state(get_path(pstate, name)):
                leaf = get_path(pstate, name)
            else:
                leaf = {}
                set_path(pstate, name, leaf)
            leaf["tier"] = mx.array(k, mx.int32)
            self.init_single(arr, leaf)
            if self._uses_acc(k) and "acc" not in leaf:
                leaf["acc"] = mx.zeros(arr.shape, mx.float32)
        self._initialized = True

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Adam moments (float32, whatever the parameter dtype)."""
        if "m" not in state:
            state["m"] = mx.zeros(parameter.shape, mx.float32)
        if "v" not in state:
            state["v"] = mx.zeros(parameter.shape, mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        raise NotImplementedError(
            "NestedAdamW needs the parameter's name to know its tier; use update()/apply_gradients()")

    def _adamw(self, G, m, v, p32, lr_k, n_k):
        """One AdamW step, written like torch.optim.AdamW's single-tensor path."""
        b1, b2 = self.betas
        m_new = b1 * m + (1.0 - b1) * G
        v_new = b2 * v + (1.0 - b2) * mx.square(G)
        n_f = mx.maximum(n_k, 1).astype(mx.float32)
        bc1 = 1.0 - mx.power(mx.array(b1, mx.float32), n_f)
        bc2 = 1.0 - mx.power(mx.array(b2, mx.float32), n_f)
        if self.weight_decay != 0.0:
            p32 = p32 * (1.0 - lr_k * self.weight_decay)
        denom = mx.sqrt(v_new) / mx.sqrt(bc2) + self.eps
        p_new = p32 - (lr_k / bc1) * (m_new / denom)
        return p_new, m_new, v_new

    def apply_gradients(self, gradients: dict, parameters: dict):
        """One optimizer step ``s``; returns the updated parameters (same tree structure as ``gradients``)."""
        if not self._initialized or any(n not in self._tier_of for n, _ in tree_flatten(gradients)):
            self.init(gradients)  # first use, restored state, or newly trainable parameters

        for name, scheduler in self._schedulers.items():
            value = scheduler(self.step)
            self.state[name] = value.astype(mx.float32) if isinstance(value, mx.array) else mx.array(value, mx.float32)
        s = self.step + 1
        self.state["step"] = s
        lr = self.learning_rate.astype(mx.float32)

        due: list[Any] = []
        n_new: list[mx.array] = []
        lr_k: list[mx.array] = []
        for k, (p, t) in enumerate(zip(self.periods, self.state["tiers"])):
            d = True if p == 1 else (s % p) == 0
            due.append(d)
            n = t["updates"] + 1 if p == 1 else t["updates"] + d.astype(mx.int32)
            n_new.append(n)
            lr_k.append(lr * self.lr_scales[k])
            t["updates"] = n
            if self._uses_acc(k):
                t["pending"] = mx.where(d, mx.array(0, mx.int32), t["pending"] + 1)

        pstate = self.state["params"]
        averaging = self.averages.active

        def step_tier(st, g, param, k):  # one tier's update of one tensor
            d = due[k]
            g32 = g.astype(mx.float32)
            if self._uses_acc(k):
                acc = st["acc"] + g32
                G = acc / float(self.periods[k]) if self.accumulate == "mean" else acc
                st["acc"] = mx.where(d, mx.zeros_like(acc), acc)
            else:
                G = g32
            p_new, m_new, v_new = self._adamw(G, st["m"], st["v"], param.astype(mx.float32), lr_k[k], n_new[k])
            p_new = p_new.astype(param.dtype)
            if d is True:
                st["m"], st["v"] = m_new, v_new
                return p_new
            st["m"] = mx.where(d, m_new, st["m"])
            st["v"] = mx.where(d, v_new, st["v"])
            return mx.where(d, p_new, param)

        def fn(path, g, param):
            if g is None:
                return None
            k = self._tier_of.get(path)
            if k is None:
                raise KeyError(f"no optimizer state for parameter {path!r}; call init() with all trainable "
                               "parameters first")
            st = get_path(pstate, path)
            if averaging:
                self.averages.start(st, param)  # the weights before the first step
                return self.averages.after_step(st, step_tier(st, g, param, k), s)
            return step_tier(st, g, param, k)

        return tree_map_with_path(fn, gradients, parameters)

    # ----------------------------------------------------------------------------------------------- extras

    def _flush_lr(self) -> mx.array:
        """The lr a flush uses: the one the next step would use (torch: ``group["lr"]`` after the
        scheduler stepped)."""
        sched = self._schedulers.get("learning_rate")
        if sched is not None:
            value = sched(self.step)
            return value.astype(mx.float32) if isinstance(value, mx.array) else mx.array(value, mx.float32)
        return self.learning_rate.astype(mx.float32)

    def flush(self, model: Union[nn.Module, dict]) -> dict:
        """Apply pending partial accumulators: every tier with gradients in its accumulator gets one last
        update with them (``mean``: ``acc / count``, ``count`` = gradients since its last update; ``sum``:
        ``acc``). ``s`` does not move. Updates ``model`` in place when it is an ``nn.Module``; returns the
        updated parameters (a partial tree). With ``ema``, a flush that moved any weight moves the EMA once
        too (toward all the weights; the returned tree holds the flushed ones). Eager only (not in ``mx.compile``)."""
        if not self._initialized:
            return {}
        lr = self._flush_lr()
        flushed: list[tuple[str, mx.array]] = []
        tiers = self.state["tiers"]
        for k in range(self.num_tiers):
            if not self._uses_acc(k):
                continue
            count = int(tiers[k]["pending"].item())
            if count == 0:
                continue
            n = tiers[k]["updates"] + 1
            lr_k = lr * self.lr_scales[k]
            for name, tk in self._tier_of.items():
                if tk != k:
                    continue
                st = get_path(self.state["params"], name)
                param = get_path(model, name)
                acc = st["acc"]
                G = acc / float(count) if self.accumulate == "mean" else acc
                p_new, st["m"], st["v"] = self._adamw(G, st["m"], st["v"], param.astype(mx.float32), lr_k, n)
                st["acc"] = mx.zeros_like(acc)
                flushed.append((name, p_new.astype(param.dtype)))
            tiers[k]["updates"] = n
            tiers[k]["pending"] = mx.array(0, mx.int32)
        tree = tree_unflatten(flushed) if flushed else {}
        if flushed and isinstance(model, nn.Module):
            model.update(tree)
        if flushed and self.averages.ema is not None:  # weights moved: the EMA follows once more
            new = dict(flushed)
            for name in self._tier_of:
                self.averages.move_ema(get_path(self.state["params"], name), new.get(name, get_path(model, name)))
        mx.eval(self.state, [a for _, a in flushed])
        return tree

    def finish(self, model: Union[nn.Module, dict]) -> dict:
        """End of training: :meth:`flush` unless ``flush_on_end`` is False (as the torch optimizer), then
        :meth:`consolidate_final`. Returns the flushed parameters (a partial tree)."""
        tree = self.flush(model) if self.flush_on_end else {}
        self.consolidate_final(model)
        return tree

    # ----------------------------------------------------------------------------------------------- slow copies

    def _with_copy(self, key: str) -> list[tuple[str, dict]]:
        """(name, state leaf) of every parameter whose leaf holds the copy ``key``."""
        leaves = [(n, get_path(self.state["params"], n)) for n in self._tier_of
                  if has_path(self.state["params"], n)]
        return [(n, leaf) for n, leaf in leaves if key in leaf]

    def consolidate_final(self, model: nn.Module) -> None:
        """With ``consolidate``, at the end of a completed run: one more consolidation, so the weights left in
        ``model`` (the final adapter) are the slow memory, holding the steps since the last consolidation too.
        Nothing before the first step."""
        if self.averages.consolidate is None or int(self.step) == 0:
            return
        fast = [(n, self.averages.consolidate_now(leaf, get_path(model, n))) for n, leaf in self._with_copy("slow")]
        if fast:
            model.update(tree_unflatten(fast))
            mx.eval(self.state, [a for _, a in fast])

    def _ema_weights(self, model: nn.Module) -> list[tuple[str, mx.array]]:
        """(name, EMA in the parameter's dtype); empty without ``ema`` or before the first step."""
        if self.averages.ema is None:
            return []
        pairs = self._with_copy("ema")
        if len(pairs) < len(self._tier_of):
            return []
        return [(n, leaf["ema"].astype(get_path(model, n).dtype)) for n, leaf in pairs]

    @contextmanager
    def averaged_weights(self, model: nn.Module) -> Iterator[None]:
        """The EMA weights in ``model`` for the ``with`` block (evaluation, saving), the fast ones after it,
        bit for bit (the same arrays). Without ``ema``, or before the first step, it changes nothing."""
        ema = self._ema_weights(model)
        if not ema:
            yield
            return
        fast = [(n, get_path(model, n)) for n, _ in ema]
        model.update(tree_unflatten(ema))
        try:
            yield
        finally:
            model.update(tree_unflatten(fast))

    def keep_averaged_weights(self, model: nn.Module) -> None:
        """With ``ema``, at the end of training: the EMA weights into ``model`` for good (what a completed run's
        final adapter holds)."""
        ema = self._ema_weights(model)
        if ema:
            model.update(tree_unflatten(ema))

    @property
    def tier_map(self) -> dict[str, int]:
        """Flattened parameter name -> tier index (known after :meth:`init` or the first update)."""
        return dict(self._tier_of)

    def tier_stats(self) -> list[dict]:
        """Per tier: name, period, lr_scale, updates (n_k), pending (gradients in the accumulator),
        num_tensors, num_params."""
        out = []
        for k in range(self.num_tiers):
            t = self.state["tiers"][k]
            names = [n for n, tk in self._tier_of.items() if tk == k]
            out.append({
                "name": self.tier_names[k],
                "period": self.periods[k],
                "lr_scale": self.lr_scales[k],
                "updates": int(t["updates"].item()),
                "pending": int(t["pending"].item()),
                "num_tensors": len(names),
                "num_params": sum(numel(self._shape_of.get(n, ())) for n in names),
            })
        return out

    def state_dict(self, model: nn.Module | None = None) -> dict[str, mx.array]:
        """Flat ``{name: array}`` of the whole state (``mx.save_safetensors`` can write it). With ``ema`` and a
        ``model``, each parameter's entry also carries its current (fast) weights, ``params.<name>.fast``: the
        adapter saved with it holds the EMA, and a resume must continue from the fast weights."""
        out = dict(tree_flatten(self.state))
        if model is not None and self.averages.ema is not None:
            for name, _ in self._with_copy("ema"):
                out[f"params.{name}.{FAST}"] = get_path(model, name)
        return out

    @property
    def state(self):
        """The optimizer's state tree (layout: :mod:`nested_learning.optim.mlx_state`)."""
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        """Replace the whole state (exact resume); the tiers recorded in it win over any assignment."""
        check_state(state, self.periods)
        self._initialized = False  # init() on next use adds state for parameters the tree lacks
        self._state = state
        state.setdefault("params", {})
        self._tier_of = {}
        for name, (k, shape) in recorded_tiers(state["params"]).items():
            self._tier_of[name] = k
            self._shape_of[name] = shape

    def load_state_dict(self, state: Mapping[str, mx.array], model: nn.Module | None = None) -> None:
        """Restore from :meth:`state_dict` (or ``dict(tree_flatten(opt.state))``); exact resume. Fast weights
        saved with an EMA state go back into ``model``, which must then be given."""
        suffix = f".{FAST}"
        fast = [(k[len("params."):-len(suffix)], a) for k, a in state.items()
                if k.startswith("params.") and k.endswith(suffix)]
        if fast and model is None:
            raise ValueError("this optimizer state carries the fast weights of an EMA run: pass the model to "
                             "load_state_dict")
        self.state = tree_unflatten([(k, a) for k, a in state.items()
                                     if not (k.startswith("params.") and k.endswith(suffix))])
        if fast:
            model.update(tree_unflatten(fast))
