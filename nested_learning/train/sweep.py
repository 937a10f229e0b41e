"""Sweeps: several runs of one config, each with other values for some fields, in turn in one process.

``nested-learning train base.yaml --sweep optim.lr=[1e-4,3e-4] --sweep tiers.periods=[[1],[1,4,16]]`` trains
every combination (here four), each in its own run directory under ``output.dir``. One process pays the start-up
once: Python, torch and transformers are imported by the first run, and the compile caches it fills on disk serve
the runs after it. Between runs the previous model is let go (compiled graphs included), so device memory holds
one run at a time.

A stop (Ctrl-C, SIGTERM) ends the current run as a stop always does (checkpoint, ``stopped``) and starts no
further run. ``--resume auto`` resumes each run from its own directory, so a sweep started again continues where
it stopped; a run that had completed finds its last checkpoint and trains no further.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nested_learning.config import ConfigError, TrainConfig, load_config, load_yaml
from nested_learning.train.state import Callback, TrainerState

__all__ = ["SweepRun", "expand_sweep", "run_sweep", "sweep_table", "write_summary"]


@dataclass
class SweepRun:
    """One combination: its name (its run directory under the base ``output.dir``), the ``--set`` items that make
    it, and, once run, what it reported."""

    name: str
    overrides: list[str]
    config: TrainConfig
    status: str = "pending"  # then the run's own status, or "failed" with ``error``
    error: str | None = None
    step: int = 0
    val_loss: float | None = None
    best_val_loss: float | None = None
    checkpoint: str | None = None
    to_first_step_s: float | None = None  # from the run's start (config built) to its first optimizer step
    seconds: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "overrides": self.overrides, "status": self.status, "step": self.step,
                "val_loss": self.val_loss, "best_val_loss": self.best_val_loss, "checkpoint": self.checkpoint,
                "to_first_step_s": self.to_first_step_s, "seconds": self.seconds, "error": self.error}


def _parse_axis(item: str) -> tuple[str, list[Any]]:
    """``KEY=[v1, v2, ...]`` (a YAML flow list of at least one value) -> (KEY, values)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--sweep {item!r}: expected KEY=[VALUE, ...], e.g. optim.lr=[1e-4,3e-4]")
    values = load_yaml(text, f"--sweep {key}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"--sweep {key}: expected a list of values in brackets, e.g. {key}=[1e-4,3e-4]; "
                          f"got {text.strip()!r}")
    return key, values


def _flow(value: Any) -> str:
    """``value`` as ``--set`` reads it back: a string as it is where YAML keeps it a string (``1e-4``,
    ``data/a``), else JSON (``"a: b"``, ``"true"``, numbers, lists: JSON is YAML)."""
    if isinstance(value, str):
        try:
            if load_yaml(value, "--sweep") == value:
                return value
        except ConfigError:
            pass
    return json.dumps(value)


def _slug(key: str, value: Any) -> str:
    """``optim.lr``, 0.0001 -> ``lr=0.0001``; ``tiers.periods``, [1, 4, 16] -> ``periods=1-4-16``."""
    if isinstance(value, list):
        text = "-".join(json.dumps(v, separators=(",", ":")) for v in value) or "none"
    else:
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return f"{key.rpartition('.')[2]}=" + (re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "_")


def expand_sweep(config: str | None, overrides: list[str], axes: list[str]) -> list[SweepRun]:
    """Every combination of the ``axes`` (``--sweep`` items, the first varying slowest) on top of ``config`` and
    ``overrides``; each validated now, so a bad value fails before any run starts (the error names the
    combination). Run directories: ``<output.dir>/<key=value_key=value>``."""
    if not axes:
        raise ConfigError("--sweep: no axes given")
    parsed = [_parse_axis(item) for item in axes]
    keys = [key for key, _ in parsed]
    repeated = {k for k in keys if keys.count(k) > 1}
    if repeated:
        raise ConfigError(f"--sweep: {', '.join(sorted(repeated))} given more than once")
    if "output.dir" in keys:
        raise ConfigError("--sweep output.dir: each run's directory is named after its values; sweep other fields")
    base = load_config(config, overrides)
    runs = []
    for combo in itertools.product(*(values for _, values in parsed)):
        items = [f"{key}={_flow(value)}" for key, value in zip(keys, combo)]
        name = "_".join(_slug(key, value) for key, value in zip(keys, combo))
        out = str(Path(base.output.dir) / name)
        try:
            cfg = load_config(config, [*overrides, *items, f"output.dir={out}"])
        except ConfigError as exc:
            raise ConfigError(f"--sweep combination {' '.join(items)}: {exc}") from None
        runs.append(SweepRun(name, items, cfg))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # values that differ only in characters a directory name cannot hold
        raise ConfigError("--sweep: two combinations would share a run directory: " +
                          ", ".join(sorted({n for n in names if names.count(n) > 1})))
    return runs


class _FirstStep(Callback):
    def __init__(self, started: float) -> None:
        self.started, self.seconds = started, None

    def on_step(self, state: TrainerState) -> None:
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.started


def _release_model() -> None:
    """Let the finished run's model go: compiled graphs hold its modules, and the allocator holds its blocks."""
    import gc
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        import torch._dynamo

        torch._dynamo.reset()  # the on-disk caches stay: the next run compiles warm
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(runs: list[SweepRun], callbacks=(), stop_event=None, resume: str | None = None, train=None,
              on_run_end=None) -> list[SweepRun]:
    """Train ``runs`` in turn (``train(config, callbacks, stop_event, resume)``, by default ``run_training``). A
    run that fails (diverged, out of memory) is recorded with its error and the sweep goes on; a stop ends the
    sweep after the current run. ``on_run_end(run)`` after each. Returns ``runs`` with their results filled in
    (runs never started stay ``pending``)."""
    if train is None:
        from nested_learning.train.loop import run_training as train
    for run in runs:
        if stop_event is not None and stop_event.is_set():
            break
        started = time.perf_counter()
        first = _FirstStep(started)
        state = None
        try:
            state = train(run.config, [*callbacks, first], stop_event, resume)
        except Exception as exc:  # noqa: BLE001 - one run's failure is that run's result, not the sweep's end
            run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            run.seconds = time.perf_counter() - started
            run.to_first_step_s = first.seconds
            _release_model()
        if state is not None:
            run.status, run.step, run.checkpoint = state.status, state.step, state.last_checkpoint
            run.val_loss, run.best_val_loss = state.val_loss, state.best_val_loss
        if on_run_end is not None:
            on_run_end(run)
        if run.status == "stopped" or (stop_event is not None and stop_event.is_set()):
            break
    return runs


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def sweep_table(runs: list[SweepRun]) -> str:
    """The sweep as a Markdown table, one row per run in the sweep's order."""
    head = ("| run | status | steps | val loss | best val loss | to first step s | seconds |\n"
            "|---|---|---:|---:|---:|---:|---:|")
    rows = [f"| {r.name} | {r.status} | {r.step} | {_cell(r.val_loss)} | {_cell(r.best_val_loss)} | "
            f"{'-' if r.to_first_step_s is None else f'{r.to_first_step_s:.2f}'} | "
            f"{'-' if r.seconds is None else f'{r.seconds:.1f}'} |" for r in runs]
    return "\n".join([head, *rows])


def write_summary(runs: list[SweepRun], path: str | Path) -> None:
    """``sweep.json``: every run's summary so far (written whole, then renamed: never half a file)."""
    from nested_learning.train.checkpoint import write_json

    write_json(path, {"runs": [r.summary() for r in runs]})
