"""Process-wide CUDA kernel choices: which scaled-dot-product-attention kernels torch may pick."""

from __future__ import annotations

import torch

__all__ = ["apply_kernel_choices", "set_sdpa_kernels"]


def apply_kernel_choices(kernels: list[str] | None, device: torch.device) -> None:
    """``speed.sdpa_kernels`` on CUDA (process-wide); nothing on the CPU. ``None`` restores torch's own set if an
    earlier run in this process changed it."""
    if device.type != "cuda":
        return
    if kernels is not None:
        set_sdpa_kernels(kernels)
    elif _sdpa_defaults is not None:
        set_sdpa_kernels([k for k, on in _sdpa_defaults.items() if on])


_SDPA_SWITCHES = {
    "flash": ("flash_sdp_enabled", "enable_flash_sdp"),
    "efficient": ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp"),
    "cudnn": ("cudnn_sdp_enabled", "enable_cudnn_sdp"),
    "math": ("math_sdp_enabled", "enable_math_sdp"),
}
_sdpa_defaults: dict[str, bool] | None = None  # torch's flags before this process first changed them


def set_sdpa_kernels(kernels: list[str]) -> None:
    """``speed.sdpa_kernels``: enable exactly these scaled-dot-product-attention kernels (process-wide)."""
    global _sdpa_defaults
    if not kernels:
        raise ValueError("speed.sdpa_kernels: name at least one kernel (flash, efficient, cudnn, math), or null")
    backends = torch.backends.cuda
    if _sdpa_defaults is None:
        _sdpa_defaults = {name: getattr(backends, query)() for name, (query, _) in _SDPA_SWITCHES.items()}
    for name, (_, enable) in _SDPA_SWITCHES.items():
        getattr(backends, enable)(name in kernels)
