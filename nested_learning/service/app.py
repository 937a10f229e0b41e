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

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response,
                               StreamingResponse)
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from nested_learning import __version__
from nested_learning.config import ConfigError, TrainConfig, check_path_text, check_unicode, load_yaml
from nested_learning.service.jobs import JobError, JobService, Settings, job_view
from nested_learning.service.docs import add_docs
from nested_learning.service.openapi import allow_every_method, document_errors, errors
from nested_learning.service.security import COOKIE, PUBLIC_PATHS, BadPath, BodyLimit, PathNotAllowed, TokenAuth
from nested_learning.service.store import FINAL, STATUSES

STATIC = Path(__file__).parent / "static"
SQLITE_INT = 2**63 - 1  # cursors and steps beyond SQLite's integer range are refused, not overflowed
METRICS_PAGE = 1000  # default rows per /metrics page


class JobCreated(BaseModel):
    id: str
    status: str


class GenerateRequest(BaseModel):
    """Text from a trained adapter: name a job (its best, else last checkpoint) or a checkpoint directory."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    job_id: str | None = Field(None, min_length=1, max_length=64,
                               description="Use this job's best (else last) checkpoint.")
    adapter: str | None = Field(None, min_length=1, description="A checkpoint directory (inside the data root).")
    prompt: str | None = Field(None, description="Raw prompt text.")
    messages: list[dict[str, str]] | None = Field(None, min_length=1,
                                                  description="Chat messages [{role, content}, ...].")
    max_new_tokens: int = Field(64, gt=0, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy.")
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @field_validator("adapter")
    @classmethod
    def _path_text(cls, v: str | None) -> str | None:
        return check_path_text(v)

    @model_validator(mode="after")
    def _one_of_each(self) -> "GenerateRequest":
        for name in ("job_id", "adapter", "prompt", "messages"):
            check_unicode(getattr(self, name), name)
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

    def generate(self, path: str, base: str, req: GenerateRequest, field: str) -> str:
        """``base`` is the base model already checked against the path policy; it overrides the one the
        adapter's config.yaml names, so nothing else from that file decides what is loaded."""
        from nested_learning.inference.generate import encode_prompt, generate_text, load_for_inference

        key = (path, base, Path(path).stat().st_mtime if Path(path).exists() else 0)
        with self.lock:
            if self.key != key:
                try:
                    self.value, self.key = load_for_inference(adapter=path, base=base), key
                except Exception as exc:  # a damaged checkpoint or base: the request named it
                    self.value = self.key = None
                    raise JobError(422, f"{field}: cannot load {path}: {exc}", field) from None
            model, tok = self.value
            try:
                n_prompt = len(encode_prompt(tok, req.prompt, req.messages))
            except Exception as exc:  # e.g. a chat template that refuses these messages
                raise JobError(422, f"{'prompt' if req.messages is None else 'messages'}: {exc}") from None
            context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if context and n_prompt + req.max_new_tokens > context:
                raise JobError(422, f"max_new_tokens: the prompt's {n_prompt} tokens plus {req.max_new_tokens} new "
                                    f"ones exceed the model's context of {context}", "max_new_tokens")
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
                  description="Training jobs for nested multi-frequency LoRA fine-tuning.",
                  docs_url=None, redoc_url=None)  # add_docs serves them with local assets (works offline)
    add_docs(app)
    app.state.jobs = svc

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError):
        return _invalid(_errors(exc))

    @app.exception_handler(JobError)
    async def _on_job_error(request: Request, exc: JobError):
        body = {"detail": str(exc)} if exc.field is None else {"detail": str(exc), "field": exc.field}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(PathNotAllowed)
    async def _on_path(request: Request, exc: PathNotAllowed):
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=403)

    @app.exception_handler(BadPath)
    async def _on_bad_path(request: Request, exc: BadPath):
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)

    @app.exception_handler(UnicodeEncodeError)
    async def _on_surrogate(request: Request, exc: UnicodeEncodeError):
        # JSON's "\ud800" escapes decode to lone surrogates, which the store (UTF-8) cannot hold.
        return JSONResponse({"detail": "the request holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape), "
                                       "which is not valid Unicode text"}, status_code=422)

    allow_every_method(app)
    document_errors(app, PUBLIC_PATHS)

    # ---- /v1 ------------------------------------------------------------------------------------------------
    @app.get("/v1/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "slots": svc.scheduler.slots}

    @app.post("/v1/jobs", status_code=201, response_model=JobCreated, tags=["jobs"], responses=errors(403, 409))
    def create_job(config: TrainConfig, name: str | None = Query(None, max_length=200),
                   devices: int = Query(1, ge=1, le=1024, description="GPUs to train on, data-parallel under "
                                        "torchrun (CPU ranks on a server without GPUs)")) -> dict[str, Any]:
        """Queue a training job. The body is a TrainConfig, exactly as in a YAML config file."""
        job = svc.create(config, name=name, devices=devices)
        return {"id": job["id"], "status": job["status"]}

    @app.post("/v1/config/from-yaml", tags=["jobs"])
    def config_from_yaml(text: str = Body(..., media_type="text/plain")) -> dict[str, Any]:
        """Validate a YAML config and return it as JSON (what the dashboard's YAML form posts to /v1/jobs)."""
        try:
            data = load_yaml(text, "(body)") or {}
        except ConfigError as exc:  # syntax, a duplicate key or absurd nesting, with the line
            raise JobError(422, str(exc)) from None
        if not isinstance(data, dict):
            raise JobError(422, "the top level must be a mapping of sections")
        try:
            return json.loads(TrainConfig.model_validate(data).model_dump_json(exclude_unset=True))
        except ValidationError as exc:
            return _invalid(_errors(exc))

    # Status reads come from the service's cached views (no SQLite, no thread hop): the hot path of pollers.
    @app.get("/v1/jobs", tags=["jobs"])
    async def list_jobs(status: Literal[STATUSES] | None = None) -> dict[str, Any]:  # type: ignore[valid-type]
        return {"jobs": svc.views.all(status)}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_class=Response,
             responses={200: {"content": {"application/json": {"schema": {"type": "object"}}},
                              "description": "The job: its record, its trainer's latest state and its config."}})
    async def get_job(job_id: str) -> Response:
        entry = svc.views.get(job_id) or await run_in_threadpool(svc.view, job_id)
        return Response(entry[1], media_type="application/json")

    @app.post("/v1/jobs/{job_id}/stop", tags=["jobs"])
    def stop_job(job_id: str) -> dict[str, Any]:
        """Graceful and idempotent: the current step finishes, a checkpoint is saved, the job ends `stopped`."""
        return job_view(svc.stop(job_id))

    @app.post("/v1/jobs/{job_id}/resume", tags=["jobs"], responses=errors(409))
    def resume_job(job_id: str) -> dict[str, Any]:
        """Queue a stopped, interrupted or failed job again; it continues from its last checkpoint."""
        return job_view(svc.resume(job_id))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], responses=errors(409))
    def delete_job(job_id: str, files: bool = False) -> dict[str, Any]:
        """Remove the record (not while running). `files=true` also removes what the job created: its output
        directory (as made when the job was queued) and its log; `kept` names any path left and why."""
        return svc.delete(job_id, files=files)

    @app.get("/v1/jobs/{job_id}/metrics", tags=["jobs"])
    def job_metrics(job_id: str,
                    since: int | None = Query(None, ge=-SQLITE_INT, le=SQLITE_INT, description="only steps after this one"),
                    after: int | None = Query(None, ge=0, le=SQLITE_INT,
                                              description="only rows after this `seq`: pass the last page's `next_after`"),
                    limit: int = Query(METRICS_PAGE, ge=1, le=10_000, description="rows per page"),
                    kind: Literal["train", "eval", "checkpoint"] | None = None) -> dict[str, Any]:
        """One page of metrics rows in `seq` order; `next_after` is the cursor for the next page (null on the
        last one)."""
        svc.get(job_id)
        rows = svc.store.metrics(job_id, since_step=since, after_seq=after, kind=kind, limit=limit)
        return {"job_id": job_id, "metrics": rows, "next_after": rows[-1]["seq"] if len(rows) == limit else None}

    @app.get("/v1/jobs/{job_id}/checkpoints", tags=["jobs"])
    def job_checkpoints(job_id: str) -> dict[str, Any]:
        return {"job_id": job_id, "checkpoints": svc.checkpoints(job_id)}

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], response_class=PlainTextResponse)
    def job_logs(job_id: str, tail: int = Query(200, gt=0, le=100_000)) -> str:
        return svc.log_tail(job_id, tail)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                              "description": "The event stream."}, **errors(400)})
    async def job_events(job_id: str, request: Request, after: int = Query(0, ge=0, le=SQLITE_INT)):
        """Server-Sent Events: `metric` (one per new metrics row; its `id` is the row's seq), `status` (on every
        change of status or step) and `end` once the job has ended. A reconnecting client's `Last-Event-ID`
        header (a seq) takes the place of `after`."""
        await run_in_threadpool(svc.view, job_id)
        start = after
        last_id = request.headers.get("last-event-id")
        if last_id is not None and last_id.strip():
            if not last_id.strip().isdigit() or int(last_id) > SQLITE_INT:
                raise JobError(400, f"Last-Event-ID: expected the seq of a metric event (an integer from 0 to "
                                    f"{SQLITE_INT}), got {last_id[:40]!r}", "Last-Event-ID")
            start = int(last_id)
        return StreamingResponse(_events(svc, job_id, request, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/generate", tags=["inference"], responses=errors(403, 404, 409))
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        """The adapter and the base model its config.yaml names pass the same path policy as a job's paths;
        remote model code runs only on a server started with --allow-remote-code."""
        if req.job_id is not None:
            field = "job_id"
            path = await run_in_threadpool(svc.inference_checkpoint, req.job_id)
        else:
            field = "adapter"
            path = str(svc.policy.resolve(req.adapter, "adapter"))
        base = await run_in_threadpool(svc.adapter_base, path, field)
        text = await run_in_threadpool(models.generate, path, base, req, field)
        return {"text": text, "adapter": path}

    # ---- the old app's router, the dashboard ------------------------------------------------------------------
    from nested_learning.service.compat import make_router
    from nested_learning.service.compat_listing import make_listing_router

    app.include_router(make_router(svc))
    app.include_router(make_listing_router(svc))  # the old page's model and adapter dropdowns

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
    _add_cors(app, settings.cors_origins)
    return app


LOOPBACK_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"


def _add_cors(app: FastAPI, origins: list[str] | None) -> None:
    """Outermost, so a browser's preflight (which carries no token) is answered before TokenAuth. ``None``:
    any loopback origin (the old app's dev server on http://localhost:3000, ...); ``[]``: no CORS."""
    from starlette.middleware.cors import CORSMiddleware

    if origins is not None and not origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=origins or [], allow_origin_regex=None if origins else
                       LOOPBACK_ORIGINS, allow_methods=["*"], allow_headers=["*"])


async def _events(svc: JobService, job_id: str, request: Request, after_seq: int):
    # The job's state comes from the cached views; SQLite is read (off the loop) only when the views say that
    # new metrics rows exist, so a follower of an idle job costs next to nothing.
    last_key, last_beat = None, time.monotonic()
    while True:
        if await request.is_disconnected():
            return
        view = svc.views.summary(job_id)
        if view is None:
            yield "event: end\ndata: {\"deleted\": true}\n\n"
            return
        rows = []
        if svc.views.metric_head(job_id) > after_seq:
            rows = await run_in_threadpool(svc.store.metrics, job_id, None, after_seq, None, 2000)
        for row in rows:
            after_seq = row["seq"]
            yield f"id: {row['seq']}\nevent: metric\ndata: {json.dumps(row)}\n\n"
        key = (view["status"], view["step"], view["stop_requested"], view["val_loss"])
        if key != last_key:
            last_key = key
            yield f"event: status\ndata: {json.dumps(view)}\n\n"
        if view["status"] in FINAL and not rows:
            yield f"event: end\ndata: {json.dumps({'status': view['status']})}\n\n"
            return
        if time.monotonic() - last_beat > 15:
            last_beat = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.5)
