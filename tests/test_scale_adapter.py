"""`nested-learning scale-adapter`: W + f * dW, exact, in both formats, never half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_an_interrupted_overwrite_leaves_a_whole_adapter(micro_checkpoint, tmp_path, monkeypatch):
    """--overwrite of an existing DST, the process dying while the old copy is removed: DST is a whole adapter
    (the new one), never the old one half-deleted."""
    import nested_learning.inference.scale as scale
    from nested_learning.inference.convert import adapter_format

    dst = scale_adapter(micro_checkpoint, tmp_path / "s", 0.5)
    names = sorted(p.name for p in dst.iterdir())

    def dies_midway(path, *args, **kwargs):  # removes one file, then the process is gone
        next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(scale.shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        scale_adapter(micro_checkpoint, dst, 0.25, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == names and adapter_format(dst) == "peft"
    orig, now = adapter_tensors(micro_checkpoint), adapter_tensors(dst)
    assert all(torch.equal(now[k], t * 0.25 if "lora_B" in k else t) for k, t in orig.items())
    assert json.loads((dst / "scaled.json").read_text())["factor"] == 0.25


def test_checkpoint_with_both_layouts_scales_both(tmp_path):
    """A checkpoint written with checkpoint.mlx_copy holds the PEFT and the MLX adapter (rsLoRA here): both are
    scaled, the rest copied as it was."""
    from safetensors.torch import load_file

    from conftest import micro_config, write_data
    from nested_learning.train.loop import run_training

    cfg = micro_config(write_data(tmp_path / "data"), tmp_path / "run", schedule={"steps": 2, "warmup_steps": 0},
                       eval={"every": 0}, checkpoint={"mlx_copy": True}, lora={"r": 4, "alpha": 8, "use_rslora": True})
    src = Path(run_training(cfg).last_checkpoint)
    out = scale_adapter(src, tmp_path / "scaled", 0.5)
    for name, b_suffix in (("adapter_model.safetensors", "lora_B.weight"), ("adapters.safetensors", "lora_b")):
        before, after = load_file(str(src / name)), load_file(str(out / name))
        assert before.keys() == after.keys()
        assert sum(k.endswith(b_suffix) for k in before) >= 14
        for key, t in before.items():
            assert torch.equal(after[key], t * 0.5 if key.endswith(b_suffix) else t), key
    # one adapter_config.json serves both tools (mlx-lm's keys beside PEFT's): copied as it was
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == json.loads((src / "adapter_config.json").read_text()) and config["use_rslora"]


def test_what_a_kill_left_beside_dst_is_tidied_first(micro_checkpoint, tmp_path):
    """Killed between moving the old DST aside and renaming the new copy in: the next run puts the old copy back
    (so it is not overwritten without --overwrite) and removes the half-built copy."""
    dst = scale_adapter(micro_checkpoint, tmp_path / "s", 0.5)
    before = adapter_tensors(dst)
    aside = tmp_path / ".old-s-x1"
    aside.mkdir()
    dst.replace(aside / "s")
    (tmp_path / ".tmp-s-x2").mkdir()
    (tmp_path / ".tmp-s-x2" / "adapter_model.safetensors").write_bytes(b"half")
    with pytest.raises(AdapterError, match="already exists"):
        scale_adapter(micro_checkpoint, dst, 0.25)
    assert all(torch.equal(adapter_tensors(dst)[k], t) for k, t in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    scale_adapter(micro_checkpoint, dst, 0.25, overwrite=True)
    assert json.loads((dst / "scaled.json").read_text())["factor"] == 0.25
