"""MLX NestedAdamW: the same test vectors as the torch optimizer, a float64 numpy reference of the tier
semantics, and an mlx-lm-style model trained through ``optimizer.update(model, grads)`` (also compiled)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

try:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map, tree_unflatten
except Exception as exc:  # pragma: no cover - depends on the platform
    print(f"skipping MLX optimizer tests: mlx is not importable ({exc!r})")
    pytest.skip(f"mlx is not importable: {exc!r}", allow_module_level=True)

from nested_learning.optim.mlx import NestedAdamW as MlxNestedAdamW
from nested_learning.tiers import UnmappedParametersWarning

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
    from nested_learning.optim.torch import NestedAdamW as TorchNestedAdamW

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


# -- an mlx-lm-style model ---------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    def __init__(self, d_in, d_out, r=2):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.lora_a = mx.random.normal((d_in, r)) * 0.2
        self.lora_b = mx.random.normal((r, d_out)) * 0.2

    def __call__(self, x):
        return self.linear(x) + (x @ self.lora_a) @ self.lora_b


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = LoRALinear(d, d)
        self.mlp = nn.Module()
        self.mlp.down_proj = LoRALinear(d, d)

    def __call__(self, x):
        return x + mx.tanh(self.mlp.down_proj(self.self_attn.q_proj(x)))


class Inner(nn.Module):
    def __init__(self, d, num_layers):
        super().__init__()
        self.layers = [Block(d) for _ in range(num_layers)]
        self.norm = nn.RMSNorm(d)


class TinyLM(nn.Module):
    def __init__(self, d=8, num_layers=6, seed=0):
        super().__init__()
        mx.random.seed(seed)
        self.model = Inner(d, num_layers)
        self.model.norm.adapter_gate = mx.zeros((d,))  # "adapter": LoRA-like, but in no block
        self.freeze()
        self.unfreeze(keys=["lora_a", "lora_b", "adapter_gate"], strict=False)

    def __call__(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return self.model.norm(x) + self.model.norm.adapter_gate


def _loss(model, x, y):
    return mx.mean(mx.square(model(x) - y))


def _batches(n, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(mx.array(rng.standard_normal((4, d)).astype(np.float32)),
             mx.array(rng.standard_normal((4, d)).astype(np.float32))) for _ in range(n)]


def _train(model, opt, batches, compiled=False):
    lvg = nn.value_and_grad(model, _loss)
    state = [model.state, opt.state]

    def step(x, y):
        loss, grads = lvg(model, x, y)
        opt.update(model, grads)
        return loss

    if compiled:  # as mlx-lm's trainer does
        step = mx.compile(step, inputs=state, outputs=state)
    losses = []
    for x, y in batches:
        loss = step(x, y)
        mx.eval(state, loss)
        losses.append(loss.item())
    return losses


def _flat(model):
    return {n: np.array(a) for n, a in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("compiled", [False, True])
def test_mlx_lm_style_model_layer_depth(compiled):
    model = TinyLM()
    opt = MlxNestedAdamW(5e-2, periods=PERIODS, weight_decay=0.01)  # layer_depth via tiers.assign_tiers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(model, opt, _batches(10), compiled=compiled)
    unmapped = [w for w in caught if issubclass(w.category, UnmappedParametersWarning)]
    assert len(unmapped) == 1 and "model.norm.adapter_gate" in str(unmapped[0].message)
    tm = opt.tier_map
    assert len(tm) == 6 * 4 + 1
    for i in range(6):
        assert tm[f"model.layers.{i}.self_attn.q_proj.lora_a"] == i // 2
        assert tm[f"model.layers.{i}.mlp.down_proj.lora_b"] == i // 2
    assert tm["model.norm.adapter_gate"] == 2  # unmapped -> slowest
    stats = opt.tier_stats()
    assert [t["updates"] for t in stats] == [10, 5, 2]
    assert [t["pending"] for t in stats] == [0, 0, 2]
    assert [t["num_tensors"] for t in stats] == [8, 8, 9]
    assert stats[2]["num_params"] == 8 * 16 + 8
    assert losses[-1] < losses[0]


def test_compiled_equals_eager():
    batches = _batches(9, seed=4)
    runs = []
    for compiled in (False, True):
        model = TinyLM(seed=1)
        opt = MlxNestedAdamW(schedule_mx, periods=PERIODS, accumulate="sum", weight_decay=0.1,
                             lr_scales=[1.0, 0.5, 0.25], strategy="layer_depth")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnmappedParametersWarning)
            _train(model, opt, batches, compiled=compiled)
        runs.append((_flat(model), [t["updates"] for t in opt.tier_stats()]))
    (a, ua), (b, ub) = runs
    assert ua == ub == [9, 4, 2]
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("accumulate", ["mean", "last"])
def test_state_round_trip_mid_chunk_is_bit_exact(tmp_path, accumulate):
    batches = _batches(11, seed=5)
    kw = dict(periods=PERIODS, accumulate=accumulate, weight_decay=0.05, lr_scales=[1.0, 0.7, 1.3])

    model = TinyLM(seed=2)
    opt = MlxNestedAdamW(schedule_mx, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmappedParametersWarning)
        _train(model, opt, batches)
    straight = _flat(model)

    model = TinyLM(seed=2)
    opt = MlxNestedAdamW(schedule_mx, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmappedParametersWarning)
        _train(model, opt, batches[:6])  # step 6: tier 2 (period 4) holds 2 gradients
    assert opt.tier_stats()[2]["pending"] == (2 if accumulate == "mean" else 0)
    mx.save_safetensors(str(tmp_path / "opt.safetensors"), opt.state_dict())
    mx.save_safetensors(str(tmp_path / "adapter.safetensors"), dict(tree_flatten(model.trainable_parameters())))

    model = TinyLM(seed=2)  # same frozen base; the trainable tensors must come from the file
    model.update(tree_map(mx.zeros_like, model.trainable_parameters()))
    model.load_weights(str(tmp_path / "adapter.safetensors"), strict=False)
    opt = MlxNestedAdamW(schedule_mx, **kw)
    opt.load_state_dict(mx.load(str(tmp_path / "opt.safetensors")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, batches[6:])
    assert not [w for w in caught if issubclass(w.category, UnmappedParametersWarning)]  # tiers came from state
    resumed = _flat(model)
    assert [t["updates"] for t in opt.tier_stats()] == [11, 5, 2]
    for n in straight:
        assert np.array_equal(straight[n], resumed[n]), n


def test_flush_updates_model_in_place():
    model = TinyLM(seed=3)
    opt = MlxNestedAdamW(1e-2, periods=PERIODS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmappedParametersWarning)
        _train(model, opt, _batches(5))
    before = _flat(model)
    updated = opt.flush(model)
    after = _flat(model)
    stats = opt.tier_stats()
    assert [t["updates"] for t in stats] == [5, 3, 2] and [t["pending"] for t in stats] == [0, 0, 0]
    assert opt.state["step"].item() == 5  # a flush is not a step
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == {n for n, k in opt.tier_map.items() if k in (1, 2)} == set(dict(tree_flatten(updated)))
    assert opt.flush(model) == {}  # nothing left
    model = TinyLM(seed=3)
    opt = MlxNestedAdamW(1e-2, periods=PERIODS, flush_on_end=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmappedParametersWarning)
        _train(model, opt, _batches(5))
    assert opt.finish(model) == {} and opt.tier_stats()[2]["pending"] == 1


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


def test_mlx_lm_trainer_drives_it(tmp_path):
    """mlx-lm's own trainer (compiled step, ``optimizer.update(model, grads)``, a schedule) on a tiny llama."""
    mlx_lm = pytest.importorskip("mlx_lm")  # noqa: F841
    import mlx.optimizers as optim
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model = Model(ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=4, intermediate_size=32,
                            num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=32, num_key_value_heads=1))
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 2, "scale": 10.0, "dropout": 0.0})
    rng = np.random.default_rng(0)
    data = [(list(rng.integers(0, 32, size=12)), 0) for _ in range(8)]
    opt = MlxNestedAdamW(optim.cosine_decay(1e-2, 10), periods=PERIODS)
    opt.init(model.trainable_parameters())
    before = _flat(model)
    train(model, opt, data, None,
          TrainingArgs(batch_size=4, iters=10, steps_per_report=10, steps_per_eval=1000, steps_per_save=1000,
                       max_seq_length=16, adapter_file=str(tmp_path / "adapters.safetensors")))
    assert [t["updates"] for t in opt.tier_stats()] == [10, 5, 2]
    assert [t["pending"] for t in opt.tier_stats()] == [0, 0, 2]
    after = _flat(model)
    assert all(not np.array_equal(before[n], after[n]) for n in before)
    assert {opt.tier_map[n] for n in before if ".layers.3." in n} == {2}
