"""Which ``TrainConfig`` fields mean nothing on the MLX backend (pure Python: no mlx import).

A field is refused, by its dotted name, when it asks for something the MLX backend does not do:

- ``speed.*`` but ``compile``: torch levers (CUDA graphs, folded LoRA GEMMs, Triton kernels, SDPA masks). The
  section saves only the levers a user chose, so being set at all is the test;
- elsewhere, a value other than the default (saved configs and job records carry every field, defaults included,
  so a default value cannot tell "chosen" from "written back").
"""

from __future__ import annotations

from typing import Any

__all__ = ["MLX_DEVICES", "mlx_problems"]

MLX_DEVICES = ("auto", "cpu", "gpu")

# (section, field) -> why it means nothing on MLX; refused when it differs from its default.
_TORCH_ONLY = {
    ("model", "attn_implementation"): "mlx-lm models have one attention implementation",
    ("model", "gradient_checkpointing"): "not implemented on the mlx backend",
    ("optim", "flat_buffers"): "a torch optimizer layout",
    ("checkpoint", "mlx_copy"): "mlx checkpoints are already in mlx-lm's adapter format",
    ("lora", "init_adapter"): "not implemented on the mlx backend",
}


def mlx_problems(cfg: Any) -> list[str]:
    """One message per field of ``cfg`` (a ``TrainConfig`` with ``backend: mlx``) that the MLX backend refuses."""
    out = [f"speed.{name}: a torch speed lever; it means nothing on the mlx backend (only speed.compile applies)"
           for name in sorted(cfg.speed.model_fields_set) if name != "compile"]
    for (section, name), why in _TORCH_ONLY.items():
        sec = getattr(cfg, section)
        default = type(sec).model_fields[name].get_default(call_default_factory=True)
        if getattr(sec, name) != default:
            out.append(f"{section}.{name}: {why} (backend mlx); leave it at {default!r}")
    if cfg.model.device not in MLX_DEVICES:
        out.append(f"model.device: {cfg.model.device!r} is not a device of the mlx backend; use one of {', '.join(MLX_DEVICES)}")
    return out
