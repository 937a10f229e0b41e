"""Checkpoints: a PEFT-format adapter plus everything an exact resume needs, written atomically.

Layout (``<run>/checkpoints/<name>/``, name = ``step-000100``, ``best`` or ``last``)::

    adapter_model.safetensors, adapter_config.json   loadable by peft.PeftModel.from_pretrained
    trainer_state.pt                                 optimizer (with tier state), scheduler, RNG, data position
    config.yaml                                      the run's TrainConfig (names the base model)
    tokenizer files                                  so generate / merge work from the checkpoint alone

A checkpoint is written into a temporary sibling directory and renamed into place. Replacing ``best`` or
``last`` renames the old one away first and deletes it only after the new one is in place, so a crash at
any moment leaves a complete checkpoint behind (``find_latest`` recovers one that was renamed away).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "adapter_is_finite",
    "capture_rng",
    "find_latest",
    "list_checkpoints",
    "load_adapter_weights",
    "load_trainer_state",
    "restore_rng",
    "save_checkpoint",
    "prune_step_checkpoints",
    "resolve_resume",
]

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
_STEP_RE = re.compile(r"^step-(\d+)$")
_OLD_PREFIX = ".old-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the path."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------------------------- RNG state
def capture_rng() -> dict[str, Any]:
    """Every RNG the run draws from; numpy's state is stored as plain lists so ``weights_only`` loading works."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- writing
def adapter_is_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is renamed away first and deleted last."""
    old = None
    if final.exists():
        old = final.with_name(f"{_OLD_PREFIX}{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    output_dir: str | Path, name: str, model, tokenizer, config, trainer_state: dict[str, Any]
) -> Path:
    """Write checkpoint ``name`` atomically; refuses non-finite adapter weights (nothing is written)."""
    if not adapter_is_finite(model):
        raise CheckpointError(f"refusing to write checkpoint {name!r}: adapter weights contain NaN/Inf")
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        model.save_pretrained(tmp, save_embedding_layers=False)
        readme = tmp / "README.md"  # PEFT's model-card stub says nothing about this run
        if readme.exists():
            readme.unlink()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config.to_yaml())
        _replace_dir(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / name


def prune_step_checkpoints(output_dir: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest ``keep_last_n`` ``step-N`` checkpoints; returns what was deleted."""
    steps = sorted(
        (int(m.group(1)), p) for p in checkpoints_dir(output_dir).glob("step-*") if (m := _STEP_RE.match(p.name))
    )
    doomed = [p for _, p in steps[: max(0, len(steps) - keep_last_n)]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------------- reading
def load_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no {STATE_FILE})")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"{f}: cannot read resume state ({exc})") from None


def load_adapter_weights(model, path: str | Path) -> None:
    """Load a checkpoint's adapter tensors into an already LoRA-wrapped model (exact, no re-init)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{path}: no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(str(f)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise CheckpointError(f"{path}: adapter does not match the model (unexpected keys, e.g. {unexpected[0]})")


def _summary(path: Path) -> dict[str, Any] | None:
    if not (path / STATE_FILE).is_file():
        return None
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception:
        return None
    ts = state.get("trainer_state", {})
    return {"name": path.name, "step": int(state["step"]), "path": str(path), "val_loss": ts.get("val_loss")}


def list_checkpoints(output_dir: str | Path) -> list[dict[str, Any]]:
    """Complete checkpoints of a run: ``[{name, step, path, val_loss}]`` sorted by step (best/last included)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [s for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") if (s := _summary(p))]
    return sorted(found, key=lambda s: (s["step"], s["name"]))


def find_latest(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step (``last`` preferred on ties); recovers a ``last`` renamed away by a
    crash in the middle of a replace."""
    root = checkpoints_dir(output_dir)
    candidates = list_checkpoints(output_dir)
    if root.is_dir():
        for p in root.glob(f"{_OLD_PREFIX}*"):
            if (s := _summary(p)) is not None:
                candidates.append(s)
    if not candidates:
        return None
    rank = {"last": 2, "best": 0}
    best = max(candidates, key=lambda s: (s["step"], rank.get(s["name"], 1)))
    return Path(best["path"])


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``None`` → fresh; ``auto`` → latest in the run dir (None when there is none); else a checkpoint dir
    or a run dir (its latest checkpoint)."""
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(output_dir)
    p = Path(resume).expanduser()
    if (p / STATE_FILE).is_file():
        return p
    if checkpoints_dir(p).is_dir() and (latest := find_latest(p)) is not None:
        return latest
    raise CheckpointError(f"--resume: {resume} is neither a checkpoint directory nor a run with checkpoints")
