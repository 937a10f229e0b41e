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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw as _functional_adamw

from nested_learning.optim.flat import FlatTier
from nested_learning.tiers import is_due

__all__ = ["NestedAdamW"]

ACCUMULATE_MODES = ("mean", "sum", "last")


def _check_group(group: dict[str, Any], index: int) -> None:
    where = f"param group {index}" + (f" ({group['name']!r})" if group.get("name") else "")
    period = group.get("period", 1)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"{where}: period must be an integer >= 1, got {period!r}")
    scale = group.get("lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{where}: lr_scale must be a number > 0, got {scale!r}")


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
    ) -> None:
        if not (isinstance(lr, float) or isinstance(lr, int)) or lr < 0:
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if accumulate not in ACCUMULATE_MODES:
            raise ValueError(f"accumulate must be one of {', '.join(ACCUMULATE_MODES)}, got {accumulate!r}")
        if fused and foreach:
            raise ValueError("fused and foreach cannot both be True")

        groups = list(params)
        if groups and isinstance(groups[0], dict):
            self._check_disjoint(groups)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, period=1, lr_scale=1.0,
                        name=None, foreach=foreach, fused=fused)
        super().__init__(groups, defaults)
        self.accumulate = accumulate
        self.flush_on_end = flush_on_end
        self.global_step = 0  # s: optimizer steps taken (one per step() call)
        # flat=True: each tier's tensors live in one contiguous buffer (see optim/flat.py); built lazily.
        self.flat = flat
        self._flat: dict[int, FlatTier | None] = {}

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
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group, len(self.param_groups) - 1)
        group.setdefault("updates", 0)  # n_k: due steps taken by this tier
        group.setdefault("pending", 0)  # gradients accumulated since the tier's last update

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

    def _adamw(self, group, params, grads, exp_avgs, exp_avg_sqs, steps, foreach, fused) -> None:
        beta1, beta2 = group["betas"]
        _functional_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach, fused=fused,
                          amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"] * group["lr_scale"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _apply(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """One AdamW step of a tier on `grads` (the tier's G)."""
        if not params:
            return
        foreach, fused = self._resolve_impl(group, params)
        states = [self._state_for(p, fused) for p in params]
        self._adamw(group, params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states], foreach, fused)

    # -- flat layout ----------------------------------------------------------------------------------
    def _flat_tier(self, index: int, group: dict[str, Any]) -> FlatTier | None:
        ft = self._flat.get(index, False)
        if ft is False or (ft is not None and not ft.owns_storage()):
            params = group["params"]
            same = params and all(p.device == params[0].device and p.dtype == params[0].dtype and p.is_floating_point()
                                  and not p.is_sparse for p in params)
            ft = None
            if same:
                _, fused = self._resolve_impl(group, params)
                ft = FlatTier(params, self.state, fused, with_acc=self._uses_accumulator(group))
            self._flat[index] = ft
        return ft

    def _flat_step(self, ft: FlatTier, group: dict[str, Any], due: bool) -> None:
        ft.gather_grads()
        foreach, fused = self._resolve_impl(group, ft.params)
        grad = ft.grad
        if ft.acc is not None:
            ft.acc.add_(ft.grad)
            if not due:
                return
            if self.accumulate == "mean":
                ft.acc.div_(group["period"])
            grad = ft.acc if ft.acc.dtype == ft.param.dtype else ft.acc.to(ft.param.dtype)
        elif not due:
            return
        self._adamw(group, [ft.param], [grad], [ft.exp_avg], [ft.exp_avg_sq], [ft.step], foreach, fused)
        if ft.acc is not None:
            ft.acc.zero_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for ft in self._flat.values():
            if ft is not None:
                ft.zero_grad()  # keep .grad pointing into the flat buffer

    def _accumulate(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        accs = []
        for p in params:
            state = self.state[p]
            if "acc" not in state:
                state["acc"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            accs.append(state["acc"])
        if any(g.dtype != torch.float32 for g in grads):
            grads = [g.float() for g in grads]
        torch._foreach_add_(accs, grads)
        return accs

    def _update_from_accumulators(self, group: dict[str, Any], divisor: int) -> None:
        params = [p for p in group["params"] if "acc" in self.state.get(p, {})]
        if not params:
            return
        accs = [self.state[p]["acc"] for p in params]
        if self.accumulate == "mean" and divisor > 1:
            torch._foreach_div_(accs, float(divisor))
        grads = [a if a.dtype == p.dtype else a.to(p.dtype) for a, p in zip(accs, params)]
        self._apply(group, params, grads)
        torch._foreach_zero_(accs)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.global_step += 1
        s = self.global_step
        for index, group in enumerate(self.param_groups):
            due = is_due(s, group["period"])
            ft = self._flat_tier(index, group) if self.flat else None
            if ft is not None:
                self._flat_step(ft, group, due)
                if self._uses_accumulator(group):
                    group["pending"] += 1
                if due:
                    group["updates"] += 1
                    group["pending"] = 0
                continue
            with_grad = [p for p in group["params"] if p.grad is not None]
            if with_grad and with_grad[0].grad.is_sparse:
                raise RuntimeError("NestedAdamW does not support sparse gradients")
            grads = [p.grad for p in with_grad]
            if self._uses_accumulator(group):
                if with_grad:
                    self._accumulate(with_grad, grads)
                group["pending"] += 1
                if due:
                    self._update_from_accumulators(group, group["period"])
            elif due:  # period 1, or `last`: the current gradient is G; skipped gradients are discarded
                self._apply(group, with_grad, grads)
            if due:
                group["updates"] += 1
                group["pending"] = 0
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Apply pending accumulated gradients now: one update per tier holding a partial chunk.

        With ``mean`` the partial chunk is averaged over the steps it holds. Does not advance the step count.
        """
        for index, group in enumerate(self.param_groups):
            if self._uses_accumulator(group) and group["pending"] > 0:
                ft = self._flat.get(index) if self.flat else None
                if ft is not None and ft.owns_storage():
                    self._flat_flush(ft, group)
                else:
                    self._update_from_accumulators(group, group["pending"])
                group["updates"] += 1
                group["pending"] = 0

    def _flat_flush(self, ft: FlatTier, group: dict[str, Any]) -> None:
        foreach, fused = self._resolve_impl(group, ft.params)
        if self.accumulate == "mean":
            ft.acc.div_(group["pending"])
        grad = ft.acc if ft.acc.dtype == ft.param.dtype else ft.acc.to(ft.param.dtype)
        self._adamw(group, [ft.param], [grad], [ft.exp_avg], [ft.exp_avg_sq], [ft.step], foreach, fused)
        ft.acc.zero_()

    def finish(self) -> None:
        """End of training: flush partial chunks unless ``flush_on_end`` is False."""
        if self.flush_on_end:
            self.flush()

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
        sd["nested"] = {"global_step": self.global_step, "accumulate": self.accumulate,
                        "flush_on_end": self.flush_on_end}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        nested = state_dict.get("nested")
        if nested is None:
            raise ValueError("state_dict has no 'nested' entry: it was not saved by NestedAdamW")
        if nested["accumulate"] != self.accumulate:
            raise ValueError(f"accumulate: checkpoint used {nested['accumulate']!r}, this optimizer {self.accumulate!r}")
        saved_periods = [g.get("period", 1) for g in state_dict["param_groups"]]
        periods = [g["period"] for g in self.param_groups]
        if saved_periods != periods:
            raise ValueError(f"periods: checkpoint has {saved_periods}, this optimizer {periods}")
        # torch casts state tensors to the parameter dtype on load; accumulators must stay float32.
        accs = {}
        stripped = {}
        for key, st in state_dict["state"].items():
            st = dict(st)
            if "acc" in st:
                accs[key] = st.pop("acc")
            stripped[key] = st
        super().load_state_dict({"state": stripped, "param_groups": state_dict["param_groups"]})
        index = [p for g in self.param_groups for p in g["params"]]
        for key, acc in accs.items():
            p = index[key]
            self.state[p]["acc"] = acc.to(device=p.device, dtype=torch.float32)
        self.global_step = int(nested["global_step"])
        self._flat = {}  # rebuilt from the loaded per-parameter state at the next step
        self.flush_on_end = bool(nested["flush_on_end"])
