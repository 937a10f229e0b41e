"""Helpers for the trainer / checkpoint / CLI tests: tiny deterministic data and micro-llama configs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from nested_learning.config import TrainConfig
from nested_learning.trainer import Callback


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
