"""Adapters cross between the old app's mlx-lm format and PEFT: exact round trip, same logits in MLX and torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nested_learning.inference.convert import (AdapterError, adapter_format, convert_adapter, load_adapter_into,
                                               read_adapter)

REPO = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN, INTER, VOCAB, RANK, SCALE = 3, 32, 64, 96, 4, 2.5
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      max_position_embeddings=64, rope_theta=10000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval(), cfg


def write_old_mlx_adapter(d: Path, num_layers: int = 2) -> Path:
    """The old app's layout: mlx-lm tensors for every projection of the last ``num_layers`` blocks, and its
    adapter_config.json (whose lora_alpha disagrees with the scale mlx-lm really applies)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    dims = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, 16), "v_proj": (HIDDEN, 16), "o_proj": (HIDDEN, HIDDEN),
            "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
    tensors = {}
    for layer in range(LAYERS - num_layers, LAYERS):
        for rel in PROJ:
            fan_in, fan_out = dims[rel.rsplit(".", 1)[1]]
            tensors[f"model.layers.{layer}.{rel}.lora_a"] = rng.normal(0, 0.2, (fan_in, RANK)).astype(np.float32)
            tensors[f"model.layers.{layer}.{rel}.lora_b"] = rng.normal(0, 0.2, (RANK, fan_out)).astype(np.float32)
    d.mkdir(parents=True)
    save_file(tensors, str(d / "adapters.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "adapter_type": "lora", "lora_rank": RANK, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_parameters": {"rank": RANK, "dropout": 0.0, "scale": SCALE},
        "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "num_layers": num_layers, "model": "/somewhere/base"}, indent=2))
    return d


def test_mlx_to_peft_to_mlx_is_exact(tmp_path):
    from safetensors.numpy import load_file

    src = write_old_mlx_adapter(tmp_path / "old")
    peft_dir = convert_adapter(src, tmp_path / "peft", "peft")
    assert adapter_format(peft_dir) == "peft"
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", RANK, SCALE * RANK)
    assert cfg["layers_to_transform"] == [1, 2] and cfg["base_model_name_or_path"] == "/somewhere/base"
    peft_t = load_file(str(peft_dir / "adapter_model.safetensors"))
    old_t = load_file(str(src / "adapters.safetensors"))
    a = peft_t["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"]
    assert a.shape == (RANK, INTER) and np.array_equal(a, old_t["model.layers.2.mlp.down_proj.lora_a"].T)

    back = convert_adapter(peft_dir, tmp_path / "back", "mlx")
    again = load_file(str(back / "adapters.safetensors"))
    assert again.keys() == old_t.keys() and all(np.array_equal(again[k], old_t[k]) for k in old_t)
    assert json.loads((back / "adapter_config.json").read_text()) == json.loads(
        (src / "adapter_config.json").read_text())

    # A PEFT adapter of ours (no MLX origin) gets a config mlx-lm's loader accepts.
    (peft_dir / "mlx_adapter_config.json").unlink()
    # mlx-lm counts adapted blocks from the last one: without the base model's depth that cannot be written.
    with pytest.raises(AdapterError, match=r"starts at block 1.*--base MODEL"):
        convert_adapter(peft_dir, tmp_path / "fresh", "mlx")
    base_dir = tmp_path / "base"
    tiny_llama()[1].save_pretrained(base_dir)
    fresh = convert_adapter(peft_dir, tmp_path / "fresh", "mlx", base=str(base_dir))
    params = json.loads((fresh / "adapter_config.json").read_text())
    assert params["lora_parameters"] == {"rank": RANK, "scale": SCALE, "dropout": 0.0, "keys": sorted(PROJ)}
    assert (params["num_layers"], params["lora_rank"], params["lora_alpha"]) == (2, RANK, SCALE * RANK)


def test_converted_adapter_gives_the_mlx_logits_in_torch(tmp_path):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.models import llama as mlx_llama
    from mlx_lm.tuner.utils import load_adapters
    from peft import PeftModel

    model, cfg = tiny_llama()
    src = write_old_mlx_adapter(tmp_path / "old")
    ids = [[3, 17, 42, 5, 88, 9, 60, 1, 33, 71]]

    args = mlx_llama.ModelArgs(model_type="llama", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                               intermediate_size=INTER, num_attention_heads=4, num_key_value_heads=2,
                               rms_norm_eps=1e-5, vocab_size=VOCAB, rope_theta=10000.0, tie_word_embeddings=False)
    mlx_model = mlx_llama.Model(args)
    mlx_model.load_weights([(k, mx.array(v.numpy())) for k, v in model.state_dict().items()])
    base_logits = np.array(mlx_model(mx.array(ids)))
    with torch.no_grad():
        torch_base = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(base_logits - torch_base).max() < 1e-4  # the same network in both before any adapter
    load_adapters(mlx_model, str(src))
    mlx_logits = np.array(mlx_model(mx.array(ids)))

    peft_dir = convert_adapter(src, tmp_path / "peft", "peft")
    with torch.no_grad():
        torch_logits = PeftModel.from_pretrained(model, str(peft_dir)).eval()(torch.tensor(ids)).logits.numpy()
    assert np.abs(mlx_logits - base_logits).max() > 0.05  # the adapter really changes the output
    assert np.abs(torch_logits - mlx_logits).max() <= 1e-4

    # The same adapter loaded into a freshly wrapped model (what lora.init_adapter does) gives the same logits.
    from nested_learning.config import LoraConfig
    from nested_learning.model.lora import wrap_lora

    fresh, _ = tiny_llama()
    wrapped = wrap_lora(fresh, LoraConfig(r=RANK, alpha=SCALE * RANK), seed=0)
    assert load_adapter_into(wrapped, src, RANK, SCALE * RANK) == 2 * len(PROJ)
    with torch.no_grad():
        loaded = wrapped.eval()(torch.tensor(ids)).logits.numpy()
    assert np.abs(loaded - mlx_logits).max() <= 1e-4

    # A checkpoint of ours with the old layout beside PEFT's (checkpoint.mlx_copy): mlx-lm loads it as it is.
    from nested_learning.inference.convert import write_mlx_beside

    (peft_dir / "mlx_adapter_config.json").unlink()
    write_mlx_beside(peft_dir, LAYERS, None)
    again = mlx_llama.Model(args)
    again.load_weights([(k, mx.array(v.numpy())) for k, v in tiny_llama()[0].state_dict().items()])
    load_adapters(again, str(peft_dir))
    assert np.abs(np.array(again(mx.array(ids))) - mlx_logits).max() <= 1e-5
    assert read_adapter(peft_dir).scale == SCALE  # still read as the PEFT adapter it is


def test_unloadable_adapters_name_the_file(tmp_path):
    from nested_learning.config import ConfigError, LoraConfig
    from nested_learning.model.lora import wrap_lora

    src = write_old_mlx_adapter(tmp_path / "old")
    wrapped = wrap_lora(tiny_llama()[0], LoraConfig(r=8, alpha=16), seed=0)
    with pytest.raises(ConfigError, match=r"adapters.safetensors has rank 4 and scale 2.5.*set lora.r=4"):
        load_adapter_into(wrapped, src, 8, 16)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapters.safetensors").write_bytes(b"not safetensors")
    (broken / "adapter_config.json").write_text('{"lora_parameters": {"rank": 4, "scale": 1.0}}')
    with pytest.raises(AdapterError, match=r"broken/adapters.safetensors: not a readable safetensors"):
        read_adapter(broken)
    (broken / "adapter_config.json").write_text('{"lora_parameters": ')
    with pytest.raises(AdapterError, match=r"broken/adapter_config.json:1: not valid JSON"):
        read_adapter(broken)
    with pytest.raises(AdapterError, match="neither a PEFT adapter"):
        read_adapter(tmp_path)

    # The CLI: one error line naming the file, exit 2, no traceback.
    proc = subprocess.run([sys.executable, "-m", "nested_learning", "convert-adapter", str(broken),
                           str(tmp_path / "out"), "--to", "peft"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "adapter_config.json:1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_inference_takes_an_old_adapter_directly_or_converted(tmp_path):
    from peft import PeftModel

    from nested_learning.cli import main
    from nested_learning.inference.generate import load_for_inference
    from nested_learning.model.embedded import byte_tokenizer

    model, _ = tiny_llama()
    base = tmp_path / "base"
    model.save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    src = write_old_mlx_adapter(tmp_path / "old")
    ids = torch.tensor([[5, 9, 33, 70, 2, 41]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(model, str(convert_adapter(src, tmp_path / "ref", "peft"))).eval()(
            ids).logits

    direct, _ = load_for_inference(adapter=src, base=str(base), device="cpu")  # converted on the fly
    assert main(["convert-adapter", str(src), str(tmp_path / "conv"), "--to", "peft", "--base", str(base)]) == 0
    converted, _ = load_for_inference(adapter=tmp_path / "conv", device="cpu")  # its config.yaml names the base
    with torch.no_grad():
        for m in (direct, converted):
            assert torch.equal(m(ids).logits, want)
