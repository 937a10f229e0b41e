"""NestedAdamW under the ``torch.optim.Optimizer`` contract: copying and pickling, ``None`` gradients (flat layout
too), complex parameters, ``add_param_group`` validation, the ``torch.distributed.checkpoint`` state-dict round
trip, and skipping a non-finite step through ``found_inf``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from nested_learning.optim.adamw import NestedAdamW


def _params(seed: int = 0, n: int = 3) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(n)]


def _grads(step: int, params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _opt(params, **kw) -> NestedAdamW:
    """Two tiers: the first parameter every step, the rest every 3rd (an accumulator holds a partial chunk)."""
    return NestedAdamW([{"params": params[:1], "period": 1}, {"params": params[1:], "period": 3}],
                       lr=0.05, weight_decay=0.1, **kw)


def _drive(opt: NestedAdamW, steps, found=None) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for s in steps:
        for p, g in zip(params, _grads(s, params)):
            p.grad = g
        opt.step() if found is None else opt.step(found_inf=found(s))


def _snapshot(opt: NestedAdamW) -> list[torch.Tensor]:
    """Every tensor the optimizer owns or moves: parameters, moments, step counts, accumulators."""
    out = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    for g in opt.param_groups:
        for p in g["params"]:
            out += [t.detach().clone() for _, t in sorted(opt.state[p].items())]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("flat", [False, True])
def test_deepcopy_and_pickle_keep_stepping_identically(flat):
    opt = _opt(_params(), flat=flat)
    _drive(opt, range(4))  # mid-chunk: the slow tier holds one step's gradients
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for c in copies:
        assert c.global_step == 4 and c.flat == flat and c.accumulate == "mean"
        assert [g["pending"] for g in c.param_groups] == [0, 1]
    _drive(opt, range(4, 9))
    for c in copies:
        _drive(c, range(4, 9))
        assert _same(_snapshot(c), _snapshot(opt))
        assert c.tier_stats() == opt.tier_stats()


def test_pickle_of_an_older_version_gets_defaults():
    opt = _opt(_params())
    _drive(opt, range(2))
    state = opt.__getstate__()
    for key in ("global_step", "accumulate", "flush_on_end", "flat"):
        del state[key]  # what an optimizer pickled before these attributes existed holds
    for group in state["param_groups"]:
        del group["updates"], group["pending"]
    old = NestedAdamW.__new__(NestedAdamW)
    old.__setstate__(state)
    assert (old.global_step, old.accumulate, old.flush_on_end, old.flat) == (0, "mean", True, False)
    before = _snapshot(old)
    _drive(old, [2])  # it steps: the period-1 tier moves
    assert not torch.equal(before[0], _snapshot(old)[0])
    assert [g["updates"] for g in old.param_groups] == [1, 0]


@pytest.mark.parametrize("flat", [False, True])
def test_none_gradients_and_frozen_parameters_are_left_alone(flat):
    """As torch.optim.AdamW: a parameter without a gradient does not move, keeps no new state and keeps
    ``.grad is None``; with one tier holding every tensor the two optimizers agree step by step."""
    ours, theirs = _params(1), _params(1)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    ref_frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = NestedAdamW([{"params": ours, "period": 1}, {"params": [frozen]}], lr=0.05, weight_decay=0.1, flat=flat)
    ref = torch.optim.AdamW([{"params": theirs}, {"params": [ref_frozen]}], lr=0.05, weight_decay=0.1, foreach=True)
    missing = {2: 1, 4: 0}  # step -> the parameter that gets no gradient
    for s in range(6):
        for i, (p, q, g) in enumerate(zip(ours, theirs, _grads(s, ours))):
            p.grad, q.grad = (None, None) if missing.get(s) == i else (g.clone(), g.clone())
        opt.step()
        ref.step()
        if flat:  # one buffer while every tensor has a gradient; tensor by tensor once their counts differ
            assert (opt._flat.get(0) is not None and opt._flat.get(0) is not False) == (s < 2)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert frozen.grad is None and torch.equal(frozen.detach(), torch.ones(2)) and frozen not in opt.state
        if s in missing:
            assert ours[missing[s]].grad is None
        opt.zero_grad()
        ref.zero_grad()
        assert all(p.grad is None for p in ours)  # zero_grad() sets to None, flat layout or not
    assert [float(opt.state[p]["step"]) for p in ours] == [float(ref.state[q]["step"]) for q in theirs]


def test_flat_fast_path_zero_grad_keeps_views_and_matches():
    """``zero_grad(set_to_none=False)`` (what the trainer calls) keeps the flat gradient views: same numbers."""
    a, b = _params(2), _params(2)
    fast, slow = _opt(a, flat=True), _opt(b, flat=True)
    for s in range(7):
        for p, q, g in zip(a, b, _grads(s, a)):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            q.grad = g.clone()
        fast.step()
        slow.step()
        fast.zero_grad(set_to_none=False)
        slow.zero_grad()
        assert all(p.grad is not None and not p.grad.any() for p in a)
    assert _same(_snapshot(fast), _snapshot(slow))
    ft = fast._flat[1]
    assert ft is not None and all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(ft.params, ft.grad_views))


def test_complex_parameters_are_rejected_clearly():
    z = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"param group 0: parameter 'params\[0\]' is complex"):
        NestedAdamW([z])
    opt = NestedAdamW(_params(n=1))
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z], "param_names": ["z"]})
    assert len(opt.param_groups) == 1


def test_rejected_param_group_is_not_added():
    p, q = _params(n=2)
    opt = NestedAdamW([p], lr=0.1)
    for bad, field in (({"period": 0}, "period"), ({"lr_scale": 0.0}, "lr_scale"), ({"lr": -1.0}, "lr"),
                       ({"betas": (0.9, 1.0)}, "betas"), ({"weight_decay": -0.1}, "weight_decay")):
        with pytest.raises(ValueError, match=f"param group 1: {field}"):
            opt.add_param_group({"params": [q], **bad})
        assert len(opt.param_groups) == 1
    p.grad = torch.ones_like(p)
    opt.step()  # no half-added group: nothing divides by zero
    assert torch.isfinite(p).all() and opt.global_step == 1
    opt.add_param_group({"params": (t for t in [q]), "period": 2})  # a generator is read once, and kept
    assert opt.param_groups[1]["params"] == [q] and opt.param_groups[1]["updates"] == 0


@pytest.mark.parametrize("flat", [False, True])
def test_distributed_checkpoint_state_dict_round_trip(flat):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        groups = [{"params": list(model[0].parameters()), "period": 1},
                  {"params": list(model[1].parameters()), "period": 3}]
        return model, NestedAdamW(groups, lr=0.05, weight_decay=0.1, flat=flat)

    def train(model, opt, steps):
        for s in steps:
            x = torch.randn(5, 3, generator=torch.Generator().manual_seed(s))
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()

    model, opt = build()
    train(model, opt, range(4))  # mid-chunk: the period-3 tier holds an accumulator
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))  # as if written to disk: no shared tensors
    assert set(saved) == {"state", "param_groups"} and any("acc" in st for st in saved["state"].values())
    model2, opt2 = build()
    model2.load_state_dict(model.state_dict())
    set_optimizer_state_dict(model2, opt2, saved)
    assert opt2.global_step == 4 and opt2.tier_stats() == opt.tier_stats()
    train(model, opt, range(4, 9))
    train(model2, opt2, range(4, 9))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_state_dict_of_an_earlier_version_loads():
    """Earlier state dicts kept the counters under a top-level ``nested`` key (checkpoints on disk have it)."""
    opt = _opt(_params())
    _drive(opt, range(4))
    sd = opt.state_dict()
    old = {"state": sd["state"], "param_groups": [dict(g) for g in sd["param_groups"]],
           "nested": {"global_step": 4, "accumulate": "mean", "flush_on_end": True}}
    for g in old["param_groups"]:
        for key in ("global_step", "accumulate", "flush_on_end"):
            del g[key]
    new = _opt(_params())
    new.load_state_dict(old)
    assert new.global_step == 4 and "global_step" not in new.param_groups[0]
    _drive(opt, range(4, 7))
    _drive(new, range(4, 7))
    assert _same(_snapshot(new)[3:], _snapshot(opt)[3:])  # parameters differ (never copied); state agrees
    with pytest.raises(ValueError, match="not saved by NestedAdamW"):
        new.load_state_dict(torch.optim.AdamW(_params()).state_dict())


# -- found_inf: a non-finite step is skipped whole ---------------------------------------------------------

def _found(bad_steps):
    return lambda s: torch.tensor(1.0 if s in bad_steps else 0.0)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("fused", [None, True])
def test_found_inf_skips_the_step_and_changes_nothing(flat, fused):
    """fused=True keeps the flag on the device (the CPU has a fused AdamW too); the default reads it first."""
    opt = _opt(_params(), flat=flat, fused=fused)
    assert opt._skips_on_device() == bool(fused)
    _drive(opt, range(4))
    before = _snapshot(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step(found_inf=torch.tensor(1.0))  # step 5: the slow tier is not due
    assert _same(_snapshot(opt), before)
    _drive(opt, [5], found=_found({5}))  # step 6: the slow tier is due; skipped, it keeps its accumulator
    assert _same(_snapshot(opt), before)
    assert opt.global_step == 6 and [t["updates"] for t in opt.tier_stats()] == [6, 2]


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("fused", [None, True])
def test_found_inf_zero_changes_no_number(flat, fused):
    plain, flagged = _opt(_params(), flat=flat, fused=fused), _opt(_params(), flat=flat, fused=fused)
    _drive(plain, range(8))
    _drive(flagged, range(8), found=_found(set()))
    assert _same(_snapshot(plain), _snapshot(flagged))


@pytest.mark.parametrize("flat", [False, True])
def test_skip_on_device_equals_skip_on_host(flat):
    """The fused kernel's device-side skip and the host-side skip are one semantics, bit for bit."""
    bad = {2, 5, 6}  # inside a chunk, and at the slow tier's due step
    device = _opt(_params(), flat=flat, fused=True)
    host = _opt(_params(), flat=flat, fused=True)
    host._skips_on_device = lambda: False
    _drive(device, range(10), found=_found(bad))
    _drive(host, range(10), found=_found(bad))
    assert _same(_snapshot(device), _snapshot(host))
    reference = _opt(_params(), flat=flat, fused=True)
    _drive(reference, range(10))
    assert not _same(_snapshot(device), _snapshot(reference))  # the skips mattered


def test_params_given_as_generators_or_a_tensor():
    a, b = _params(n=2)
    opt = NestedAdamW([{"params": (p for p in [a]), "period": 1}, {"params": iter([b]), "period": 2}])
    assert [g["params"] for g in opt.param_groups] == [[a], [b]]
    with pytest.raises(TypeError, match="got a tensor"):
        NestedAdamW(a)
