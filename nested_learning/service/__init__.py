"""The training-job service: ``nested-learning serve`` (or ``python -m nested_learning.service``).

Modules: store (SQLite job store), jobs (operations behind the routes), scheduler (worker processes),
worker (one job's process), security (token, path roots, body limit), app (the /v1 routes), openapi (the
error responses the schema documents), compat (the old app's routes), static/ (the dashboard).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["add_serve_arguments", "main", "serve"]


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--workdir", default="outputs/service",
                        help="where job outputs (<workdir>/jobs/<id>) and logs go (default outputs/service)")
    parser.add_argument("--db", default=None,
                        help="job store: SQLite path or sqlite:///PATH (default <workdir>/jobs.db)")
    parser.add_argument("--data-root", action="append", default=None, dest="data_roots",
                        help="directory that model, data and output paths must lie under; repeatable "
                             "(default: the workdir)")
    parser.add_argument("--token", default=None,
                        help="bearer token required on every route but /v1/healthz (default $NL_API_TOKEN); "
                             "required for a non-loopback --host")
    parser.add_argument("--max-body", type=int, default=1_000_000, help="largest request body in bytes (413 above)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids to schedule on "
                             "(default: detected; none → one job at a time on CPU)")
    parser.add_argument("--allow-remote-code", action="store_true",
                        help="let jobs and adapters set model.trust_remote_code (model code from a hub repository "
                             "then runs in workers and in this server); refused by default")
    parser.add_argument("--cors-origin", action="append", default=None, dest="cors_origins", metavar="ORIGIN",
                        help="browser origin allowed to call the API, e.g. http://localhost:3000; repeatable; "
                             "`none` turns CORS off (default: any loopback origin)")
    warm = parser.add_mutually_exclusive_group()
    warm.add_argument("--warm-workers", action="store_const", const=True, dest="warm_workers",
                      help="after a slot's first job, keep a worker that has imported torch and transformers ready "
                           "for its next job (default on GPU slots; on a CPU-only server its imports take cores "
                           "from the running job)")
    warm.add_argument("--cold-workers", action="store_const", const=False, dest="warm_workers",
                      help="start every job in a fresh process")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser


def serve(host: str = "127.0.0.1", port: int = 8000, db: str | None = None, workdir: str | Path = "outputs/service",
          token: str | None = None, data_root: str | Path | list | None = None, max_body: int = 1_000_000,
          gpus: list[str] | None = None, log_level: str = "info", allow_remote_code: bool = False,
          cors_origins: list[str] | None = None, warm_workers: bool | None = None) -> None:
    import uvicorn

    from nested_learning.service.app import create_app
    from nested_learning.service.jobs import Settings
    from nested_learning.service.security import check_bind

    token = token or os.environ.get("NL_API_TOKEN") or None
    check_bind(host, token)
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    roots = data_root if isinstance(data_root, list) else ([data_root] if data_root else [])
    settings = Settings(db=db or str(workdir / "jobs.db"), workdir=workdir, data_roots=[Path(r) for r in roots],
                        token=token, max_body=max_body, gpus=gpus, allow_remote_code=allow_remote_code,
                        cors_origins=None if cors_origins is None else [o for o in cors_origins if o != "none"],
                        warm_workers=warm_workers)
    app = create_app(settings)
    print(f"nested-learning serve: http://{host}:{port}/  store={settings.db}  workdir={workdir}  "
          f"data roots={', '.join(map(str, settings.data_roots))}  auth={'token' if token else 'off'}"
          f"{'  remote model code: ALLOWED' if allow_remote_code else ''}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def run_from_args(args: argparse.Namespace) -> int:
    gpus = None if args.gpus is None else [g for g in args.gpus.split(",") if g.strip()]
    serve(host=args.host, port=args.port, db=args.db, workdir=args.workdir, token=args.token,
          data_root=args.data_roots, max_body=args.max_body, gpus=gpus, log_level=args.log_level,
          allow_remote_code=args.allow_remote_code, cors_origins=args.cors_origins,
          warm_workers=args.warm_workers)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="nested-learning serve",
                                                         description="Run the training-job service."))
    return run_from_args(parser.parse_args(argv))
