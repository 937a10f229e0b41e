"""``speed.compile_scope: layers``: every decoder layer runs through one compiled callable, so the graph count does
not grow with depth. Same loss and gradients as eager (float64 tiny Llama and Qwen2, compiled with ``aot_eager``:
dynamo and AOTAutograd run, no C++ compiler); the plan line, what it turns off, and the config errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from conftest import TARGETS, assert_same, tiny
from nested_learning.config import TrainConfig
from nested_learning.speed import compile as compile_mod
from nested_learning.speed.compile import compile_layers
from nested_learning.speed.plan import apply_speed, plan_speed

LAYERS = {"speed": {"compile_scope": "layers"}, "data": {"packing": True}}


class CountingBackend:
    """A dynamo backend that counts the graphs it is handed and runs them through ``aot_eager``."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        return aot_eager(gm, example_inputs)


def _ids(seed: int, width: int = 13):
    return torch.randint(0, 211, (2, width), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layers_share_their_graphs_and_keep_loss_and_gradients(arch):
    """Four layers, two graphs: the first layer's input (the frozen embedding's output) needs no gradient, so its
    graph has no input gradient; the other three share one. Depth adds no graph, and no graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = tiny(arch, layers=4).train()
    model = copy.deepcopy(ref)
    backend = CountingBackend()
    assert compile_layers(model, backend=backend) == 4
    assert compile_layers(model, backend=backend) == 4  # a second call wraps nothing twice
    assert_same(model, ref, _ids(0), loss_rtol=1e-12, grad_rtol=1e-10)
    assert_same(model, ref, _ids(1), loss_rtol=1e-12, grad_rtol=1e-10)  # same shape: no new graph
    assert backend.graphs == 2 and counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]


def test_checkpointed_layers_compile_one_graph():
    """With gradient checkpointing every layer's input needs a gradient: one graph for all four layers."""
    torch._dynamo.reset()
    ref = tiny("llama", layers=4).train()
    model = copy.deepcopy(ref)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backend = CountingBackend()
    compile_layers(model, backend=backend)
    assert_same(model, ref, _ids(2), loss_rtol=1e-12, grad_rtol=1e-10)
    assert backend.graphs == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_apply_speed_compiles_layers_with_every_other_lever(arch, monkeypatch):
    """A CUDA plan carried out on a CPU model (aot_eager instead of inductor): fold, rotary op and causal-mask
    attention inside the shared layer graph, losses and gradients equal to the untouched eager model."""
    torch._dynamo.reset()
    backend = CountingBackend()
    monkeypatch.setattr(compile_mod, "compile_layers", functools.partial(compile_layers, backend=backend))
    cfg = TrainConfig.model_validate(LAYERS)
    ref = tiny(arch, layers=3).train()
    model = copy.deepcopy(ref)
    plan = plan_speed(cfg, model, torch.device("cuda"))
    assert plan.compile_scope == "layers" and plan.on("lora_fold") and plan.on("outer_rotary")
    assert apply_speed(plan, model, cfg, torch.device("cpu")) is model
    assert_same(model, ref, _ids(3), loss_rtol=1e-12, grad_rtol=1e-10)
    assert backend.graphs == 2


def test_plan_lines_and_what_layers_turn_off():
    model = tiny("llama", layers=3)
    plan = plan_speed(TrainConfig.model_validate(LAYERS), model, torch.device("cuda"))
    lines = plan.format().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  compile "))
    assert lines[start:start + 4] == [
        "  compile                   on   3 decoder layers, compiled once and reused; the code between them runs eager",
        "  activation_memory_budget  on   0.8 of the activations kept",
        "  offload_activations       off  speed.offload_activations is off",
        "  cuda_graphs               off  speed.compile_scope layers (a layer graph per layer's weights, not one step)",
    ]
    default = plan_speed(TrainConfig.model_validate({"data": {"packing": True}}), model, torch.device("cuda"))
    assert default.compile_scope == "model" and default.on("cuda_graphs")
    assert default["compile"].note == "the decoder; head + loss run chunked outside the graph"
    cpu = plan_speed(TrainConfig.model_validate(LAYERS), model, torch.device("cpu"))
    assert cpu.compile_scope == "model" and cpu["compile"].note == "CPU runs eager (exact float32)"


@pytest.mark.parametrize("sections, message", [
    ({"speed": {"compile_scope": "layers", "compile": False}}, "speed.compile_scope layers needs speed.compile"),
    ({"speed": {"compile_scope": "layers", "cuda_graphs": True}, "data": {"packing": True}},
     "speed.cuda_graphs cannot run with speed.compile_scope layers"),
    ({"speed": {"compile_scope": "model", "offload_activations": True}, "model": {"gradient_checkpointing": True}},
     "speed.compile_scope model cannot run with speed.offload_activations"),
])
def test_contradictions_are_config_errors(sections, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        TrainConfig.model_validate(sections)
    TrainConfig.model_validate({**sections, "speed": {"compile_scope": sections["speed"]["compile_scope"]}})


def test_mixed_layer_kinds_stay_under_the_recompile_limit():
    """Sliding-window and full-attention layers (Gemma, Qwen2 with ``use_sliding_window``) trace apart, and each
    kind recompiles as the batch shape turns dynamic: all graphs of the one shared code object count against
    dynamo's ``recompile_limit`` (8 by default; 4 here to keep the test short), past which the layers would
    silently run eager. ``compile_layers`` raises it for the kinds of layer it finds."""
    import torch._dynamo.config as dynamo_config
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch._dynamo.reset()
    counters.clear()
    cfg = Qwen2Config(vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, use_cache=False, use_sliding_window=True, sliding_window=4,
                      max_window_layers=2)
    assert cfg.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="sdpa")
    base.requires_grad_(False)
    torch.manual_seed(1)
    ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)).train()
    model = copy.deepcopy(ref)
    backend = CountingBackend()
    with dynamo_config.patch(recompile_limit=4):  # restored on exit (monkeypatch would delete the key)
        compile_layers(model, backend=backend)
        for seed, width in enumerate([13, 9]):
            assert_same(model, ref, _ids(seed, width), loss_rtol=1e-12, grad_rtol=1e-10)
    # three kinds (the first layer without an input gradient, full, sliding), each static, then dynamic in width
    assert backend.graphs == 6
    assert not counters["unimplemented"], list(counters["unimplemented"])
