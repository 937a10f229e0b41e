"""One job, one process: ``python -m nested_learning.service.worker JOB_ID --db URL``.

The scheduler starts this with the job already marked ``running``. It reads the validated config from the
store, runs ``run_training`` with a callback that writes the trainer's state and one metrics row per step and
evaluation, and records the final status. Stop arrives three ways, all ending in the trainer's ``stop_event``
(the current step finishes, a checkpoint is saved):

- the user: ``stop_requested`` in the store, or SIGUSR1 from the server (immediate) → ``stopped``;
- the server going away: SIGTERM on a clean shutdown, or this process being re-parented after a crash
  → ``interrupted`` (resumable from the checkpoint just written).

An exception is recorded as ``failed`` with its message; the traceback goes to the job's log.

A job of ``devices: N`` runs as N ranks under ``torchrun`` (the scheduler starts it; ``WORLD_SIZE`` says so).
Every rank joins the process group and trains its share; the trainer gives the store callback to rank 0 alone,
so rank 0 writes progress, metrics and the final status. Every rank watches the stop flag and the server (whose
pid ``NL_SERVICE_PID`` names: torchrun, not the server, is a rank's parent); the trainer agrees on a stop at
the end of a step. A rank that fails records ``failed`` with its rank and error first (the others then fail in a
collective, and torchrun ends them all); torchrun passes the server's SIGTERM on to every rank.
``NL_WORKER_STEP_DELAY`` (seconds) slows every step down, for demos and tests that must catch a job mid-run.

``--spare``: a warm worker for one slot (``python -m nested_learning.service.worker --spare --db URL``, started
with that slot's ``CUDA_VISIBLE_DEVICES``). It imports what a job needs (torch, transformers, PEFT, the trainer;
CUDA stays uninitialised) and waits on stdin for the scheduler's one line, ``{"job": ID, "log": PATH}``; then it
writes to the job's log, names itself after the job (``/proc/self/comm``, which ``worker_alive`` reads) and runs
the job as above. End of input before a job (the server went away) ends it. A job it runs starts its first
step without the import time (seconds on a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from nested_learning.config import TrainConfig
from nested_learning.service.store import open_store


class StopSignal:
    """Why the trainer was asked to stop (first reason wins) and the last step the worker had seen then."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None
        self.seen_step: int | None = None
        self.last_step = 0

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.seen_step = self.last_step
        self.event.set()


def _state_dict(state: Any) -> dict[str, Any]:
    d = state.to_dict() if hasattr(state, "to_dict") else dict(vars(state))
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


class StoreCallback:
    """Writes progress to the store; all five Callback hooks of the trainer contract."""

    def __init__(self, store, job_id: str, stop: StopSignal, step_delay: float = 0.0):
        self.store = store
        self.job_id = job_id
        self.stop = stop
        self.step_delay = step_delay

    def _state(self, state: Any) -> dict[str, Any]:
        d = _state_dict(state)
        if self.stop.seen_step is not None:
            d["stop_seen_at_step"] = self.stop.seen_step
        return d

    def on_start(self, state: Any) -> None:
        # A resumed run redoes the steps after its checkpoint: drop their old rows so the charts stay single.
        self.stop.last_step = int(state.step or 0)
        self.store.truncate_metrics(self.job_id, int(state.step or 0))
        self.store.save_progress(self.job_id, self._state(state))

    def on_step(self, state: Any) -> None:
        self.stop.last_step = int(state.step)
        row = {
            "train_loss": state.train_loss,
            "lr": state.lr,
            "grad_norm": state.grad_norm,
            "tokens_per_sec": state.tokens_per_sec,
            "eta_s": state.eta_s,
            "tier_updates": [t.get("updates") for t in (state.tier_stats or [])],
        }
        self.store.save_progress(self.job_id, self._state(state), (state.step, "train", row))
        if self.step_delay:
            time.sleep(self.step_delay)

    def on_eval(self, state: Any) -> None:
        # eval_metrics: val_loss, val_ppl and, when configured, retain_loss[/<set>] and the exact-match scores
        row = {**state.eval_metrics(), "best_val_loss": state.best_val_loss}
        self.store.save_progress(self.job_id, self._state(state), (state.step, "eval", row))

    def on_checkpoint(self, state: Any, path: Any) -> None:
        self.store.save_progress(self.job_id, self._state(state), (state.step, "checkpoint", {"path": str(path)}))

    def on_end(self, state: Any) -> None:
        self.store.save_progress(self.job_id, self._state(state))


def _gone(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _watch(store, job_id: str, stop: StopSignal, parent: int, poll: float = 0.5) -> None:
    service = int(os.environ.get("NL_SERVICE_PID") or 0)
    while not stop.event.is_set():
        if os.getppid() != parent or _gone(service):
            stop.set("server")
            return
        try:
            job = store.get_job(job_id)
        except Exception:  # a locked or vanished store must not kill the run; the next poll retries
            job = {}
        if job is None or (job and job["stop_requested"]):
            stop.set("user")
            return
        time.sleep(poll)


def _has_checkpoint(output_dir: str) -> bool:
    try:
        from nested_learning.train.checkpoint import list_checkpoints

        return bool(list_checkpoints(output_dir))
    except Exception:
        return False


def run_job(db: str, job_id: str) -> int:
    store = open_store(db)
    job = store.get_job(job_id)
    if job is None:
        print(f"job {job_id} not found in {db}", file=sys.stderr)
        return 2
    stop = StopSignal()
    signal.signal(signal.SIGUSR1, lambda *_: stop.set("user"))
    signal.signal(signal.SIGTERM, lambda *_: stop.set("server"))
    signal.signal(signal.SIGINT, lambda *_: stop.set("server"))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        store.update(job_id, worker_pid=os.getpid(), worker_ready=1)  # the server may signal us from now on
    elif rank == 0:
        store.update(job_id, worker_ready=1)  # worker_pid stays torchrun's, the process the scheduler watches
    where = f" rank {rank} of {world}" if world > 1 else ""
    print(f"[worker] job {job_id}{where} pid {os.getpid()} run {job['runs']} resume={job['resume']}", flush=True)
    threading.Thread(target=_watch, args=(store, job_id, stop, os.getppid()), daemon=True).start()
    try:
        cfg = TrainConfig.model_validate_json(job["config_json"])
        if world > 1:
            from nested_learning.train import distributed

            distributed.init_from_env(cfg.distributed.timeout_s, cfg.model.device)
        resume = None
        if job["resume"]:
            resume = "auto"
            if not _has_checkpoint(cfg.output.dir):
                # Nothing to resume from: start afresh in the job's own directory (it may hold partial output).
                cfg.output.overwrite = True
        from nested_learning.train.loop import run_training

        delay = float(os.environ.get("NL_WORKER_STEP_DELAY", "0") or 0)
        state = run_training(cfg, [StoreCallback(store, job_id, stop, delay)], stop_event=stop.event, resume=resume)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the job record
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}".strip()
        if world > 1 and not message.startswith(f"{type(exc).__name__}: rank "):
            message = f"rank {rank} of {world}: {message}"
        # The first rank to fail records its error; the others' (a collective that lost it) find it recorded.
        store.transition(job_id, ["running"], "failed", error=message, ended_at=time.time())
        return 1
    finally:
        if world > 1:
            from nested_learning.train import distributed

            distributed.shutdown()
    if rank != 0:
        return 0  # rank 0 records how the job ended
    status = getattr(state, "status", "completed")
    if status == "stopped" and stop.reason == "server":
        status = "interrupted"
    error = getattr(state, "error", None) if status == "failed" else None
    if status == "interrupted":
        error = "the server went away; resume to continue from the last checkpoint"
    store.save_progress(job_id, {**_state_dict(state), "stop_seen_at_step": stop.seen_step})
    store.transition(job_id, ["running"], status, ended_at=time.time(), error=error, stop_requested=0)
    print(f"[worker] job {job_id} ended {status} at step {getattr(state, 'step', '?')}", flush=True)
    return 0


def _warm_imports() -> None:
    """What every job imports before its first step (torch.compile's inductor too: a CUDA job compiles); none of it
    initialises CUDA."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import nested_learning.train.loop  # noqa: F401
    import nested_learning.train.setup  # noqa: F401


def name_process(job_id: str) -> bool:
    """Call this process by ``job_id`` in ``/proc/<pid>/comm`` (Linux; 15 characters at most)."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(job_id[:15])
        return True
    except OSError:
        return False


def run_spare(db: str) -> int:
    """``--spare``: import, wait for a job on stdin, run it (see the module docstring)."""
    _warm_imports()
    print(f"[worker] spare pid {os.getpid()} warm, waiting for a job", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the server went away (or shut down) before handing us a job
    try:
        order = json.loads(line)
        job_id, log = str(order["job"]), str(order["log"])
    except (ValueError, KeyError, TypeError) as exc:
        print(f"[worker] spare: unreadable hand-off {line!r}: {exc}", file=sys.stderr, flush=True)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    name_process(job_id)
    return run_job(db, job_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nested_learning.service.worker")
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--db", required=True, help="store URL or SQLite path")
    parser.add_argument("--spare", action="store_true", help="import first, then take a job id from stdin")
    args = parser.parse_args(argv)
    if args.spare == bool(args.job_id):
        parser.error("give a job id or --spare (not both)")
    return run_spare(args.db) if args.spare else run_job(args.db, args.job_id)


if __name__ == "__main__":
    raise SystemExit(main())
