"""The old desktop app's ``/nested-learning/*`` routes (and its ``/models``, ``/adapters`` lists) on our jobs.

Drop-in for the old back end: in its ``main.py`` the line ``from nested_learning_api import router as
nested_learning_router`` becomes ``from nested_learning.service.compat import router as nested_learning_router``;
``app.include_router(nested_learning_router)`` stays. That module-level ``router`` creates its job service on
first use from the environment (``NL_SERVICE_WORKDIR``, ``NL_DATA_ROOTS``; see ``settings_from_env``) or from
``configure(settings)`` called before; its errors are answered by the router itself (``{"detail": ...}`` with a
4xx), so the host app needs no exception handlers. ``nested-learning serve`` mounts the same routes through
``make_router(svc)``; how a start request becomes a ``TrainConfig``: ``compat_request.py``; the
``/models`` and ``/adapters`` lists: ``compat_listing.py``.

Each ``start`` queues a job like ``POST /v1/jobs``; ``status``, ``stop`` and ``metrics`` refer to the *current*
job: the running one if any, else the most recently created one (``?job_id=`` picks another).

Progress is counted in the request's unit, micro-batches: ``current_step`` = optimizer steps × accumulation,
``total_steps`` = ``num_steps`` (rounded down to whole optimizer steps). ``metrics_history`` rows carry the same
``step`` plus ``optimizer_step``. Old statuses: ``queued``/``running`` → ``running``; ``completed`` →
``completed``; ``failed`` → ``error``; ``stopped``/``interrupted`` → ``idle`` (what the old stop left behind);
no job at all → ``idle``.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from nested_learning.config import TrainConfig
from nested_learning.service.compat_request import OLD_OUTPUT_PATH, OldStartRequest, to_train_config
from nested_learning.service.jobs import JobError, JobService, Settings, job_view
from nested_learning.service.openapi import errors

__all__ = ["AnswersItsErrors", "OldStartRequest", "configure", "make_router", "router", "service_provider",
           "settings_from_env", "to_train_config"]

OLD_STATUS = {"queued": "running", "running": "running", "completed": "completed", "failed": "error",
              "stopped": "idle", "interrupted": "idle"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,120}$")
HISTORY_ROWS = 100  # /status carries the last 100 rows, as the old manager did


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
class AnswersItsErrors(APIRoute):
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


def service_provider(svc: JobService | Callable[[], JobService]) -> Callable[[], JobService]:
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
    service = service_provider(svc)
    router = APIRouter(prefix="/nested-learning", tags=["compat (old app)"], route_class=AnswersItsErrors,
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
