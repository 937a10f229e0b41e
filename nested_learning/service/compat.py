"""The old desktop app's ``/nested-learning/*`` routes (and its ``/models``, ``/adapters`` lists) on our jobs.

Drop-in for the old back end: in its ``main.py`` the line ``from nested_learning_api import router as
nested_learning_router`` becomes ``from nested_learning.service.compat import router as nested_learning_router``;
``app.include_router(nested_learning_router)`` stays. That module-level ``router`` creates its job service on
first use from the environment (``NL_SERVICE_WORKDIR``, ``NL_DATA_ROOTS``; see ``settings_from_env``) or from
``configure(settings)`` called before; its errors are answered by the router itself (``{"detail": ...}`` with a
4xx), so the host app needs no exception handlers. ``nested-learning serve`` mounts the same routes through
``make_router(svc)``.

Each ``start`` queues a job like ``POST /v1/jobs``; ``status``, ``stop`` and ``metrics`` refer to the *current*
job: the running one if any, else the most recently created one (``?job_id=`` picks another).

The start request (the page's ``NestedLearningRequest``) maps onto ``TrainConfig`` like this; every field whose
meaning shifts is also named in the response's ``message``. Empty strings mean "not given".

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

Progress is counted in the request's unit, micro-batches: ``current_step`` = optimizer steps × accumulation,
``total_steps`` = ``num_steps`` (rounded down to whole optimizer steps). ``metrics_history`` rows carry the same
``step`` plus ``optimizer_step``. Old statuses: ``queued``/``running`` → ``running``; ``completed`` →
``completed``; ``failed`` → ``error``; ``stopped``/``interrupted`` → ``idle`` (what the old stop left behind);
no job at all → ``idle``.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from nested_learning.config import TrainConfig
from nested_learning.service.jobs import JobError, JobService, Settings, job_view
from nested_learning.service.openapi import errors

__all__ = ["OldStartRequest", "configure", "make_listing_router", "make_router", "router", "settings_from_env",
           "to_train_config"]

OLD_STATUS = {"queued": "running", "running": "running", "completed": "completed", "failed": "error",
              "stopped": "idle", "interrupted": "idle"}
HISTORY_ROWS = 100  # /status carries the last 100 rows, as the old manager did
OLD_OUTPUT_PATH = "./nested_learning/checkpoints"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,120}$")


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


# ---- the old response shapes ------------------------------------------------------------------------------
def _periods(view: dict[str, Any]) -> list[int]:
    return list(view.get("config", {}).get("tiers", {}).get("periods", []))


def _accum(view: dict[str, Any]) -> int:
    return int(view.get("config", {}).get("optim", {}).get("grad_accum", 1) or 1)


def _old_tiers(periods: list[int], counts: list[int], params: list[int | None], step: int) -> dict[str, Any]:
    """The old optimizer's ``get_tier_stats()`` shape."""
    return {
        "global_step": step,
        "tier_update_counts": counts,
        "tier_update_frequencies": periods,
        "tier_parameters": {f"tier_{i}": {"frequency": p, "update_count": counts[i], "parameter_count": params[i]}
                            for i, p in enumerate(periods)},
    }


def _tier_stats(view: dict[str, Any]) -> dict[str, Any] | None:
    stats = view.get("tier_stats") or []
    periods = _periods(view) or [s.get("period") for s in stats]
    if not periods:
        return None
    counts = [int((stats[i] if i < len(stats) else {}).get("updates", 0) or 0) for i in range(len(periods))]
    params = [(stats[i] if i < len(stats) else {}).get("num_params") for i in range(len(periods))]
    out = _old_tiers(periods, counts, params, view["step"])
    out["num_tiers"] = len(periods)
    return out


def _history(svc: JobService, view: dict[str, Any], last: int | None) -> list[dict[str, Any]]:
    """Rows as the old trainer wrote them: step, loss, step_time, learning_rate, tier_stats (+ val_loss where
    evaluated). ``last``: only the newest rows."""
    accum, periods = _accum(view), _periods(view)
    params = [s.get("num_params") for s in view.get("tier_stats") or []]
    params += [None] * (len(periods) - len(params))
    since = max(view["step"] - last - 1, 0) if last else None  # one row more: the first step_time needs it
    rows: dict[int, dict[str, Any]] = {}
    prev_time = None
    for row in svc.store.metrics(view["id"], since_step=since):
        step = row["step"]
        if row["kind"] == "train":
            counts = [int(c or 0) for c in (row.get("tier_updates") or [])] or [0] * len(periods)
            before = prev_time  # the first row's time since start would include loading the model
            rows[step] = {**rows.get(step, {}), "step": step * accum, "optimizer_step": step,
                          "loss": row.get("train_loss"),
                          "step_time": None if before is None else max(row["time"] - before, 0.0),
                          "learning_rate": row.get("lr"),
                          "tier_stats": _old_tiers(periods, counts, params, step)}
            prev_time = row["time"]
        elif row["kind"] == "eval" and row.get("val_loss") is not None:
            rows.setdefault(step, {"step": step * accum, "optimizer_step": step})["val_loss"] = row["val_loss"]
    out = [rows[s] for s in sorted(rows)]
    return out[-last:] if last else out


def _view(job: dict[str, Any]) -> dict[str, Any]:
    return job_view(job, full=True)


def _old_status(svc: JobService, view: dict[str, Any] | None) -> dict[str, Any]:
    if view is None:
        return {"status": "idle", "current_step": 0, "total_steps": 0, "experiment_name": None,
                "tier_stats": None, "message": None, "metrics_history": None, "recent_logs": None,
                "current_train_loss": None, "current_val_loss": None, "job_id": None, "job_status": None}
    message = view["error"]
    if view["status"] in ("stopped", "interrupted"):
        message = message or f"training {view['status']} at step {view['step'] * _accum(view)}"
    if view.get("early_stopped") and view["status"] == "completed":
        message = f"early stopping at step {view['step'] * _accum(view)}: no better validation loss in " \
                  f"{view['config']['eval']['early_stopping_patience']} evaluations"
    accum = _accum(view)
    return {"status": OLD_STATUS[view["status"]], "current_step": view["step"] * accum,
            "total_steps": view["total_steps"] * accum, "experiment_name": view["name"],
            "tier_stats": _tier_stats(view), "message": message,
            "metrics_history": _history(svc, view, HISTORY_ROWS) or None, "recent_logs": None,
            "optimizer_step": view["step"], "total_optimizer_steps": view["total_steps"],
            "current_train_loss": view["train_loss"], "current_val_loss": view["val_loss"],
            "best_val_loss": view["best_val_loss"], "learning_rate": view["lr"], "job_id": view["id"],
            "job_status": view["status"], "output_path": view["output_dir"]}


TIER_TEXT = [
    ("Fast tier", "updated on every optimizer step: follows the task most closely"),
    ("Medium tier", "updated every few steps with the mean of the gradients it collected in between"),
    ("Slow tier", "updated least often: changes slowly and keeps what the model already does"),
]


def _tier_info(view: dict[str, Any] | None) -> dict[str, Any]:
    periods = _periods(view) if view else [1, 2, 4]
    stats = _tier_stats(view) if view else None
    tiers = {}
    for i, period in enumerate(periods):
        name, text = TIER_TEXT[min(i, len(TIER_TEXT) - 1)] if len(periods) > 1 else TIER_TEXT[0]
        entry = {"name": name, "description": text, "typical_frequency": period, "frequency": period}
        if stats:
            entry.update({k: v for k, v in stats["tier_parameters"][f"tier_{i}"].items() if k != "frequency"})
        tiers[f"tier_{i}"] = entry
    info = {
        "description": "The adapter's parameters are split into tiers; tier k is updated every period_k "
                       "optimizer steps with the mean of the gradients it accumulated since its last update.",
        "tiers": tiers,
        "benefits": ["slow tiers change less per step, which limits forgetting of what the base model knew",
                     "fast tiers still adapt to the task at every step",
                     "slow tiers skip optimizer work on the steps they wait"],
        "strategies": {"layer_depth": "contiguous groups of transformer blocks, shallow blocks fastest",
                       "parameter_importance": "a short probe ranks parameters by gradient size; larger is "
                                               "faster (gradient_norm)",
                       "manual": "an explicit parameter-name to tier map (POST /v1/jobs with tiers.manual)",
                       "rules": "ordered glob patterns mapping parameter names to tiers (POST /v1/jobs)"},
    }
    if view is not None:
        info["job_id"] = view["id"]
    return info


# ---- routing --------------------------------------------------------------------------------------------------
class _AnswersItsErrors(APIRoute):
    """Bad requests become 4xx answers inside the route, so a host app without our exception handlers (the old
    app's main.py) still answers ``{"detail": ...}`` rather than a 500."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def answer(request: Request):
            from nested_learning.config import ConfigError
            from nested_learning.inference.convert import AdapterError
            from nested_learning.service.security import BadPath, PathNotAllowed

            try:
                return await handler(request)
            except JobError as exc:
                body = {"detail": str(exc)}
                if getattr(exc, "field", None):
                    body["field"] = exc.field
                return JSONResponse(body, status_code=exc.status)
            except PathNotAllowed as exc:
                return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=403)
            except BadPath as exc:  # a path that cannot be resolved at all (NUL byte, too long)
                return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)
            except (AdapterError, ConfigError) as exc:
                return JSONResponse({"detail": str(exc)}, status_code=422)

        return answer


def _provider(svc: JobService | Callable[[], JobService]) -> Callable[[], JobService]:
    return svc if callable(svc) and not isinstance(svc, JobService) else (lambda: svc)


def _run_dir(svc: JobService, root: Path, name: str) -> tuple[Path, str]:
    """``root/name``, or ``root/name-2``, ``-3``, ... when that exists or another job writes there."""
    taken = {Path(j["output_dir"]) for j in svc.store.list_jobs()}
    for n in range(1, 10_000):
        candidate = name if n == 1 else f"{name}-{n}"
        path = root / candidate
        if not os.path.lexists(path) and path not in taken:
            return path, candidate
    raise JobError(409, f"experiment_name: no free run directory for {name!r} under {root}", "experiment_name")


def make_router(svc: JobService | Callable[[], JobService], lifespan=None) -> APIRouter:
    """The ``/nested-learning`` routes on ``svc`` (or on what a zero-argument callable returns at each call);
    ``lifespan`` joins the host app's when the router is included."""
    service = _provider(svc)
    router = APIRouter(prefix="/nested-learning", tags=["compat (old app)"], route_class=_AnswersItsErrors,
                       lifespan=lifespan)
    start_lock = threading.Lock()

    def current(job_id: str | None) -> dict[str, Any] | None:
        s = service()
        if job_id:
            return _view(s.get(job_id))
        jobs = s.store.list_jobs("running") or s.store.list_jobs()
        return _view(jobs[-1]) if jobs else None

    @router.post("/start", responses=errors(403, 409))
    def start(req: OldStartRequest) -> dict[str, Any]:
        from nested_learning.inference.convert import read_adapter

        s = service()
        adapter = None
        if req.adapter_path:
            req.adapter_path = str(s.policy.resolve(req.adapter_path, "adapter_path"))
            adapter = read_adapter(req.adapter_path)  # AdapterError (422, naming the file) before any job exists
        data, notes = to_train_config(req, adapter)
        model = s.policy.model(data["model"]["name_or_path"], "base_model_path")
        if Path(model).is_absolute() and not Path(model).is_dir():  # a local model folder, as the page picks
            raise JobError(422, f"base_model_path: model directory not found: {model}", "base_model_path")
        if not _NAME.match(req.experiment_name) or req.experiment_name in (".", ".."):
            raise JobError(422, f"experiment_name: {req.experiment_name!r} is not usable as a directory name "
                                "(letters, digits, '.', '_', '-', spaces)", "experiment_name")
        root = s.policy.resolve(req.output_path or OLD_OUTPUT_PATH, "output_path")
        with start_lock:  # two starts of one name at once still get two directories
            for _ in range(5):
                out, name = _run_dir(s, root, req.experiment_name)
                data["output"] = {"dir": str(out)}
                try:
                    job = s.create(TrainConfig.model_validate(data), name=name)
                    break
                except JobError as exc:
                    if exc.status != 409 or getattr(exc, "field", None) != "output.dir":
                        raise
            else:
                raise JobError(409, f"experiment_name: could not claim a run directory under {root}")
        if name != req.experiment_name:
            notes.insert(0, f"{req.experiment_name} already exists; this run is {name}")
        ahead = len(s.store.list_jobs(["running", "queued"])) - 1
        message = "Nested learning training queued" + (f" behind {ahead} job(s)" if ahead else "")
        message += "".join(f"; {n}" for n in notes)
        return {"success": True, "message": message, "experiment_name": name,
                "requested_experiment_name": req.experiment_name, "job_id": job["id"], "output_path": str(out)}

    @router.get("/status", responses=errors(404))
    def status(job_id: str | None = Query(None)) -> dict[str, Any]:
        return _old_status(service(), current(job_id))

    @router.post("/stop", responses=errors(400, 404))
    def stop(job_id: str | None = Query(None)) -> dict[str, Any]:
        view = current(job_id)
        if view is None or view["status"] not in ("queued", "running"):
            raise JobError(400, "No training in progress")
        after = job_view(service().stop(view["id"]))
        return {"success": True, "message": "Stop requested: the current step finishes and a checkpoint is saved",
                "job_id": after["id"], "job_status": after["status"]}

    @router.get("/metrics", responses=errors(404))
    def metrics(job_id: str | None = Query(None)) -> dict[str, Any]:
        view = current(job_id)
        if view is None:
            return {"experiment_name": None, "current_step": 0, "total_steps": 0, "tier_stats": None,
                    "metrics_history": []}
        accum = _accum(view)
        return {"experiment_name": view["name"], "current_step": view["step"] * accum,
                "total_steps": view["total_steps"] * accum, "tier_stats": _tier_stats(view),
                "metrics_history": _history(service(), view, None), "job_id": view["id"]}

    @router.get("/experiments")
    def experiments() -> dict[str, Any]:
        return {"experiments": [{"experiment_name": j["name"] or j["id"], "job_id": j["id"], "status": j["status"],
                                 "created": j["created_at"], "output_path": j["output_dir"]}
                                for j in map(job_view, service().store.list_jobs())]}

    @router.get("/tier-info", responses=errors(404))
    def tier_info(job_id: str | None = Query(None)) -> dict[str, Any]:
        return _tier_info(current(job_id))

    return router


# ---- /models and /adapters (the page's dropdowns) ----------------------------------------------------------
def _dirs(root: Path, depth: int) -> list[Path]:
    """Directories under ``root`` down to ``depth`` levels, hidden ones and their insides skipped."""
    out, level = [], [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError:
                continue
            nxt += children
        out += nxt
        level = nxt
    return out


def list_models(roots: list[Path], depth: int = 3) -> list[dict[str, Any]]:
    """Model directories (a ``config.json`` with a ``model_type`` and weights beside it), in the old shape."""
    models = []
    for root in roots:
        for d in _dirs(root, depth):
            cfg = d / "config.json"
            if not cfg.is_file() or not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
                continue
            try:
                data = json.loads(cfg.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
            if not isinstance(data, dict) or "model_type" not in data:
                continue
            models.append({"name": d.name, "path": str(d), "model_type": data.get("model_type", "unknown"),
                           "vocab_size": data.get("vocab_size", 0)})
    return models


def list_adapters(roots: list[Path], depth: int = 5) -> list[dict[str, Any]]:
    """Adapter directories, ours (PEFT checkpoints) and old ones (mlx-lm ``adapters.safetensors``)."""
    adapters = []
    for root in roots:
        for d in _dirs(root, depth):
            cfg_file = d / "adapter_config.json"
            if not cfg_file.is_file():
                continue
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if (d / "adapter_model.safetensors").is_file():
                fmt, rank, alpha = "peft", cfg.get("r", "unknown"), cfg.get("lora_alpha", "unknown")
            elif (d / "adapters.safetensors").is_file():
                params = cfg.get("lora_parameters") or {}
                fmt = "mlx"
                rank = cfg.get("lora_rank", params.get("rank", "unknown"))
                alpha = cfg.get("lora_alpha", "unknown")
            else:
                continue
            # <run>/checkpoints/<name>: a nested-learning run's checkpoint, named after the run as the old list did
            nested = d.parent.name == "checkpoints"
            run = d.parent.parent.name if nested else d.name
            adapters.append({"name": f"{run} (nested)" if nested and d.name == "best" else
                             (f"{run}/{d.name} (nested)" if nested else d.name),
                             "path": str(d), "type": "nested_learning" if nested else "standard", "format": fmt,
                             "lora_rank": rank, "lora_alpha": alpha})
    return adapters


def make_listing_router(svc: JobService | Callable[[], JobService]) -> APIRouter:
    """``GET /models`` and ``GET /adapters`` in the old shapes, listing what lies under the data roots."""
    service = _provider(svc)
    router = APIRouter(tags=["compat (old app)"], route_class=_AnswersItsErrors)

    @router.get("/models")
    def models() -> dict[str, Any]:
        return {"models": list_models(service().policy.roots)}

    @router.get("/adapters")
    def adapters() -> dict[str, Any]:
        return {"adapters": list_adapters(service().policy.roots)}

    return router


# ---- the drop-in module-level router ---------------------------------------------------------------------------
def settings_from_env() -> Settings:
    """``NL_SERVICE_WORKDIR`` (default ``./nested_learning_service``): job store, logs, job outputs;
    ``NL_DATA_ROOTS`` (``os.pathsep``-separated; default the current directory): the directories model, data,
    adapter and output paths must lie under; ``NL_SERVICE_DB`` (default ``<workdir>/jobs.db``)."""
    workdir = Path(os.environ.get("NL_SERVICE_WORKDIR") or "nested_learning_service").expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    roots = [Path(r) for r in (os.environ.get("NL_DATA_ROOTS") or "").split(os.pathsep) if r.strip()]
    return Settings(db=os.environ.get("NL_SERVICE_DB") or str(workdir / "jobs.db"), workdir=workdir,
                    data_roots=roots or [Path.cwd()])


class _Lazy:
    """The job service behind the module-level ``router``, created (and its scheduler started) on first use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: Settings | None = None
        self.svc: JobService | None = None

    def __call__(self) -> JobService:
        with self.lock:
            if self.svc is None:
                self.svc = JobService(self.settings or settings_from_env())
                self.svc.start()
                atexit.register(self.shutdown)
            return self.svc

    def shutdown(self) -> None:
        with self.lock:
            svc, self.svc = self.svc, None
        if svc is not None:
            svc.shutdown()


_default = _Lazy()


def configure(settings: Settings) -> None:
    """Use ``settings`` for the module-level ``router`` (call before its first request)."""
    if _default.svc is not None:
        raise RuntimeError("the compat router's job service is already running; configure() it before use")
    _default.settings = settings


@asynccontextmanager
async def _stop_on_shutdown(app):
    # The host app's shutdown stops the scheduler and asks running workers to checkpoint (atexit does it too).
    yield
    _default.shutdown()


# The old main.py keeps its own /models and /adapters; `nested-learning serve` adds make_listing_router's.
router = make_router(_default, lifespan=_stop_on_shutdown)
