"""Shared helpers and fixtures: tiny deterministic data, micro-llama run configs, a recording callback, and tiny
PEFT models (Llama / Qwen2, float64) for the speed levers' equality tests."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from nested_learning.config import TrainConfig
from nested_learning.speed.lora_groups import LoraGroup
from nested_learning.train.state import Callback


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """The default ``write_data`` set under ``tmp_path/data``."""
    return write_data(tmp_path / "data")


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> Path:
    """A real micro-llama checkpoint (2 steps, the ``last`` one), trained once per session; copy it before
    changing it."""
    from nested_learning.train.loop import run_training

    root = tmp_path_factory.mktemp("micro-ckpt")
    cfg = micro_config(write_data(root / "data"), root / "run", schedule={"steps": 2, "warmup_steps": 0},
                       eval={"every": 0})
    return Path(run_training(cfg, []).last_checkpoint)


def write_data(root: Path, n_train: int = 40, n_valid: int = 8, seed: int = 0) -> Path:
    """Prompt/completion JSONL of varied lengths (so padding and length grouping matter)."""
    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid)):
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                pad = "x" * rng.randint(0, 12)
                f.write(json.dumps({"prompt": f"add {a} and {b}{pad}: ", "completion": f"{a + b} ok"}) + "\n")
    return root


def micro_config(data_dir: Path, out_dir: Path, **sections: dict[str, Any]) -> TrainConfig:
    """A micro-llama run: 2 layers, 10 steps, two tiers; ``sections`` update the raw config per section."""
    raw: dict[str, Any] = {
        "seed": 0,
        "model": {"name_or_path": "embedded:micro-llama", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"dir": str(data_dir), "max_length": 64},
        "tiers": {"periods": [1, 2]},
        "optim": {"lr": 1e-2, "batch_size": 4},
        "schedule": {"steps": 10, "warmup_steps": 2},
        "eval": {"every": 5},
        "output": {"dir": str(out_dir), "tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return TrainConfig.model_validate(raw)


class Recorder(Callback):
    """Collects what callbacks see; optionally sets a stop event after a given step."""

    def __init__(self, stop_at: int | None = None, stop_event=None):
        self.stop_at, self.stop_event = stop_at, stop_event
        self.steps: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []
        self.checkpoints: list[str] = []
        self.events: list[str] = []
        self.final = None

    def on_start(self, state):
        self.events.append("start")

    def on_step(self, state):
        self.steps.append((state.step, state.train_loss))
        if self.stop_at is not None and state.step == self.stop_at:
            self.stop_event.set()

    def on_eval(self, state):
        self.evals.append((state.step, state.val_loss))

    def on_checkpoint(self, state, path):
        self.checkpoints.append(Path(path).name)

    def on_end(self, state):
        self.events.append("end")
        self.final = state.to_dict()


def adapter_tensors(checkpoint_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint_dir) / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------- tiny PEFT models (float64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(arch: str, dtype=torch.float64, dropout: float = 0.0, device="cpu", layers: int = 2, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, use_cache=False)
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

    def __init__(self, monkeypatch, group_class=LoraGroup):
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


# ------------------------------------------------------------------------ experiments/forgetting as modules
def forgetting_module(name: str):
    """``experiments/forgetting/<name>.py`` imported as a module (its siblings importable while it loads)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1] / "experiments" / "forgetting"
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(f"forgetting_{name}", root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(root))
