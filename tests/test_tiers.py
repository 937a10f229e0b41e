"""Tier assignment strategies on real PEFT parameter names, and the tensor-free tier module."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from nested_learning.tiers import (
    UnmappedParametersWarning,
    assign_tiers,
    due_tiers,
    format_plan,
    is_lora_name,
    layer_index,
)

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_model():
    """A 6-layer Llama-style PEFT model; LoRA on all 7 projections, plus a trainable lm_head (modules_to_save)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=PROJ, modules_to_save=["lm_head"]))


def _tier_of(groups):
    return {name: k for k, g in enumerate(groups) for name in g["param_names"]}


def _lora(layer, module, ab):
    part = "self_attn" if module in PROJ[:4] else "mlp"
    return f"base_model.model.model.layers.{layer}.{part}.{module}.lora_{ab}.default.weight"


HEAD = "base_model.model.lm_head.modules_to_save.default.weight"


def test_layer_depth_splits_blocks_into_contiguous_equal_groups(peft_model):
    with pytest.warns(UnmappedParametersWarning) as record:
        groups = assign_tiers(peft_model.named_parameters(), periods=[1, 4, 16])
    tiers = _tier_of(groups)
    assert len(tiers) == 6 * 7 * 2 + 1  # only trainable parameters are placed
    for layer in range(6):
        for module in PROJ:
            for ab in "AB":
                assert tiers[_lora(layer, module, ab)] == layer // 2
    # The head has no block index: unmapped -> slowest tier, named in exactly one warning.
    assert tiers[HEAD] == 2
    assert len(record) == 1 and HEAD in str(record[0].message) and "slowest tier 2" in str(record[0].message)
    assert [g["period"] for g in groups] == [1, 4, 16]
    assert [len(g["params"]) for g in groups] == [28, 28, 29]
    assert all(set(g) == {"name", "period", "lr_scale", "params", "param_names"} for g in groups)


def test_layer_depth_reverse_and_uneven_split(peft_model):
    with pytest.warns(UnmappedParametersWarning):
        groups = assign_tiers(peft_model.named_parameters(), periods=[1, 2, 4, 8], reverse=True)
    tiers = _tier_of(groups)
    # 6 blocks into 4 tiers: floor(i * 4 / 6) = 0,0,1,2,2,3; reversed -> 3,3,2,1,1,0
    assert [tiers[_lora(i, "q_proj", "A")] for i in range(6)] == [3, 3, 2, 1, 1, 0]


def test_rules_first_match_wins_attention_fast_mlp_slow(peft_model):
    rules = [("*.layers.0.*", 0), ("*self_attn*", 0), ("*mlp*", 1)]
    with pytest.warns(UnmappedParametersWarning) as record:
        groups = assign_tiers(peft_model.named_parameters(), strategy="rules", periods=[1, 8], rules=rules)
    tiers = _tier_of(groups)
    assert tiers[_lora(0, "down_proj", "B")] == 0  # the first rule wins over `*mlp*`
    assert tiers[_lora(3, "k_proj", "A")] == 0
    assert tiers[_lora(3, "up_proj", "A")] == 1
    assert tiers[HEAD] == 1
    assert len(record) == 1


def test_manual_map_and_its_errors(peft_model):
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    manual = {n: (0 if "lora_A" in n else 1) for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything mapped: no warning at all
        groups = assign_tiers(peft_model.named_parameters(), strategy="manual", periods=[1, 3], manual=manual)
    assert _tier_of(groups) == manual
    with pytest.raises(ValueError, match=r"manual: 'model.nope' is not a parameter of the model"):
        assign_tiers(peft_model.named_parameters(), strategy="manual", periods=[1, 3], manual={"model.nope": 0})
    frozen = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    with pytest.raises(ValueError, match="is not trainable"):
        assign_tiers(peft_model.named_parameters(), strategy="manual", periods=[1, 3], manual={frozen: 0})
    with pytest.raises(ValueError, match=r"manual\[.*tier must be an integer in 0..1, got 2"):
        assign_tiers(peft_model.named_parameters(), strategy="manual", periods=[1, 3], manual={names[0]: 2})


def test_gradient_norm_ranks_larger_gradients_faster(peft_model):
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    stats = {n: float(i) for i, n in enumerate(names)}  # later names: larger gradients
    calls = []

    def probe():
        calls.append(1)
        return stats

    groups = assign_tiers(peft_model.named_parameters(), strategy="gradient_norm", periods=[1, 2, 4], probe=probe)
    tiers = _tier_of(groups)
    assert calls == [1]
    n = len(names)
    for rank, name in enumerate(reversed(names)):
        assert tiers[name] == rank * 3 // n
    with pytest.raises(ValueError, match="grad_stats"):
        assign_tiers(peft_model.named_parameters(), strategy="gradient_norm", periods=[1, 2])


def test_lora_detection_is_case_insensitive():
    class P:
        requires_grad = True

        def numel(self):
            return 4

    named = [("model.layers.0.attn.q.lora_A.weight", P()), ("model.layers.0.attn.q.lora_b", P()),
             ("model.layers.1.attn.q.LORA_A", P()), ("model.layers.1.attn.q.lora_magnitude_vector", P()),
             ("model.layers.1.mlp.Adapter.up", P()), ("model.layers.1.norm.weight", P())]
    assert [is_lora_name(n) for n, _ in named] == [True, True, True, True, True, False]
    groups = assign_tiers(named, periods=[1, 2], lora_only=True)
    placed = [n for g in groups for n in g["param_names"]]
    assert placed == [n for n, _ in named[:5]]
    assert [g["param_names"] for g in groups] == [[n for n, _ in named[:2]], [n for n, _ in named[2:5]]]


def test_layer_index_and_due_tiers():
    assert layer_index("base_model.model.model.layers.11.mlp.up_proj.lora_A.default.weight") == 11
    assert layer_index("transformer.h.3.attn.c_attn.lora_B") == 3
    assert layer_index("model.layers_norm.weight") is None
    assert layer_index("lm_head.weight") is None
    assert [due_tiers(s, [1, 2, 4]) for s in (1, 2, 3, 4)] == [
        [True, False, False], [True, True, False], [True, False, False], [True, True, True]]


@pytest.mark.parametrize("periods", [[], [0, 1], [1, -2], [1, 2.0], [True], "124"])
def test_periods_must_be_positive_integers(periods):
    with pytest.raises(ValueError, match="periods"):
        assign_tiers([], periods=periods)


def test_other_bad_options():
    with pytest.raises(ValueError, match="strategy"):
        assign_tiers([], strategy="random")
    with pytest.raises(ValueError, match="lr_scales"):
        assign_tiers([], periods=[1, 2], lr_scales=[1.0])
    with pytest.raises(ValueError, match=r"rules\[0\]"):
        assign_tiers([], strategy="rules", periods=[1, 2], rules=[("*", 5)])


def test_format_plan_counts(peft_model):
    with pytest.warns(UnmappedParametersWarning):
        groups = assign_tiers(peft_model.named_parameters(), periods=[1, 4, 16], lr_scales=[1.0, 1.0, 0.5])
    text = format_plan(groups)
    lines = text.splitlines()
    assert lines[2].split() == ["tier0", "1", "1", "28", f"{sum(p.numel() for p in groups[0]['params']):,}", "28"]
    assert lines[4].split()[:4] == ["tier2", "16", "0.5", "29"]
    assert lines[-1].split()[:2] == ["total", "85"]


def test_tier_module_imports_no_tensor_library():
    code = ("import sys, nested_learning.tiers; "
            "bad = [m for m in ('torch', 'mlx', 'numpy', 'jax') if m in sys.modules]; print(bad); "
            "raise SystemExit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
