"""The HTTP face of the service: ``create_app(settings)`` builds the FastAPI app.

Routes under ``/v1`` translate requests into ``JobService`` calls; ``/nested-learning/*`` is the old app's
router (compat.py); ``/`` serves the dashboard. Bodies are validated by the same ``TrainConfig`` the CLI uses,
so the OpenAPI page at ``/docs`` documents every config field.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote

import yaml
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from nested_learning import __version__
from nested_learning.config import TrainConfig
from nested_learning.service.jobs import JobError, JobService, Settings, job_view
from nested_learning.service.security import COOKIE, BodyLimit, PathNotAllowed, TokenAuth
from nested_learning.service.store import FINAL, STATUSES

STATIC = Path(__file__).parent / "static"


class JobCreated(BaseModel):
    id: str
    status: str


class GenerateRequest(BaseModel):
    """Text from a trained adapter: name a job (its best, else last checkpoint) or a checkpoint directory."""

    model_config = ConfigDict(extra="forbid")
    job_id: str | None = Field(None, description="Use this job's best (else last) checkpoint.")
    adapter: str | None = Field(None, description="A checkpoint directory (inside the data root).")
    prompt: str | None = Field(None, description="Raw prompt text.")
    messages: list[dict[str, str]] | None = Field(None, description="Chat messages [{role, content}, ...].")
    max_new_tokens: int = Field(64, gt=0, le=2048)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    seed: int = 0

    @model_validator(mode="after")
    def _one_of_each(self) -> "GenerateRequest":
        if (self.job_id is None) == (self.adapter is None):
            raise ValueError("give exactly one of job_id or adapter")
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


def _errors(exc: ValidationError | RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        out.append({"field": ".".join(loc) or "(body)", "msg": str(e.get("msg", "")).removeprefix("Value error, "),
                    "type": e.get("type")})
    return out


def _invalid(errors: list[dict[str, Any]]) -> JSONResponse:
    message = "invalid request: " + "; ".join(f"{e['field']}: {e['msg']}" for e in errors)
    return JSONResponse({"detail": errors, "message": message}, status_code=422)


class _ModelCache:
    """The last adapter loaded for /v1/generate, kept warm; one generation at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.value: tuple | None = None

    def generate(self, path: str, req: GenerateRequest) -> str:
        from nested_learning.generate import generate_text, load_for_inference

        key = (path, Path(path).stat().st_mtime if Path(path).exists() else 0)
        with self.lock:
            if self.key != key:
                self.value, self.key = load_for_inference(adapter=path), key
            model, tok = self.value
            return generate_text(model, tok, prompt=req.prompt, messages=req.messages,
                                 max_new_tokens=req.max_new_tokens, temperature=req.temperature, seed=req.seed)


def create_app(settings: Settings) -> FastAPI:
    svc = JobService(settings)
    models = _ModelCache()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.start()
        yield
        svc.shutdown()

    app = FastAPI(title="nested-learning", version=__version__, lifespan=lifespan,
                  description="Training jobs for nested multi-frequency LoRA fine-tuning.")
    app.state.jobs = svc

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError):
        return _invalid(_errors(exc))

    @app.exception_handler(JobError)
    async def _on_job_error(request: Request, exc: JobError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(PathNotAllowed)
    async def _on_path(request: Request, exc: PathNotAllowed):
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=403)

    # ---- /v1 ------------------------------------------------------------------------------------------------
    @app.get("/v1/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "slots": svc.scheduler.slots}

    @app.post("/v1/jobs", status_code=201, response_model=JobCreated, tags=["jobs"])
    def create_job(config: TrainConfig, name: str | None = Query(None, max_length=200)) -> dict[str, Any]:
        """Queue a training job. The body is a TrainConfig, exactly as in a YAML config file."""
        job = svc.create(config, name=name)
        return {"id": job["id"], "status": job["status"]}

    @app.post("/v1/config/from-yaml", tags=["jobs"])
    def config_from_yaml(text: str = Body(..., media_type="text/plain")) -> dict[str, Any]:
        """Validate a YAML config and return it as JSON (what the dashboard's YAML form posts to /v1/jobs)."""
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise JobError(422, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise JobError(422, "the top level must be a mapping of sections")
        try:
            return json.loads(TrainConfig.model_validate(data).model_dump_json(exclude_unset=True))
        except ValidationError as exc:
            return _invalid(_errors(exc))

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(status: Literal[STATUSES] | None = None) -> dict[str, Any]:  # type: ignore[valid-type]
        return {"jobs": [job_view(j) for j in svc.store.list_jobs(status)]}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str) -> dict[str, Any]:
        return job_view(svc.get(job_id), full=True)

    @app.post("/v1/jobs/{job_id}/stop", tags=["jobs"])
    def stop_job(job_id: str) -> dict[str, Any]:
        """Graceful and idempotent: the current step finishes, a checkpoint is saved, the job ends `stopped`."""
        return job_view(svc.stop(job_id))

    @app.post("/v1/jobs/{job_id}/resume", tags=["jobs"])
    def resume_job(job_id: str) -> dict[str, Any]:
        """Queue a stopped, interrupted or failed job again; it continues from its last checkpoint."""
        return job_view(svc.resume(job_id))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def delete_job(job_id: str, files: bool = False) -> dict[str, Any]:
        """Remove the record (not while running); `files=true` also removes the output directory and log."""
        return svc.delete(job_id, files=files)

    @app.get("/v1/jobs/{job_id}/metrics", tags=["jobs"])
    def job_metrics(job_id: str, since: int | None = Query(None, description="only steps after this one"),
                    kind: Literal["train", "eval", "checkpoint"] | None = None) -> dict[str, Any]:
        svc.get(job_id)
        return {"job_id": job_id, "metrics": svc.store.metrics(job_id, since_step=since, kind=kind)}

    @app.get("/v1/jobs/{job_id}/checkpoints", tags=["jobs"])
    def job_checkpoints(job_id: str) -> dict[str, Any]:
        return {"job_id": job_id, "checkpoints": svc.checkpoints(job_id)}

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], response_class=PlainTextResponse)
    def job_logs(job_id: str, tail: int = Query(200, gt=0, le=100_000)) -> str:
        return svc.log_tail(job_id, tail)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request, after: int = Query(0, ge=0)) -> StreamingResponse:
        """Server-Sent Events: `metric` (one per new metrics row; its `id` is the row's seq), `status` (on every
        change of status or step) and `end` once the job has ended."""
        await run_in_threadpool(svc.get, job_id)
        start = int(request.headers.get("last-event-id") or after)
        return StreamingResponse(_events(svc, job_id, request, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/generate", tags=["inference"])
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        if req.job_id is not None:
            path = await run_in_threadpool(svc.inference_checkpoint, req.job_id)
        else:
            path = str(svc.policy.resolve(req.adapter, "adapter"))
            if not Path(path).is_dir():
                raise JobError(404, f"adapter: {req.adapter!r} is not a checkpoint directory")
        text = await run_in_threadpool(models.generate, path, req)
        return {"text": text, "adapter": path}

    # ---- the old app's router, the dashboard ------------------------------------------------------------------
    from nested_learning.service.compat import make_router

    app.include_router(make_router(svc))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> RedirectResponse:
        # A urlencoded form (no python-multipart needed for this one field).
        token = (parse_qs((await request.body()).decode(errors="replace")).get("token") or [""])[0]
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, quote(token, safe=""), httponly=True, samesite="strict")
        return resp

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # Outermost first: the size limit, then the token (so an oversized unauthenticated body is still a 413).
    app.add_middleware(TokenAuth, token=settings.token)
    app.add_middleware(BodyLimit, max_body=settings.max_body)
    return app


async def _events(svc: JobService, job_id: str, request: Request, after_seq: int):
    last_key, last_beat = None, time.monotonic()
    while True:
        if await request.is_disconnected():
            return
        job = await run_in_threadpool(svc.store.get_job, job_id)
        if job is None:
            yield "event: end\ndata: {\"deleted\": true}\n\n"
            return
        rows = await run_in_threadpool(svc.store.metrics, job_id, None, after_seq, None, 2000)
        for row in rows:
            after_seq = row["seq"]
            yield f"id: {row['seq']}\nevent: metric\ndata: {json.dumps(row)}\n\n"
        view = job_view(job)
        key = (view["status"], view["step"], view["stop_requested"], view["val_loss"])
        if key != last_key:
            last_key = key
            yield f"event: status\ndata: {json.dumps(view)}\n\n"
        if job["status"] in FINAL and not rows:
            yield f"event: end\ndata: {json.dumps({'status': job['status']})}\n\n"
            return
        if time.monotonic() - last_beat > 15:
            last_beat = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.5)
