"""MLX NestedAdamW on fixed test vectors: the same vectors as the torch optimizer, a float64 numpy reference of
the tier semantics and ``torch.optim.AdamW``; plus argument/state validation and mlx staying optional.

The tests that train an mlx-lm-style model through ``optimizer.update(model, grads)`` (also compiled) are in
``test_optim_mlx_model.py``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

try:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
except Exception as exc:  # pragma: no cover - depends on the platform
    print(f"skipping MLX optimizer tests: mlx is not importable ({exc!r})")
    pytest.skip(f"mlx is not importable: {exc!r}", allow_module_level=True)

from nested_learning.optim.mlx import NestedAdamW as MlxNestedAdamW

# -- test vectors ------------------------------------------------------------------------------------------

PERIODS = [1, 2, 4]
# name -> (shape, tier); names as mlx-lm's tree_flatten writes them
SPEC = {
    "model.layers.0.self_attn.q_proj.lora_a": ((6, 3), 0),
    "model.layers.0.self_attn.q_proj.lora_b": ((3, 6), 0),
    "model.layers.1.mlp.up_proj.lora_a": ((5, 2), 1),
    "model.layers.1.mlp.up_proj.lora_b": ((2, 4), 1),
    "model.layers.2.self_attn.v_proj.lora_a": ((7,), 2),
    "model.layers.2.self_attn.v_proj.lora_b": ((4, 4), 2),
}
TIER_MAP = {n: t for n, (_, t) in SPEC.items()}
BASE_LR = 1e-2


def vectors(steps=12, seed=0):
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(shape).astype(np.float32) for n, (shape, _) in SPEC.items()}
    grads = [{n: (rng.standard_normal(shape) * rng.uniform(0.1, 3.0)).astype(np.float32)
              for n, (shape, _) in SPEC.items()} for _ in range(steps)]
    return params, grads


def schedule_mx(step):
    """Warm-up then decay; ``step`` = optimizer steps taken before this one (MLX and LambdaLR convention)."""
    k = mx.array(step).astype(mx.float32)
    return BASE_LR * mx.minimum(1.0, (k + 1.0) / 5.0) * mx.power(0.9, k)


def schedule_value(k: int) -> float:
    return float(schedule_mx(mx.array(k)).item())


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# -- float64 numpy reference of DESIGN.md "Tier semantics" -------------------------------------------------

def reference(params, grads, *, periods=PERIODS, tier_of=TIER_MAP, lr=BASE_LR, lr_scales=None, betas=(0.9, 0.999),
              eps=1e-8, wd=0.0, accumulate="mean", flush=False):
    lr_scales = lr_scales or [1.0] * len(periods)
    lr_fn = lr if callable(lr) else (lambda k: lr)
    b1, b2 = betas
    p = {n: v.astype(np.float64) for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    v = {n: np.zeros_like(x) for n, x in p.items()}
    acc = {n: np.zeros_like(x) for n, x in p.items()}
    n_k = [0] * len(periods)
    pending = [0] * len(periods)

    def adamw(name, G, lr_t, n):
        m[name] = b1 * m[name] + (1 - b1) * G
        v[name] = b2 * v[name] + (1 - b2) * G * G
        p[name] = p[name] * (1 - lr_t * wd)
        p[name] = p[name] - lr_t / (1 - b1**n) * m[name] / (np.sqrt(v[name] / (1 - b2**n)) + eps)

    uses_acc = [accumulate != "last" and q > 1 for q in periods]
    for s, g in enumerate(grads, start=1):
        lr_s = lr_fn(s - 1)
        for k, q in enumerate(periods):
            names = [n for n in p if tier_of[n] == k]
            if uses_acc[k]:
                for name in names:
                    acc[name] += g[name]
                pending[k] += 1
            if s % q:
                continue
            n_k[k] += 1
            for name in names:
                G = (acc[name] / q if accumulate == "mean" else acc[name].copy()) if uses_acc[k] else g[name]
                adamw(name, G, lr_s * lr_scales[k], n_k[k])
                acc[name][:] = 0
            pending[k] = 0
    if flush:  # the lr the next step would use; mean over the gradients the partial chunk holds
        lr_s = lr_fn(len(grads))
        for k in range(len(periods)):
            if uses_acc[k] and pending[k]:
                n_k[k] += 1
                for name in [n for n in p if tier_of[n] == k]:
                    G = acc[name] / pending[k] if accumulate == "mean" else acc[name]
                    adamw(name, G, lr_s * lr_scales[k], n_k[k])
                    acc[name][:] = 0
                pending[k] = 0
    return p, n_k


# -- runners -----------------------------------------------------------------------------------------------

def run_mlx(params, grads, *, periods=PERIODS, tier_map=TIER_MAP, lr=BASE_LR, lr_scales=None, betas=(0.9, 0.999),
            eps=1e-8, wd=0.0, accumulate="mean", flush=False):
    opt = MlxNestedAdamW(lr, betas=betas, eps=eps, weight_decay=wd, accumulate=accumulate, periods=periods,
                         lr_scales=lr_scales, tier_map=tier_map)
    tree = tree_unflatten([(n, mx.array(v)) for n, v in params.items()])
    for g in grads:
        gt = tree_unflatten([(n, mx.array(x)) for n, x in g.items()])
        tree = opt.apply_gradients(gt, tree)
        mx.eval(tree, opt.state)
    if flush:
        tree = _merge(tree, opt.flush(tree))
    return {n: np.array(a) for n, a in tree_flatten(tree)}, opt


def _merge(tree, partial):
    flat = dict(tree_flatten(tree))
    flat.update(dict(tree_flatten(partial)))
    return tree_unflatten(list(flat.items()))


def run_torch(params, grads, *, periods=PERIODS, tier_map=TIER_MAP, lr=BASE_LR, lr_scales=None, betas=(0.9, 0.999),
              eps=1e-8, wd=0.0, accumulate="mean", flush=False):
    torch = pytest.importorskip("torch")
    from nested_learning.optim.adamw import NestedAdamW as TorchNestedAdamW

    lr_scales = lr_scales or [1.0] * len(periods)
    tensors = {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in params.items()}
    groups = [{"params": [tensors[n] for n in tensors if tier_map[n] == k], "period": q, "lr_scale": lr_scales[k]}
              for k, q in enumerate(periods)]
    opt = TorchNestedAdamW(groups, lr=BASE_LR if callable(lr) else lr, betas=betas, eps=eps, weight_decay=wd,
                           accumulate=accumulate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr(k) / BASE_LR) if callable(lr) else None
    for g in grads:
        for n, t in tensors.items():
            t.grad = torch.from_numpy(g[n].copy())
        opt.step()
        if sched is not None:
            sched.step()
    if flush:
        opt.flush()
    return {n: t.detach().numpy().copy() for n, t in tensors.items()}, opt


CASES = {
    "mean": dict(accumulate="mean"),
    "sum": dict(accumulate="sum"),
    "last": dict(accumulate="last"),
    "mean_wd_scales_schedule": dict(accumulate="mean", wd=0.1, lr_scales=[1.0, 0.5, 2.0], lr=schedule_value),
    "sum_wd_schedule_betas": dict(accumulate="sum", wd=0.05, lr=schedule_value, betas=(0.8, 0.95), eps=1e-6),
    # Adam is nearly invariant to a constant gradient scale, so mean vs sum (acc / p vs acc) only shows when eps
    # is not negligible next to sqrt(v): these two cases pin the divisor.
    "mean_large_eps": dict(accumulate="mean", eps=0.3, wd=0.01),
    "sum_large_eps_flush": dict(accumulate="sum", eps=0.3, flush=True),
    "mean_large_eps_flush": dict(accumulate="mean", eps=0.3, lr=schedule_value, flush=True),
    "mean_flush": dict(accumulate="mean", wd=0.02, lr=schedule_value, flush=True),
    "sum_flush": dict(accumulate="sum", lr_scales=[2.0, 1.0, 0.5], flush=True),
}


def _mlx_kwargs(kw):
    kw = dict(kw)
    if kw.get("lr") is schedule_value:
        kw["lr"] = schedule_mx
    return kw


@pytest.mark.parametrize("case", list(CASES))
def test_matches_numpy_reference(case):
    steps = 11 if CASES[case].get("flush") else 12  # 11: a partial chunk in both slow tiers
    params, grads = vectors(steps)
    ref, ref_updates = reference(params, grads, **CASES[case])
    got, opt = run_mlx(params, grads, **_mlx_kwargs(CASES[case]))
    for n in SPEC:
        assert rel_err(got[n], ref[n]) < 1e-5, n
        assert not np.allclose(got[n], params[n])  # every tier moved
    assert [t["updates"] for t in opt.tier_stats()] == ref_updates


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_nested_adamw(case):
    steps = 11 if CASES[case].get("flush") else 12
    params, grads = vectors(steps, seed=1)
    want, topt = run_torch(params, grads, **CASES[case])
    got, opt = run_mlx(params, grads, **_mlx_kwargs(CASES[case]))
    for n in SPEC:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-7, err_msg=n)
    mine = [{k: t[k] for k in ("period", "lr_scale", "updates", "pending", "num_tensors", "num_params")}
            for t in opt.tier_stats()]
    theirs = [{k: t[k] for k in ("period", "lr_scale", "updates", "pending", "num_tensors", "num_params")}
              for t in topt.tier_stats()]
    assert mine == theirs


def test_ema_and_consolidate_match_torch():
    """``ema`` and ``consolidate`` against the torch optimizer on the test vectors: 11 steps (consolidations at 4
    and 8, partial chunks pending), then ``finish`` (flush, one more EMA step, the last consolidation). The EMA and
    slow copies and the weights agree within 2e-6 (relative norm); ``averaged_weights`` shows the EMA inside its
    block and gives back the very same fast arrays after it; the saved state carries those fast weights."""
    import mlx.nn as nn
    torch = pytest.importorskip("torch")
    from nested_learning.optim.adamw import NestedAdamW as TorchNestedAdamW
    from nested_learning.optim.mlx_state import get_path

    params, grads = vectors(11, seed=3)
    tensors = {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in params.items()}
    groups = [{"params": [tensors[n] for n in tensors if TIER_MAP[n] == k], "period": q}
              for k, q in enumerate(PERIODS)]
    topt = TorchNestedAdamW(groups, lr=BASE_LR, ema=0.8, consolidate=(4, 0.5))
    model = nn.Module()
    model.model = tree_unflatten([(n, mx.array(v)) for n, v in params.items()])["model"]
    opt = MlxNestedAdamW(BASE_LR, periods=PERIODS, tier_map=TIER_MAP, ema=0.8, consolidate=(4, 0.5))
    for g in grads:
        for n, t in tensors.items():
            t.grad = torch.from_numpy(g[n].copy())
        topt.step()
        opt.update(model, tree_unflatten([(n, mx.array(x)) for n, x in g.items()]))
        mx.eval(model.parameters(), opt.state)
    topt.finish()
    opt.finish(model)
    for n, t in tensors.items():
        leaf = get_path(opt.state["params"], n)
        for key in ("ema", "slow"):
            assert rel_err(leaf[key], topt.state[t][key].numpy()) < 2e-6, (n, key)
        assert rel_err(get_path(model, n), t.detach().numpy()) < 2e-6, n
        np.testing.assert_array_equal(np.array(get_path(model, n)), np.array(leaf["slow"]))  # the final consolidation
    fast = dict(tree_flatten(model.trainable_parameters()))
    with opt.averaged_weights(model):
        for n, a in tree_flatten(model.trainable_parameters()):
            np.testing.assert_array_equal(np.array(a), np.array(get_path(opt.state["params"], n)["ema"]))
    assert all(a is fast[n] for n, a in tree_flatten(model.trainable_parameters()))
    saved = opt.state_dict(model)
    assert all(saved[f"params.{n}.fast"] is a for n, a in fast.items())
    with pytest.raises(ValueError, match="pass the model"):
        MlxNestedAdamW(BASE_LR, periods=PERIODS, tier_map=TIER_MAP, ema=0.8).load_state_dict(saved)


def test_all_period_one_equals_torch_adamw():
    torch = pytest.importorskip("torch")
    params, grads = vectors(15, seed=2)
    kw = dict(betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
    tensors = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in params.values()]
    ref = torch.optim.AdamW(tensors, lr=BASE_LR, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda k: schedule_value(k) / BASE_LR)
    for g in grads:
        for t, x in zip(tensors, g.values()):
            t.grad = torch.from_numpy(x.copy())
        ref.step()
        sched.step()
    got, opt = run_mlx(params, grads, periods=[1], tier_map={n: 0 for n in SPEC}, lr=schedule_mx,
                       betas=kw["betas"], eps=kw["eps"], wd=kw["weight_decay"])
    for t, n in zip(tensors, SPEC):
        np.testing.assert_allclose(got[n], t.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=n)
    assert opt.tier_stats()[0]["updates"] == 15


def test_non_due_tiers_are_bit_identical_and_accumulate():
    params, grads = vectors(4, seed=3)
    opt = MlxNestedAdamW(1e-2, periods=PERIODS, tier_map=TIER_MAP, weight_decay=0.1)
    tree = tree_unflatten([(n, mx.array(v)) for n, v in params.items()])
    before = {n: np.array(a) for n, a in tree_flatten(tree)}
    for s, g in enumerate(grads, start=1):
        tree = opt.apply_gradients(tree_unflatten([(n, mx.array(x)) for n, x in g.items()]), tree)
        mx.eval(tree, opt.state)
        now = {n: np.array(a) for n, a in tree_flatten(tree)}
        for n, (_, k) in SPEC.items():
            due = s % PERIODS[k] == 0
            assert np.array_equal(now[n], before[n]) != due, (s, n)
        before = now
        if s == 3:  # tier 2 (period 4) holds g1 + g2 + g3 in float32
            acc = opt.state["params"]["model"]["layers"][2]["self_attn"]["v_proj"]["lora_a"]["acc"]
            assert acc.dtype == mx.float32
            np.testing.assert_allclose(np.array(acc), sum(grads[i]["model.layers.2.self_attn.v_proj.lora_a"]
                                                          for i in range(3)), rtol=1e-6)
    # no accumulator for period-1 tiers, nor in `last` mode
    assert "acc" not in opt.state["params"]["model"]["layers"][0]["self_attn"]["q_proj"]["lora_a"]
    last = MlxNestedAdamW(1e-2, periods=PERIODS, tier_map=TIER_MAP, accumulate="last")
    last.init(tree)
    assert not any(n.endswith(".acc") for n in last.state_dict())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_params_keep_dtype_with_float32_state(dtype):
    params, grads = vectors(4, seed=6)
    dt = getattr(mx, dtype)
    tree = tree_unflatten([(n, mx.array(v).astype(dt)) for n, v in params.items()])
    opt = MlxNestedAdamW(1e-2, periods=PERIODS, tier_map=TIER_MAP, weight_decay=0.1)
    for g in grads:
        tree = opt.apply_gradients(tree_unflatten([(n, mx.array(x).astype(dt)) for n, x in g.items()]), tree)
    mx.eval(tree, opt.state)
    assert all(a.dtype == dt for _, a in tree_flatten(tree))
    flat = opt.state_dict()
    assert all(flat[k].dtype == mx.float32 for k in flat if k.endswith((".m", ".v", ".acc")))
    ref, _ = reference(params, grads, wd=0.1)
    for n, a in tree_flatten(tree):
        assert rel_err(np.array(a.astype(mx.float32)), ref[n]) < 2e-2, n


def test_newly_trainable_parameter_gets_state_later():
    params, grads = vectors(3, seed=7)
    names = list(SPEC)
    opt = MlxNestedAdamW(1e-2, periods=PERIODS, tier_map=TIER_MAP)
    tree = tree_unflatten([(n, mx.array(params[n])) for n in names[:2]])
    tree = opt.apply_gradients(tree_unflatten([(n, mx.array(grads[0][n])) for n in names[:2]]), tree)
    full = _merge(tree_unflatten([(n, mx.array(v)) for n, v in params.items()]), tree)
    out = opt.apply_gradients(tree_unflatten([(n, mx.array(grads[1][n])) for n in names]), full)
    mx.eval(out)
    assert set(opt.tier_map) == set(names)


# -- arguments, tier groups, optional import ---------------------------------------------------------------

def test_validation_and_state_mismatch():
    with pytest.raises(ValueError):
        MlxNestedAdamW(1e-3, accumulate="median")
    with pytest.raises(ValueError):
        MlxNestedAdamW(1e-3, periods=[1, 0])
    with pytest.raises(ValueError):
        MlxNestedAdamW(1e-3, periods=[1, 2], tier_map={"a": 5})
    opt = MlxNestedAdamW(1e-3, periods=[1, 2, 4], tier_map=TIER_MAP)
    opt.init(tree_unflatten([(n, mx.zeros(s)) for n, (s, _) in SPEC.items()]))
    with pytest.raises(ValueError, match="period"):
        MlxNestedAdamW(1e-3, periods=[1, 2, 8]).load_state_dict(opt.state_dict())


def test_tiers_from_assign_tiers_groups():
    from nested_learning.tiers import assign_tiers

    params = tree_unflatten([(n, mx.zeros(s)) for n, (s, _) in SPEC.items()])
    groups = assign_tiers(tree_flatten(params), strategy="rules", periods=[1, 3],
                          rules=[("*.self_attn.*", 0), ("*.mlp.*", 1)], lr_scales=[1.0, 0.5])
    opt = MlxNestedAdamW(1e-3, tiers=groups)
    opt.init(params)
    assert opt.periods == [1, 3] and opt.lr_scales == [1.0, 0.5]
    assert opt.tier_map["model.layers.1.mlp.up_proj.lora_a"] == 1
    assert opt.tier_map["model.layers.2.self_attn.v_proj.lora_b"] == 0


def test_importing_nested_learning_does_not_import_mlx():
    code = ("import sys, nested_learning, nested_learning.tiers, nested_learning.optim; "
            "assert 'mlx' not in sys.modules, 'mlx imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
