"""Checkpoints: PEFT-loadable, exact logits, merge, atomic replace, keep-last-n, non-finite refusal."""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch

from nested_learning.train import checkpoint as ckpt
from nested_learning.model.embedded import build_embedded
from nested_learning.train.loop import run_training, train_loop
from nested_learning.train.setup import build_run
from conftest import adapter_tensors, micro_config, write_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished run plus the in-memory trained model."""
    out = tmp_path_factory.mktemp("run")
    cfg = micro_config(data_dir, out, schedule={"steps": 6}, eval={"every": 3},
                       checkpoint={"every": 2, "keep_last_n": 2}, lora={"r": 4, "alpha": 8, "use_rslora": True})
    run = build_run(cfg)
    state = train_loop(run)
    return state, run.model, out


def _ids():
    return torch.tensor([[1, 50, 60, 70, 80, 90, 100, 33]])


def test_layout_and_listing(trained):
    state, _, out = trained
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["best", "last", "step-000004", "step-000006"]  # step-000002 pruned (keep_last_n=2)
    last = out / "checkpoints" / "last"
    for f in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.pt", "config.yaml",
              "tokenizer.json"):
        assert (last / f).is_file(), f
    listed = ckpt.list_checkpoints(out)
    steps = {c["name"]: c["step"] for c in listed}
    assert steps == {"best": state.step if state.val_loss == state.best_val_loss else 3, "step-000004": 4,
                     "last": 6, "step-000006": 6}
    assert [c["step"] for c in listed] == sorted(c["step"] for c in listed)
    assert next(c for c in listed if c["name"] == "last")["val_loss"] == state.val_loss
    assert ckpt.find_latest(out).name == "last"
    st = torch.load(last / "trainer_state.pt", weights_only=True)  # plain tensors and primitives only
    assert st["step"] == 6 and st["trainer_state"]["status"] == "completed"


def test_peft_from_pretrained_reproduces_trained_logits(trained):
    from peft import PeftModel

    from nested_learning.speed.lora_groups import unfold_lora_groups

    state, trained_model, _ = trained
    model = copy.deepcopy(trained_model).eval()  # the fixture's model stays as trained (folded) for other tests
    with torch.no_grad():
        folded = model(input_ids=_ids()).logits
        assert unfold_lora_groups(model) > 0  # trained with speed.lora_fold: PEFT's own path for the exact check
        expected = model(input_ids=_ids()).logits
        torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-6)  # the fold only reorders float32 sums
        base, _ = build_embedded("embedded:micro-llama")
        loaded = PeftModel.from_pretrained(base, state.last_checkpoint).eval()
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, expected, rtol=0, atol=0)
    assert not torch.equal(expected, build_embedded("embedded:micro-llama")[0](input_ids=_ids()).logits)


def test_merge_loads_with_automodel(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from nested_learning.inference.merge import merge_adapter

    state, model, _ = trained
    out = merge_adapter(state.last_checkpoint, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_ids()).logits, model.eval()(input_ids=_ids()).logits,
                                   rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_merge_refuses_non_finite(trained, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from nested_learning.inference.merge import merge_adapter

    state, _, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(state.last_checkpoint, bad)
    tensors = adapter_tensors(bad)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="non-finite"):
        merge_adapter(bad, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_crash_mid_replace_keeps_a_checkpoint(data_dir, tmp_path, monkeypatch):
    cfg = micro_config(data_dir, tmp_path / "run", schedule={"steps": 4}, eval={"every": 0},
                       checkpoint={"save_best": False})
    stop = threading.Event()
    from conftest import Recorder

    run_training(cfg, [Recorder(stop_at=2, stop_event=stop)], stop)  # last = step 2
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        if os.path.basename(str(src)).startswith(".tmp-last") and os.path.basename(str(dst)) == "last":
            calls.append(dst)  # the old `last` is already renamed away; the new one is not in place yet
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="simulated crash"):
        run_training(cfg, resume="auto")
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert len(calls) == 1
    root = tmp_path / "run" / "checkpoints"
    assert not (root / "last").exists()
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # the half-written dir is gone
    latest = ckpt.find_latest(tmp_path / "run")
    assert latest is not None and ckpt.load_trainer_state(latest)["step"] == 2
    state = run_training(cfg, resume="auto")  # recovers from the renamed-away checkpoint
    assert state.status == "completed" and state.step == 4


def test_refuses_non_finite_adapter(tmp_path):
    from nested_learning.config import LoraConfig, TrainConfig
    from nested_learning.model.lora import wrap_lora

    base, tok = build_embedded("embedded:micro-llama")
    model = wrap_lora(base, LoraConfig(r=2, alpha=4), seed=0)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
    with pytest.raises(ckpt.CheckpointError, match="NaN/Inf"):
        ckpt.save_checkpoint(tmp_path, "last", model, tok, TrainConfig(), {"step": 0})
    assert not (tmp_path / "checkpoints" / "last").exists()


def test_resume_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path) is None
    assert ckpt.list_checkpoints(tmp_path) == []
