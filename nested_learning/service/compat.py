"""The old app's ``/nested-learning/*`` routes, mapped onto the same jobs as ``/v1``.

The old front end drives one training at a time: ``start`` with its flat request, then polls ``status`` and
``metrics``, and may ``stop``. Here every ``start`` queues a job like ``POST /v1/jobs``; ``status``, ``stop``
and ``metrics`` refer to the *current* job: the running one if any, else the most recently created one
(``?job_id=`` picks another). Responses keep the old field names and add ``job_id`` / ``job_status``.

Request mapping (old field → TrainConfig), best effort:

========================================  =================================================================
``base_model_path`` / ``model_path`` /    ``model.name_or_path`` (hub id, ``embedded:*`` or a path inside
``model_name``                            the data root)
``train_data_path`` / ``data_path``       ``data.train``
``val_data_path``                         ``data.valid``
``num_tiers`` + ``tier_update_frequencies``  ``tiers.periods`` (the first ``num_tiers`` frequencies)
``tier_assignment_strategy``              ``layer_depth`` → ``layer_depth``, ``parameter_importance`` →
                                          ``gradient_norm``, ``manual`` → rejected (the old request had no map)
``learning_rate``, ``batch_size``         ``optim.lr``, ``optim.batch_size``
``gradient_accumulation_steps``           ``optim.grad_accum``
``max_grad_norm``                         ``optim.max_grad_norm``
``num_steps``, ``warmup_steps``           ``schedule.steps``, ``schedule.warmup_steps`` (capped at num_steps);
                                          the old app kept the lr constant after warmup: ``schedule.kind``
                                          is ``constant``
``max_seq_length``                        ``data.max_length``
``lora_rank``, ``lora_alpha``,            ``lora.r``, ``lora.alpha``, ``lora.dropout``
``lora_dropout``
``checkpoint_every``, ``eval_every``      ``checkpoint.every``, ``eval.every``
``output_path`` + ``experiment_name``     ``output.dir = output_path/experiment_name`` when ``output_path``
                                          is given (inside the data root), else the job's own directory;
                                          ``experiment_name`` is also the job's name
``adapter_path``                          not used: training starts a fresh adapter (said in ``message``)
========================================  =================================================================

Old statuses: ``queued``/``running`` → ``running``; ``completed`` → ``completed``; ``failed`` → ``error``;
``stopped``/``interrupted`` → ``idle`` (what the old stop left behind); no job at all → ``idle``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, ValidationError

from nested_learning.config import TrainConfig
from nested_learning.service.jobs import JobError, JobService, job_view

OLD_STATUS = {"queued": "running", "running": "running", "completed": "completed", "failed": "error",
              "stopped": "idle", "interrupted": "idle"}


class OldStartRequest(BaseModel):
    """The old ``NestedLearningRequest``; unknown fields are ignored as the old app did."""

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
    batch_size: int = 4
    num_steps: int = 1000
    max_seq_length: int = 2048
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    warmup_steps: int = 100
    gradient_accumulation_steps: int = 2
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 100
    output_path: str | None = None
    experiment_name: str = "nested_learning_experiment"


def to_train_config(req: OldStartRequest) -> TrainConfig:
    model = req.base_model_path or req.model_path or req.model_name
    train = req.train_data_path or req.data_path
    missing = [n for n, v in (("base_model_path", model), ("train_data_path", train)) if not v]
    if missing:
        raise JobError(422, f"missing required field(s): {', '.join(missing)}")
    if req.num_tiers < 1 or req.num_tiers > len(req.tier_update_frequencies):
        raise JobError(422, f"num_tiers ({req.num_tiers}) must be between 1 and the number of "
                            f"tier_update_frequencies ({len(req.tier_update_frequencies)})")
    if req.tier_assignment_strategy == "manual":
        raise JobError(422, "tier_assignment_strategy 'manual' needs a parameter map; use POST /v1/jobs with "
                            "tiers.manual")
    data: dict[str, Any] = {
        "model": {"name_or_path": model},
        "lora": {"r": req.lora_rank, "alpha": req.lora_alpha, "dropout": req.lora_dropout},
        "data": {"train": train, "valid": req.val_data_path, "max_length": req.max_seq_length},
        "tiers": {"periods": req.tier_update_frequencies[: req.num_tiers],
                  "strategy": "gradient_norm" if req.tier_assignment_strategy == "parameter_importance"
                  else "layer_depth"},
        "optim": {"lr": req.learning_rate, "batch_size": req.batch_size, "grad_accum": req.gradient_accumulation_steps,
                  "max_grad_norm": req.max_grad_norm},
        "schedule": {"steps": req.num_steps, "warmup_steps": min(req.warmup_steps, max(req.num_steps, 0)),
                     "kind": "constant"},
        "eval": {"every": req.eval_every},
        "checkpoint": {"every": req.checkpoint_every},
    }
    if req.output_path:
        data["output"] = {"dir": f"{req.output_path.rstrip('/')}/{req.experiment_name}"}
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise JobError(422, f"invalid request: {problems}") from None


def _tier_stats(view: dict[str, Any]) -> dict[str, Any] | None:
    """The old shape: {"tier_parameters": {"tier_0": {"update_count", "frequency", "num_params"}}}."""
    periods = view.get("config", {}).get("tiers", {}).get("periods", [])
    stats = view.get("tier_stats") or []
    if not stats and not periods:
        return None
    tiers = {}
    for i, period in enumerate(periods or [s.get("period") for s in stats]):
        s = stats[i] if i < len(stats) else {}
        tiers[f"tier_{i}"] = {"update_count": s.get("updates", 0), "frequency": s.get("period", period),
                              "num_params": s.get("num_params"), "lr_scale": s.get("lr_scale")}
    return {"tier_parameters": tiers, "num_tiers": len(tiers)}


def _old_status(view: dict[str, Any] | None) -> dict[str, Any]:
    if view is None:
        return {"status": "idle", "current_step": 0, "total_steps": 0, "experiment_name": None,
                "tier_stats": None, "message": None, "current_train_loss": None, "current_val_loss": None,
                "job_id": None, "job_status": None}
    message = view["error"]
    if view["status"] in ("stopped", "interrupted"):
        message = message or f"training {view['status']} at step {view['step']}"
    return {"status": OLD_STATUS[view["status"]], "current_step": view["step"], "total_steps": view["total_steps"],
            "experiment_name": view["name"], "tier_stats": _tier_stats(view), "message": message,
            "current_train_loss": view["train_loss"], "current_val_loss": view["val_loss"],
            "best_val_loss": view["best_val_loss"], "learning_rate": view["lr"], "job_id": view["id"],
            "job_status": view["status"]}


def make_router(svc: JobService) -> APIRouter:
    router = APIRouter(prefix="/nested-learning", tags=["compat (old app)"])

    def current(job_id: str | None) -> dict[str, Any] | None:
        if job_id:
            return job_view(svc.get(job_id), full=True)
        running = svc.store.list_jobs("running")
        jobs = running or svc.store.list_jobs()
        return job_view(jobs[-1], full=True) if jobs else None

    @router.post("/start")
    def start(req: OldStartRequest) -> dict[str, Any]:
        job = svc.create(to_train_config(req), name=req.experiment_name)
        ahead = len(svc.store.list_jobs(["running", "queued"])) - 1
        message = "Nested learning training queued" + (f" behind {ahead} job(s)" if ahead else "")
        if req.adapter_path:
            message += "; adapter_path is not used (training starts a fresh adapter)"
        return {"success": True, "message": message, "experiment_name": req.experiment_name, "job_id": job["id"]}

    @router.get("/status")
    def status(job_id: str | None = Query(None)) -> dict[str, Any]:
        return _old_status(current(job_id))

    @router.post("/stop")
    def stop(job_id: str | None = Query(None)) -> dict[str, Any]:
        view = current(job_id)
        if view is None or view["status"] not in ("queued", "running"):
            raise JobError(400, "No training in progress")
        after = job_view(svc.stop(view["id"]))
        return {"success": True, "message": "Stop requested: the current step finishes and a checkpoint is saved",
                "job_id": after["id"], "job_status": after["status"]}

    @router.get("/metrics")
    def metrics(job_id: str | None = Query(None)) -> dict[str, Any]:
        view = current(job_id)
        if view is None:
            return {"experiment_name": None, "current_step": 0, "total_steps": 0, "tier_stats": None,
                    "metrics_history": []}
        history: dict[int, dict[str, Any]] = {}
        for row in svc.store.metrics(view["id"]):
            entry = history.setdefault(row["step"], {"step": row["step"]})
            if row["kind"] == "train":
                entry.update(train_loss=row.get("train_loss"), learning_rate=row.get("lr"),
                             tokens_per_sec=row.get("tokens_per_sec"), tier_updates=row.get("tier_updates"))
            elif row["kind"] == "eval":
                entry.update(val_loss=row.get("val_loss"))
        return {"experiment_name": view["name"], "current_step": view["step"], "total_steps": view["total_steps"],
                "tier_stats": _tier_stats(view), "metrics_history": [history[s] for s in sorted(history)],
                "job_id": view["id"]}

    @router.get("/experiments")
    def experiments() -> dict[str, Any]:
        return {"experiments": [{"experiment_name": j["name"] or j["id"], "job_id": j["id"], "status": j["status"],
                                 "created": j["created_at"], "output_path": j["output_dir"]}
                                for j in map(job_view, svc.store.list_jobs())]}

    @router.get("/tier-info")
    def tier_info(job_id: str | None = Query(None)) -> dict[str, Any]:
        view = current(job_id)
        info: dict[str, Any] = {
            "description": "Parameters are split into tiers; tier k is updated every period_k optimizer steps "
                           "with the mean of the gradients it accumulated since its last update.",
            "strategies": {"layer_depth": "contiguous groups of transformer blocks, shallow blocks fastest",
                           "rules": "ordered glob patterns mapping parameter names to tiers",
                           "manual": "an explicit parameter-name to tier map",
                           "gradient_norm": "a short probe ranks parameters by gradient size; larger is faster",
                           "parameter_importance": "old name, mapped to gradient_norm"},
        }
        if view is not None:
            info["job_id"] = view["id"]
            info["tiers"] = (_tier_stats(view) or {}).get("tier_parameters", {})
        return info

    return router
