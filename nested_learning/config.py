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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "load_yaml",
    "format_validation_error",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field (and file) at fault."""


class _Section(BaseModel):
    # Infinity and NaN are refused in every float field: JSON's `Infinity` and YAML's `.inf` would otherwise pass
    # `gt=0` checks and reach the optimizer (and serialise back as null).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid_unicode(self) -> "_Section":
        for name in type(self).model_fields:
            check_unicode(getattr(self, name), name)
        return self


def check_unicode(value: Any, name: str) -> None:
    """JSON's ``"\\ud800"`` escapes decode to lone surrogates, which cannot be written as UTF-8 (a job record,
    a YAML file, a tokenizer): refused up front, naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name}: the text holds a lone surrogate (U+{ord(value[exc.start]):04X}), "
                             "which is not valid Unicode") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_unicode(item, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, name)
            check_unicode(item, name)


PATH_MAX = 4096  # Linux PATH_MAX: longer paths can never be opened
NAME_MAX = 255  # Linux NAME_MAX: the longest single path component


def check_path_text(value: str | None) -> str | None:
    """A path field's text must be openable at all: no NUL byte, within the OS limits. Checked before any
    filesystem call so a bad path is a validation error naming the field, not an OS error later."""
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError("the path contains a NUL byte")
    if len(value) > PATH_MAX:
        raise ValueError(f"the path is {len(value)} characters long; the limit is {PATH_MAX}")
    longest = max((len(part) for part in value.replace("\\", "/").split("/")), default=0)
    if longest > NAME_MAX:
        raise ValueError(f"a path component is {longest} characters long; the limit is {NAME_MAX}")
    return value


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
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository to run.")
    device: str = Field("auto", description="`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`.")

    @field_validator("name_or_path")
    @classmethod
    def _path_text(cls, v: str | None) -> str | None:
        return check_path_text(v)


class SpeedConfig(_Section):
    """How fast: each lever keeps the math (a CPU test per lever against the reference path). The run prints
    which levers took effect and why the others did not (``nested_learning.speed.plan``); ``docs/speed.md``
    walks through them. A lever set explicitly together with one that rules it out is a config error."""

    fit_memory: bool = Field(
        True, description="On CUDA: estimate a micro-batch's peak memory before training and, when it would not fit "
        "the free device memory, turn on gradient checkpointing, then `offload_activations`, by itself (the plan "
        "prints the estimate). Off: the settings as given.",
    )
    compile: bool = Field(True, description="Compile the decoder with `torch.compile` on CUDA; the first steps pay "
                          "the compile time. Off: eager kernels. Ignored on CPU (eager and exact). `backend: mlx`: `mx.compile` of "
                          "each micro-batch's forward and backward, on any device.")
    compile_scope: Literal["model", "layers"] = Field(
        "model", description="With `compile`: `model` compiles the decoder as one graph; `layers` compiles one decoder "
        "layer and reuses its graph for every layer (regional compilation: shorter cold start, the code between "
        "layers runs eager). `layers` turns CUDA graphs off.",
    )
    cuda_graphs: bool = Field(
        True, description="With `compile` and `data.packing`: replay the compiled step as CUDA graphs (rows padded to "
        "`data.max_length`, one shape). Turn off if recording graphs costs more memory than you have.",
    )
    activation_memory_budget: float = Field(
        0.8, gt=0.0, le=1.0, description="With `compile`: the share of activations the compiled graph keeps for "
        "backward (the rest is recomputed, cheapest first). 1.0 keeps all: a little faster, more memory.",
    )
    offload_activations: bool = Field(
        False, description="With `model.gradient_checkpointing`: keep each checkpointed decoder layer's input in "
        "pinned host memory until backward instead of on the device (a copy each way per layer). Turns CUDA graphs "
        "off; with `compile`, each decoder layer is compiled instead of the whole decoder.",
    )
    recompute_tokens: int = Field(
        0, ge=0, description="With `offload_activations`: backward recomputes each decoder layer over groups of whole "
        "rows of at most this many tokens (one row at least), so one layer's recompute holds that share of the "
        "micro-batch's activations. 0: the whole micro-batch at once. Ignored with dropout in the model.",
    )
    lora_fold: bool = Field(
        True, description="Fold the LoRA product of projections sharing an input (q/k/v, gate/up) into the frozen "
        "GEMM, `[x | xA] @ [W | sB]^T`. Needs lora.dropout 0, no DoRA, no gradient checkpointing.",
    )
    loss_chunk_tokens: int = Field(
        2048, ge=0, description="Head + cross-entropy over chunks of this many tokens, so full logits never exist. "
        "0: the model's own full-logits forward (needed for soft-capped or scaled logits, chosen automatically).",
    )
    loss_chunk_kernel: Literal["triton", "compile"] = Field(
        "triton", description="With the chunked loss on CUDA: a Triton kernel per chunk (`triton`) or "
        "torch.compile's kernels (`compile`). Triton falls back to `compile` where it cannot run.",
    )
    skip_causal_mask: bool = Field(
        True, description="With SDPA attention: rows holding one sample from position 0 run the causal kernel with "
        "no mask tensor. Off: transformers' own masks.",
    )
    varlen_attention: bool = Field(
        True, description="With `skip_causal_mask`: rows packed with several samples run attention sample by sample "
        "(torch's flash varlen kernel on CUDA) instead of through a (B, 1, T, T) mask. On by itself on CUDA; `true` "
        "set explicitly also runs it on CPU (a loop over samples). Off: transformers' block-diagonal mask.",
    )
    outer_rotary: bool = Field(
        True, description="Rotary cos/sin tables as one outer product per forward (checked bit-identical per module). "
        "Off: the model's own rotary forward.",
    )
    sdpa_kernels: list[Literal["flash", "efficient", "cudnn", "math"]] | None = Field(
        None, min_length=1, description="CUDA SDPA kernels torch may choose from (process-wide); null keeps torch's "
        "own set. E.g. `[flash, efficient, math]` leaves cuDNN's kernel out.",
    )

    @model_serializer(mode="wrap")
    def _only_chosen(self, handler: Any) -> dict[str, Any]:
        # Saved configs (run directory, checkpoints, job records) keep only the levers the user chose: levers
        # never change the math, so a resume under newer defaults is still exact, and a saved config read back
        # never looks like it asked for two contradictory levers.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


# Levers that lived under ``model:`` before the ``speed:`` section.
MOVED_TO_SPEED = frozenset(SpeedConfig.model_fields)


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
    init_adapter: str | None = Field(
        None, description="Start from this adapter instead of a fresh one: a PEFT adapter directory or an old "
        "mlx-lm one (`adapters.safetensors`, converted on load). Its rank and scale must equal `r` and `alpha`. "
        "Ignored when resuming (the checkpoint's adapter wins).",
    )


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

    @field_validator("dir", "train", "valid")
    @classmethod
    def _path_text(cls, v: str | None) -> str | None:
        return check_path_text(v)


class ConsolidateConfig(_Section):
    every: int = Field(..., ge=1, description="Consolidate every this many optimizer steps.")
    alpha: float = Field(..., gt=0, le=1, description="Step of the slow copy toward the fast weights (1 = copy).")


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
    consolidate: ConsolidateConfig | None = Field(
        None, description="{every: k, alpha: a}: every k steps slow += a*(fast - slow), then fast <- slow (all tiers)."
    )
    ema: float | None = Field(
        None, gt=0, lt=1, description="EMA decay of the adapter weights; eval and saved adapters use the EMA."
    )

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
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A step whose loss or gradient norm is NaN or Inf is never applied; then `stop` the run "
        "with an error naming the step, or `skip` the step (weights and optimizer state unchanged) and go on.",
    )
    max_skipped_steps: int = Field(
        8, gt=0, description="`on_nonfinite: skip`: stop the run when more than this many consecutive steps are "
        "non-finite.",
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
    max_batches: int | None = Field(
        None, gt=0, description="Cap on validation batches per evaluation (of eval.batch_size; by default of the "
        "global micro-batch, optim.batch_size x ranks, so any number of ranks scores the same samples).",
    )
    batch_size: int | None = Field(None, gt=0, description="Validation batch size (default: optim.batch_size).")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N evals without improvement (0: off).")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest val-loss drop counted as improvement.")
    at_start: bool = Field(False, description="Also evaluate once before the first step (the baseline val loss).")
    retain: dict[str, str] = Field(
        default_factory=dict, description="Retain sets: JSONL files (any data format) evaluated at every eval "
        "point, to trace forgetting. A path, a list of paths (each named by its file stem) or a mapping "
        "name -> path. Written as `retain_loss` (mean over sets) and `retain_loss/<name>` per set.",
    )
    metric: Literal["loss", "exact_match"] = Field(
        "loss", description="`exact_match` also scores validation and retain sets by exact match of the greedy "
        "completion (tasks with one right answer): `val_exact_match`, `retain_exact_match`. Best checkpoint and "
        "early stopping still follow val_loss.",
    )

    @field_validator("retain", mode="before")
    @classmethod
    def _name_retain_sets(cls, v: Any) -> Any:
        # One path or a list of paths: each set is named by its file stem, which must then be unique.
        if v is None:
            return {}
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            named: dict[str, str] = {}
            for path in v:
                if not isinstance(path, str) or not path:
                    raise ValueError(f"expected JSONL paths, got {path!r}")
                name = Path(path).stem
                if name in named:
                    raise ValueError(f"two retain sets are named {name!r} ({named[name]}, {path}); "
                                     "give a mapping name -> path instead")
                named[name] = path
            return named
        return v

    @field_validator("retain")
    @classmethod
    def _retain_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not name or "/" in name or not path:
                raise ValueError(f"retain set {name!r}: names are non-empty without '/', paths non-empty")
        return v


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="Save `step-N` every N optimizer steps (0: only best/last).")
    keep_last_n: int = Field(3, ge=1, description="How many `step-N` checkpoints to keep.")
    save_best: bool = Field(True, description="Keep the checkpoint with the lowest validation loss as `best`.")
    mlx_copy: bool = Field(
        False, description="Also write each checkpoint's adapter in the old desktop app's mlx-lm layout "
        "(`adapters.safetensors`, mlx-lm's keys added to `adapter_config.json`), so its adapter list, evaluation "
        "and fusion read our runs.",
    )


class OutputConfig(_Section):
    dir: str = Field("runs/default", description="Run directory: checkpoints, metrics.jsonl, TensorBoard events.")
    log_every: int = Field(1, gt=0, description="Read the loss back from the device every N steps.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under `<dir>/tb` (when `report_to` "
                              "is not set; `report_to` decides otherwise).")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] | None = Field(
        None, description="Run trackers fed every `metrics.jsonl` row: `tensorboard`, `mlflow` (params: the flat "
        "config; artifacts: the final adapter), `wandb`. Unset: TensorBoard as `tensorboard` says.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: a file store under `<dir>/mlruns`.")
    mlflow_experiment: str = Field("nested-learning", min_length=1, description="MLflow experiment name.")
    wandb_project: str = Field("nested-learning", min_length=1, description="Weights & Biases project.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="Weights & Biases mode: `offline` writes under `<dir>/wandb` (sync it later).")
    overwrite: bool = Field(False, description="Allow writing into a non-empty run directory without resuming.")

    @field_validator("dir")
    @classmethod
    def _path_text(cls, v: str | None) -> str | None:
        return check_path_text(v)

    @field_validator("report_to")
    @classmethod
    def _no_repeats(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"each tracker may appear once, got {v}")
        return v

    @model_validator(mode="after")
    def _tensorboard_agrees(self) -> "OutputConfig":
        if self.report_to is not None and "tensorboard" in self.report_to and self.tensorboard is False:
            raise ValueError("output.tensorboard is false but output.report_to lists tensorboard; drop one of them")
        return self

    @property
    def trackers(self) -> list[str]:
        """The trackers this run reports to: ``report_to``, or TensorBoard when ``tensorboard`` (the older switch)."""
        if self.report_to is not None:
            return list(self.report_to)
        return ["tensorboard"] if self.tensorboard else []


class DistributedConfig(_Section):
    """Data-parallel training under ``torchrun`` (see docs/distributed.md); ignored by a single process."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="`ddp`: every rank holds the whole model and a share of each global batch; gradients "
        "are summed over ranks with explicit all-reduces (one per tier). `fsdp`: the same, but the frozen base is "
        "sharded over the ranks (FSDP2, per decoder layer; the output head stays whole), for a base that does not "
        "fit one GPU; the LoRA adapter stays replicated and is synced as under `ddp`. Turns speed.lora_fold off.",
    )
    tier_sync: Literal["deferred", "every_step"] = Field(
        "deferred", description="`deferred`: a tier of period p > 1 keeps its gradients on each rank and sums them "
        "over ranks only at its due steps (1/p of the communication); the clip norm covers what a step applies. "
        "`every_step`: every tier is summed every step and clipping is exactly that of one process.",
    )
    timeout_s: int = Field(
        600, gt=0, description="A collective that waits longer than this (a rank died or hangs) ends the job with "
        "an error on every rank.",
    )


class TrainConfig(_Section):
    """A complete description of one fine-tuning run."""

    seed: int = Field(0, description="Seed for adapter init, data order, dropout.")
    backend: Literal["torch", "mlx"] = Field(
        "torch", description="`torch` (PyTorch + PEFT) or `mlx` (mlx-lm models and adapters: Apple Silicon, or Linux "
        "CPU with `mlx[cpu]`; needs `pip install \"nested-learning[mlx]\"`). Fields that mean nothing on MLX are "
        "refused, naming the field.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tiers: TiersConfig = Field(default_factory=TiersConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved_levers(cls, data: Any) -> Any:
        """Configs written before the ``speed:`` section (saved runs, job records) keep loading: their
        ``model.<lever>`` keys move to ``speed.<lever>``; the retired ``model.fused_lora`` is dropped when off."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        model = dict(data["model"])
        moved = {k: model.pop(k) for k in list(model) if k in MOVED_TO_SPEED}
        if model.get("fused_lora") is False:
            model.pop("fused_lora")
        if not moved and model == data["model"]:
            return data
        speed = data.get("speed")
        speed = dict(speed) if isinstance(speed, dict) else {}
        for key, value in moved.items():
            speed.setdefault(key, value)
        return {**data, "model": model, "speed": speed}

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        if self.schedule.warmup_steps > self.schedule.steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds schedule.steps ({self.schedule.steps})"
            )
        for problem in self._contradictions():
            raise ValueError(problem)
        if self.backend == "mlx":  # pure Python: validating an MLX config never imports mlx
            from nested_learning.mlx.fields import mlx_problems

            for problem in mlx_problems(self):
                raise ValueError(problem)
        return self

    def _contradictions(self) -> list[str]:
        """Levers set explicitly (not left at their default) together with a setting that rules them out."""
        sp, asked = self.speed, self.speed.model_fields_set
        out = []
        if not sp.compile:
            out += [f"speed.{k} needs speed.compile" for k in ("cuda_graphs", "activation_memory_budget")
                    if k in asked and (k != "cuda_graphs" or sp.cuda_graphs)]
            if "compile_scope" in asked and sp.compile_scope == "layers":
                out.append("speed.compile_scope layers needs speed.compile")
        # Not conditioned on data.packing being set explicitly: a saved config (job record, run directory) sets
        # every data field, so the same config must pass or fail before and after a round trip.
        if "cuda_graphs" in asked and sp.cuda_graphs and not self.data.packing:
            out.append("speed.cuda_graphs needs data.packing (one batch shape to replay)")
        if "lora_fold" in asked and sp.lora_fold:
            blockers = [("lora.dropout > 0", self.lora.dropout > 0), ("lora.use_dora", self.lora.use_dora),
                        ("model.gradient_checkpointing", self.model.gradient_checkpointing)]
            blockers.append(("distributed.strategy fsdp (its [W | S] buffer holds whole frozen weights)",
                             self.distributed.strategy == "fsdp"))
            out += [f"speed.lora_fold cannot run with {why}" for why, hit in blockers if hit]
        if "offload_activations" in asked and sp.offload_activations:
            if not self.model.gradient_checkpointing:
                out.append("speed.offload_activations needs model.gradient_checkpointing (only checkpointed layer "
                           "inputs are offloaded)")
            if "cuda_graphs" in asked and sp.cuda_graphs:
                out.append("speed.cuda_graphs cannot run with speed.offload_activations (replayed graphs keep "
                           "their inputs on the device)")
            if self.distributed.strategy == "fsdp":
                out.append("speed.offload_activations cannot run with distributed.strategy fsdp")
        if "recompute_tokens" in asked and sp.recompute_tokens and not sp.offload_activations:
            out.append("speed.recompute_tokens needs speed.offload_activations (only offloaded layers recompute by "
                       "groups of rows)")
        if "compile_scope" in asked and sp.compile_scope == "layers" and "cuda_graphs" in asked and sp.cuda_graphs:
            out.append("speed.cuda_graphs cannot run with speed.compile_scope layers (the step is no longer one "
                       "compiled region)")
        if "compile_scope" in asked and sp.compile_scope == "model" and sp.offload_activations:
            out.append("speed.compile_scope model cannot run with speed.offload_activations (offloaded layers "
                       "compile one by one)")
        if "loss_chunk_kernel" in asked and sp.loss_chunk_tokens == 0:
            out.append("speed.loss_chunk_kernel needs speed.loss_chunk_tokens > 0")
        if "skip_causal_mask" in asked and sp.skip_causal_mask and self.model.attn_implementation != "sdpa":
            out.append(f"speed.skip_causal_mask needs model.attn_implementation sdpa, "
                       f"not {self.model.attn_implementation}")
        if "varlen_attention" in asked and sp.varlen_attention:
            if not sp.skip_causal_mask:
                out.append("speed.varlen_attention needs speed.skip_causal_mask")
            elif self.model.attn_implementation != "sdpa":
                out.append(f"speed.varlen_attention needs model.attn_implementation sdpa, "
                           f"not {self.model.attn_implementation}")
        return out

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
        return load_yaml(text, "--set")
    except ConfigError:
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


MAX_YAML_DEPTH = 64  # a config is 3 levels deep; PyYAML's composer recurses once per level


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    source = "<yaml>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # an unhashable key: construct_mapping below reports it
                    continue
                if first != line:
                    raise ConfigError(f"{self.source}:{line}: duplicate key {key!r} (first given at line {first})")
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """Parse YAML text safely: a syntax error, nesting deeper than ``MAX_YAML_DEPTH`` or a duplicate key is a
    ``ConfigError`` whose message starts with ``source:line:``.

    The depth is checked on PyYAML's event stream first (its parser is iterative), so a hostile 20,000-deep
    document is refused with its line instead of exhausting the recursion of the composer."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ConfigError(f"{source}:{event.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} "
                                      "levels deep; a config needs three")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        loader = _StrictLoader(text)
        loader.source = source
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:  # anchors and aliases can still nest deeply; never a traceback
        raise ConfigError(f"{source}: nested too deeply to read") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (optional), apply overrides, validate. Errors name the file and the field."""
    data: dict[str, Any] = {}
    source = text = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        loaded = load_yaml(text, str(p))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        if text is None:
            raise ConfigError(format_validation_error(err, source)) from None
        set_keys = {o.partition("=")[0].strip() for o in overrides or []}
        lines = [_located(e, text, source, set_keys) for e in err.errors()]
        head = [] if len(lines) == 1 else [f"invalid config in {source} ({len(lines)} problems):"]
        raise ConfigError("\n".join(head + lines)) from None


def _located(error: dict[str, Any], text: str, source: str, set_keys: set[str]) -> str:
    """``file:line: field: message`` for one validation error, the line found in the YAML node tree
    (``--set KEY`` instead of a line when an override gave the value)."""
    loc = [str(p) for p in error["loc"]]
    field = ".".join(loc) or "(root)"
    msg = error["msg"].removeprefix("Value error, ")
    if any(field == k or field.startswith(k + ".") for k in set_keys):
        return f"--set {field}: {msg}"
    node, line = yaml.compose(text, Loader=yaml.SafeLoader), None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if str(getattr(k, "value", "")) == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return f"{source}:{line}: {field}: {msg}" if line else f"{source}: {field}: {msg}"
