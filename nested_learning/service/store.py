"""The job store: every job's record, state and metrics, shared by the server and its worker processes.

SQLite in WAL mode is the embedded default: the server and each worker open their own connection, readers
never block the one writer, and a record survives any crash of either. ``open_store(url)`` is the only
constructor callers use, so a PostgreSQL store can follow behind the same methods.

Times are UNIX seconds (float). ``state_json`` holds the trainer's latest ``TrainerState.to_dict()``;
``metrics`` holds one row per training step (``kind="train"``) and per evaluation (``kind="eval"``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

STATUSES = ("queued", "running", "completed", "stopped", "failed", "interrupted")
FINAL = ("completed", "stopped", "failed", "interrupted")
RESUMABLE = ("stopped", "interrupted", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    name TEXT,
    status TEXT NOT NULL,
    config_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    worker_pid INTEGER,
    worker_ready INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    state_json TEXT,
    output_dir TEXT NOT NULL,
    log_path TEXT,
    gpu TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    owned_json TEXT,
    devices INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS metrics (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_job ON metrics(job_id, seq);
"""

# `changed` orders every write to a job row (from any process: server, workers, imports), so a reader can
# fetch just the rows written since it last looked. Triggers keep it, whoever writes, from a counter that
# never goes back (max(changed) would, when the newest job is deleted). Without recursive_triggers (SQLite's
# default) the triggers' own UPDATE does not fire them again.
_CHANGE_TRACKING = """
CREATE INDEX IF NOT EXISTS jobs_changed ON jobs(changed);
CREATE TABLE IF NOT EXISTS job_writes (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL);
INSERT OR IGNORE INTO job_writes VALUES (0, (SELECT coalesce(max(changed), 0) FROM jobs));
CREATE TRIGGER IF NOT EXISTS jobs_changed_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_writes SET n = n + 1 WHERE id = 0;
    UPDATE jobs SET changed = (SELECT n FROM job_writes WHERE id = 0) WHERE seq = NEW.seq;
END;
CREATE TRIGGER IF NOT EXISTS jobs_changed_update AFTER UPDATE ON jobs WHEN NEW.changed = OLD.changed BEGIN
    UPDATE job_writes SET n = n + 1 WHERE id = 0;
    UPDATE jobs SET changed = (SELECT n FROM job_writes WHERE id = 0) WHERE seq = NEW.seq;
END;
"""

# Columns a caller may set through update(); the rest are managed by the methods below.
_UPDATABLE = {"name", "status", "started_at", "ended_at", "worker_pid", "worker_ready", "error", "state_json",
              "log_path", "gpu", "stop_requested", "resume", "runs", "config_json", "output_dir"}


class StoreError(RuntimeError):
    pass


def open_store(url: str | Path) -> "SQLiteStore":
    """``sqlite:////abs/path.db``, ``sqlite:///rel.db`` or a plain file path. ``postgresql://`` is not built yet."""
    text = str(url)
    if text.startswith(("postgres://", "postgresql://")):
        raise StoreError("PostgreSQL stores are not implemented yet; use a SQLite path (sqlite:///jobs.db)")
    if text.startswith("sqlite:///"):
        text = text.removeprefix("sqlite:///")  # sqlite:////abs/path keeps its leading slash
    elif "://" in text:
        raise StoreError(f"unsupported store URL {text!r}: expected a SQLite path or sqlite:///PATH")
    return SQLiteStore(Path(text))


class SQLiteStore:
    """One connection per thread (sqlite3 connections must not cross threads); WAL; 30 s busy timeout."""

    def __init__(self, path: Path):
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Stores written by older versions gain the newer columns (NULL: unknown for their old rows)."""
        have = {row["name"] for row in self._conn().execute("PRAGMA table_info(jobs)")}
        for column, decl in (("owned_json", "TEXT"), ("changed", "INTEGER NOT NULL DEFAULT 0"),
                             ("devices", "INTEGER NOT NULL DEFAULT 1")):
            if column not in have:
                try:
                    self._conn().execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
                except sqlite3.OperationalError:  # another process added it in between
                    pass
        self._conn().executescript(_CHANGE_TRACKING)

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> "SQLiteStore._Tx":
        return SQLiteStore._Tx(self._conn())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- jobs -----------------------------------------------------------------------------------------------
    def create_job(self, config_json: str, output_dir: str, name: str | None = None, job_id: str | None = None,
                   owned: list[str] | None = None, devices: int = 1) -> str:
        """``owned``: the paths this job created (its output directory); deleting its files removes these only.
        ``devices``: how many GPUs (ranks, on a machine without GPUs) the job trains on."""
        job_id = job_id or uuid.uuid4().hex[:12]
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, name, status, config_json, created_at, output_dir, owned_json, devices) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job_id, name, "queued", config_json, time.time(), output_dir, json.dumps(owned or []), int(devices)),
            )
        return job_id

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, status: str | Iterable[str] | None = None) -> list[dict[str, Any]]:
        if status is None:
            rows = self._conn().execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        else:
            wanted = [status] if isinstance(status, str) else list(status)
            marks = ",".join("?" * len(wanted))
            rows = self._conn().execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", wanted).fetchall()
        return [_job(r) for r in rows]

    def changed_since(self, changed: int) -> list[dict[str, Any]]:
        """Jobs written after the write numbered ``changed``, oldest write first (each has its ``changed``)."""
        rows = self._conn().execute("SELECT * FROM jobs WHERE changed > ? ORDER BY changed", (changed,)).fetchall()
        return [_job(r) for r in rows]

    def job_count(self) -> int:
        return self._conn().execute("SELECT count(*) FROM jobs").fetchone()[0]

    def job_ids(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT id FROM jobs")}

    def metric_heads(self, after_seq: int) -> tuple[dict[str, int], int]:
        """({job id: its newest metrics seq} for jobs with rows after ``after_seq``, the newest seq overall)."""
        rows = self._conn().execute("SELECT job_id, max(seq) FROM metrics WHERE seq > ? GROUP BY job_id",
                                    (after_seq,)).fetchall()
        heads = {r[0]: r[1] for r in rows}
        return heads, max(heads.values(), default=after_seq)

    def update(self, job_id: str, **fields: Any) -> None:
        bad = set(fields) - _UPDATABLE
        if bad:
            raise StoreError(f"cannot update {sorted(bad)}")
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def transition(self, job_id: str, allowed_from: Iterable[str], to: str, **fields: Any) -> bool:
        """Set ``status = to`` (and ``fields``) only if the current status is in ``allowed_from``; atomic."""
        bad = set(fields) - _UPDATABLE
        if bad:
            raise StoreError(f"cannot update {sorted(bad)}")
        allowed = list(allowed_from)
        cols = ", ".join(["status = ?", *(f"{k} = ?" for k in fields)])
        marks = ",".join("?" * len(allowed))
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET {cols} WHERE id = ? AND status IN ({marks})",
                (to, *fields.values(), job_id, *allowed),
            )
            return cur.rowcount == 1

    def delete_job(self, job_id: str) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM metrics WHERE job_id = ?", (job_id,))
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 1

    def add_finished_job(self, config_json: str, output_dir: str, name: str | None, status: str,
                         state: dict[str, Any], metrics: list[tuple[int, str, dict[str, Any], float]],
                         created_at: float, ended_at: float, owned: list[str] | None = None) -> str:
        """A job that ran elsewhere (an imported run), recorded already ended with its metric rows
        ``(step, kind, data, time)`` in one transaction: no scheduler ever sees it queued."""
        if status not in FINAL:
            raise StoreError(f"an imported job must have ended ({', '.join(FINAL)}), not {status!r}")
        job_id = uuid.uuid4().hex[:12]
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, name, status, config_json, created_at, started_at, ended_at, output_dir, "
                "state_json, owned_json) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, name, status, config_json, created_at, created_at, ended_at, output_dir,
                 json.dumps(state, default=_json_default), json.dumps(owned or [])),
            )
            db.executemany(
                "INSERT INTO metrics (job_id, step, kind, time, json) VALUES (?,?,?,?,?)",
                [(job_id, int(step), kind, t, json.dumps(data, default=_json_default))
                 for step, kind, data, t in metrics],
            )
        return job_id

    # ---- metrics --------------------------------------------------------------------------------------------
    def add_metric(self, job_id: str, step: int, kind: str, data: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO metrics (job_id, step, kind, time, json) VALUES (?,?,?,?,?)",
                (job_id, int(step), kind, time.time(), json.dumps(data, default=_json_default)),
            )

    def save_progress(self, job_id: str, state: dict[str, Any], metric: tuple[int, str, dict] | None = None) -> None:
        """The worker's per-step write: the state and (optionally) one metrics row in one transaction."""
        now = time.time()
        with self._tx() as db:
            state_json = json.dumps(state, default=_json_default)
            db.execute("UPDATE jobs SET state_json = ? WHERE id = ?", (state_json, job_id))
            if metric is not None:
                step, kind, data = metric
                db.execute(
                    "INSERT INTO metrics (job_id, step, kind, time, json) VALUES (?,?,?,?,?)",
                    (job_id, int(step), kind, now, json.dumps(data, default=_json_default)),
                )

    def truncate_metrics(self, job_id: str, after_step: int) -> None:
        """Drop step/eval rows past ``after_step``: a resumed run redoes those steps."""
        with self._tx() as db:
            db.execute("DELETE FROM metrics WHERE job_id = ? AND step > ?", (job_id, int(after_step)))

    def metrics(self, job_id: str, since_step: int | None = None, after_seq: int | None = None,
                kind: str | None = None, limit: int = 100_000) -> list[dict[str, Any]]:
        sql = "SELECT seq, step, kind, time, json FROM metrics WHERE job_id = ?"
        args: list[Any] = [job_id]
        if since_step is not None:
            sql += " AND step > ?"
            args.append(since_step)
        if after_seq is not None:
            sql += " AND seq > ?"
            args.append(after_seq)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        out = []
        for row in self._conn().execute(sql, args).fetchall():
            rec = json.loads(row["json"])
            rec.update(step=row["step"], kind=row["kind"], time=row["time"], seq=row["seq"])
            out.append(rec)
        return out


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job["stop_requested"] = bool(job["stop_requested"])
    job["worker_ready"] = bool(job["worker_ready"])
    job["resume"] = bool(job["resume"])
    job["state"] = json.loads(job.pop("state_json") or "{}")
    owned = job.pop("owned_json", None)
    job["owned"] = None if owned is None else json.loads(owned)
    return job
