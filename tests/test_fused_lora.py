"""Grouped LoRA GEMMs (``nested_learning.fused_lora``): same loss and gradients as PEFT's per-projection path,
the fallbacks, adapter files unchanged. The compiled bf16 path on CUDA: tests/test_cuda_paths.py."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import nested_learning.fused_lora as fl
from nested_learning.fused_lora import fuse_lora_groups, unfuse_lora_groups

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(arch: str, dtype=torch.float64, dropout: float = 0.0, device="cpu", **lora):
    common = dict(vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, use_cache=False)
    cfg = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common, head_dim=12)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    base.requires_grad_(False)
    torch.manual_seed(1)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False, **lora)
    return get_peft_model(base, lcfg)


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class CountCalls:
    """Counts grouped computations (``run`` calls of ``group_class``, ``LoraGroup`` or a subclass)."""

    def __init__(self, monkeypatch, group_class=fl.LoraGroup):
        self.n = 0
        run = group_class.run

        def counted(group, x):
            self.n += 1
            return run(group, x)

        monkeypatch.setattr(group_class, "run", counted)


def assert_same(model, ref, ids, loss_rtol=1e-10, grad_rtol=1e-10):
    """``model`` and ``ref`` give the same loss and the same gradients for the same parameters."""
    l_ref, g_ref = loss_and_grads(ref, ids)
    l_got, g_got = loss_and_grads(model, ids)
    assert torch.allclose(l_got, l_ref, rtol=loss_rtol)
    assert g_got.keys() == g_ref.keys()
    for name in g_ref:
        assert torch.allclose(g_got[name], g_ref[name], rtol=grad_rtol, atol=1e-12), name


def grouped_copy(arch: str, layout):
    """(PEFT model, a copy with ``layout`` applied, its groups): q/k/v and gate/up of both layers."""
    ref = tiny(arch)
    model = copy.deepcopy(ref)
    groups = layout(model)
    assert [g.names for g in groups] == [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")] * 2
    return ref, model, groups


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: q/k/v carry a bias
def test_grouped_path_matches_peft(arch, monkeypatch):
    ref, fused, groups = grouped_copy(arch, fuse_lora_groups)
    calls = CountCalls(monkeypatch)
    ids = torch.randint(0, 211, (3, 17), generator=torch.Generator().manual_seed(2))
    assert_same(fused, ref, ids, loss_rtol=1e-12, grad_rtol=1e-9)
    assert calls.n == 4  # two groups per layer, two layers: every group took the grouped GEMM
    # The frozen weights are views of one stacked tensor: no copy was added.
    q = fused.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer().weight
    assert q.untyped_storage().data_ptr() == groups[0].weight.untyped_storage().data_ptr()


def test_a_second_fuse_is_a_no_op_and_unfuse_restores_peft():
    model = tiny("llama")
    assert len(fuse_lora_groups(model)) == 4
    assert fuse_lora_groups(model) == []
    ids = torch.randint(0, 211, (2, 9))
    fused_loss, _ = loss_and_grads(model, ids)
    assert unfuse_lora_groups(model) == 10
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert "forward" not in vars(q) and q.get_base_layer().weight.is_contiguous()
    assert torch.allclose(loss_and_grads(model, ids)[0], fused_loss, rtol=1e-12)


def test_dropout_and_dora_run_peft_path(monkeypatch):
    for model in (tiny("llama", dropout=0.1), tiny("llama", use_dora=True)):
        ref = copy.deepcopy(model)
        fuse_lora_groups(model)
        calls = CountCalls(monkeypatch)
        ids = torch.randint(0, 211, (2, 9))
        torch.manual_seed(5)
        l_fused, g_fused = loss_and_grads(model, ids)
        torch.manual_seed(5)
        l_ref, g_ref = loss_and_grads(ref, ids)
        assert calls.n == 0
        assert torch.equal(l_fused, l_ref)
        assert all(torch.equal(g_fused[k], g_ref[k]) for k in g_ref)


def test_member_called_on_another_input_falls_back(monkeypatch):
    """A model that feeds k_proj something other than q_proj's input still gets exact results."""
    model = tiny("llama")
    attn = model.get_base_model().model.layers[0].self_attn
    ref = copy.deepcopy(attn)
    fuse_lora_groups(model)
    x, y = torch.randn(2, 5, 48, dtype=torch.float64), torch.randn(2, 5, 48, dtype=torch.float64)
    q, k, v = attn.q_proj(x), attn.k_proj(y), attn.v_proj(x)
    assert torch.allclose(q, ref.q_proj(x), rtol=1e-12)
    assert torch.allclose(k, ref.k_proj(y), rtol=1e-12)
    assert torch.allclose(v, ref.v_proj(x), rtol=1e-12)
    # merged adapters: PEFT's own forward (the merged weight), still exact
    calls = CountCalls(monkeypatch)
    attn.q_proj.merge()
    assert torch.allclose(attn.q_proj(x), ref.q_proj(x), rtol=1e-10) and calls.n == 0


def test_adapter_files_do_not_change(tmp_path):
    from safetensors.torch import load_file

    ref = tiny("qwen2")
    fused = copy.deepcopy(ref)
    fuse_lora_groups(fused)
    ref.save_pretrained(tmp_path / "ref")
    fused.save_pretrained(tmp_path / "fused")
    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_graph_has_no_breaks():
    model = tiny("qwen2", dtype=torch.float32)
    fuse_lora_groups(model)
    decoder = model.get_base_model().model
    explained = torch._dynamo.explain(decoder)(input_ids=torch.randint(0, 211, (2, 9)))
    assert explained.graph_break_count == 0, explained.break_reasons
