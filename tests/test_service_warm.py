"""Warm workers: after a slot's first job the scheduler keeps a spare worker that has already imported torch,
transformers and the trainer, and hands it the slot's next job. The job runs there as it runs cold (same
losses), the spare is recognised as that job's worker (stop, restart), a spare that died leaves the slot cold,
and shutdown ends the spares."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import micro_config, write_data
from nested_learning.service.scheduler import Scheduler, worker_alive
from nested_learning.service.store import open_store

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/comm"), reason="a spare names itself in /proc")


def _wait(fn, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _job(store, tmp_path, name: str, steps: int = 4) -> str:
    cfg = micro_config(write_data(tmp_path / "data"), tmp_path / name, schedule={"steps": steps, "warmup_steps": 1},
                       eval={"every": 0})
    return store.create_job(cfg.model_dump_json(), str(tmp_path / name))


def _ended(store, job_id: str):
    job = store.get_job(job_id)
    return job if job["status"] not in ("queued", "running") else None


def _losses(store, job_id: str) -> list[float]:
    return [m["train_loss"] for m in store.metrics(job_id, kind="train")]


@pytest.fixture
def scheduler(tmp_path):
    store = open_store(str(tmp_path / "jobs.db"))
    made = []

    def make(**env):
        sched = Scheduler(store, tmp_path, gpus=[], poll_s=0.1, warm=True, env={**os.environ, **env})
        made.append(sched)
        sched.start()
        return sched

    yield store, make
    for sched in made:
        sched.shutdown()


def test_a_slot_s_next_job_runs_in_its_warm_worker_with_the_same_losses(scheduler, tmp_path):
    store, make = scheduler
    sched = make()
    first = _job(store, tmp_path, "first")
    sched.wake()
    assert _wait(lambda: _ended(store, first), "the first job")["status"] == "completed"
    spare = sched.spares["cpu"]  # started once the first job had its slot
    spare_log = tmp_path / "logs" / "spare-cpu.log"
    _wait(lambda: spare_log.exists() and "warm, waiting for a job" in spare_log.read_text(), "the spare's imports")
    second = _job(store, tmp_path, "second")
    sched.wake()
    assert _wait(lambda: _ended(store, second), "the second job")["status"] == "completed"
    assert store.get_job(second)["worker_pid"] == spare.pid != store.get_job(first)["worker_pid"]
    assert spare.wait(10) == 0
    log = (tmp_path / "logs" / f"{second}.log").read_text()
    assert f"[worker] job {second} pid {spare.pid}" in log and f"job {second} ended completed" in log
    assert _losses(store, second) == _losses(store, first) and len(_losses(store, first)) == 4
    third_spare = sched.spares["cpu"]  # the slot has its next spare already
    sched.shutdown()
    assert third_spare.wait(20) is not None and not sched.spares


def test_a_job_in_a_spare_is_its_worker_for_stop_and_restart(scheduler, tmp_path):
    store, make = scheduler
    sched = make(NL_WORKER_STEP_DELAY="0.3")
    first = _job(store, tmp_path, "first", steps=2)
    sched.wake()
    _wait(lambda: _ended(store, first), "the first job")
    spare = sched.spares["cpu"]
    second = _job(store, tmp_path, "second", steps=200)
    sched.wake()
    _wait(lambda: store.get_job(second)["worker_ready"] and _losses(store, second), "the second job's first step")
    assert store.get_job(second)["worker_pid"] == spare.pid
    assert worker_alive(spare.pid, second) and not worker_alive(spare.pid, first)
    sched.shutdown(signal_workers=False)  # the server goes away; a new one finds the job's worker alive
    again = make(NL_WORKER_STEP_DELAY="0.3")
    assert second in again.runs and again.runs[second].pid == spare.pid
    again.request_stop(second)  # SIGUSR1 reaches it: worker_alive knows the spare by its name
    job = _wait(lambda: _ended(store, second), "the stop")
    assert job["status"] == "stopped" and 0 < len(_losses(store, second)) < 200


def test_a_spare_that_died_leaves_its_slot_cold(scheduler, tmp_path):
    store, make = scheduler
    sched = make()
    first = _job(store, tmp_path, "first", steps=2)
    sched.wake()
    _wait(lambda: _ended(store, first), "the first job")
    spare = sched.spares["cpu"]
    os.kill(spare.pid, signal.SIGKILL)
    spare.wait(10)
    second = _job(store, tmp_path, "second", steps=2)
    sched.wake()
    assert _wait(lambda: _ended(store, second), "the second job")["status"] == "completed"
    assert store.get_job(second)["worker_pid"] != spare.pid
    assert sched.cold_slots == {"cpu"} and not sched.spares  # no spare restarted for that slot


def test_warm_workers_default_to_gpu_servers(tmp_path):
    store = open_store(str(tmp_path / "jobs.db"))
    assert Scheduler(store, tmp_path, gpus=["0", "1"], warm=None).warm
    assert not Scheduler(store, tmp_path, gpus=[], warm=None).warm  # the CPU: a spare's imports slow the job
    assert Scheduler(store, tmp_path, gpus=[], warm=True).warm and not Scheduler(store, tmp_path, gpus=["0"]).warm
    import argparse

    from nested_learning.service import add_serve_arguments

    parse = add_serve_arguments(argparse.ArgumentParser()).parse_args
    assert parse([]).warm_workers is None and parse(["--warm-workers"]).warm_workers is True
    assert parse(["--cold-workers"]).warm_workers is False
