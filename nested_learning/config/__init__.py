"""One schema for every way a run is described: YAML files, ``--set`` overrides and REST bodies.

``TrainConfig`` is the single source of truth. Each section is a small pydantic model whose fields carry
their own documentation (shown by ``nested-learning train --help-config`` and in the service's OpenAPI
schema). Unknown fields are rejected everywhere, so a typo never silently falls back to a default.

The package: ``sections`` (one model per section), ``train`` (``TrainConfig``, the whole run), ``reading`` (YAML,
overrides and located errors). Import from here.
"""

from nested_learning.config.reading import apply_overrides, format_validation_error, load_config, load_yaml
from nested_learning.config.sections import (
    MOVED_TO_SPEED,
    CheckpointConfig,
    ConfigError,
    ConsolidateConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ScheduleConfig,
    SpeedConfig,
    TiersConfig,
    check_path_text,
    check_unicode,
)
from nested_learning.config.train import TrainConfig

__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "load_yaml",
    "format_validation_error",
    "ModelConfig",
    "SpeedConfig",
    "LoraConfig",
    "DataConfig",
    "ConsolidateConfig",
    "TiersConfig",
    "OptimConfig",
    "ScheduleConfig",
    "EvalConfig",
    "CheckpointConfig",
    "OutputConfig",
    "DistributedConfig",
    "MOVED_TO_SPEED",
    "check_path_text",
    "check_unicode",
]
