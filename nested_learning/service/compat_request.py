"""The old app's start request (``POST /nested-learning/start``, the page's ``NestedLearningRequest``) and how it
becomes a ``TrainConfig``, field by field; every field whose meaning shifts is also named in the response's
``message``. Empty strings mean "not given".

===============================  ========================================================================
``base_model_path`` (or          ``model.name_or_path``: a local model directory (inside a data root), a hub
``model_path``, ``model_name``)  id or ``embedded:*``
``train_data_path``              ``data.train``
``val_data_path``                ``data.valid``; empty: ``data.valid_fraction`` (10 %) of the training data
                                 is held out, as the old trainer split off its last 10 %
``adapter_path``                 ``lora.init_adapter``: training continues that adapter (PEFT or the old
                                 mlx-lm format); its own rank and scale replace ``lora_rank``/``lora_alpha``
``num_tiers``,                   ``tiers.periods`` (the first ``num_tiers`` frequencies)
``tier_update_frequencies``
``tier_assignment_strategy``     ``layer_depth``; ``parameter_importance`` → ``gradient_norm``;
                                 ``manual`` → 422 (the old request had no parameter map)
``num_steps``                    micro-batches, as the old loop counted them: ``schedule.steps`` =
                                 ``num_steps // gradient_accumulation_steps`` optimizer steps
``gradient_accumulation_steps``  ``optim.grad_accum``
``warmup_steps``,                also micro-batches: divided by ``gradient_accumulation_steps`` (at least
``eval_every``,                  1 for the two intervals); the lr stays constant after warmup
``checkpoint_every``             (``schedule.kind: constant``), as before
``early_stop``, ``patience``,    ``eval.early_stopping_patience`` (0 when ``early_stop`` is false),
``min_delta``                    ``eval.early_stopping_min_delta``
``save_best_only``               ``checkpoint.every: 0`` (only ``best`` and ``last``)
(always)                         ``checkpoint.mlx_copy``: every checkpoint also holds the adapter in the old
                                 mlx-lm layout, which the old app's adapter list, evaluation and fusion read
``keep_last_n_checkpoints``      ``checkpoint.keep_last_n``
``seed``                         ``seed``
``learning_rate``,               ``optim.lr``, ``optim.batch_size``, ``optim.max_grad_norm``,
``batch_size``,                  ``data.max_length``, ``lora.r``, ``lora.alpha``, ``lora.dropout``
``max_grad_norm``,
``max_seq_length``,
``lora_rank``, ``lora_alpha``,
``lora_dropout``
``output_path`` +                the run directory ``output_path/experiment_name`` (inside a data root);
``experiment_name``              when that exists already the run goes to ``experiment_name-2``, ``-3``, ...
                                 (said in ``message``); the job is named after the directory
``mixed_precision``              not used: bfloat16 on CUDA, float32 on CPU (``model.dtype: auto``)
===============================  ========================================================================
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from nested_learning.config import TrainConfig
from nested_learning.service.jobs import JobError

__all__ = ["OLD_OUTPUT_PATH", "OldStartRequest", "to_train_config"]

OLD_OUTPUT_PATH = "./nested_learning/checkpoints"


class OldStartRequest(BaseModel):
    """The old ``NestedLearningRequest`` with its defaults; unknown fields are ignored as the old app did."""

    model_config = ConfigDict(extra="ignore")
    base_model_path: str | None = None
    model_path: str | None = None
    model_name: str | None = None
    adapter_path: str | None = None
    train_data_path: str | None = None
    data_path: str | None = None
    val_data_path: str | None = None
    num_tiers: int = 3
    tier_update_frequencies: list[int] = [1, 2, 4]
    tier_assignment_strategy: Literal["layer_depth", "parameter_importance", "manual"] = "layer_depth"
    learning_rate: float = 1e-5
    batch_size: int = 1
    num_steps: int = 1000
    max_seq_length: int = 128
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    warmup_steps: int = 100
    gradient_accumulation_steps: int = 2
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 100
    early_stop: bool = True
    patience: int = 5
    min_delta: float = 0.0001
    output_path: str | None = OLD_OUTPUT_PATH
    experiment_name: str = "nested_learning_experiment"
    save_best_only: bool = False
    keep_last_n_checkpoints: int = 5
    seed: int = 42
    mixed_precision: bool = True

    @model_validator(mode="before")
    @classmethod
    def _empty_is_absent(cls, data: Any) -> Any:
        # The page sends "" for every path it has no value for; the old app read "" as "not given".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and not v.strip())}
        return data


def _invalid(exc: ValidationError) -> JobError:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JobError(422, f"invalid request: {problems}")


def to_train_config(req: OldStartRequest, adapter=None) -> tuple[dict[str, Any], list[str]]:
    """(TrainConfig data without ``output``, notes on what the old fields became). ``adapter`` is the
    ``Adapter`` read from ``adapter_path`` (its path already confined), or None."""
    model = req.base_model_path or req.model_path or req.model_name
    train = req.train_data_path or req.data_path
    missing = [n for n, v in (("base_model_path", model), ("train_data_path", train)) if not v]
    if missing:
        raise JobError(422, f"missing required field(s): {', '.join(missing)}", missing[0])
    if req.num_tiers < 1 or req.num_tiers > len(req.tier_update_frequencies):
        raise JobError(422, f"num_tiers ({req.num_tiers}) must be between 1 and the number of "
                            f"tier_update_frequencies ({len(req.tier_update_frequencies)})", "num_tiers")
    if req.tier_assignment_strategy == "manual":
        raise JobError(422, "tier_assignment_strategy 'manual' needs a parameter map; use POST /v1/jobs with "
                            "tiers.manual", "tier_assignment_strategy")
    accum = req.gradient_accumulation_steps
    if accum < 1:
        raise JobError(422, "gradient_accumulation_steps must be >= 1", "gradient_accumulation_steps")
    steps = req.num_steps // accum
    if steps < 1:
        raise JobError(422, f"num_steps ({req.num_steps}) is fewer than one optimizer step of "
                            f"{accum} micro-batches", "num_steps")
    notes = []
    if accum > 1:
        notes.append(f"num_steps {req.num_steps} counts micro-batches as before: {steps} optimizer steps of "
                     f"{accum} micro-batches (warmup_steps, eval_every and checkpoint_every divided by {accum} too)")
    if req.val_data_path is None:
        notes.append("no val_data_path: 10% of the training data is held out for validation")
    lora: dict[str, Any] = {"r": req.lora_rank, "alpha": req.lora_alpha, "dropout": req.lora_dropout}
    if adapter is not None:
        lora.update(r=adapter.r, alpha=adapter.alpha, use_rslora=adapter.use_rslora,
                    target_modules=adapter.leaf_names(), init_adapter=req.adapter_path)
        note = f"continuing the adapter in {req.adapter_path}"
        if (adapter.r, adapter.alpha) != (req.lora_rank, req.lora_alpha):
            note += (f" with its own rank {adapter.r} and scale {adapter.scale:g} (alpha {adapter.alpha:g}); "
                     f"lora_rank {req.lora_rank} / lora_alpha {req.lora_alpha:g} not used")
        notes.append(note)
    data: dict[str, Any] = {
        "seed": req.seed,
        "model": {"name_or_path": model},
        "lora": lora,
        "data": {"train": train, "valid": req.val_data_path, "max_length": req.max_seq_length},
        "tiers": {"periods": req.tier_update_frequencies[: req.num_tiers],
                  "strategy": "gradient_norm" if req.tier_assignment_strategy == "parameter_importance"
                  else "layer_depth"},
        "optim": {"lr": req.learning_rate, "batch_size": req.batch_size, "grad_accum": accum,
                  "max_grad_norm": req.max_grad_norm},
        "schedule": {"steps": steps, "warmup_steps": min(max(req.warmup_steps, 0) // accum, steps),
                     "kind": "constant"},
        "eval": {"every": max(1, req.eval_every // accum) if req.eval_every > 0 else 0,
                 "early_stopping_patience": max(req.patience, 0) if req.early_stop else 0,
                 "early_stopping_min_delta": max(req.min_delta, 0.0)},
        "checkpoint": {"every": 0 if req.save_best_only or req.checkpoint_every <= 0
                       else max(1, req.checkpoint_every // accum),
                       "keep_last_n": max(req.keep_last_n_checkpoints, 1),
                       "mlx_copy": True},  # the old app's adapter list, evaluation and fusion read these
    }
    try:
        TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    return data, notes
