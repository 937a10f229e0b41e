"""The published OpenAPI schema tells the truth about errors.

Every error the service sends is JSON shaped like ``ErrorBody``: ``detail`` (a message, or one entry per invalid
field for a 422), and for the service's own refusals ``field`` (the request field at fault) and ``message``.
FastAPI documents only its own 422 shape; ``document_errors`` replaces it with the real one and adds the codes
the middleware and body parsing can answer with, so a client generated from the schema (or schemathesis) sees
each response it can get. Route-specific codes (403, 404, 409) come from ``errors(...)`` on the route itself.

``allow_every_method`` makes a 405's ``Allow`` header list every method the path supports: Starlette answers from
the first route whose path matches, which for ``/v1/jobs/{id}`` (GET and DELETE) left one of them out.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ErrorBody", "FieldError", "allow_every_method", "document_errors", "errors"]

_WHY = {
    400: "The body could not be parsed, or a header is malformed.",
    401: "Missing or wrong API token (a sign-in page for a browser asking for HTML).",
    403: "A path outside the data roots, or remote model code on a server that does not allow it.",
    404: "No such job.",
    409: "The job's state (or an existing path) does not allow this.",
    413: "The request body is larger than the server's limit.",
    422: "A field is invalid; `detail` names each one.",
}


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the field, e.g. `optim.lr`; `(body)` for the body itself.")
    msg: str
    type: str | None = None


class ErrorBody(BaseModel):
    detail: str | list[FieldError]
    message: str | None = Field(None, description="All problems in one line.")
    field: str | None = Field(None, description="The request field at fault, where there is one.")


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the listed error codes, each with the error body."""
    return {code: {"model": ErrorBody, "description": _WHY.get(code, "Error.")} for code in codes}


def _error_response(code: int, ref: str) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": ref}}}
    if code == 401:
        content["text/html"] = {"schema": {"type": "string"}}
    return {"description": _WHY[code], "content": content}


def document_errors(app: FastAPI, public_paths: set[str]) -> None:
    """Install an ``app.openapi`` that adds the codes every route can answer with: 401 (token; not on the
    public paths), 422 (any parameter or body), 400 and 413 (a body), 404 (a path parameter)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (FieldError, ErrorBody):
            comps[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        ref = "#/components/schemas/ErrorBody"
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                params = op.get("parameters", [])
                codes = set()
                if path not in public_paths:
                    codes.add(401)
                if params or "requestBody" in op:
                    codes.add(422)
                if "requestBody" in op:
                    codes |= {400, 413}
                if any(p.get("in") == "path" for p in params):
                    codes.add(404)
                responses = op["responses"]
                for code in sorted(codes | {int(c) for c in responses if c.isdigit() and int(c) >= 400}):
                    if str(code) in responses and code not in _WHY:
                        continue
                    responses[str(code)] = _error_response(code, ref)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def allow_every_method(app: FastAPI) -> None:
    """405 responses name every method the path supports in ``Allow``."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            path = request.scope.get("path", "")
            methods = {m for route in app.router.routes if (regex := getattr(route, "path_regex", None))
                       and regex.match(path) for m in (getattr(route, "methods", None) or ())}
            if methods:
                headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers or None)
