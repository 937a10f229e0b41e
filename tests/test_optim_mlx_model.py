"""MLX NestedAdamW training an mlx-lm-style model through ``optimizer.update(model, grads)``, eagerly and
compiled as mlx-lm's trainer does: layer-depth tiers, exact resume from a saved state, flush, and mlx-lm's own
trainer. The checks on fixed test vectors (numpy reference, torch optimizer) are in ``test_optim_mlx.py``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

try:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
except Exception as exc:  # pragma: no cover - depends on the platform
    print(f"skipping MLX optimizer tests: mlx is not importable ({exc!r})")
    pytest.skip(f"mlx is not importable: {exc!r}", allow_module_level=True)

from nested_learning.optim.mlx import NestedAdamW as MlxNestedAdamW
from nested_learning.tiers import UnmappedParametersWarning

PERIODS = [1, 2, 4]
BASE_LR = 1e-2


def schedule_mx(step):
    """Warm-up then decay; ``step`` = optimizer steps taken before this one (MLX convention)."""
    k = mx.array(step).astype(mx.float32)
    return BASE_LR * mx.minimum(1.0, (k + 1.0) / 5.0) * mx.power(0.9, k)


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
