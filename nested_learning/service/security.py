"""What the service lets in: a bearer token, paths inside the configured roots, bodies under a size limit.

- Token: every route but ``/v1/healthz`` (and ``/login``, which sets the token cookie the dashboard and its
  EventSource use) needs ``Authorization: Bearer <token>`` or that cookie, once a token is configured. Binding
  to a non-loopback address without a token is refused at start.
- Paths: model, data and output paths in a job must resolve (``..`` and symlinks followed) inside one of the
  roots; anything else is a 403 whose message names the field and the root.
- Size: a request body over ``max_body`` bytes is answered 413 before the app sees it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from urllib.parse import unquote
from pathlib import Path
from typing import Any, Awaitable, Callable

from nested_learning.config import TrainConfig
from nested_learning.model.embedded import is_embedded

PUBLIC_PATHS = {"/v1/healthz", "/login"}
COOKIE = "nl_token"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PathNotAllowed(Exception):
    """A path outside every root; ``str()`` is the message the client sees."""

    def __init__(self, field: str, value: str, resolved: Path, roots: list[Path]):
        self.field = field
        shown = ", ".join(str(r) for r in roots)
        super().__init__(
            f"{field}: path {value!r} resolves to {resolved}, which is outside the allowed root(s) {shown}"
        )


class BadPath(ValueError):
    """A path that cannot be resolved at all (a NUL byte, too long, a symlink loop): a 422 naming the field."""

    def __init__(self, field: str, value: str, why: str):
        self.field = field
        super().__init__(f"{field}: path {value[:200]!r}{'...' if len(value) > 200 else ''} cannot be used: {why}")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token (the API starts training jobs and reads files)."""
    if not token and not is_loopback(host):
        raise SystemExit(
            f"refusing to bind {host}: a non-loopback address needs an API token (--token or NL_API_TOKEN)"
        )


class PathPolicy:
    """Resolves user paths against the roots; relative paths are taken relative to the first root."""

    def __init__(self, roots: list[str | Path]):
        if not roots:
            raise ValueError("at least one data root is needed")
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def resolve(self, value: str | Path, field: str) -> Path:
        from nested_learning.config import check_path_text

        try:
            check_path_text(str(value))
            p = Path(value).expanduser()
            if not p.is_absolute():
                p = self.roots[0] / p
            resolved = p.resolve()  # follows symlinks, folds `..`
        except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise BadPath(field, str(value), str(exc)) from None
        if not any(resolved == r or resolved.is_relative_to(r) for r in self.roots):
            raise PathNotAllowed(field, str(value), resolved, self.roots)
        return resolved

    def model(self, name: str, field: str = "model.name_or_path") -> str:
        """``embedded:*`` and hub ids pass; anything that is (or looks like) a local path must be inside a root."""
        if is_embedded(name):
            return name
        looks_local = name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
        if not looks_local and _HUB_ID.match(name) and not _exists(self.roots[0] / name) and not _exists(Path(name)):
            return name  # a hub id: nothing local to guard
        return str(self.resolve(name, field))


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):
        return False


def confine_config(cfg: TrainConfig, policy: PathPolicy, default_output_dir: Path) -> TrainConfig:
    """A copy of ``cfg`` whose paths are absolute and inside the roots (PathNotAllowed otherwise).

    The output directory is ``default_output_dir`` unless the request set ``output.dir`` itself.
    """
    data = json.loads(cfg.model_dump_json())
    data["model"]["name_or_path"] = policy.model(cfg.model.name_or_path)
    for key in ("dir", "train", "valid"):
        if data["data"][key] is not None:
            data["data"][key] = str(policy.resolve(data["data"][key], f"data.{key}"))
    data["eval"]["retain"] = {name: str(policy.resolve(path, f"eval.retain.{name}"))
                              for name, path in cfg.eval.retain.items()}
    if data["lora"].get("init_adapter"):
        data["lora"]["init_adapter"] = str(policy.resolve(data["lora"]["init_adapter"], "lora.init_adapter"))
    if "dir" in cfg.output.model_fields_set:
        data["output"]["dir"] = str(policy.resolve(cfg.output.dir, "output.dir"))
    else:
        data["output"]["dir"] = str(default_output_dir)
    return TrainConfig.model_validate(data)


# ---- ASGI middleware ----------------------------------------------------------------------------------------
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def _send_response(send, status: int, body: bytes, content_type: str, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _json(detail: str) -> bytes:
    return json.dumps({"detail": detail}).encode()


_LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>nested-learning: sign in</title></head>
<body style="font-family:sans-serif;max-width:28em;margin:4em auto">
<h1>nested-learning</h1><p>This server needs its API token (the one given to <code>nested-learning serve</code>
with <code>--token</code> or <code>NL_API_TOKEN</code>).</p>
<form method="post" action="/login"><input type="password" name="token" placeholder="token" autofocus>
<button type="submit">Sign in</button></form></body></html>"""


class TokenAuth:
    """Bearer token (header) or the ``nl_token`` cookie that ``POST /login`` sets; constant-time compare."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    def _ok(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode(), self.token.encode())

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.token or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        cookie = _cookie(headers.get("cookie", ""), COOKIE)
        if self._ok(bearer) or self._ok(cookie):
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return None
        if scope.get("method") == "GET" and "text/html" in headers.get("accept", ""):
            return await _send_response(send, 401, _LOGIN_PAGE.encode(), "text/html; charset=utf-8")
        why = "invalid API token" if (bearer or cookie) else "missing API token: send 'Authorization: Bearer <token>'"
        await _send_response(send, 401, _json(why), "application/json", [(b"www-authenticate", b"Bearer")])


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return unquote(v)
    return None


class BodyLimit:
    """413 for a request body over ``max_body`` bytes, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        msg = f"request body too large: the limit is {self.max_body} bytes"
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length" and v.isdigit() and int(v) > self.max_body:
                return await _send_response(send, 413, _json(msg), "application/json")
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the (bounded) body first, then replay it to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_response(send, 413, _json(msg), "application/json")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
