"""Contiguous storage for one tier: parameters, gradients and optimizer state as views into flat buffers.

A LoRA model has hundreds of small tensors (336 for Qwen2.5-0.5B with all 7 projections adapted). Even
torch's multi-tensor kernels pay per-tensor bookkeeping on the host at every step. With the tier's tensors laid
out back to back, an optimizer step is a handful of kernels over one buffer, whatever the tensor count.

The parameters stay the same ``nn.Parameter`` objects; only their storage moves (``p.data`` becomes a view).
Gradients are pre-set views too, so autograd accumulates straight into the flat gradient buffer. If something
replaces a ``.grad`` (``model.zero_grad(set_to_none=True)``, a hook), :meth:`FlatTier.gather_grads` notices
and copies it back in, so results never depend on who zeroed the gradients.

A tier is flat only while every parameter has a gradient: torch's optimizers leave a parameter whose ``.grad``
is ``None`` alone, which one update of the whole buffer cannot do. At such a step the optimizer dissolves the
layout (:meth:`FlatTier.dissolve`) and updates tensor by tensor; it flattens again while the update counts agree.
"""

from __future__ import annotations

from typing import Any

import torch


class FlatTier:
    """Flat buffers for a list of parameters that share one device and dtype."""

    def __init__(self, params: list[torch.Tensor], state: dict[torch.Tensor, dict[str, Any]], fused: bool,
                 with_acc: bool) -> None:
        first = params[0]
        numels = [p.numel() for p in params]
        total = sum(numels)
        self.params = params
        self.param = torch.empty(total, device=first.device, dtype=first.dtype)
        self.grad = torch.zeros(total, device=first.device, dtype=first.dtype)
        self.exp_avg = torch.zeros(total, device=first.device, dtype=first.dtype)
        self.exp_avg_sq = torch.zeros(total, device=first.device, dtype=first.dtype)
        self.acc = torch.zeros(total, device=first.device, dtype=torch.float32) if with_acc else None
        self.step = torch.zeros((), dtype=torch.float32, device=first.device if fused else "cpu")
        self.grad_views: list[torch.Tensor] = []

        offset = 0
        for p, n in zip(params, numels):
            sl = slice(offset, offset + n)
            offset += n
            view = self.param[sl].view_as(p)
            view.copy_(p.detach())
            if p.grad is not None:
                self.grad[sl].view_as(p).copy_(p.grad)
            p.data = view
            grad_view = self.grad[sl].view_as(p)
            p.grad = grad_view
            self.grad_views.append(grad_view)
            # Keep per-parameter state (restored from a checkpoint, or from an earlier layout) and expose views.
            st = state[p]
            for key, buf in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq), ("acc", self.acc)):
                if buf is None:
                    st.pop(key, None)
                    continue
                if key in st:
                    buf[sl].copy_(st[key].reshape(-1))
                st[key] = buf[sl].view_as(p)
            if "step" in st:
                self.step.copy_(st["step"])
            st["step"] = self.step

    @staticmethod
    def steps_agree(params: list[torch.Tensor], state: dict[torch.Tensor, dict[str, Any]]) -> bool:
        """One flat step counter can stand for these parameters: none has Adam state yet, or all have taken the
        same number of updates (reads the counters: called once, when a layout is built)."""
        steps = [state[p]["step"] for p in params if "step" in state.get(p, {})]
        if not steps:
            return True
        return len(steps) == len(params) and len({float(s) for s in steps}) == 1

    def dissolve(self, state: dict[torch.Tensor, dict[str, Any]]) -> None:
        """Give every parameter its own step counter; its other state stays a view into the buffers."""
        for p in self.params:
            state[p]["step"] = self.step.clone()

    def gather_grads(self) -> None:
        """Make sure every ``p.grad`` is our view; copy in gradients that were replaced (every parameter has
        one: see the module docstring)."""
        for p, view in zip(self.params, self.grad_views):
            g = p.grad
            if g.data_ptr() != view.data_ptr():
                view.copy_(g)
                p.grad = view

    def zero_grad(self) -> None:
        """Zero the gradient buffer; a replaced ``.grad`` points at its view again, a ``None`` one stays None."""
        self.grad.zero_()
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                p.grad = view

    def owns_storage(self) -> bool:
        """False once a parameter's storage was replaced from outside (e.g. a module reloaded with
        ``assign=True``); the optimizer then rebuilds the layout."""
        base = self.param.untyped_storage().data_ptr()
        return all(p.untyped_storage().data_ptr() == base for p in self.params)
