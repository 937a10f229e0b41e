"""Jobs on several devices: ``POST /v1/jobs?devices=N`` runs the worker under torchrun, one rank per device.

Without GPUs the ranks are gloo processes on the CPU, which is what the end-to-end tests use (2 ranks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import adapter_tensors
from servicekit import Server, job_config, kill_workers, wait_for, wait_job, write_data

# Full-logits loss (the chunked one is slow on a CPU), no evaluation, a short collective timeout.
TINY = dict(speed={"loss_chunk_tokens": 0}, eval={"every": 0}, checkpoint={"save_best": False},
            schedule={"warmup_steps": 0}, distributed={"timeout_s": 60})


# ------------------------------------------------------------------------------------------ in-process
def test_scheduler_gives_a_job_n_gpus_and_launches_torchrun(tmp_path, monkeypatch):
    """Three GPUs, jobs asking 2, 2 and 1 in that order: the first takes GPUs 0,1 under torchrun; the second
    waits for two free GPUs and the 1-GPU job waits behind it (no starving), until the first ends."""
    from nested_learning.service import scheduler as sched_mod
    from nested_learning.service.store import open_store

    store = open_store(str(tmp_path / "jobs.db"))
    ids = [store.create_job("{}", str(tmp_path / f"out{i}"), devices=n) for i, n in enumerate([2, 2, 1])]
    sched = sched_mod.Scheduler(store, tmp_path, gpus=["0", "1", "2"])
    launched: list[tuple[str, list[str], str]] = []

    class FakePopen:
        def __init__(self, cmd, env, **kw):
            self.pid = 10_000 + len(launched)
            launched.append((cmd[cmd.index("nested_learning.service.worker") + 1], cmd, env["CUDA_VISIBLE_DEVICES"]))

    monkeypatch.setattr(sched_mod.subprocess, "Popen", FakePopen)
    sched._launch()
    assert [(j, gpus) for j, _, gpus in launched] == [(ids[0], "0,1")]
    cmd = launched[0][1]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["-m", "nested_learning.service.worker", ids[0], "--db", store.url]
    assert store.get_job(ids[0])["gpu"] == "0,1" and store.get_job(ids[1])["status"] == "queued"
    assert store.get_job(ids[2])["status"] == "queued"  # behind the 2-GPU job, though GPU 2 is free

    sched.runs.pop(ids[0])  # the first job ended
    store.transition(ids[0], ["running"], "completed")
    sched._launch()
    assert [(j, gpus) for j, _, gpus in launched[1:]] == [(ids[1], "0,1"), (ids[2], "2")]
    assert launched[2][1][1:3] == ["-m", "nested_learning.service.worker"]  # one device: no torchrun


def test_a_job_asking_for_more_devices_than_the_server_has_is_refused(tmp_path):
    from conftest import micro_config
    from nested_learning.service.jobs import JobError, JobService, Settings

    data = write_data(tmp_path)
    cfg = micro_config(data, tmp_path / "out")
    svc = JobService(Settings(db=str(tmp_path / "jobs.db"), workdir=tmp_path, gpus=["0", "1"], run_scheduler=False))
    with pytest.raises(JobError) as err:
        svc.create(cfg, devices=3)
    assert err.value.field == "devices" and err.value.status == 422
    assert str(err.value) == "devices: 3 GPUs asked; this server has 2 (0, 1)"
    with pytest.raises(JobError, match="^devices: 2 devices need backend torch"):
        svc.create(micro_config(data, tmp_path / "out", backend="mlx"), devices=2)
    assert svc.store.list_jobs() == [] and not (tmp_path / "out").exists()  # nothing written for a refusal
    job = svc.create(cfg, devices=2)
    assert job["devices"] == 2 and job["status"] == "queued"


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # No GPU even where there are some: `devices` then counts gloo ranks on the CPU.
    work = tmp_path_factory.mktemp("svc-devices") / "work"
    write_data(work)
    srv = Server(work, env={"NL_WORKER_STEP_DELAY": "0.05", "CUDA_VISIBLE_DEVICES": ""}).start()
    try:
        yield srv
    finally:
        srv.stop()
        kill_workers(work)


def job_processes(job_id: str) -> list[int]:
    """Pids whose command line names the job (torchrun and its ranks)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if job_id.encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def last_adapter(client, job_id: str) -> dict:
    ckpts = {ck["name"]: ck for ck in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]}
    return ckpts["last"]


def test_two_ranks_equal_one_process_with_the_doubled_batch(server):
    c = server.client()
    too_many = c.post("/v1/jobs", json=job_config(2), params={"devices": (os.cpu_count() or 1) + 1})
    assert too_many.status_code == 422 and too_many.json()["field"] == "devices", too_many.text
    zero = c.post("/v1/jobs", json=job_config(2), params={"devices": 0})
    assert zero.status_code == 422 and "devices" in json.dumps(zero.json()["detail"])

    # optim.batch_size is per rank: 2 ranks x 2 is the global batch of 1 process x 4.
    two = c.post("/v1/jobs", json=job_config(6, optim={"batch_size": 2}, **TINY), params={"devices": 2})
    one = c.post("/v1/jobs", json=job_config(6, optim={"batch_size": 4}, **TINY))
    assert two.status_code == 201 and one.status_code == 201, (two.text, one.text)
    two, one = two.json()["id"], one.json()["id"]
    done = [wait_job(c, j, lambda j: j["status"] in ("completed", "failed"), "the end", timeout=90) for j in (two, one)]
    assert [d["status"] for d in done] == ["completed", "completed"], [d["error"] for d in done]
    assert done[0]["devices"] == 2 and done[0]["gpu"] is None and done[1]["devices"] == 1

    # Rank 0 alone writes metrics: one train row per step.
    rows = c.get(f"/v1/jobs/{two}/metrics", params={"kind": "train"}).json()["metrics"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    ref_rows = c.get(f"/v1/jobs/{one}/metrics", params={"kind": "train"}).json()["metrics"]
    for got, want in zip(rows, ref_rows):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)

    got, want = (last_adapter(c, j) for j in (two, one))
    assert got["step"] == want["step"] == 6
    a, b = adapter_tensors(got["path"]), adapter_tensors(want["path"])
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-5, key
    log = c.get(f"/v1/jobs/{two}/logs").text
    assert f"[worker] job {two} rank 0 of 2" in log and f"[worker] job {two} rank 1 of 2" in log


def test_stopping_a_two_rank_job_checkpoints_and_ends_every_rank(server):
    from nested_learning.service.scheduler import worker_alive

    c = server.client()
    job_id = c.post("/v1/jobs", json=job_config(60, **TINY), params={"devices": 2}).json()["id"]
    running = wait_job(c, job_id, lambda j: j["status"] == "running" and j["step"] >= 2, "step 2", timeout=60)
    assert c.post(f"/v1/jobs/{job_id}/stop").status_code == 200
    job = wait_job(c, job_id, lambda j: j["status"] != "running", "the stop", timeout=30)
    assert job["status"] == "stopped" and job["error"] is None, job
    assert 2 <= job["step"] < 60
    assert last_adapter(c, job_id)["step"] == job["step"]  # the checkpoint is at the step it stopped on
    # torchrun (the pid the scheduler watches) and its ranks are gone.
    wait_for(lambda: not worker_alive(running["worker_pid"], job_id) and not job_processes(job_id),
             "torchrun and its ranks to exit", timeout=20)
    log = c.get(f"/v1/jobs/{job_id}/logs").text
    assert f"[worker] job {job_id} ended stopped at step {job['step']}" in log
