"""Adapter interpolation: scale a trained LoRA adapter's update by a factor, ``W + f * dW``.

``f = 0`` is the base model, ``f = 1`` the adapter unchanged, values between walk the straight line from one to the
other (the WiSE-FT idea applied to an adapter). A LoRA update is ``scale * B A``, linear in ``B``, so multiplying
every ``B`` by ``f`` is exact and needs no base model. On the forgetting benchmarks (docs/science.md) this cheap,
after-the-fact knob traced a learning-forgetting front at least as good as every tier schedule, so it is offered as
a command rather than left to editing ``lora_alpha`` by hand.

DoRA adapters are refused: their magnitude vector makes the update non-linear in ``B``.
"""

from __future__ import annotations

import glob
import json
import math
import shutil
import tempfile
from pathlib import Path

from nested_learning.inference.convert import (
    CONFIG, MLX_WEIGHTS, PEFT_WEIGHTS, AdapterError, adapter_format, read_json_object,
)

__all__ = ["scale_adapter"]

# What a checkpoint holds besides the adapter: optimizer state and the manifest no longer describe a scaled copy.
_LEFT_BEHIND = {"trainer_state.pt", "manifest.json"}
_B_SUFFIXES = (".lora_B.weight", ".lora_b")


def _check_linear(src: Path) -> None:
    cfg_path = src / CONFIG
    cfg = read_json_object(cfg_path, "the adapter's config", AdapterError) if cfg_path.is_file() else {}
    if cfg.get("use_dora") or str(cfg.get("fine_tune_type", "")).lower() == "dora":
        raise AdapterError(f"{cfg_path}: a DoRA adapter cannot be scaled linearly (its update is not linear in B)")


def _scale_weights(path: Path, factor: float) -> int:
    """Multiply every LoRA ``B`` tensor in the safetensors file ``path`` by ``factor``, in place; how many."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from None
    scaled = 0
    for key, t in tensors.items():
        if key.endswith(_B_SUFFIXES):
            tensors[key] = (t.float() * factor).to(t.dtype)
            scaled += 1
    if not scaled:
        raise AdapterError(f"{path}: no LoRA B tensors (keys ending in {' or '.join(_B_SUFFIXES)})")
    save_file(tensors, str(path))
    return scaled


def _recover(dst: Path) -> None:
    """Tidy what a killed earlier run left beside ``dst``: a half-built ``.tmp-<name>-*`` is removed; an old copy
    moved aside (``.old-<name>-*/<name>``) goes back into place when the kill came before the new copy's rename,
    and is removed otherwise."""
    for tmp in dst.parent.glob(f".tmp-{glob.escape(dst.name)}-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for holder in dst.parent.glob(f".old-{glob.escape(dst.name)}-*"):
        if (holder / dst.name).exists() and not dst.exists():
            (holder / dst.name).replace(dst)
        shutil.rmtree(holder, ignore_errors=True)


def scale_adapter(src: str | Path, dst: str | Path, factor: float, *, overwrite: bool = False) -> Path:
    """Write ``src``'s adapter scaled by ``factor`` into the new directory ``dst``, in the same format(s).

    The adapter config, the run's ``config.yaml`` (so ``eval`` / ``generate`` / ``merge`` still find the base) and
    any other small files are copied; optimizer state and the checkpoint manifest are not. ``dst`` appears complete
    or not at all (built in a temporary directory beside it, then renamed); with ``overwrite`` the old ``dst`` is
    moved aside whole and removed after the rename, so it is never seen half-deleted; what a killed run left
    beside ``dst`` is tidied first (``_recover``)."""
    if not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise AdapterError(f"--factor: expected a finite number, got {factor!r}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    adapter_format(src)  # a clear error for a directory with no adapter in it
    _check_linear(src)
    _recover(dst)  # before the checks: a kill between the two renames leaves the old copy to put back
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise AdapterError(f"{dst}: already exists and is not empty (pass --overwrite to replace it)")
    if dst.resolve() == src.resolve():
        raise AdapterError(f"{dst}: is the source adapter; write the scaled copy to a new directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        for item in src.iterdir():
            if item.is_file() and item.name not in _LEFT_BEHIND:
                shutil.copy2(item, tmp / item.name)
        for name in (PEFT_WEIGHTS, MLX_WEIGHTS):  # a checkpoint written with mlx_copy holds both layouts
            if (tmp / name).is_file():
                _scale_weights(tmp / name, float(factor))
        (tmp / "scaled.json").write_text(json.dumps({"source": str(src), "factor": float(factor)}, indent=2) + "\n")
        old = None
        if dst.exists():  # --overwrite: moved aside whole, removed only once the new copy is in place
            old = Path(tempfile.mkdtemp(prefix=f".old-{dst.name}-", dir=dst.parent)) / dst.name
            dst.replace(old)
        tmp.replace(dst)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
