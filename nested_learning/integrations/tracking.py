"""Run trackers for ``output.report_to``: MLflow and Weights & Biases, fed the rows of ``metrics.jsonl``.

``MetricsLog`` hands every row it writes to each tracker (``log_row``), so a tracker sees exactly the file's
records, train and eval, tier update counts included, keyed as TensorBoard keys them (``train/loss``,
``eval/val_loss``, ``tiers/updates_<k>``). Each tracker also records the flat config as parameters at the start
and the final adapter as an artifact when the run ends (``close``).

- ``mlflow``: a SQLite store under the run directory (``<dir>/mlflow.db``, artifacts in ``<dir>/mlartifacts``)
  unless ``output.mlflow_tracking_uri`` names another store or server. A resumed run continues its MLflow run.
- ``wandb``: offline by default (``<dir>/wandb``; ``wandb sync`` uploads it later).

Each backend is an optional extra (``pip install 'nested-learning[mlflow]'``); a missing one is a
``ConfigError`` naming the extra, raised before the first step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

from nested_learning.config import ConfigError, TrainConfig

__all__ = ["MlflowTracker", "WandbTracker", "flat_config", "metric_items", "open_trackers"]

log = logging.getLogger("nested_learning.train")

RUN_FILE = {"mlflow": "mlflow_run.json", "wandb": "wandb_run.json"}
_EXTRA_MODULE = {"mlflow": "mlflow", "wandb": "wandb"}
_PARAM_LIMIT = 6000  # MLflow's longest parameter value


def _require(tracker: str):
    import importlib

    try:
        return importlib.import_module(_EXTRA_MODULE[tracker])
    except ImportError:
        raise ConfigError(f"output.report_to: {tracker!r} needs the {_EXTRA_MODULE[tracker]} package; install it "
                          f"with: pip install 'nested-learning[{tracker}]'") from None


def flat_config(cfg: TrainConfig) -> dict[str, str]:
    """The config as ``section.field -> text`` (lists and maps as JSON), what trackers record as parameters."""
    out: dict[str, str] = {}
    for section, fields in json.loads(cfg.model_dump_json()).items():
        if not isinstance(fields, dict):  # top-level fields (seed, backend)
            fields, section = {section: fields}, ""
        for key, value in fields.items():
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{section}.{key}" if section else key] = text[:_PARAM_LIMIT]
    return out


def metric_items(record: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    """``(key, value)`` of a metrics row as trackers log it: finite numbers only, lists and maps spelled out."""
    for key, value in record.items():
        if key == "step":
            continue
        if key == "tier_updates" and isinstance(value, list):
            for k, n in enumerate(value):
                yield f"tiers/updates_{k}", float(n)
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    yield f"{prefix}/{key}/{sub}", float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}/{key}", float(value)


def _adapter_files(checkpoint: str | None) -> list[Path]:
    if not checkpoint or not Path(checkpoint).is_dir():
        return []
    # adapter_model.safetensors + adapter_config.json (PEFT); adapters.safetensors in MLX runs (mlx-lm's layout)
    return sorted(p for p in Path(checkpoint).iterdir() if p.is_file() and p.name.startswith("adapter"))


def _saved_run_id(path: Path, resumed: bool, where: str | None) -> str | None:
    """The tracker run a resumed training continues: the id saved in the run directory, if the store is the same."""
    if not resumed or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        log.warning("%s: not readable, starting a new tracker run", path)
        return None
    return saved.get("run_id") if saved.get("where") == where else None


class MlflowTracker:
    """One MLflow run per training run, through ``MlflowClient`` (no global active run, so jobs running in
    threads of one process never share a run)."""

    FLUSH_EVERY_S = 5.0  # metrics are sent in batches: one SQLite transaction per batch, not per row

    def __init__(self, cfg: TrainConfig, output_dir: Path, state, resumed: bool):
        _require("mlflow")
        from mlflow.tracking import MlflowClient

        self.state, self.output_dir = state, Path(output_dir)
        uri = cfg.output.mlflow_tracking_uri
        artifacts = None
        if uri is None:
            uri = f"sqlite:///{(self.output_dir / 'mlflow.db').resolve()}"
            artifacts = (self.output_dir / "mlartifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        run_file = self.output_dir / RUN_FILE["mlflow"]
        self.run_id = _saved_run_id(run_file, resumed, uri)
        params = flat_config(cfg)
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:  # MLflow parameters cannot change; the config saved with the run has the new values
                log.warning("mlflow: parameters changed since the run started, kept as first logged: %s",
                            ", ".join(changed))
            params = {k: v for k, v in params.items() if k not in logged}
        else:
            experiment = self.client.get_experiment_by_name(cfg.output.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment is not None else
                             self.client.create_experiment(cfg.output.mlflow_experiment, artifact_location=artifacts))
            run = self.client.create_run(experiment_id, run_name=self.output_dir.name,
                                         tags={"nested_learning.output_dir": str(self.output_dir.resolve())})
            self.run_id = run.info.run_id
            from nested_learning.train.checkpoint import write_json

            write_json(run_file, {"run_id": self.run_id, "where": uri})
        self._send(params=params)
        self._pending: list = []
        self._last_flush = time.monotonic()

    def _send(self, metrics=(), params: dict[str, str] | None = None) -> None:
        from mlflow.entities import Param

        params, metrics = [Param(k, v) for k, v in (params or {}).items()], list(metrics)
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_row(self, record: dict[str, Any], prefix: str) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        self._pending.extend(Metric(k, v, now, step) for k, v in metric_items(record, prefix))
        if time.monotonic() - self._last_flush >= self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        try:
            self._send(pending)
        except Exception as exc:  # a tracking server that went away must not end the training
            log.warning("mlflow: could not log %d metric values (%s); training goes on", len(pending), exc)

    def close(self) -> None:
        self.flush()
        status = getattr(self.state, "status", "completed")
        try:
            if status in ("completed", "stopped"):
                for f in _adapter_files(getattr(self.state, "last_checkpoint", None)):
                    self.client.log_artifact(self.run_id, str(f), artifact_path="adapter")
            self.client.set_terminated(self.run_id, status={"completed": "FINISHED", "stopped": "KILLED"}.get(
                status, "FAILED"))
        except Exception as exc:  # the run's own result (and any error of its own) matters more
            log.warning("mlflow: could not finish run %s (%s)", self.run_id, exc)


class WandbTracker:
    """One Weights & Biases run per training run, offline unless ``output.wandb_mode`` says ``online``."""

    def __init__(self, cfg: TrainConfig, output_dir: Path, state, resumed: bool):
        wandb = _require("wandb")
        self.wandb, self.state, self.output_dir = wandb, state, Path(output_dir)
        run_file = self.output_dir / RUN_FILE["wandb"]
        where = f"{cfg.output.wandb_mode}:{cfg.output.wandb_project}"
        run_id = _saved_run_id(run_file, resumed, where)
        self.run = wandb.init(project=cfg.output.wandb_project, dir=str(self.output_dir), mode=cfg.output.wandb_mode,
                              name=self.output_dir.name, config=flat_config(cfg), id=run_id, resume="allow",
                              reinit="create_new")
        from nested_learning.train.checkpoint import write_json

        write_json(run_file, {"run_id": self.run.id, "where": where})

    def log_row(self, record: dict[str, Any], prefix: str) -> None:
        values = dict(metric_items(record, prefix))
        if values:
            try:
                self.run.log(values, step=int(record.get("step", 0)))
            except Exception as exc:  # as for MLflow: tracking trouble must not end the training
                log.warning("wandb: could not log step %s (%s); training goes on", record.get("step"), exc)

    def close(self) -> None:
        status = getattr(self.state, "status", "completed")
        files = _adapter_files(getattr(self.state, "last_checkpoint", None)) if status in ("completed", "stopped") \
            else []
        try:
            if files:
                artifact = self.wandb.Artifact(f"adapter-{self.run.id}", type="model")
                for f in files:
                    artifact.add_file(str(f))
                self.run.log_artifact(artifact)
            self.run.finish(exit_code=0 if status in ("completed", "stopped") else 1)
        except Exception as exc:  # as for MLflow
            log.warning("wandb: could not finish run %s (%s)", self.run.id, exc)


_TRACKERS = {"mlflow": MlflowTracker, "wandb": WandbTracker}


def open_trackers(cfg: TrainConfig, output_dir: str | Path, state, resumed: bool) -> list:
    """The trackers ``output.report_to`` names, besides TensorBoard (which ``MetricsLog`` writes itself).

    ``state``: the run's live ``TrainerState``; at ``close`` its status and last checkpoint decide the run's
    final status and the adapter artifact. Every package is checked before any tracker starts."""
    names = [n for n in cfg.output.trackers if n in _TRACKERS]
    for name in names:
        _require(name)
    trackers = []
    try:
        for name in names:
            trackers.append(_TRACKERS[name](cfg, Path(output_dir), state, resumed))
    except BaseException:
        for t in trackers:
            t.close()
        raise
    return trackers
