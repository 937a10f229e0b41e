"""``nested-learning demo``: the whole job on CPU in a few minutes, no download.

A templated prompt → completion task is generated into the run directory; the embedded ``tiny-llama`` base
(random weights, byte-level tokenizer) learns it through nested-tier LoRA. The completion repeats the
prompt's name and city inside a fixed reply, so the loss falls quickly on the template and further as the
model learns to copy: the sample generation turns from random bytes into the reply.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Iterable

from nested_learning.config import TrainConfig

__all__ = ["DEMO_PROMPT", "demo_config", "make_demo_data", "run_demo"]

NAMES = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Max", "Ned", "Oz", "Pam"]
CITIES = ["Oslo", "Rome", "Lima", "Kyiv", "Doha", "Bern", "Nice", "Riga", "Baku", "Pune", "Cork", "Graz"]
ITEMS = ["tea", "jam", "figs", "rice", "soup", "cake"]
DEMO_PROMPT = "Greet Ada from Rome, who likes tea.\n"


def _record(name: str, city: str, item: str) -> dict[str, str]:
    return {"prompt": f"Greet {name} from {city}, who likes {item}.\n", "completion": f"Hi {name}! Enjoy {item} in {city}."}


def make_demo_data(data_dir: str | Path, seed: int = 0, n_valid: int = 64) -> Path:
    """Write ``train.jsonl`` / ``valid.jsonl``: every (name, city, item) triple once; a seeded random
    ``n_valid`` of them are held out, so validation measures the learned rule, not memorised lines."""
    triples = [(n, c, i) for n in NAMES for c in CITIES for i in ITEMS]
    random.Random(seed).shuffle(triples)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("valid", triples[:n_valid]), ("train", triples[n_valid:])):
        lines = "".join(json.dumps(_record(*t)) + "\n" for t in part)
        (data_dir / f"{name}.jsonl").write_text(lines)
    return data_dir


def demo_config(out: str | Path = "runs/demo", steps: int = 400, backend: str = "torch",
                **overrides: Any) -> TrainConfig:
    """The demo run, also shipped as ``configs/demo.yaml`` (a test keeps the two equal)."""
    out = Path(out)
    raw: dict[str, Any] = {
        "seed": 0,
        **({"backend": backend} if backend != "torch" else {}),
        "model": {"name_or_path": "embedded:tiny-llama", "device": "cpu"},
        # The embedded base is random and frozen: adapting the head too lets the model grow confident logits.
        "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj", "lm_head"]},
        "data": {"dir": str(out / "data"), "max_length": 96},
        # CMS reading of nested learning: attention fast, MLP blocks slower, the output head slowest.
        "tiers": {"periods": [1, 2, 4], "strategy": "rules",
                  "rules": [["*self_attn*", 0], ["*mlp*", 1], ["*lm_head*", 2]]},
        "optim": {"lr": 3e-3, "batch_size": 16, "max_grad_norm": 1.0},
        "schedule": {"steps": steps, "warmup_steps": min(20, steps // 10), "kind": "cosine", "min_lr_ratio": 0.1},
        "eval": {"every": max(1, steps // 5), "max_batches": 4, "at_start": True},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out / "run"), "tensorboard": True},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return TrainConfig.model_validate(raw)


def run_demo(out: str | Path = "runs/demo", steps: int = 400, callbacks: Iterable = (), max_new_tokens: int = 40,
             overwrite: bool = False, backend: str = "torch") -> dict[str, Any]:
    """Generate the data, show a generation before, train, show one after. Returns the numbers.
    ``backend="mlx"``: the same run on MLX (the embedded model's MLX twin, same weights)."""
    from nested_learning.train.loop import run_training
    from nested_learning.train.state import Callback

    cfg = demo_config(out, steps, backend=backend, output__overwrite=overwrite)
    if backend == "mlx":
        from nested_learning.mlx import require_mlx

        require_mlx()
        from nested_learning.mlx.generate import generate_mlx as generate_text
        from nested_learning.mlx.generate import load_mlx_checkpoint
        from nested_learning.mlx.model import load_base
        from nested_learning.model.loading import load_tokenizer

        def load_for_inference(adapter, device):
            return load_mlx_checkpoint(adapter)

        def load_model_and_tokenizer(model_cfg):
            return load_base(model_cfg)[0], load_tokenizer(model_cfg)
    else:
        from nested_learning.inference.generate import generate_text, load_for_inference
        from nested_learning.model.loading import load_model_and_tokenizer
    make_demo_data(cfg.data.dir, seed=cfg.seed)
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    before = generate_text(base, tokenizer, prompt=DEMO_PROMPT, max_new_tokens=max_new_tokens)
    del base

    evals: list[tuple[int, float]] = []

    class _Evals(Callback):
        def on_eval(self, state) -> None:
            evals.append((state.step, state.val_loss))

    t0 = time.perf_counter()
    state = run_training(cfg, [_Evals(), *callbacks])
    train_s = time.perf_counter() - t0
    model, tokenizer = load_for_inference(adapter=state.last_checkpoint, device="cpu")
    after = generate_text(model, tokenizer, prompt=DEMO_PROMPT, max_new_tokens=max_new_tokens)
    return {
        "status": state.status,
        "steps": state.step,
        "val_loss_before": evals[0][1] if evals else None,
        "val_loss_after": evals[-1][1] if evals else None,
        "evals": evals,
        "train_seconds": train_s,
        "prompt": DEMO_PROMPT,
        "before": before,
        "after": after,
        "adapter": state.last_checkpoint,
        "run_dir": str(Path(cfg.output.dir)),
    }
