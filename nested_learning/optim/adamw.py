"""NestedAdamW for PyTorch: AdamW whose parameter groups ("tiers") update at different periods.

Semantics (DESIGN.md, "Tier semantics"):

- the optimizer counts its own steps ``s = 1, 2, ...``; tier ``k`` is due iff ``s % period_k == 0``;
- every step each tier's gradient is added into a float32 accumulator; a due tier is updated with
  ``G = acc / period`` (``mean``), ``acc`` (``sum``) or the current gradient (``last``), then the accumulator
  is cleared. Period-1 tiers and ``last`` mode keep no accumulator;
- Adam moments move only at due steps, bias correction uses the tier's own update count (the per-tensor
  ``step`` state, as in ``torch.optim.AdamW``), weight decay is decoupled and applied at due steps;
- the learning rate is the group's ``lr`` (what LR schedulers set) times its ``lr_scale``.

The math of a due tier is delegated to ``torch.optim``'s functional AdamW with the foreach (CPU) or fused
(CUDA) implementation, so an all-period-1 run *is* ``torch.optim.AdamW``, and no Python loop does per-tensor
arithmetic.

``chunk_hook(index, sums, step)``, when set, is called just before tier ``index`` applies its accumulated gradients:
``sums`` are its accumulator tensors (one flat buffer, or one per parameter), ``step`` the due step (``None`` in
``flush``). It returns the sums to apply in their place (same shapes; ``sums`` themselves are left alone and
cleared after the update as usual). Data-parallel training hands in the sum over all ranks there
(``nested_learning.train.grad_sync``); ``tier_buffers`` gives it a tier's gradients and accumulators.

The ``torch.optim.Optimizer`` contract holds as for ``torch.optim.AdamW``: a parameter whose ``.grad`` is
``None`` is left alone (in the flat layout too), ``zero_grad()`` sets gradients to ``None``, the optimizer
deep-copies and pickles, ``add_param_group`` validates a group before adding it, and the state dict round-trips
through ``torch.distributed.checkpoint.state_dict`` (the optimizer's own counters ride in the param groups).
Complex parameters are rejected.

``step(found_inf=flag)`` skips a step whose gradients are not finite, as ``torch.amp.GradScaler`` does with the
fused optimizers: nothing changes, neither parameters, Adam moments and update counts, nor accumulators. The
fused kernel reads the flag on the device (no host sync); other implementations read it first (free on a CPU).
The step still counts in the schedule: tiers due at a skipped step report the update, a slow tier keeps its
accumulated gradients for its next due step.

``ema`` and ``consolidate`` keep slow copies of the weights in the state (``nested_learning.optim.averaging``):
an exponential average used for evaluation and saving (:meth:`NestedAdamW.averaged_weights`), and a Lookahead
consolidation (every ``k`` steps ``slow += alpha * (fast - slow)``, then ``fast <- slow``; one more in
:meth:`NestedAdamW.finish` / :meth:`NestedAdamW.consolidate_final`). Both off: nothing of this runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw as _functional_adamw

from nested_learning.optim.averaging import STATE_KEYS as _AVERAGE_KEYS
from nested_learning.optim.averaging import WeightAverages
from nested_learning.optim.flat import FlatTier
from nested_learning.tiers import is_due

__all__ = ["NestedAdamW"]

ACCUMULATE_MODES = ("mean", "sum", "last")


# Counters saved in every param group of a state dict (see ``state_dict``), not kept in the live groups.
_SAVED_IN_GROUPS = ("global_step", "accumulate", "flush_on_end")
_GROUP_DEFAULTS = {"period": 1, "lr_scale": 1.0, "name": None, "updates": 0, "pending": 0}


def _check_hyperparameters(where: str, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"{where}lr must be a number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise ValueError(f"{where}eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"{where}weight_decay must be >= 0, got {weight_decay!r}")


def _check_group(group: dict[str, Any], index: int) -> None:
    """A param group (defaults filled in) is valid; raised before the group is added, so a rejected group never
    stays behind in ``param_groups``."""
    where = f"param group {index}" + (f" ({group['name']!r})" if group.get("name") else "")
    period = group.get("period", 1)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"{where}: period must be an integer >= 1, got {period!r}")
    scale = group.get("lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{where}: lr_scale must be a number > 0, got {scale!r}")
    _check_hyperparameters(f"{where}: ", group["lr"], group["betas"], group["eps"], group["weight_decay"])
    names = group.get("param_names") or []
    for i, p in enumerate(group["params"]):
        if isinstance(p, torch.Tensor) and p.is_complex():
            name = names[i] if i < len(names) else f"params[{i}]"
            raise ValueError(f"{where}: parameter {name!r} is complex ({p.dtype}); NestedAdamW supports real "
                             "parameters only (optimize torch.view_as_real(p) instead)")


class NestedAdamW(torch.optim.Optimizer):
    """AdamW with per-group update periods. See the module docstring for the exact rule.

    ``params`` is an iterable of tensors or of param-group dicts; a group may carry ``period`` (default 1),
    ``lr_scale`` (default 1.0), ``name`` and ``param_names`` (as :func:`nested_learning.assign_tiers` makes them).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        accumulate: str = "mean",
        flush_on_end: bool = True,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        flat: bool = False,
        ema: float | None = None,
        consolidate: tuple[int, float] | None = None,
    ) -> None:
        _check_hyperparameters("", lr, betas, eps, weight_decay)
        if accumulate not in ACCUMULATE_MODES:
            raise ValueError(f"accumulate must be one of {', '.join(ACCUMULATE_MODES)}, got {accumulate!r}")
        if fused and foreach:
            raise ValueError("fused and foreach cannot both be True")

        if isinstance(params, torch.Tensor):  # iterating it would hand over its rows
            raise TypeError("params must be an iterable of tensors or of param-group dicts, got a tensor")
        groups = list(params)
        if groups and isinstance(groups[0], dict):
            # Read each group's params once (a generator would be empty by the time the group is added).
            groups = [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else g["params"]
                       if isinstance(g["params"], set) else list(g["params"])} for g in groups]
            self._check_disjoint(groups)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, period=1, lr_scale=1.0,
                        name=None, foreach=foreach, fused=fused)
        super().__init__(groups, defaults)
        self.accumulate = accumulate
        self.flush_on_end = flush_on_end
        self.global_step = 0  # s: optimizer steps taken (one per step() call)
        # flat=True: each tier's tensors live in one contiguous buffer (see optim/flat.py); built lazily.
        self.flat = flat
        # index -> FlatTier; None: this tier cannot be flat; absent or False: not built (yet, or again)
        self._flat: dict[int, FlatTier | None | bool] = {}
        self.chunk_hook = None  # see the module docstring; not pickled
        self.averages = WeightAverages(ema, consolidate)

    # -- construction helpers -------------------------------------------------------------------------
    @staticmethod
    def _check_disjoint(groups: list[dict[str, Any]]) -> None:
        owner: dict[int, tuple[int, str]] = {}
        for gi, group in enumerate(groups):
            params = group.get("params", [])
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            names = group.get("param_names") or [f"params[{i}]" for i in range(len(params))]
            for p, pname in zip(params, names):
                if id(p) in owner:
                    first, first_name = owner[id(p)]
                    raise ValueError(f"params: parameter {first_name!r} appears in param group {first} and "
                                     f"param group {gi}; each parameter must be in exactly one tier")
                owner[id(p)] = (gi, pname)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets (unordered) itself, with its own message
            params = list(params)  # a generator is read once: keep what it gave
        param_group = {**param_group, "params": params}
        _check_group({**self.defaults, **param_group}, len(self.param_groups))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("updates", 0)  # n_k: due steps taken by this tier
        group.setdefault("pending", 0)  # gradients accumulated since the tier's last update

    # -- copying and pickling -------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(global_step=self.global_step, accumulate=self.accumulate, flush_on_end=self.flush_on_end,
                     flat=self.flat, averages=self.averages)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Pickles made before an attribute existed get the constructor's default.
        for key, default in (("global_step", 0), ("accumulate", "mean"), ("flush_on_end", True), ("flat", False),
                             ("chunk_hook", None)):
            self.__dict__.setdefault(key, default)
        self.__dict__.setdefault("averages", WeightAverages())
        for group in self.param_groups:
            for key, default in _GROUP_DEFAULTS.items():
                group.setdefault(key, default)
        self._flat = {}  # views into buffers of the original object: rebuilt at the next step

    # -- the step -------------------------------------------------------------------------------------
    def _uses_accumulator(self, group: dict[str, Any]) -> bool:
        return group["period"] > 1 and self.accumulate != "last"

    def _state_for(self, p: torch.Tensor, fused: bool) -> dict[str, Any]:
        state = self.state[p]
        if "exp_avg" not in state:
            # `step` lives on the device for the fused kernel, as a CPU scalar otherwise (as torch.optim.AdamW).
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _resolve_impl(self, group: dict[str, Any], params: list[torch.Tensor]) -> tuple[bool, bool]:
        """(foreach, fused): fused when every tensor is a CUDA float tensor, foreach otherwise."""
        fused, foreach = group["fused"], group["foreach"]
        if fused is None and foreach is None:
            fused = all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
            foreach = not fused
        return bool(foreach), bool(fused)

    def _adamw(self, group, params, grads, exp_avgs, exp_avg_sqs, steps, foreach, fused, found_inf=None) -> None:
        beta1, beta2 = group["betas"]
        extra = {} if found_inf is None else {"found_inf": found_inf}  # fused only (see _skips_on_device)
        _functional_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach, fused=fused,
                          amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"] * group["lr_scale"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, **extra)

    def _apply(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
               found_inf: torch.Tensor | None = None) -> None:
        """One AdamW step of a tier on `grads` (the tier's G)."""
        if not params:
            return
        foreach, fused = self._resolve_impl(group, params)
        states = [self._state_for(p, fused) for p in params]
        self._adamw(group, params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states], foreach, fused, found_inf)

    # -- flat layout ----------------------------------------------------------------------------------
    def _flat_tier(self, index: int, group: dict[str, Any]) -> FlatTier | None:
        """The tier's flat buffers (built at its first step), or ``None``: for good when the tier cannot be flat
        (mixed devices or dtypes, diverged update counts), for this step when a parameter has no gradient (torch
        leaves such a parameter alone; one update of the whole buffer cannot)."""
        ft = self._flat.get(index, False)
        params = group["params"]
        if not params or any(p.grad is None for p in params):
            if isinstance(ft, FlatTier):
                ft.dissolve(self.state)
                self._flat[index] = False
            return None
        if ft is False or (ft is not None and not ft.owns_storage()):
            ft = None
            same = all(p.device == params[0].device and p.dtype == params[0].dtype and p.is_floating_point()
                       and not p.is_sparse for p in params)
            if same and FlatTier.steps_agree(params, self.state):
                _, fused = self._resolve_impl(group, params)
                ft = FlatTier(params, self.state, fused, with_acc=self._uses_accumulator(group))
            self._flat[index] = ft
        return ft

    def _sums(self, index: int, sums: list[torch.Tensor], step: int | None) -> list[torch.Tensor]:
        """What tier ``index`` applies of its accumulated gradient sums (``chunk_hook``'s, when set)."""
        return sums if self.chunk_hook is None else self.chunk_hook(index, sums, step)

    def _flat_step(self, index: int, ft: FlatTier, group: dict[str, Any], due: bool,
                   found_inf: torch.Tensor | None) -> None:
        ft.gather_grads()
        foreach, fused = self._resolve_impl(group, ft.params)
        grad = ft.grad
        if ft.acc is not None:
            ft.acc.add_(ft.grad if found_inf is None else torch.where(found_inf.bool(), 0, ft.grad))
            if not due:
                return
            total = self._sums(index, [ft.acc], self.global_step)[0]
            if found_inf is None:
                if self.accumulate == "mean":
                    total.div_(group["period"])
                chunk = total
            else:  # the accumulator must survive a skipped step unchanged
                chunk = total / group["period"] if self.accumulate == "mean" else total
            grad = chunk if chunk.dtype == ft.param.dtype else chunk.to(ft.param.dtype)
        elif not due:
            return
        self._adamw(group, [ft.param], [grad], [ft.exp_avg], [ft.exp_avg_sq], [ft.step], foreach, fused, found_inf)
        if ft.acc is not None:
            ft.acc.zero_() if found_inf is None else ft.acc.mul_(found_inf)  # kept where the step was skipped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``. With ``set_to_none=False`` a flat tier zeroes its one gradient
        buffer and its parameters' ``.grad`` stay views into it (the fast path the trainer takes); with ``True``
        the gradients become ``None`` and the next step copies the new ones into the buffer."""
        flats = [ft for ft in self._flat.values() if isinstance(ft, FlatTier)]
        if set_to_none or not flats:
            super().zero_grad(set_to_none)
            return
        in_flat = set()
        for ft in flats:
            ft.zero_grad()
            in_flat.update(id(p) for p in ft.params)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in in_flat and p.grad is not None:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    def _accumulate(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                    found_inf: torch.Tensor | None = None) -> list[torch.Tensor]:
        accs = []
        for p in params:
            state = self.state[p]
            if "acc" not in state:
                state["acc"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            accs.append(state["acc"])
        if found_inf is not None:  # a skipped step adds nothing
            skip = found_inf.bool()
            grads = [torch.where(skip, 0, g) for g in grads]
        if any(g.dtype != torch.float32 for g in grads):
            grads = [g.float() for g in grads]
        torch._foreach_add_(accs, grads)
        return accs

    def _update_from_accumulators(self, index: int, group: dict[str, Any], divisor: int,
                                  found_inf: torch.Tensor | None = None, step: int | None = None) -> None:
        params = [p for p in group["params"] if "acc" in self.state.get(p, {})]
        if not params:
            return
        accs = [self.state[p]["acc"] for p in params]
        sums = self._sums(index, accs, step)
        mean = self.accumulate == "mean" and divisor > 1
        if found_inf is None:
            if mean:
                torch._foreach_div_(sums, float(divisor))
            chunks = sums
        else:  # the accumulators must survive a skipped step unchanged
            chunks = torch._foreach_div(sums, float(divisor)) if mean else sums
        grads = [a if a.dtype == p.dtype else a.to(p.dtype) for a, p in zip(chunks, params)]
        self._apply(group, params, grads, found_inf)
        if found_inf is None:
            torch._foreach_zero_(accs)
        else:
            torch._foreach_mul_(accs, found_inf)  # kept where the step was skipped

    def _skips_on_device(self) -> bool:
        """A found-inf flag can stay on the device only when every tier runs the fused kernel."""
        return all(self._resolve_impl(g, g["params"])[1] for g in self.param_groups if g["params"])

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None):  # noqa: D401 - torch signature
        """One optimizer step. ``found_inf``: a scalar tensor, non-zero when this step's gradients are not
        finite; the step is then skipped (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skipped = False
        if found_inf is not None:
            if self._skips_on_device():
                found_inf = found_inf.to(dtype=torch.float32)
            else:
                skipped, found_inf = bool(found_inf), None
        averaging = self.averages.active
        if averaging:
            self.averages.before_step(self._all_params(), self.state)
        self.global_step += 1
        s = self.global_step
        for index, group in enumerate(self.param_groups):
            due = is_due(s, group["period"])
            if not skipped:
                self._step_group(index, group, due, found_inf)
            if self._uses_accumulator(group):
                group["pending"] += 1
            if due:
                group["updates"] += 1
                group["pending"] = 0
        if averaging:  # data parallel: every rank holds the same weights, so the same update on each keeps them so
            self.averages.after_step(self._all_params(), self.state, s)
        return loss

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _step_group(self, index: int, group: dict[str, Any], due: bool, found_inf: torch.Tensor | None) -> None:
        ft = self._flat_tier(index, group) if self.flat else None
        if ft is not None:
            self._flat_step(index, ft, group, due, found_inf)
            return
        with_grad = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in with_grad):
            raise RuntimeError("NestedAdamW does not support sparse gradients")
        grads = [p.grad for p in with_grad]
        if self._uses_accumulator(group):
            if with_grad:
                self._accumulate(with_grad, grads, found_inf)
            if due:
                self._update_from_accumulators(index, group, group["period"], found_inf, self.global_step)
        elif due:  # period 1, or `last`: the current gradient is G; skipped gradients are discarded
            self._apply(group, with_grad, grads, found_inf)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply pending accumulated gradients now: one update per tier holding a partial chunk.

        With ``mean`` the partial chunk is averaged over the steps it holds. Does not advance the step count.
        With ``ema``, a flush that moved any weight moves the EMA once too.
        """
        flushed = False
        for index, group in enumerate(self.param_groups):
            if self._uses_accumulator(group) and group["pending"] > 0:
                ft = self._flat.get(index) if self.flat else None
                if ft is not None and ft.owns_storage():
                    self._flat_flush(index, ft, group)
                else:
                    self._update_from_accumulators(index, group, group["pending"])
                group["updates"] += 1
                group["pending"] = 0
                flushed = flushed or bool(group["params"])  # an empty tier moves no weight
        if flushed and self.averages.ema is not None:
            self.averages.update_ema(self._all_params(), self.state)

    def _flat_flush(self, index: int, ft: FlatTier, group: dict[str, Any]) -> None:
        foreach, fused = self._resolve_impl(group, ft.params)
        total = self._sums(index, [ft.acc], None)[0]
        if self.accumulate == "mean":
            total.div_(group["pending"])
        grad = total if total.dtype == ft.param.dtype else total.to(ft.param.dtype)
        self._adamw(group, [ft.param], [grad], [ft.exp_avg], [ft.exp_avg_sq], [ft.step], foreach, fused)
        ft.acc.zero_()

    def finish(self) -> None:
        """End of training: flush partial chunks unless ``flush_on_end`` is False, then the last consolidation
        (with ``consolidate``)."""
        if self.flush_on_end:
            self.flush()
        self.consolidate_final()

    @torch.no_grad()
    def consolidate_final(self) -> None:
        """With ``consolidate``, at the end of a completed run: one more consolidation, so the weights left in the
        parameters (the final adapter) are the slow memory, holding the steps since the last consolidation too
        (exactly a no-op right after one, with float32 parameters). Nothing before the first step."""
        if self.averages.consolidate is not None and self.global_step > 0:
            self.averages.consolidate_now(self._all_params(), self.state)

    @torch.no_grad()
    def keep_averaged_weights(self) -> None:
        """With ``ema``, at the end of training: the EMA weights into the parameters for good (what a completed
        run's final adapter holds). Training on afterwards would continue from them, not from the fast weights."""
        if self.averages.ema is not None:
            pairs = [(p, self.state[p]["ema"]) for p in self._all_params() if "ema" in self.state.get(p, {})]
            if pairs:
                torch._foreach_copy_([p for p, _ in pairs], [e.to(p.dtype) for p, e in pairs])

    def averaged_weights(self):
        """Context manager: the EMA weights in the parameters inside the ``with`` block, the fast (training)
        weights restored after it, bit for bit. Without ``ema``, or before the first step, it changes nothing."""
        return self.averages.swapped_in(self._all_params(), self.state)

    def tier_buffers(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Tier ``index``'s gradients and accumulators in as few tensors as its layout allows: one flat buffer
        each when the tier is flat (its parameters' ``.grad`` are made views of it again), else one per parameter
        with a gradient, accumulators aligned with them (``None`` where none exists yet)."""
        group = self.param_groups[index]
        ft = self._flat.get(index) if self.flat else None
        if isinstance(ft, FlatTier) and ft.owns_storage() and all(p.grad is not None for p in ft.params):
            ft.gather_grads()
            return [ft.grad], [ft.acc]
        with_grad = [p for p in group["params"] if p.grad is not None]
        return [p.grad for p in with_grad], [self.state.get(p, {}).get("acc") for p in with_grad]

    # -- introspection and persistence ----------------------------------------------------------------
    def tier_stats(self) -> list[dict[str, Any]]:
        return [
            {
                "name": g.get("name") or f"tier{i}",
                "period": g["period"],
                "lr_scale": g["lr_scale"],
                "updates": g["updates"],
                "pending": g["pending"],
                "num_tensors": len(g["params"]),
                "num_params": sum(p.numel() for p in g["params"]),
            }
            for i, g in enumerate(self.param_groups)
        ]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # The optimizer's own counters go into every param group: torch.distributed.checkpoint's state-dict API
        # keeps `state` and `param_groups` only.
        for group in sd["param_groups"]:
            group.update(global_step=self.global_step, accumulate=self.accumulate, flush_on_end=self.flush_on_end)
        self.averages.add_fast_weights(self._all_params(), sd["state"],
                                       [k for g in sd["param_groups"] for k in g["params"]])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        nested = state_dict.get("nested")  # where state dicts of earlier versions kept the counters
        if nested is None and groups and all(k in groups[0] for k in _SAVED_IN_GROUPS):
            nested = {k: groups[0][k] for k in _SAVED_IN_GROUPS}
        if nested is None:
            raise ValueError("state_dict has no NestedAdamW counters (global_step): it was not saved by NestedAdamW")
        if nested["accumulate"] != self.accumulate:
            raise ValueError(f"accumulate: checkpoint used {nested['accumulate']!r}, this optimizer {self.accumulate!r}")
        saved_periods = [g.get("period", 1) for g in state_dict["param_groups"]]
        periods = [g["period"] for g in self.param_groups]
        if saved_periods != periods:
            raise ValueError(f"periods: checkpoint has {saved_periods}, this optimizer {periods}")
        # torch casts state tensors to the parameter dtype on load; accumulators must stay float32.
        accs = {}
        stripped = {}
        kept: dict[Any, dict[str, torch.Tensor]] = {}  # slow copies (averaging.py), at their own precision
        fast: dict[Any, torch.Tensor] = {}  # the training weights an EMA checkpoint carries
        for key, st in state_dict["state"].items():
            st = dict(st)
            if "acc" in st:
                accs[key] = st.pop("acc")
            kept[key] = {k: st.pop(k) for k in _AVERAGE_KEYS if k in st}
            if "fast" in st:
                fast[key] = st.pop("fast")
            stripped[key] = st
        groups = [{k: v for k, v in g.items() if k not in _SAVED_IN_GROUPS} for g in groups]
        super().load_state_dict({"state": stripped, "param_groups": groups})
        # State keys are whatever the saved groups list: indices, or parameter names (torch.distributed.checkpoint).
        index = dict(zip((k for g in state_dict["param_groups"] for k in g["params"]),
                         (p for g in self.param_groups for p in g["params"])))
        for key, acc in accs.items():
            p = index[key]
            self.state[p]["acc"] = acc.to(device=p.device, dtype=torch.float32)
        for key, copies in kept.items():
            p = index[key]
            for name, t in copies.items():
                self.state[p][name] = t.to(device=p.device, dtype=torch.promote_types(p.dtype, torch.float32),
                                           copy=True)
        with torch.no_grad():
            for key, t in fast.items():
                index[key].copy_(t)
        for group in self.param_groups:  # torch loads `step` on the CPU; the fused kernel keeps it on the device
            if self._resolve_impl(group, group["params"])[1]:
                for p in group["params"]:
                    if "step" in self.state.get(p, {}):
                        self.state[p]["step"] = self.state[p]["step"].to(p.device)
        self.global_step = int(nested["global_step"])
        self._flat = {}  # rebuilt from the loaded per-parameter state at the next step
        self.flush_on_end = bool(nested["flush_on_end"])
