"""Starts queued jobs in worker processes and notices when they end.

One slot per GPU (the worker sees only its own through ``CUDA_VISIBLE_DEVICES``), one slot on a machine with
none. Jobs start in the order they were queued. A job of ``devices: N`` waits for N free GPUs (later jobs wait
behind it, so it is never starved) and runs under ``torchrun --standalone --nproc-per-node N``, one rank per GPU;
on a machine without GPUs it takes the one CPU slot and runs N gloo ranks. A worker that exits while its job still reads ``running``
died without a word (a crash, SIGKILL, the OOM killer): the job becomes ``failed`` with the exit code or signal.

On start, ``recover()`` looks at every job the store says is running: a worker still alive (the server
restarted under it) is watched by its pid until it exits; a job whose worker is gone becomes ``interrupted``.

With ``warm`` (the service's default on GPUs), once a slot has started a one-device job it keeps a spare worker
(``worker --spare``) that has already imported torch, transformers and the trainer; the slot's next job is handed
to it, so a stream of short jobs pays the imports once per slot, not once per job. A spare that died before its
job arrived turns warm workers off for that slot (the job starts cold, as every job does without ``warm``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def detect_gpus() -> list[str]:
    """GPU ids for the slots: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi -L``; no torch import."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
        except (OSError, subprocess.SubprocessError):
            return []
    return []


def worker_alive(pid: int | None, job_id: str) -> bool:
    """Is ``pid`` a live worker of ``job_id``? (/proc guards against a recycled pid on Linux.)"""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        if b"nested_learning.service.worker" not in args:
            return False
        if job_id.encode() in args:
            return True
        return b"--spare" in args and _comm(pid) == job_id[:15]  # a spare names itself after its job
    return True


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "worker exited without recording a final status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker killed by {name}"
    return f"worker exited with code {code} without recording a final status"


def is_mlx_job(job: dict) -> bool:
    """A job whose config says ``backend: mlx``. MLX jobs run one at a time: MLX has one device per machine
    (one Metal GPU on a Mac), which parallel workers would only share and oversubscribe."""
    try:
        return json.loads(job.get("config_json") or "{}").get("backend") == "mlx"
    except (ValueError, AttributeError):
        return False


def job_devices(job: dict) -> int:
    return int(job.get("devices") or 1)


def spare_command(db_url: str) -> list[str]:
    return [sys.executable, "-m", "nested_learning.service.worker", "--spare", "--db", db_url]


def worker_command(job: dict, db_url: str) -> list[str]:
    """The worker's command line: the worker module itself, or torchrun starting one per device. torchrun's
    own command line names the worker module and the job id too, so ``worker_alive`` recognises it."""
    worker = ["-m", "nested_learning.service.worker", job["id"], "--db", db_url]
    n = job_devices(job)
    if n == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *worker]


@dataclass
class _Run:
    job_id: str
    slots: tuple[str, ...]
    pid: int
    proc: subprocess.Popen | None  # None: adopted from a previous server, watched by pid
    mlx: bool = False


class Scheduler:
    def __init__(self, store, workdir: Path, gpus: list[str] | None = None, poll_s: float = 0.5,
                 env: dict[str, str] | None = None, warm: bool | None = False):
        self.store = store
        self.workdir = Path(workdir)
        self.gpus = detect_gpus() if gpus is None else list(gpus)
        self.slots = self.gpus or ["cpu"]
        self.poll_s = poll_s
        self.env = env
        self.runs: dict[str, _Run] = {}
        # None: warm on GPU slots only (a spare's imports take CPU cores from a job training on the CPU).
        self.warm = bool(self.gpus) if warm is None else warm
        self.spares: dict[str, subprocess.Popen] = {}  # slot -> its warm worker, waiting for a job
        self.cold_slots: set[str] = set()  # slots whose spare died before a job reached it
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="nl-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, signal_workers: bool = True) -> None:
        """Stop scheduling; ask our workers to checkpoint and end ``interrupted`` (they do so on SIGTERM)."""
        self._halt.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._end_spares()
        if signal_workers:
            with self._lock:
                for run in self.runs.values():
                    if worker_alive(run.pid, run.job_id):
                        try:
                            os.kill(run.pid, signal.SIGTERM)
                        except OSError:
                            pass

    def wake(self) -> None:
        self._wake.set()

    def recover(self) -> None:
        for job in self.store.list_jobs("running"):
            if worker_alive(job["worker_pid"], job["id"]):
                slots = tuple(job["gpu"].split(",")) if job["gpu"] else ("cpu",)
                self.runs[job["id"]] = _Run(job["id"], slots, job["worker_pid"], None, is_mlx_job(job))
            else:
                self.store.transition(job["id"], ["running"], "interrupted", ended_at=time.time(),
                                      error="the worker was gone when the server started; resume to continue")

    def request_stop(self, job_id: str) -> None:
        """Flag in the store (seen within a poll) and SIGUSR1 to the worker (seen at once). A multi-device job's
        pid is torchrun's, which SIGUSR1 would kill: its ranks see the flag (every rank polls it; they agree on
        the stop at the end of a step)."""
        self.store.update(job_id, stop_requested=1)
        with self._lock:
            run = self.runs.get(job_id)
        job = self.store.get_job(job_id)
        # Before its handlers are in place SIGUSR1 would kill the worker; until then the store flag does it.
        if run is not None and job is not None and job["worker_ready"] and job_devices(job) == 1 \
                and worker_alive(run.pid, job_id):
            try:
                os.kill(run.pid, signal.SIGUSR1)
            except OSError:
                pass

    # ---- the loop -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._halt.is_set():
            try:
                self._reap()
                self._launch()
            except Exception as exc:  # a store hiccup must not end scheduling
                print(f"[scheduler] {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _reap(self) -> None:
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            if run.proc is not None:
                code = run.proc.poll()
                if code is None:
                    continue
            else:
                if worker_alive(run.pid, run.job_id):
                    continue
                code = None
            with self._lock:
                self.runs.pop(run.job_id, None)
            job = self.store.get_job(run.job_id)
            if job is not None and job["status"] == "running":
                self.store.transition(run.job_id, ["running"], "failed", error=describe_exit(code),
                                      ended_at=time.time())

    def _launch(self) -> None:
        if self._halt.is_set():
            return
        with self._lock:
            busy = {s for r in self.runs.values() for s in r.slots}
            mlx_running = any(r.mlx for r in self.runs.values())
        free = [s for s in self.slots if s not in busy]
        while free:
            # The oldest queued job that may start: an MLX job waits while another MLX job runs.
            queued = [j for j in self.store.list_jobs("queued") if not (mlx_running and is_mlx_job(j))]
            if not queued:
                return
            job = queued[0]
            need = job_devices(job) if self.gpus else 1  # without GPUs, N ranks share the one CPU slot
            if need > len(self.slots):  # queued before the server restarted with fewer GPUs
                self.store.transition(job["id"], ["queued"], "failed", ended_at=time.time(),
                                      error=f"devices: {need} GPUs asked; this server has {len(self.slots)}")
                continue
            if need > len(free):
                return  # it waits for enough free GPUs; the jobs behind it wait too, so it is never starved
            slots = tuple(free[:need])
            if not self.store.transition(job["id"], ["queued"], "running", started_at=time.time(), ended_at=None,
                                         gpu=None if slots == ("cpu",) else ",".join(slots), runs=job["runs"] + 1,
                                         error=None, worker_ready=0):
                continue  # stopped or deleted in between
            free = free[need:]
            self._spawn(job, slots)
            mlx_running = mlx_running or is_mlx_job(job)

    def _env(self, slots: tuple[str, ...]) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env["CUDA_VISIBLE_DEVICES"] = "" if slots == ("cpu",) else ",".join(slots)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Ranks are torchrun's children, not ours: they watch this pid to notice the server going away.
        env["NL_SERVICE_PID"] = str(os.getpid())
        return env

    def _spawn(self, job: dict, slots: tuple[str, ...]) -> None:
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{job['id']}.log"
        slot = ",".join(slots)
        one = self.warm and len(slots) == 1 and job_devices(job) == 1
        try:
            with open(log_path, "ab") as log:
                log.write(f"=== run {job['runs'] + 1} on {slot} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
                log.flush()
                proc = self._hand_to_spare(job["id"], slot, log_path) if one else None
                if proc is None:
                    # Own session: a Ctrl-C at the server's terminal reaches the server, which then stops workers
                    # cleanly.
                    proc = subprocess.Popen(worker_command(job, self.store.url), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self._env(slots), cwd=str(self.workdir),
                                            start_new_session=True)
        except OSError as exc:
            self.store.transition(job["id"], ["running"], "failed", error=f"could not start worker: {exc}",
                                  ended_at=time.time())
            return
        with self._lock:
            self.runs[job["id"]] = _Run(job["id"], slots, proc.pid, proc, is_mlx_job(job))
        self.store.update(job["id"], worker_pid=proc.pid, log_path=str(log_path))
        if one:
            self._start_spare(slot)  # warm for this slot's next job

    # ---- warm workers -------------------------------------------------------------------------------------
    def _start_spare(self, slot: str) -> None:
        if self._halt.is_set() or slot in self.cold_slots or slot in self.spares:
            return
        log_path = self.workdir / "logs" / f"spare-{slot}.log"
        try:
            with open(log_path, "ab") as log:
                self.spares[slot] = subprocess.Popen(spare_command(self.store.url), stdin=subprocess.PIPE,
                                                     stdout=log, stderr=subprocess.STDOUT, env=self._env((slot,)),
                                                     cwd=str(self.workdir), start_new_session=True)
        except OSError as exc:
            print(f"[scheduler] no warm worker for slot {slot}: {exc}", file=sys.stderr, flush=True)
            self.cold_slots.add(slot)

    def _hand_to_spare(self, job_id: str, slot: str, log_path: Path) -> subprocess.Popen | None:
        """The slot's spare, now running ``job_id``; None when there is none to take it (start cold then)."""
        spare = self.spares.pop(slot, None)
        if spare is None:
            return None
        if spare.poll() is not None:
            self.cold_slots.add(slot)  # it died waiting (see its log): no more spares for this slot
            print(f"[scheduler] the warm worker of slot {slot} exited ({describe_exit(spare.returncode)}); "
                  f"jobs on it start cold", file=sys.stderr, flush=True)
            return None
        try:
            spare.stdin.write((json.dumps({"job": job_id, "log": str(log_path)}) + "\n").encode())
            spare.stdin.close()
        except OSError:  # it died just now
            self.cold_slots.add(slot)
            return None
        return spare

    def _end_spares(self) -> None:
        """Spares waiting for a job read end of input and exit; ones still importing are terminated."""
        for slot, spare in list(self.spares.items()):
            self.spares.pop(slot, None)
            try:
                spare.stdin.close()
                spare.terminate()
                spare.wait(timeout=5)  # no handlers yet: SIGTERM ends it at once
            except (OSError, subprocess.TimeoutExpired):
                spare.kill()
