"""Job operations shared by the /v1 API, the compatibility router and the dashboard.

Routes translate HTTP to these calls and back; nothing here knows about requests or responses.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nested_learning.config import TrainConfig
from nested_learning.service.scheduler import Scheduler
from nested_learning.service.security import PathPolicy, confine_config
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

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).expanduser().resolve()
        self.data_roots = [Path(r).expanduser().resolve() for r in (self.data_roots or [self.workdir])]


class JobError(Exception):
    """A request that cannot be honoured; ``status`` is the HTTP code the API answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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
        "worker_pid": job["worker_pid"],
        "stop_requested": job["stop_requested"],
        "runs": job["runs"],
    }
    if full:
        out["config"] = cfg
    return out


class JobService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = open_store(settings.db)
        self.policy = PathPolicy(settings.data_roots)
        self.scheduler = Scheduler(self.store, settings.workdir, gpus=settings.gpus, poll_s=settings.poll_s)

    def start(self) -> None:
        if self.settings.run_scheduler:
            self.scheduler.start()

    def shutdown(self) -> None:
        if self.settings.run_scheduler:
            self.scheduler.shutdown()

    def get(self, job_id: str) -> dict[str, Any]:
        job = self.store.get_job(job_id)
        if job is None:
            raise JobError(404, f"job {job_id!r} not found")
        return job

    def create(self, cfg: TrainConfig, name: str | None = None) -> dict[str, Any]:
        """Confine the paths (PathNotAllowed → 403) before anything is written, then queue."""
        job_id = _new_id()
        confined = confine_config(cfg, self.policy, self.settings.workdir / "jobs" / job_id)
        _check_data(confined)
        self.store.create_job(confined.model_dump_json(), confined.output.dir, name=name, job_id=job_id)
        job = self.get(job_id)  # as queued, before the scheduler can take it
        self.scheduler.wake()
        return job

    def stop(self, job_id: str) -> dict[str, Any]:
        """Idempotent: a queued job ends ``stopped`` at once; a running one is asked to stop after its step;
        a job that has already ended is left as it is."""
        job = self.get(job_id)
        if job["status"] == "queued" and self.store.transition(job_id, ["queued"], "stopped", ended_at=time.time()):
            return self.get(job_id)
        job = self.get(job_id)
        if job["status"] == "running":
            self.scheduler.request_stop(job_id)
        return self.get(job_id)

    def resume(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if not self.store.transition(job_id, RESUMABLE, "queued", resume=1, stop_requested=0, error=None,
                                     ended_at=None):
            raise JobError(409, f"job {job_id} is {job['status']}; only {', '.join(RESUMABLE)} jobs can be resumed")
        job = self.get(job_id)  # as queued, before the scheduler can take it
        self.scheduler.wake()
        return job

    def delete(self, job_id: str, files: bool = False) -> dict[str, Any]:
        job = self.get(job_id)
        if job["status"] == "running":
            raise JobError(409, f"job {job_id} is running; stop it first")
        if not self.store.delete_job(job_id):
            raise JobError(404, f"job {job_id!r} not found")
        removed = []
        if files:
            for p in (job["output_dir"], job["log_path"]):
                removed += self._remove(p)
        return {"id": job_id, "deleted": True, "removed": removed}

    def _remove(self, path: str | None) -> list[str]:
        if not path:
            return []
        p = Path(path)
        # Only ever delete inside the roots or the workdir, whatever the record says.
        allowed = [*self.policy.roots, self.settings.workdir]
        if not p.exists() or not any(p.resolve().is_relative_to(r) and p.resolve() != r for r in allowed):
            return []
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        return [str(p)]

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        job = self.get(job_id)
        if not Path(job["output_dir"]).exists():
            return []
        from nested_learning.checkpoint import list_checkpoints

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


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]
