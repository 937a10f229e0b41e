"""The old app's page fills its model and adapter dropdowns from ``GET /models`` and ``GET /adapters``: what lies
under the data roots, in the old shapes (``nested-learning serve`` mounts these; the old ``main.py`` keeps its own)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter

from nested_learning.service.compat import AnswersItsErrors, service_provider
from nested_learning.service.jobs import JobService

__all__ = ["list_adapters", "list_models", "make_listing_router"]


def _dirs(root: Path, depth: int) -> list[Path]:
    """Directories under ``root`` down to ``depth`` levels, hidden ones and their insides skipped."""
    out, level = [], [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError:
                continue
            nxt += children
        out += nxt
        level = nxt
    return out


def list_models(roots: list[Path], depth: int = 3) -> list[dict[str, Any]]:
    """Model directories (a ``config.json`` with a ``model_type`` and weights beside it), in the old shape."""
    models = []
    for root in roots:
        for d in _dirs(root, depth):
            cfg = d / "config.json"
            if not cfg.is_file() or not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
                continue
            try:
                data = json.loads(cfg.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
            if not isinstance(data, dict) or "model_type" not in data:
                continue
            models.append({"name": d.name, "path": str(d), "model_type": data.get("model_type", "unknown"),
                           "vocab_size": data.get("vocab_size", 0)})
    return models


def list_adapters(roots: list[Path], depth: int = 5) -> list[dict[str, Any]]:
    """Adapter directories, ours (PEFT checkpoints) and old ones (mlx-lm ``adapters.safetensors``)."""
    adapters = []
    for root in roots:
        for d in _dirs(root, depth):
            cfg_file = d / "adapter_config.json"
            if not cfg_file.is_file():
                continue
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if (d / "adapter_model.safetensors").is_file():
                fmt, rank, alpha = "peft", cfg.get("r", "unknown"), cfg.get("lora_alpha", "unknown")
            elif (d / "adapters.safetensors").is_file():
                params = cfg.get("lora_parameters") or {}
                fmt = "mlx"
                rank = cfg.get("lora_rank", params.get("rank", "unknown"))
                alpha = cfg.get("lora_alpha", "unknown")
            else:
                continue
            # <run>/checkpoints/<name>: a nested-learning run's checkpoint, named after the run as the old list did
            nested = d.parent.name == "checkpoints"
            run = d.parent.parent.name if nested else d.name
            adapters.append({"name": f"{run} (nested)" if nested and d.name == "best" else
                             (f"{run}/{d.name} (nested)" if nested else d.name),
                             "path": str(d), "type": "nested_learning" if nested else "standard", "format": fmt,
                             "lora_rank": rank, "lora_alpha": alpha})
    return adapters


def make_listing_router(svc: JobService | Callable[[], JobService]) -> APIRouter:
    """``GET /models`` and ``GET /adapters`` in the old shapes, listing what lies under the data roots."""
    service = service_provider(svc)
    router = APIRouter(tags=["compat (old app)"], route_class=AnswersItsErrors)

    @router.get("/models")
    def models() -> dict[str, Any]:
        return {"models": list_models(service().policy.roots)}

    @router.get("/adapters")
    def adapters() -> dict[str, Any]:
        return {"adapters": list_adapters(service().policy.roots)}

    return router
