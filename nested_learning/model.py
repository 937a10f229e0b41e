"""Load a causal LM and its tokenizer (hub id, local directory or ``embedded:<name>``) and wrap it with LoRA.

Everything device- and dtype-related is decided here, so the trainer only sees a model on a device and an
``autocast`` context to run its forward passes in.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from nested_learning.config import LoraConfig, ModelConfig
from nested_learning.embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX, build_embedded, byte_tokenizer, is_embedded

__all__ = [
    "ModelError",
    "apply_kernel_choices",
    "autocast_context",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "prepare_base",
    "resolve_device",
    "resolve_dtype",
    "uses_cuda_graphs",
    "wrap_lora",
]


class ModelError(ValueError):
    """The model or tokenizer named in the config cannot be loaded; the message names the field."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device: {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA (LoRA weights stay float32); nothing on CPU, so CPU runs are exact float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_source(name: str) -> None:
    """A name that looks like a filesystem path must exist: fail here, not deep inside the hub client."""
    looks_local = name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name or name.endswith(os.sep)
    if looks_local and not Path(name).expanduser().exists():
        raise ModelError(f"model.name_or_path: local model directory not found: {name}")


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer alone (cheap): the trainer loads data with it before it loads the model."""
    if is_embedded(cfg.name_or_path):
        key = cfg.name_or_path.removeprefix(EMBEDDED_PREFIX)
        if key not in EMBEDDED_MODELS:
            known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
            raise ModelError(f"model.name_or_path: unknown embedded model {cfg.name_or_path!r} (known: {known})")
        return byte_tokenizer()
    _check_source(cfg.name_or_path)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            str(Path(cfg.name_or_path).expanduser()) if Path(cfg.name_or_path).expanduser().exists() else cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path: cannot load a tokenizer from {cfg.name_or_path!r}: {exc}") from None
    if tok.pad_token_id is None:
        # Causal LMs often ship without a pad token; padded positions never carry loss, so eos serves.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, seed: int = 0):
    """The base model on its device, frozen, in the configured dtype. ``seed`` only affects embedded weights."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if is_embedded(cfg.name_or_path):
        model, _ = build_embedded(cfg.name_or_path, seed=seed, attn_implementation=cfg.attn_implementation)
        model = model.to(dtype)
        model.name_or_path = cfg.name_or_path  # recorded by PEFT as base_model_name_or_path
    else:
        _check_source(cfg.name_or_path)
        from transformers import AutoModelForCausalLM

        source = cfg.name_or_path
        if Path(source).expanduser().exists():
            source = str(Path(source).expanduser())
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                revision=cfg.revision,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ModelError(f"model.name_or_path: cannot load a causal LM from {cfg.name_or_path!r}: {exc}") from None
    return prepare_base(model, cfg).to(device)


def prepare_base(model, cfg: ModelConfig):
    """What every loaded base model gets: the kernel choices, frozen weights, no KV cache, and
    ``model.gradient_checkpointing``. ``load_model`` calls it; so does anything that builds the base itself
    (``bench/peers.py``)."""
    apply_kernel_choices(cfg, resolve_device(cfg.device))
    model.requires_grad_(False)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs, so no input-grad hook is needed.
        with warnings.catch_warnings():  # renamed in newer transformers; the old name works on all we support
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def wrap_lora(model, cfg: LoraConfig, seed: int):
    """Add LoRA adapters (PEFT). The adapter init is seeded here so it does not depend on what ran before."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.init_seed if cfg.init_seed is not None else seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            peft_model = get_peft_model(model, peft_cfg)
        except ValueError as exc:
            raise ModelError(f"lora.target_modules: {exc}") from None
    return peft_model


def load_model_and_tokenizer(model_cfg: ModelConfig, seed: int = 0):
    """(base model, tokenizer), without LoRA. ``embedded:<name>`` builds from ``nested_learning.embedded``."""
    tokenizer = load_tokenizer(model_cfg)
    return load_model(model_cfg, seed=seed), tokenizer


def uses_cuda_graphs(cfg: ModelConfig, device: torch.device, packing: bool, grad_accum: int = 1) -> bool:
    """``model.cuda_graphs`` takes effect with ``compile`` on CUDA, packed batches (their rows are then padded to
    ``data.max_length``, one shape) and one micro-batch per step. Padded batches vary in shape and run compiled
    without graphs. With gradient accumulation the replayed backward can hand autograd a gradient buffer that
    the next micro-batch's replay overwrites (torch keeps it as ``.grad``), so accumulation runs without graphs."""
    return cfg.cuda_graphs and cfg.compile and device.type == "cuda" and packing and grad_accum == 1


def maybe_compile(model, cfg: ModelConfig, device: torch.device, *, cuda_graphs: bool = False):
    """``torch.compile`` on CUDA when asked; CPU runs stay eager (and exact).

    Under the chunked loss (``loss_chunk_tokens > 0``) the trainer calls the decoder directly, so the decoder
    is compiled in place (the head and cross-entropy run chunk by chunk outside the graph, see ``loss.py``).
    """
    if cfg.compile and device.type == "cuda":
        from nested_learning.compile_cache import tag_compile_caches
        from nested_learning.loss import decoder_and_head

        tag_compile_caches()
        set_activation_memory_budget(cfg.activation_memory_budget)
        # CUDA graphs (mode reduce-overhead) record one graph per batch shape: callers ask for them only when
        # the shape is fixed (see uses_cuda_graphs).
        options = {"mode": "reduce-overhead"} if cuda_graphs else {}
        parts = decoder_and_head(model) if cfg.loss_chunk_tokens > 0 else None
        if parts is not None:
            parts[0].compile(**options)
            return model
        return torch.compile(model, **options)
    return model


def set_activation_memory_budget(budget: float) -> None:
    """``model.activation_memory_budget``: torch's partitioner keeps at most this share of the activations it
    would keep for speed and recomputes the rest in backward. Process-wide; read when a graph is compiled."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "activation_memory_budget"):  # pragma: no cover - torch < 2.4
        if budget < 1.0:
            raise ModelError("model.activation_memory_budget: needs torch >= 2.4")
        return
    functorch_config.activation_memory_budget = float(budget)


def apply_kernel_choices(cfg: ModelConfig, device: torch.device) -> None:
    """Process-wide kernel settings of ``cfg`` (``model.sdpa_kernels``) on CUDA; nothing on the CPU.
    ``None`` restores torch's own set if an earlier run in this process changed it."""
    if device.type != "cuda":
        return
    if cfg.sdpa_kernels is not None:
        set_sdpa_kernels(cfg.sdpa_kernels)
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
    """``model.sdpa_kernels``: enable exactly these scaled-dot-product-attention kernels (process-wide)."""
    global _sdpa_defaults
    if not kernels:
        raise ModelError("model.sdpa_kernels: name at least one kernel (flash, efficient, cudnn, math), or null")
    backends = torch.backends.cuda
    if _sdpa_defaults is None:
        _sdpa_defaults = {name: getattr(backends, query)() for name, (query, _) in _SDPA_SWITCHES.items()}
    for name, (_, enable) in _SDPA_SWITCHES.items():
        getattr(backends, enable)(name in kernels)
