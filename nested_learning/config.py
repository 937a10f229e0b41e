"""One schema for every way a run is described: YAML files, ``--set`` overrides and REST bodies.

``TrainConfig`` is the single source of truth. Each section is a small pydantic model whose fields carry
their own documentation (shown by ``nested-learning train --help-config`` and in the service's OpenAPI
schema). Unknown fields are rejected everywhere, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "format_validation_error",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field (and file) at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "embedded:tiny-llama",
        description="Hugging Face hub id or local directory of a causal LM. `embedded:tiny-llama` builds the "
        "small model the project ships (no download).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype: `auto` is bfloat16 on CUDA, float32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    sdpa_kernels: list[Literal["flash", "efficient", "cudnn", "math"]] | None = Field(
        None, min_length=1, description="With `attn_implementation: sdpa` on CUDA: the attention kernels torch may choose from "
        "(process-wide); null keeps torch's own set. E.g. `[flash, efficient, math]` leaves cuDNN's kernel out.",
    )
    skip_causal_mask: bool = Field(
        True, description="With `attn_implementation: sdpa`: batches whose rows each hold one sample from position 0 "
        "(padded rows, packed rows of one sample) run SDPA's causal kernel with no mask tensor. Under `torch.compile` "
        "transformers otherwise builds a (batch, 1, T, T) mask for them and attention computes the whole T x T square. "
        "Same attention for every token that carries loss (padding only follows real tokens). H200, Llama-1B 8x2048: "
        "attention kernels 61 -> 23 ms per step (docs/benchmarks.md).",
    )
    outer_rotary: bool = Field(
        True, description="Compute rotary cos/sin tables as an outer product laid out (batch, position, dim), the way "
        "newer transformers releases do; older ones (e.g. 5.17) take a transposed matrix product, and the compiled "
        "rotary kernels then read it along the transposed dimension (see `nested_learning/rotary.py`). Bit-identical "
        "tables, checked per module; dynamic rotary types keep their own.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository to run.")
    device: str = Field("auto", description="`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`.")
    compile: bool = Field(True, description="Compile the decoder with `torch.compile` on CUDA (about 2x tokens/s on an H200; "
                          "the first steps pay the compile time). Ignored on CPU.")
    activation_memory_budget: float = Field(
        0.8, gt=0.0, le=1.0, description="With `compile` on: the share of the activations the compiled graph may keep "
        "for backward (torch's partitioner recomputes the rest, cheapest first: norms and element-wise work). 1.0 is "
        "torch's default (keep what is fastest). On an H200, 0.8 took the peak from 10.7 to 7.3 GiB (Qwen-0.5B, "
        "8x1024) and from 25.0 to 17.0 GiB (Llama-1B, 8x2048) for +0.4% step time on Llama-1B (docs/benchmarks.md).",
    )
    cuda_graphs: bool = Field(
        True, description="With `compile` on CUDA and `data.packing`: replay the compiled decoder's forward and "
        "backward as CUDA graphs (torch.compile mode `reduce-overhead`), so the step no longer waits on the host "
        "launching ~2,000 kernels. Packed rows are then padded to `data.max_length`, so full micro-batches share "
        "one shape (a short last micro-batch, or one with and one without shared rows, records one more graph). "
        "Padded (unpacked) batches and `optim.grad_accum > 1` run compiled without graphs.",
    )
    fused_lora: bool = Field(
        False, description="Run LoRA projections that share an input (q/k/v, gate/up) as one frozen GEMM plus one "
        "low-rank pair (same math, fewer and larger kernels; see `nested_learning/fused_lora.py`). Applies when "
        "LoRA dropout is 0 and DoRA is off; otherwise PEFT's own per-projection path runs. Off by default: on an "
        "H200 it speeds the grouped projections up 1.2-1.4x alone but left the compiled Qwen-0.5B step unchanged "
        "(76.5 vs 76.6 ms, docs/benchmarks.md).",
    )
    lora_fold: bool = Field(
        True, description="Fold the low-rank product of LoRA projections that share an input (q/k/v, gate/up) into "
        "the frozen GEMM's reduction, `[x | xA] @ [W | sB]^T`, so no full-size low-rank output is written and read "
        "again (`nested_learning/folded_lora.py`). Same math, the low-rank term summed in the GEMM's float32 "
        "accumulator. Applies when LoRA dropout is 0, DoRA is off and `fused_lora` and `gradient_checkpointing` are "
        "off (checkpointed layers cannot trace it whole under torch.compile: Llama-8B 917.6 ms vs 666.6 ms); "
        "otherwise PEFT's own path runs. H200, Llama-1B 8x2048: 203.7 -> 186.5 ms per step (docs/benchmarks.md).",
    )
    loss_chunk_tokens: int = Field(
        2048, ge=0, description="Compute the head and cross-entropy over chunks of this many tokens, so the full "
        "(tokens x vocab) logits never exist (same loss; much less memory). 0: the model's own full-logits forward.",
    )
    loss_chunk_kernel: Literal["triton", "compile"] = Field(
        "triton", description="With `loss_chunk_tokens > 0` on CUDA: each chunk's softmax, loss and logits gradient as "
        "one Triton kernel reading the logits twice (`nested_learning/ce_kernel.py`), or `compile`: torch.compile's "
        "kernels, which read them three times. Falls back to `compile` where Triton cannot run; eager on CPU.",
    )


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r)).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or `all-linear` for every linear projection but the head."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    init_seed: int | None = Field(None, description="Seed for the adapter initialisation (defaults to run.seed).")


class DataConfig(_Section):
    dir: str | None = Field(None, description="Directory holding `train.jsonl` and optionally `valid.jsonl`.")
    train: str | None = Field(None, description="Explicit training JSONL path (overrides `dir`).")
    valid: str | None = Field(None, description="Explicit validation JSONL path (overrides `dir`).")
    valid_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of train records held out for validation when no valid file exists."
    )
    max_length: int = Field(1024, gt=1, description="Tokens per sample; longer samples are truncated (one warning).")
    mask_prompt: bool = Field(True, description="Only completion / assistant tokens carry loss.")
    chat_template: str | None = Field(
        None, description="Jinja chat template for `messages` data when the tokenizer has none."
    )
    packing: bool = Field(
        False, description="Pack samples into rows of `max_length`; samples never attend to each other."
    )
    group_by_length: bool = Field(True, description="Batch samples of similar length together to cut padding.")
    shuffle: bool = Field(True, description="Shuffle the training order each epoch (seeded).")


class TiersConfig(_Section):
    periods: list[int] = Field([1, 4, 16], min_length=1, description="Update period of each tier, fastest first.")
    lr_scales: list[float] | None = Field(None, description="Per-tier learning-rate multipliers (default all 1).")
    strategy: Literal["layer_depth", "rules", "manual", "gradient_norm"] = Field(
        "layer_depth", description="How parameters are mapped to tiers."
    )
    reverse: bool = Field(False, description="`layer_depth`: deep layers fast, shallow slow.")
    rules: list[tuple[str, int]] | None = Field(
        None, description="`rules`: ordered [glob, tier] pairs; first match wins."
    )
    manual: dict[str, int] | None = Field(None, description="`manual`: parameter name -> tier index.")
    probe_steps: int = Field(8, gt=0, description="`gradient_norm`: probe steps used to rank parameters.")
    accumulate: Literal["mean", "sum", "last"] = Field(
        "mean", description="What a slow tier applies when due: mean, sum or last of its chunk's gradients."
    )
    flush_on_end: bool = Field(True, description="Apply a slow tier's partial chunk at the end of training.")

    @field_validator("periods")
    @classmethod
    def _positive_periods(cls, v: list[int]) -> list[int]:
        if any(p < 1 for p in v):
            raise ValueError(f"every period must be an integer >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _lengths_match(self) -> "TiersConfig":
        n = len(self.periods)
        if self.lr_scales is not None:
            if len(self.lr_scales) != n:
                raise ValueError(f"lr_scales has {len(self.lr_scales)} entries but periods has {n} tiers")
            if any(s <= 0 for s in self.lr_scales):
                raise ValueError("every lr_scale must be > 0")
        for pattern, tier in self.rules or []:
            if not 0 <= tier < n:
                raise ValueError(f"rule {pattern!r} names tier {tier}, but there are {n} tiers (0..{n - 1})")
        for name, tier in (self.manual or {}).items():
            if not 0 <= tier < n:
                raise ValueError(f"manual entry {name!r} names tier {tier}, but there are {n} tiers (0..{n - 1})")
        if self.strategy == "rules" and not self.rules:
            raise ValueError("strategy `rules` needs `rules`")
        if self.strategy == "manual" and not self.manual:
            raise ValueError("strategy `manual` needs `manual`")
        return self


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    max_grad_norm: float = Field(1.0, ge=0, description="Global grad-norm clip per optimizer step; 0 disables.")
    batch_size: int = Field(4, gt=0, description="Samples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    flat_buffers: bool = Field(
        True, description="Keep each tier's parameters, gradients and Adam state in one contiguous buffer, so a "
        "tier's update is a few fused kernels instead of one per tensor (same numbers).",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {v}")
        return v


class ScheduleConfig(_Section):
    steps: int = Field(100, gt=0, description="Optimizer steps to run.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to `optim.lr`.")
    kind: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay as a fraction of the peak lr.")


class EvalConfig(_Section):
    every: int = Field(50, ge=0, description="Evaluate every N optimizer steps (0: only at the end).")
    max_batches: int | None = Field(None, gt=0, description="Cap on validation batches per evaluation.")
    batch_size: int | None = Field(None, gt=0, description="Validation batch size (default: optim.batch_size).")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N evals without improvement (0: off).")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest val-loss drop counted as improvement.")
    at_start: bool = Field(False, description="Also evaluate once before the first step (the baseline val loss).")


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="Save `step-N` every N optimizer steps (0: only best/last).")
    keep_last_n: int = Field(3, ge=1, description="How many `step-N` checkpoints to keep.")
    save_best: bool = Field(True, description="Keep the checkpoint with the lowest validation loss as `best`.")


class OutputConfig(_Section):
    dir: str = Field("runs/default", description="Run directory: checkpoints, metrics.jsonl, TensorBoard events.")
    log_every: int = Field(1, gt=0, description="Read the loss back from the device every N steps.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under `<dir>/tb`.")
    overwrite: bool = Field(False, description="Allow writing into a non-empty run directory without resuming.")


class TrainConfig(_Section):
    """A complete description of one fine-tuning run."""

    seed: int = Field(0, description="Seed for adapter init, data order, dropout.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tiers: TiersConfig = Field(default_factory=TiersConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        if self.schedule.warmup_steps > self.schedule.steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds schedule.steps ({self.schedule.steps})"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """One line per problem, each naming the dotted field: ``optim.lr: Input should be greater than 0``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    head = f"invalid config{f' in {source}' if source else ''}:"
    return "\n".join([head, *("  " + line for line in lines)])


def _parse_scalar(text: str) -> Any:
    """``--set`` values are YAML scalars/flow collections: ``3``, ``1e-4``, ``true``, ``[1,4,16]``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides onto a raw config dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (optional), apply overrides, validate. Errors name the file and the field."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
