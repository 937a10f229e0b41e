"""The speed plan: every lever decided in one place, printed with its reason, pinned for four architectures
(Llama, Qwen2, Gemma-2 with soft-capped logits and eager attention, Phi-3 with fused qkv/gate_up projections);
contradictory switches are config errors; the plan lands in the run directory."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import micro_config, write_data
from nested_learning.config import ConfigError, TrainConfig, load_config
from nested_learning.model.lora import wrap_lora
from nested_learning.speed.plan import LEVERS, plan_speed

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def _model(arch: str):
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config

    config = {"llama": lambda: LlamaConfig(**COMMON), "qwen2": lambda: Qwen2Config(**COMMON),
              "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8),
              "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0)}[arch]()
    torch.manual_seed(0)
    # transformers runs Gemma-2 on eager attention only
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if arch == "gemma2" else "sdpa")
    base.requires_grad_(False)
    return wrap_lora(base, TrainConfig().lora, seed=0)


CPU_TAIL = """\
  loss_chunk_kernel         off  {kernel}
  compile                   off  CPU runs eager (exact float32)
  activation_memory_budget  off  compile is off
  offload_activations       off  speed.offload_activations is off
  cuda_graphs               off  compile is off
  data_parallel             off  one process"""

EXPECTED = {
    "llama": ["on   one-sample rows run SDPA's causal kernel, no mask tensor", "on   1 rotary module",
              "on   4 groups (gate_proj+up_proj, q_proj+k_proj+v_proj)", "on   2048 tokens per chunk",
              "CPU runs the eager chunk"],
    "qwen2": ["on   one-sample rows run SDPA's causal kernel, no mask tensor", "on   1 rotary module",
              "on   4 groups (gate_proj+up_proj, q_proj+k_proj+v_proj)", "on   2048 tokens per chunk",
              "CPU runs the eager chunk"],
    "gemma2": ["off  the model runs eager attention, not sdpa", "on   1 rotary module",
               "on   4 groups (gate_proj+up_proj, q_proj+k_proj+v_proj)",
               "off  final_logit_softcapping in the model config", "chunked_loss is off"],
    "phi3": ["on   one-sample rows run SDPA's causal kernel, no mask tensor", "on   1 rotary module",
             "off  no sibling LoRA projections (q/k/v, gate/up) in this model", "on   2048 tokens per chunk",
             "CPU runs the eager chunk"],
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_printed_plan_per_architecture(arch):
    causal, rotary, fold, chunked, kernel = EXPECTED[arch]
    plan = plan_speed(TrainConfig(), _model(arch), torch.device("cpu"))
    assert plan.format() == "\n".join([
        "speed plan (cpu):",
        "  fit_memory                off  CPU",
        "  sdpa_kernels              off  torch's own set",
        f"  skip_causal_mask          {causal}",
        "  varlen_attention          off  " + ("skip_causal_mask is off" if arch == "gemma2"
                                              else "data.packing is off (no row holds several samples)"),
        f"  outer_rotary              {rotary}",
        f"  lora_fold                 {fold}",
        f"  chunked_loss              {chunked}",
        CPU_TAIL.format(kernel=kernel),
    ])
    assert [lv.name for lv in plan.levers] == list(LEVERS)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_cuda_plan_decides_compile_graphs_and_budget(arch):
    """Decided for a CUDA device from the config and the model alone (the model itself stays on the CPU)."""
    model = _model(arch)
    packed = TrainConfig.model_validate({"data": {"packing": True}})
    plan = plan_speed(packed, model, torch.device("cuda"))
    assert plan.on("compile") and plan.on("cuda_graphs") and plan.on("activation_memory_budget")
    assert plan["compile"].note == "the decoder; head + loss run chunked outside the graph"
    assert plan["lora_fold"].on is (arch == "llama")
    padded = plan_speed(TrainConfig(), model, torch.device("cuda"))
    assert padded["cuda_graphs"].note == "data.packing is off (padded batches vary in shape)"
    ranks = plan_speed(packed, model, torch.device("cuda"), world=2)["data_parallel"]
    assert ranks.on and ranks.note == "2 ranks; gradients summed each tier at its due steps"
    lean = TrainConfig.model_validate({"speed": {"activation_memory_budget": 1.0}})
    assert plan_speed(lean, model, torch.device("cuda"))["activation_memory_budget"].note == "1.0 keeps every activation"


@pytest.mark.parametrize("sections, message", [
    ({"speed": {"compile": False, "cuda_graphs": True}}, "speed.cuda_graphs needs speed.compile"),
    ({"speed": {"compile": False, "activation_memory_budget": 0.5}}, "speed.activation_memory_budget needs speed.compile"),
    ({"speed": {"cuda_graphs": True}, "data": {"packing": False}}, "speed.cuda_graphs needs data.packing"),
    ({"speed": {"lora_fold": True}, "lora": {"dropout": 0.1}}, "speed.lora_fold cannot run with lora.dropout > 0"),
    ({"speed": {"lora_fold": True}, "lora": {"use_dora": True}}, "speed.lora_fold cannot run with lora.use_dora"),
    ({"speed": {"lora_fold": True}, "model": {"gradient_checkpointing": True}},
     "speed.lora_fold cannot run with model.gradient_checkpointing"),
    ({"speed": {"loss_chunk_tokens": 0, "loss_chunk_kernel": "compile"}}, "speed.loss_chunk_kernel needs"),
    ({"speed": {"skip_causal_mask": True}, "model": {"attn_implementation": "eager"}},
     "speed.skip_causal_mask needs model.attn_implementation sdpa"),
])
def test_contradictory_switches_are_config_errors(tmp_path, sections, message):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(sections))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path)
    # Left at their defaults, the same levers just turn themselves off in the plan.
    defaults = {k: {f: v for f, v in sec.items() if k != "speed" or f == "compile" and v is False}
                for k, sec in sections.items()}
    TrainConfig.model_validate(defaults)


def test_levers_written_under_model_move_to_speed_and_saved_configs_round_trip():
    old = TrainConfig.model_validate({"model": {"compile": False, "lora_fold": False, "fused_lora": False}})
    assert not old.speed.compile and not old.speed.lora_fold
    with pytest.raises(Exception, match="fused_lora"):
        TrainConfig.model_validate({"model": {"fused_lora": True}})  # retired: asking for it is an error
    # A saved config keeps only the levers the user chose, so reading it back never looks contradictory.
    chosen = TrainConfig.model_validate({"speed": {"compile": False}, "lora": {"dropout": 0.1}})
    assert "speed:\n  compile: false\nlora:" in chosen.to_yaml()
    assert TrainConfig.model_validate_json(chosen.model_dump_json()) == chosen


def test_run_prints_and_writes_its_plan(tmp_path):
    from nested_learning.train.setup import build_run

    run = build_run(micro_config(write_data(tmp_path / "data"), tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "speed_plan.json").read_text())
    assert written == run.speed_plan.to_dict()
    assert written["levers"]["lora_fold"] == {"on": True, "note": "4 groups (gate_proj+up_proj, q_proj+k_proj+v_proj)"}
    assert run.state.speed_plan == run.speed_plan.format()
