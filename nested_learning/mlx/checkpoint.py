"""MLX checkpoints: mlx-lm's adapter format plus what an exact resume needs, written like the torch ones.

Layout (``<run>/checkpoints/<name>/``)::

    adapters.safetensors, adapter_config.json   mlx-lm's adapter format: mlx_lm.load(base, adapter_path=...)
    optimizer.safetensors                       NestedAdamW state: step, moments, tier counters, accumulators
    trainer_state.json                          data position, counters, reported state, tier assignment, RNG
    config.yaml, tokenizer files                the run's TrainConfig and tokenizer
    manifest.json                               size and sha256 of every file (written last; names the required)

Written into a temporary sibling and renamed into place with the torch backend's own helpers
(:mod:`nested_learning.train.checkpoint`), so ``--resume auto``, listings and damage checks work unchanged.
``nested-learning convert-adapter CKPT DST --to peft`` turns the adapter into a PEFT one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from nested_learning.train import checkpoint as ckpt
from nested_learning.train.state import CheckpointError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "OPTIMIZER_FILE", "STATE_FILE", "capture_rng", "is_mlx_checkpoint",
           "load_state", "restore_rng", "save"]

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
REQUIRED = [ADAPTER_FILE, ADAPTER_CONFIG, OPTIMIZER_FILE, STATE_FILE]


def capture_rng() -> dict[str, Any]:
    """Python's and numpy's generators, as JSON. (MLX's key cannot be set from Python; the loop reseeds it from
    the run seed and the step before every step, so it needs no saving.)"""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _finite(arrays: dict[str, mx.array]) -> list[str]:
    return [n for n, a in arrays.items() if mx.issubdtype(a.dtype, mx.floating) and not bool(mx.isfinite(a).all())]


def save(output_dir: str | Path, name: str, *, adapter: dict[str, mx.array], adapter_config: dict[str, Any],
         optimizer_state: dict[str, mx.array], payload: dict[str, Any], config, tokenizer) -> Path:
    """Write checkpoint ``name`` atomically; refuses non-finite adapter weights or optimizer state."""
    if bad := _finite(adapter):
        raise CheckpointError(f"refusing to write checkpoint {name!r}: adapter weights contain NaN/Inf ({bad[0]})")
    if bad := _finite(optimizer_state):
        raise CheckpointError(f"refusing to write checkpoint {name!r}: resume state holds NaN/Inf ({bad[0]})")
    root = ckpt.checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), adapter, metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), optimizer_state)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / STATE_FILE).write_text(json.dumps(payload, allow_nan=True) + "\n")
        (tmp / ckpt.CONFIG_FILE).write_text(config.to_yaml())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        val = (payload.get("trainer_state") or {}).get("val_loss")
        ckpt.write_manifest(tmp, int(payload["step"]), val if val is None or math.isfinite(val) else None,
                            required=REQUIRED)
        ckpt._replace_dir(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / name


def is_mlx_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file() and (Path(path) / OPTIMIZER_FILE).is_file()


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, mx.array], dict[str, mx.array]]:
    """(payload, optimizer state, adapter tensors) of an MLX checkpoint; errors name the file."""
    p = Path(path)
    if not is_mlx_checkpoint(p):
        what = "a torch checkpoint" if (p / ckpt.STATE_FILE).is_file() else "not an MLX checkpoint"
        raise CheckpointError(f"--resume {p}: {what} (no {STATE_FILE} + {OPTIMIZER_FILE}); the mlx backend resumes "
                              "only its own checkpoints")
    try:
        payload = json.loads((p / STATE_FILE).read_text())
        return payload, mx.load(str(p / OPTIMIZER_FILE)), mx.load(str(p / ADAPTER_FILE))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{p}: cannot read resume state ({exc})") from None
