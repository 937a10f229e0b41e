"""``TrainConfig``: a whole run, its sections together, and the checks that need more than one section."""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from nested_learning.config.sections import (
    _Section,
    ModelConfig,
    SpeedConfig,
    MOVED_TO_SPEED,
    LoraConfig,
    DataConfig,
    TiersConfig,
    OptimConfig,
    ScheduleConfig,
    EvalConfig,
    CheckpointConfig,
    OutputConfig,
    DistributedConfig,
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
