"""Folded LoRA (``nested_learning.speed.lora_fold``): the low-rank product inside the frozen GEMM's reduction gives
PEFT's loss and gradients, reads the current adapter weights every call, falls back where it cannot fold, and
compiles to one opaque op. The bf16 path on CUDA: tests/test_cuda_paths.py."""

from __future__ import annotations

import copy

import pytest
import torch

import nested_learning.speed.lora_fold as fold
from nested_learning.speed.lora_fold import BUFFER, fold_lora_groups
from nested_learning.speed.lora_groups import unfold_lora_groups
from conftest import CountCalls, grouped_copy, loss_and_grads, tiny
from conftest import assert_same as shared_assert_same

IDS = torch.randint(0, 211, (3, 17), generator=torch.Generator().manual_seed(2))


def CountFolds(monkeypatch):
    return CountCalls(monkeypatch, fold.FoldedGroup)


def assert_same(model, ref, rtol=1e-10):
    shared_assert_same(model, ref, IDS, loss_rtol=rtol, grad_rtol=rtol)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: q/k/v carry a bias
def test_folded_path_matches_peft(arch, monkeypatch):
    ref, model, _ = grouped_copy(arch, fold_lora_groups)
    calls = CountFolds(monkeypatch)
    assert_same(model, ref)
    assert calls.n == 4  # one call per group (q/k/v, gate/up), both layers
    # The frozen weight is the left block of [W | S]: same storage, no copy; S holds s * B of this call.
    up = model.get_base_model().model.layers[1].mlp.up_proj
    buf = getattr(up.get_base_layer(), BUFFER)
    assert up.get_base_layer().weight.data_ptr() == buf.data_ptr()
    assert buf.shape == (96, 48 + 2 * 4)
    expected = (up.lora_B["default"].weight * up.scaling["default"]).detach()
    assert torch.equal(buf[:, 48 + 4 :], expected) and not buf[:, 48 : 48 + 4].any()


def test_updated_adapter_weights_are_read_on_the_next_call():
    ref = tiny("llama")
    model = copy.deepcopy(ref)
    fold_lora_groups(model)
    loss_and_grads(model, IDS)
    for m in (ref, model):  # what an optimizer step does: B and A change in place
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.mul_(1.5).add_(0.01)
    assert_same(model, ref)


def test_unfold_restores_peft_and_adapter_state_is_unchanged():
    ref = tiny("qwen2")
    model = copy.deepcopy(ref)
    fold_lora_groups(model)
    assert fold_lora_groups(model) == []  # idempotent
    assert model.state_dict().keys() == ref.state_dict().keys()  # the [W | S] buffers are not saved
    assert unfold_lora_groups(model) == 10
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert "forward" not in vars(q) and q.get_base_layer().weight.is_contiguous()
    assert not hasattr(q.get_base_layer(), BUFFER)
    assert_same(model, ref)


def test_dropout_dora_and_merged_adapters_run_peft_path(monkeypatch):
    for model in (tiny("llama", dropout=0.1), tiny("llama", use_dora=True)):
        ref = copy.deepcopy(model)
        fold_lora_groups(model)
        calls = CountFolds(monkeypatch)
        torch.manual_seed(5)
        l_got, g_got = loss_and_grads(model, IDS)
        torch.manual_seed(5)
        l_ref, g_ref = loss_and_grads(ref, IDS)
        assert calls.n == 0 and torch.equal(l_got, l_ref)
        assert all(torch.equal(g_got[k], g_ref[k]) for k in g_ref)
    model = tiny("llama")
    ref = copy.deepcopy(model)
    fold_lora_groups(model)
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    ref_attn = ref.get_base_model().model.layers[0].self_attn
    attn.q_proj.merge()  # the merged weight is written into the buffer's left block: PEFT's path, still exact
    assert torch.allclose(attn.q_proj(x), ref_attn.q_proj(x), rtol=1e-10)


def test_compiled_fold_is_one_op_per_group_and_matches_eager():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    ref = tiny("qwen2", dtype=torch.float32)
    model = copy.deepcopy(ref)
    fold_lora_groups(model)
    decoder = model.get_base_model().model
    torch._dynamo.reset()
    explained = torch._dynamo.explain(decoder)(input_ids=IDS)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.nested_learning.lora_fold.default) == 4  # one op per group
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    l_ref, g_ref = loss_and_grads(ref, IDS)
    compiled(input_ids=IDS, labels=IDS).loss.backward()  # compiles; the counted run below replays
    model.zero_grad(set_to_none=True)
    with CountOps() as counted:
        l_got = compiled(input_ids=IDS, labels=IDS).loss
        l_got.backward()
    assert counted.calls.count(torch.ops.nested_learning.lora_fold.default) == 4
    assert counted.calls.count(torch.ops.nested_learning.lora_fold_backward.default) == 4
    g_got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert torch.allclose(l_got, l_ref, rtol=1e-5)
    for name in g_ref:
        assert torch.allclose(g_got[name], g_ref[name], rtol=1e-4, atol=1e-6), name


def test_gradient_checkpointing_recomputes_the_fold():
    ref = tiny("llama")
    model = copy.deepcopy(ref)
    for m in (ref, model):
        m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    fold_lora_groups(model)
    assert_same(model, ref)


def test_members_called_in_any_order_or_on_other_inputs_are_exact():
    model = tiny("llama")
    ref = copy.deepcopy(model)
    fold_lora_groups(model)
    attn, ref_attn = (m.get_base_model().model.layers[0].self_attn for m in (model, ref))
    x, y = torch.randn(2, 5, 48, dtype=torch.float64), torch.randn(2, 5, 48, dtype=torch.float64)
    for name, inp in (("v_proj", x), ("k_proj", y), ("q_proj", x)):
        assert torch.allclose(getattr(attn, name)(inp), getattr(ref_attn, name)(inp), rtol=1e-12), name


def test_op_registrations_agree_with_the_unfolded_formula():
    g = torch.Generator().manual_seed(0)
    f64 = {"generator": g, "dtype": torch.float64}
    k, r, n = 8, 2, 3
    x = torch.randn(10, k, **f64, requires_grad=True)
    a = torch.randn(n * r, k, **f64, requires_grad=True)  # three members of rank 2
    sbs = [torch.randn(o, r, **f64, requires_grad=True) for o in (5, 3, 3)]
    # [W_i | S_i] as fold_lora_groups lays them out: other members' blocks of S_i stay zero.
    wps = [torch.cat([torch.randn(o, k, **f64), torch.zeros(o, n * r, dtype=torch.float64)], 1) for o in (5, 3, 3)]
    biases = [torch.randn(o, **f64) for o in (5, 3, 3)]
    # The schema check is left out on purpose: the op writes S_i into its own buffer without declaring it
    # (an idempotent write of the values the call uses; see lora_fold's docstring).
    torch.library.opcheck(fold.lora_fold, (x, a, sbs, wps, biases),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    _, *ys = fold.lora_fold(x, a, sbs, wps, biases)
    weights = [torch.randn(y.shape, **f64) for y in ys]
    got = torch.autograd.grad(sum((y * w).sum() for y, w in zip(ys, weights)), [x, a, *sbs])
    ref_ys = [x @ w[:, :k].t() + b + (x @ a[r * i : r * (i + 1)].t()) @ sb.t()
              for i, (w, sb, b) in enumerate(zip(wps, sbs, biases))]
    want = torch.autograd.grad(sum((y * w).sum() for y, w in zip(ref_ys, weights)), [x, a, *sbs])
    assert all(torch.allclose(y, ref) for y, ref in zip(ys, ref_ys))
    assert all(torch.allclose(g1, g2) for g1, g2 in zip(got, want))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_folds_by_default_but_not_under_gradient_checkpointing(tmp_path, checkpointing):
    from conftest import micro_config, write_data
    from nested_learning.train.setup import build_run

    cfg = micro_config(write_data(tmp_path / "data"), tmp_path / "out", schedule={"steps": 2, "warmup_steps": 0},
                       eval={"every": 0}, model={"device": "cpu", "gradient_checkpointing": checkpointing})
    run = build_run(cfg)
    up = run.model.get_base_model().model.layers[0].mlp.up_proj
    assert hasattr(up.get_base_layer(), BUFFER) is not checkpointing
    assert run.speed_plan.on("lora_fold") is not checkpointing


def test_float32_model_under_bf16_autocast_takes_peft_path(monkeypatch):
    """The buffers hold the model's dtype; a call computing in another dtype must not mix them."""
    ref = tiny("llama", dtype=torch.float32)
    model = copy.deepcopy(ref)
    fold_lora_groups(model)
    calls = CountFolds(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l_got, g_got = loss_and_grads(model, IDS)
        l_ref, g_ref = loss_and_grads(ref, IDS)
    assert calls.n == 0 and torch.equal(l_got, l_ref)
    assert all(torch.equal(g_got[k], g_ref[k]) for k in g_ref)


def test_two_forwards_before_one_backward():
    """An eval forward between forward and backward, or two losses summed: autograd still accepts the buffers."""
    ref = tiny("llama")
    model = copy.deepcopy(ref)
    fold_lora_groups(model)
    other = IDS.flip(0)
    grads = {}
    for name, m in (("fold", model), ("peft", ref)):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=IDS, labels=IDS).loss
        with torch.no_grad():
            m(input_ids=other)
        (loss + m(input_ids=other, labels=other).loss).backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    for name in grads["peft"]:
        assert torch.allclose(grads["fold"][name], grads["peft"][name], rtol=1e-10, atol=1e-12), name


def test_deepcopy_of_a_folded_model_is_independent():
    ref = tiny("llama")
    model = copy.deepcopy(ref)
    fold_lora_groups(model)
    twin = copy.deepcopy(model)
    for m in (twin, ref):
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.mul_(-2.0)
    assert_same(twin, ref)  # the copy runs its own adapters and buffers ...
    loss_and_grads(twin, IDS)
    assert all(p.grad is None for n, p in model.named_parameters() if p.requires_grad)  # ... and fills its own grads
    up = twin.get_base_model().model.layers[0].mlp.up_proj.get_base_layer()
    assert up.weight.data_ptr() == getattr(up, BUFFER).data_ptr()


def test_weights_given_new_storage_are_linked_again():
    """``.to()`` (or a safe merge) replaces a weight's storage; the next call copies it back into the buffer."""
    ref = tiny("llama")
    model = copy.deepcopy(ref)
    fold_lora_groups(model)
    for m in (model, ref):
        m.to(torch.float32).to(torch.float64)
    new_base = {k: torch.randn_like(v) for k, v in ref.state_dict().items() if "base_layer.weight" in k}
    for m in (model, ref):
        m.load_state_dict(new_base, strict=False)
    assert_same(model, ref)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert q.weight.data_ptr() == getattr(q, BUFFER).data_ptr()


def test_lora_bias_and_trainable_base_weights_take_peft_path(monkeypatch):
    lora_bias = tiny("llama", lora_bias=True)  # a bias on lora_B: not in the fold
    trainable = tiny("llama")
    trainable.get_base_model().model.layers[0].mlp.up_proj.get_base_layer().weight.requires_grad_(True)
    for model, folded_calls in ((lora_bias, 0), (trainable, 3)):  # trainable: layer 0's gate/up runs PEFT's path
        ref = copy.deepcopy(model)
        fold_lora_groups(model)
        calls = CountFolds(monkeypatch)
        l_got, g_got = loss_and_grads(model, IDS)
        l_ref, g_ref = loss_and_grads(ref, IDS)
        assert calls.n == folded_calls
        assert torch.allclose(l_got, l_ref, rtol=1e-12)
        assert g_got.keys() == g_ref.keys()
        assert all(torch.allclose(g_got[k], g_ref[k], rtol=1e-9, atol=1e-12) for k in g_ref)
