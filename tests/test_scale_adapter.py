"""`nested-learning scale-adapter`: W + f * dW, exact, in both formats, never half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import adapter_tensors
from nested_learning.inference.convert import AdapterError, convert_adapter
from nested_learning.inference.scale import scale_adapter


def merged_weights(adapter_dir):
    from nested_learning.inference.generate import load_for_inference

    model, _ = load_for_inference(adapter=adapter_dir, device="cpu")
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_scaled_update_is_factor_times_the_update(micro_checkpoint, tmp_path):
    out = scale_adapter(micro_checkpoint, tmp_path / "half", 0.5)
    zero = scale_adapter(micro_checkpoint, tmp_path / "zero", 0.0)
    orig, half = adapter_tensors(micro_checkpoint), adapter_tensors(out)
    b_keys = [k for k in orig if "lora_B" in k]
    assert b_keys and any(orig[k].abs().max() > 0 for k in b_keys)  # two steps moved B off zero
    for key, t in orig.items():
        assert torch.equal(half[key], t * 0.5 if "lora_B" in key else t), key

    from nested_learning.inference.generate import load_for_inference

    full_w, half_w, zero_w = merged_weights(micro_checkpoint), merged_weights(out), merged_weights(zero)
    model, _ = load_for_inference(adapter=micro_checkpoint, device="cpu")
    with model.disable_adapter():
        base_w = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.clone()
                  for k, v in model.state_dict().items() if "lora_" not in k}
    moved = 0
    for name, w in full_w.items():
        delta = w - base_w[name]
        torch.testing.assert_close(half_w[name] - base_w[name], 0.5 * delta, rtol=0, atol=1e-7)
        assert torch.equal(zero_w[name], base_w[name]), name
        moved += int(delta.abs().max() > 0)
    assert moved >= 7  # every adapted projection of the micro model

    # what travels: the adapter, its config and the run config naming the base; not the optimizer state
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "config.yaml", "scaled.json"} <= names
    assert "trainer_state.pt" not in names and "manifest.json" not in names
    assert json.loads((out / "scaled.json").read_text())["factor"] == 0.5


def test_mlx_adapter_is_scaled_too(micro_checkpoint, tmp_path):
    from safetensors.torch import load_file

    mlx = convert_adapter(micro_checkpoint, tmp_path / "mlx", "mlx")
    out = scale_adapter(mlx, tmp_path / "mlx-scaled", -1.0)
    before, after = load_file(str(mlx / "adapters.safetensors")), load_file(str(out / "adapters.safetensors"))
    assert before.keys() == after.keys()
    for key, t in before.items():
        assert torch.equal(after[key], -t if key.endswith(".lora_b") else t), key


def test_bad_requests_name_what_is_wrong_and_write_nothing(micro_checkpoint, tmp_path):
    with pytest.raises(AdapterError, match="--factor"):
        scale_adapter(micro_checkpoint, tmp_path / "x", float("nan"))
    with pytest.raises(AdapterError, match="not an adapter directory"):
        scale_adapter(tmp_path / "missing", tmp_path / "x", 0.5)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match="already exists"):
        scale_adapter(micro_checkpoint, tmp_path / "busy", 0.5)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]

    dora = tmp_path / "dora"
    shutil.copytree(micro_checkpoint, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        scale_adapter(dora, tmp_path / "y", 0.5)

    broken = tmp_path / "broken"
    shutil.copytree(micro_checkpoint, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        scale_adapter(broken, tmp_path / "z", 0.5)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no half-written directory left


def test_cli(micro_checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "nested_learning", "scale-adapter", str(micro_checkpoint), str(tmp_path / "s"),
           "--factor", "0.25"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"scaled": str(tmp_path / "s"), "factor": 0.25}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr
