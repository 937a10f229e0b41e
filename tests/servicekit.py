"""Helpers for the service tests: a real server in a subprocess on a free loopback port, tiny data, waits."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(root: Path, n_train: int = 48, n_valid: int = 8) -> Path:
    """Prompt/completion JSONL under ``root/data``: copy a short word sequence."""
    rng = random.Random(0)
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("valid.jsonl", n_valid)):
        with open(d / name, "w") as f:
            for _ in range(n):
                words = " ".join(rng.choice(WORDS) for _ in range(4))
                f.write(json.dumps({"prompt": f"Repeat: {words}\n", "completion": words}) + "\n")
    return d


def job_config(steps: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """A micro-llama job on the data written by ``write_data`` (paths relative to the data root)."""
    cfg: dict[str, Any] = {
        "model": {"name_or_path": "embedded:micro-llama"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": "data/train.jsonl", "valid": "data/valid.jsonl", "max_length": 64},
        "tiers": {"periods": [1, 2, 4]},
        "optim": {"lr": 1e-3, "batch_size": 4},
        "schedule": {"steps": steps},
        "eval": {"every": 4},
        "output": {"tensorboard": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


class Server:
    """``python -m nested_learning.service`` on a free port; stdout/stderr in ``<workdir>/server.log``."""

    def __init__(self, workdir: Path, token: str | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.token = token
        self.extra_args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "Server":
        self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "nested_learning.service", "--port", str(self.port),
               "--workdir", str(self.workdir), "--log-level", "warning", *self.extra_args]
        if self.token:
            cmd += ["--token", self.token]
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        env.pop("NL_API_TOKEN", None)
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not come up in {timeout}s: {self.log()[-3000:]}")

    def log(self) -> str:
        p = self.workdir / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def client(self, token: str | None = "default") -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def kill_workers(workdir: Path) -> None:
    """Teardown: end any worker process a test left behind (by the pids the store recorded)."""
    import sqlite3

    db = Path(workdir) / "jobs.db"
    if not db.exists():
        return
    with sqlite3.connect(db) as conn:
        pids = [r[0] for r in conn.execute("SELECT worker_pid FROM jobs WHERE worker_pid IS NOT NULL")]
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"nested_learning.service.worker" in cmd:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@contextlib.contextmanager
def running_server(root: Path, step_delay: float = 0.1) -> Iterator[Server]:
    """A started server on ``root/work`` holding ``write_data``'s data; each worker step pauses ``step_delay`` s,
    which keeps a job mid-run long enough to stop or kill it on any machine. On exit the server is stopped and
    any worker it left behind is killed. For a module-scoped fixture::

        with running_server(tmp_path_factory.mktemp("svc")) as srv:
            yield srv
    """
    work = Path(root) / "work"
    write_data(work)
    srv = Server(work, env={"NL_WORKER_STEP_DELAY": str(step_delay)}).start()
    try:
        yield srv
    finally:
        srv.stop()
        kill_workers(work)


def wait_for(fn: Callable[[], Any], what: str, timeout: float = 90, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def wait_job(client: httpx.Client, job_id: str, pred: Callable[[dict], bool], what: str, timeout: float = 120) -> dict:
    def check():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if pred(job) else None

    try:
        return wait_for(check, f"job {job_id}: {what}", timeout)
    except AssertionError:
        job = client.get(f"/v1/jobs/{job_id}").json()
        logs = client.get(f"/v1/jobs/{job_id}/logs").text
        raise AssertionError(f"job {job_id}: timed out waiting for {what}; job={job}\nlog:\n{logs[-3000:]}") from None
