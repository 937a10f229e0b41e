"""Job operations shared by the /v1 API, the compatibility router and the dashboard.

Routes translate HTTP to these calls and back; nothing here knows about requests or responses.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nested_learning.config import TrainConfig
from nested_learning.service.scheduler import Scheduler
from nested_learning.service.security import BadPath, PathNotAllowed, PathPolicy, confine_config
from nested_learning.service.store import FINAL, RESUMABLE, open_store


@dataclass
class Settings:
    db: str
    workdir: Path
    data_roots: list[Path] = field(default_factory=list)  # default: [workdir]
    token: str | None = None
    max_body: int = 1_000_000
    gpus: list[str] | None = None  # None: detect
    run_scheduler: bool = True
    poll_s: float = 0.5
    allow_remote_code: bool = False  # `trust_remote_code` in a job or an adapter's config needs this
    cors_origins: list[str] | None = None  # browser origins allowed to call the API; None: loopback ones
    warm_workers: bool | None = None  # a spare worker per slot for its next job (scheduler.py); None: on GPUs

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).expanduser().resolve()
        self.data_roots = [Path(r).expanduser().resolve() for r in (self.data_roots or [self.workdir])]


class JobError(Exception):
    """A request that cannot be honoured; ``status`` is the HTTP code the API answers with and ``field`` the
    request field at fault (the message starts with it too)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


REMOTE_CODE = ("this server runs no model code from a repository; start it with --allow-remote-code to allow "
               "trust_remote_code")


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def job_view(job: dict[str, Any], full: bool = False) -> dict[str, Any]:
    """The public shape of a job: its record plus the trainer's latest state, flattened."""
    st = job["state"] or {}
    cfg = json.loads(job["config_json"])
    out = {
        "id": job["id"],
        "name": job["name"],
        "status": job["status"],
        "step": st.get("step", 0) or 0,
        "total_steps": st.get("total_steps") or cfg["schedule"]["steps"],
        "epoch": st.get("epoch"),
        "train_loss": st.get("train_loss"),
        "val_loss": st.get("val_loss"),
        "best_val_loss": st.get("best_val_loss"),
        "retain_loss": st.get("retain_loss"),  # eval.retain: mean over the sets; per set under "retain"
        "retain": st.get("retain") or {},
        "val_exact_match": st.get("val_exact_match"),
        "retain_exact_match": st.get("retain_exact_match"),
        "lr": st.get("lr"),
        "grad_norm": st.get("grad_norm"),
        "tokens_per_sec": st.get("tokens_per_sec"),
        "tokens_seen": st.get("tokens_seen"),
        "eta_s": st.get("eta_s") if job["status"] == "running" else None,
        "tier_stats": st.get("tier_stats") or [],
        "early_stopped": st.get("early_stopped", False),
        "last_checkpoint": st.get("last_checkpoint"),
        "best_checkpoint": st.get("best_checkpoint"),
        "stop_seen_at_step": st.get("stop_seen_at_step"),
        "error": job["error"],
        "created_at": iso(job["created_at"]),
        "started_at": iso(job["started_at"]),
        "ended_at": iso(job["ended_at"]),
        "output_dir": job["output_dir"],
        "model": cfg["model"]["name_or_path"],
        "gpu": job["gpu"],
        "devices": job.get("devices") or 1,
        "worker_pid": job["worker_pid"],
        "stop_requested": job["stop_requested"],
        "runs": job["runs"],
    }
    if full:
        out["config"] = cfg
        out["tier_plan"] = st.get("tier_plan") or ""  # the run's printed plans, as the CLI shows them
        out["speed_plan"] = st.get("speed_plan") or ""
    return out


class JobViews:
    """The server's copy of every job's public view, so status reads cost no SQLite query and no thread hop.

    One thread reads the rows written since it last looked (the store's ``changed`` order) every ``interval``
    seconds: a worker's progress shows within that. The service refreshes at once after its own writes, so a
    client reads what it just did. Views are kept serialised too: a poll answers with ready bytes."""

    def __init__(self, store, interval: float = 0.2):
        self.store = store
        self.interval = interval
        self._lock = threading.RLock()
        # id -> (seq, the list view, the full view, the full view's JSON)
        self._views: dict[str, tuple[int, dict[str, Any], dict[str, Any], bytes]] = {}
        self._changed = -1
        self._heads: dict[str, int] = {}  # id -> newest metrics seq
        self._metric_seq = 0
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        with self._lock:
            rows = self.store.changed_since(self._changed)
            for job in rows:
                full = job_view(job, full=True)
                self._views[job["id"]] = (job["seq"], job_view(job), full, json.dumps(full).encode())
                self._changed = max(self._changed, job["changed"])
            heads, self._metric_seq = self.store.metric_heads(self._metric_seq)
            self._heads.update(heads)
            if len(self._views) != self.store.job_count():  # a job deleted by another process
                for job_id in set(self._views) - self.store.job_ids():
                    self.forget(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._views.pop(job_id, None)
            self._heads.pop(job_id, None)

    # Readers take no lock (they run on the event loop): one dict lookup, or list() of the values, is atomic
    # under the GIL, and refresh() replaces entries whole.
    def get(self, job_id: str) -> tuple[dict[str, Any], bytes] | None:
        """(the full view, its JSON), or None."""
        entry = self._views.get(job_id)
        return None if entry is None else entry[2:]

    def summary(self, job_id: str) -> dict[str, Any] | None:
        """The view ``GET /v1/jobs`` lists (no config), or None."""
        entry = self._views.get(job_id)
        return None if entry is None else entry[1]

    def all(self, status: str | None = None) -> list[dict[str, Any]]:
        views = sorted(list(self._views.values()), key=lambda e: e[0])
        return [v for _, v, _, _ in views if status is None or v["status"] == status]

    def metric_head(self, job_id: str) -> int:
        return self._heads.get(job_id, 0)

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="nl-job-views", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.refresh()
            except Exception as exc:  # a busy or briefly locked store: the next round catches up
                print(f"[job-views] {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


class JobService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = open_store(settings.db)
        self.policy = PathPolicy(settings.data_roots)
        self.scheduler = Scheduler(self.store, settings.workdir, gpus=settings.gpus, poll_s=settings.poll_s,
                                   warm=settings.warm_workers)
        self.views = JobViews(self.store)

    def start(self) -> None:
        if self.settings.run_scheduler:
            self.scheduler.start()  # recovers first: jobs whose worker died are `interrupted` in the first views
        self.views.start()

    def shutdown(self) -> None:
        if self.settings.run_scheduler:
            self.scheduler.shutdown()
        self.views.stop()

    def view(self, job_id: str) -> tuple[dict[str, Any], bytes]:
        """A job's public view (and its JSON) from the cache; one refresh before a 404, for a job that was
        created a moment ago by another process."""
        entry = self.views.get(job_id)
        if entry is None:
            self.views.refresh()
            entry = self.views.get(job_id)
        if entry is None:
            raise JobError(404, f"job {job_id!r} not found")
        return entry

    def get(self, job_id: str) -> dict[str, Any]:
        job = self.store.get_job(job_id)
        if job is None:
            raise JobError(404, f"job {job_id!r} not found")
        return job

    # ---- paths the service keeps for itself ------------------------------------------------------------------
    def reserved(self) -> list[Path]:
        """The job store (with SQLite's -wal/-shm files), the logs and the default job outputs: no job's
        output directory may be, contain or lie inside any of them, so deleting a job's files never takes them."""
        db = self.store.path
        work = self.settings.workdir
        return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), work / "logs", work / "jobs"]

    def _check_output_dir(self, out: Path, job_id: str) -> None:
        """A new job writes into a directory of its own: one that does not exist yet, clear of the service's
        files and of every other job's output."""
        field = "output.dir"
        if out == self.settings.workdir / "jobs" / job_id:
            return  # the default: a fresh directory named by the new id
        for keep in self.reserved():
            if out == keep or out.is_relative_to(keep) or keep.is_relative_to(out):
                raise JobError(409, f"{field}: {out} overlaps {keep}, which the service keeps for itself; "
                                    "choose another directory or leave output.dir unset", field)
        if os.path.lexists(out):
            raise JobError(409, f"{field}: {out} already exists; a job writes into a new directory of its own "
                                "(choose another or leave output.dir unset)", field)
        for other in self.store.list_jobs():
            theirs = Path(other["output_dir"])
            if out.is_relative_to(theirs) or theirs.is_relative_to(out):
                raise JobError(409, f"{field}: {out} overlaps job {other['id']}'s output directory {theirs}", field)

    def create(self, cfg: TrainConfig, name: str | None = None, devices: int = 1) -> dict[str, Any]:
        """Check everything before anything is written (PathNotAllowed → 403, bad data or output → 4xx), then
        create the output directory, record it as the job's own and queue. ``devices``: GPUs (or, on a server
        without GPUs, CPU ranks) the job trains on data-parallel."""
        if cfg.model.trust_remote_code and not self.settings.allow_remote_code:
            raise JobError(403, f"model.trust_remote_code: {REMOTE_CODE}", "model.trust_remote_code")
        self._check_devices(cfg, devices)
        job_id = _new_id()
        confined = confine_config(cfg, self.policy, self.settings.workdir / "jobs" / job_id)
        _check_data(confined)
        out = Path(confined.output.dir)
        self._check_output_dir(out, job_id)
        if out.parent == self.settings.workdir / "jobs":
            out.parent.mkdir(parents=True, exist_ok=True)  # the service's own, shared by every default output
        owned = _make_dir(out, "output.dir")
        try:
            self.store.create_job(confined.model_dump_json(), confined.output.dir, name=name, job_id=job_id,
                                  owned=[str(owned)], devices=devices)
        except BaseException:
            shutil.rmtree(owned, ignore_errors=True)  # empty: made a moment ago
            raise
        job = self.get(job_id)  # as queued, before the scheduler can take it
        self.views.refresh()
        self.scheduler.wake()
        return job

    def _check_devices(self, cfg: TrainConfig, devices: int) -> None:
        """A multi-device job runs under torchrun: torch backend only, and no more GPUs than the server has
        (on a server without GPUs, no more ranks than CPU cores)."""
        if devices < 1:
            raise JobError(422, f"devices: {devices} is not a device count (1 or more)", "devices")
        if devices == 1:
            return
        if cfg.backend != "torch":
            raise JobError(422, f"devices: {devices} devices need backend torch (data-parallel under torchrun), "
                                f"not {cfg.backend}", "devices")
        gpus = self.scheduler.gpus
        if gpus and devices > len(gpus):
            raise JobError(422, f"devices: {devices} GPUs asked; this server has {len(gpus)} "
                                f"({', '.join(gpus)})", "devices")
        cores = os.cpu_count() or 1
        if not gpus and devices > cores:
            raise JobError(422, f"devices: {devices} ranks asked; this server has no GPU and {cores} CPU cores",
                           "devices")

    def stop(self, job_id: str) -> dict[str, Any]:
        """Idempotent: a queued job ends ``stopped`` at once; a running one is asked to stop after its step;
        a job that has already ended is left as it is."""
        job = self.get(job_id)
        if job["status"] == "queued" and self.store.transition(job_id, ["queued"], "stopped", ended_at=time.time()):
            self.views.refresh()
            return self.get(job_id)
        job = self.get(job_id)
        if job["status"] == "running":
            self.scheduler.request_stop(job_id)
            self.views.refresh()
        return self.get(job_id)

    def resume(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if not self.store.transition(job_id, RESUMABLE, "queued", resume=1, stop_requested=0, error=None,
                                     ended_at=None):
            raise JobError(409, f"job {job_id} is {job['status']}; only {', '.join(RESUMABLE)} jobs can be resumed")
        job = self.get(job_id)  # as queued, before the scheduler can take it
        self.views.refresh()
        self.scheduler.wake()
        return job

    def delete(self, job_id: str, files: bool = False) -> dict[str, Any]:
        """Remove the record; with ``files`` also what the job created (its output directory as recorded at
        creation, its log) and nothing else: ``kept`` names each path left in place and why."""
        job = self.get(job_id)
        if job["status"] == "running":
            raise JobError(409, f"job {job_id} is running; stop it first")
        if not self.store.delete_job(job_id):
            raise JobError(404, f"job {job_id!r} not found")
        self.views.forget(job_id)
        removed: list[str] = []
        kept: list[str] = []
        if files:
            others = [Path(j["output_dir"]) for j in self.store.list_jobs()]
            owned = job["owned"]
            if owned is None:  # a record from before ownership was kept: only the default directory is surely its
                default = self.settings.workdir / "jobs" / job_id
                owned = [str(default)] if Path(job["output_dir"]) == default else []
            if job["output_dir"] and not any(Path(job["output_dir"]).is_relative_to(p) for p in owned):
                kept.append(f"{job['output_dir']}: not created by this job")
            for path in owned:
                why = self._why_not_removable(Path(path), others)
                if why:
                    kept.append(f"{path}: {why}")
                else:
                    shutil.rmtree(path)
                    removed.append(path)
            log = self.settings.workdir / "logs" / f"{job_id}.log"
            if job["log_path"] and Path(job["log_path"]) == log and log.is_file():
                log.unlink()
                removed.append(str(log))
        return {"id": job_id, "deleted": True, "removed": removed, "kept": kept}

    def _why_not_removable(self, p: Path, others: list[Path]) -> str | None:
        """Checked again at deletion, whatever the record says: a directory inside a root, not a symlink, and
        holding neither the service's files nor another job's output."""
        if not os.path.lexists(p):
            return "already gone"
        if p.is_symlink() or not p.is_dir():
            return "no longer the directory the job created"
        if not any(p.is_relative_to(r) and p != r for r in [*self.policy.roots, self.settings.workdir]):
            return "outside the data roots"
        for keep in [*self.reserved(), *others]:
            if keep.is_relative_to(p):
                return f"it holds {keep}"
        return None

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        job = self.get(job_id)
        if not Path(job["output_dir"]).exists():
            return []
        from nested_learning.train.checkpoint import list_checkpoints

        return [{k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()}
                for c in list_checkpoints(job["output_dir"])]

    def inference_checkpoint(self, job_id: str) -> str:
        """The checkpoint generation uses for a job: ``best``, else ``last``, else the latest ``step-N``."""
        ckpts = self.checkpoints(job_id)
        if not ckpts:
            raise JobError(409, f"job {job_id} has no checkpoint yet")
        by_name = {c["name"]: c for c in ckpts}
        chosen = by_name.get("best") or by_name.get("last") or max(ckpts, key=lambda c: c.get("step") or 0)
        return str(chosen["path"])

    def adapter_base(self, path: str, field: str) -> str:
        """The base model a checkpoint's config.yaml names, passed through the path policy like a job's
        ``model.name_or_path``; its ``trust_remote_code`` needs the server's --allow-remote-code."""
        from nested_learning.config import ConfigError, load_config

        p = Path(path)
        if not p.is_dir() or not (p / "adapter_config.json").is_file():
            raise JobError(422, f"{field}: {path} is not a checkpoint directory (no adapter_config.json)", field)
        config_file = p / "config.yaml"
        if (p / "adapters.safetensors").is_file() and not (p / "adapter_model.safetensors").is_file():
            raise JobError(422, f"{field}: {path} is an old mlx-lm adapter; convert it first: nested-learning "
                                f"convert-adapter {path} DST --to peft --base MODEL (then train or import with it)",
                           field)
        if not config_file.is_file():
            raise JobError(422, f"{field}: {path} has no config.yaml naming its base model", field)
        try:
            model = load_config(config_file).model
        except ConfigError as exc:
            raise JobError(422, f"{field}: {exc}", field) from None
        if model.trust_remote_code and not self.settings.allow_remote_code:
            raise JobError(403, f"{field}: {config_file} sets model.trust_remote_code; {REMOTE_CODE}", field)
        try:
            return self.policy.model(model.name_or_path)
        except (PathNotAllowed, BadPath) as exc:
            raise JobError(403 if isinstance(exc, PathNotAllowed) else 422,
                           f"{field}: the base model named in {config_file} is refused: {exc}", field) from None

    def log_tail(self, job_id: str, lines: int) -> str:
        job = self.get(job_id)
        path = job["log_path"] or str(self.settings.workdir / "logs" / f"{job_id}.log")
        if not Path(path).exists():
            return ""
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 2_000_000))
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) + "\n"

    def is_final(self, job: dict[str, Any]) -> bool:
        return job["status"] in FINAL


def _check_data(cfg: TrainConfig) -> None:
    """Missing data is a 422 now rather than a failed job later."""
    d = cfg.data
    if not d.dir and not d.train:
        raise JobError(422, "data: no training data; set data.train (a JSONL file) or data.dir")
    for key, path, want_dir in (("data.dir", d.dir, True), ("data.train", d.train, False),
                                ("data.valid", d.valid, False)):
        if path and not (Path(path).is_dir() if want_dir else Path(path).is_file()):
            raise JobError(422, f"{key}: {'directory' if want_dir else 'file'} not found: {path}")
    for name, path in cfg.eval.retain.items():
        if not Path(path).is_file():
            raise JobError(422, f"eval.retain.{name}: file not found: {path}")
    if cfg.lora.init_adapter:
        from nested_learning.inference.convert import AdapterError, adapter_format

        try:
            adapter_format(cfg.lora.init_adapter)
        except AdapterError as exc:
            raise JobError(422, f"lora.init_adapter: {exc}", "lora.init_adapter") from None


def _make_dir(out: Path, field: str) -> Path:
    """Create ``out`` (and missing parents); return the topmost directory this created, which the job owns."""
    top = out
    while not os.path.lexists(top.parent) and top.parent != top:
        top = top.parent
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        raise JobError(409, f"{field}: {out} already exists", field) from None
    except NotADirectoryError:
        raise JobError(422, f"{field}: cannot create {out}: a parent is a file, not a directory", field) from None
    except OSError as exc:  # read-only mount, no permission, no space
        raise JobError(422, f"{field}: cannot create {out}: {exc.strerror or exc}", field) from None
    return top


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]
