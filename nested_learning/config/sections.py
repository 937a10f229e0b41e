"""The sections of a run config (``model:``, ``speed:``, ``lora:``, ...): one pydantic model each, every field
documented, unknown fields refused; the checks they share on text and paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator


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
