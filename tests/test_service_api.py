"""The /v1 API against a real server (subprocess, random loopback port) running micro-llama jobs.

One server for the module; the tests share its single CPU slot, so they run one job at a time, in order.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest

from servicekit import job_config, running_server, wait_for, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("svc")) as srv:
        yield srv


def read_events(client, job_id: str, timeout: float = 120) -> list[tuple[str, dict]]:
    """Read the job's SSE stream until its `end` event."""
    events, current = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if line == "":
                if current:
                    events.append((current.get("event", "message"), json.loads(current["data"])))
                    if current.get("event") == "end":
                        break
                current = {}
                continue
            key, _, value = line.partition(":")
            current[key] = value[1:] if value.startswith(" ") else value
    return events


def train_steps(client, job_id: str, **params) -> list[int]:
    rows = client.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "train", **params}).json()["metrics"]
    return [r["step"] for r in rows]


def test_job_runs_to_completion_with_metrics_and_jobs_queue_in_order(server):
    c = server.client()
    ra = c.post("/v1/jobs", json=job_config(8), params={"name": "first"})
    rb = c.post("/v1/jobs", json=job_config(6, checkpoint={"every": 3}))
    assert ra.status_code == 201 and rb.status_code == 201
    assert ra.json()["status"] == "queued" and set(ra.json()) == {"id", "status"}
    a, b = ra.json()["id"], rb.json()["id"]

    # One CPU slot: the first job runs, the second waits its turn.
    wait_job(c, a, lambda j: j["status"] == "running", "first job running")
    assert c.get(f"/v1/jobs/{b}").json()["status"] == "queued"
    assert [j["id"] for j in c.get("/v1/jobs", params={"status": "queued"}).json()["jobs"]] == [b]

    # Follow the second job's live stream from queued to its end.
    events = read_events(c, b)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "end" and events[-1][1]["status"] == "completed"
    statuses = [d["status"] for k, d in events if k == "status"]
    assert statuses[0] == "queued" and "running" in statuses and statuses[-1] == "completed"
    metric_steps = [d["step"] for k, d in events if k == "metric" and d["kind"] == "train"]
    assert metric_steps == [1, 2, 3, 4, 5, 6]

    ja, jb = c.get(f"/v1/jobs/{a}").json(), c.get(f"/v1/jobs/{b}").json()
    assert ja["status"] == "completed" and ja["name"] == "first"
    assert (ja["step"], ja["total_steps"]) == (8, 8)
    for key in ("train_loss", "val_loss", "best_val_loss", "lr", "tokens_per_sec"):
        assert isinstance(ja[key], float) and math.isfinite(ja[key]), key
    assert ja["best_val_loss"] <= ja["val_loss"] and ja["tokens_per_sec"] > 0
    assert ja["eta_s"] is None and ja["error"] is None
    assert [t["updates"] for t in ja["tier_stats"]] == [8, 4, 2]
    assert ja["created_at"] <= ja["started_at"] <= ja["ended_at"]
    assert jb["started_at"] >= ja["ended_at"], "the queued job started before the first one ended"
    assert ja["config"]["schedule"]["steps"] == 8 and ja["output_dir"].endswith(f"jobs/{a}")
    # The job record carries the run's printed plans (tiers and speed levers, as the CLI prints them).
    assert ja["tier_plan"].startswith("tier") and "lora_fold" in ja["speed_plan"]
    assert ja["speed_plan"].startswith("speed plan (cpu):")

    # Metrics: one train row per step, evals every 4 steps; `since` filters by step.
    assert train_steps(c, a) == list(range(1, 9))
    assert train_steps(c, a, since=5) == [6, 7, 8]
    evals = c.get(f"/v1/jobs/{a}/metrics", params={"kind": "eval"}).json()["metrics"]
    assert [e["step"] for e in evals] == [4, 8] and all(math.isfinite(e["val_loss"]) for e in evals)

    ckpts = {ck["name"]: ck for ck in c.get(f"/v1/jobs/{b}/checkpoints").json()["checkpoints"]}
    assert {"step-000003", "step-000006", "last"} <= set(ckpts) and ckpts["last"]["step"] == 6
    log = c.get(f"/v1/jobs/{a}/logs").text
    assert f"[worker] job {a}" in log and "ended completed at step 8" in log


def test_stop_mid_run_checkpoints_then_resume_continues_the_step_count(server):
    c = server.client()
    job_id = c.post("/v1/jobs", json=job_config(24, eval={"every": 8})).json()["id"]
    wait_job(c, job_id, lambda j: j["status"] == "running" and j["step"] >= 3, "step 3")

    first = c.post(f"/v1/jobs/{job_id}/stop")
    assert first.status_code == 200 and first.json()["stop_requested"] is True
    assert c.post(f"/v1/jobs/{job_id}/stop").status_code == 200  # idempotent
    job = wait_job(c, job_id, lambda j: j["status"] == "stopped", "stopped", timeout=30)
    assert c.post(f"/v1/jobs/{job_id}/stop").json()["status"] == "stopped"  # still idempotent once ended

    stopped_at = job["step"]
    assert 3 <= stopped_at < 24
    # The worker finishes at most the step that was under way when the stop arrived.
    assert stopped_at - job["stop_seen_at_step"] <= 1
    assert job["error"] is None and job["ended_at"] is not None

    # A loadable checkpoint at the step it stopped on: list it, then generate from it through the API.
    last = {ck["name"]: ck for ck in c.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]}["last"]
    assert last["step"] == stopped_at
    gen = c.post("/v1/generate", json={"job_id": job_id, "prompt": "Repeat: alpha beta\n", "max_new_tokens": 4})
    assert gen.status_code == 200, gen.text
    assert isinstance(gen.json()["text"], str) and "/checkpoints/" in gen.json()["adapter"]

    seq_before = max(r["seq"] for r in c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"])
    resumed = c.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    again = c.post(f"/v1/jobs/{job_id}/resume")
    assert again.status_code == 409 and "only stopped, interrupted, failed jobs" in again.json()["detail"]

    job = wait_job(c, job_id, lambda j: j["status"] == "completed", "completed after resume")
    assert (job["step"], job["runs"]) == (24, 2)
    rows = c.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "train"}).json()["metrics"]
    assert [r["step"] for r in rows] == list(range(1, 25))  # no step twice, none missing
    assert [r["step"] for r in rows if r["seq"] > seq_before] == list(range(stopped_at + 1, 25))
    assert c.post(f"/v1/jobs/{job_id}/resume").status_code == 409  # a completed job is done


def test_sigkilled_worker_marks_the_job_failed_and_the_server_keeps_answering(server):
    c = server.client()
    job_id = c.post("/v1/jobs", json=job_config(500)).json()["id"]
    job = wait_job(c, job_id, lambda j: j["status"] == "running" and j["step"] >= 1 and j["worker_pid"], "step 1")
    deleted = c.delete(f"/v1/jobs/{job_id}")
    assert deleted.status_code == 409 and "running" in deleted.json()["detail"]

    os.kill(job["worker_pid"], signal.SIGKILL)
    job = wait_job(c, job_id, lambda j: j["status"] == "failed", "failed", timeout=30)
    assert "SIGKILL" in job["error"]
    assert c.get("/v1/healthz").json()["status"] == "ok"
    assert server.proc.poll() is None

    # The failed job can go, with its files.
    out = job["output_dir"]
    gone = c.delete(f"/v1/jobs/{job_id}", params={"files": "true"})
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert c.get(f"/v1/jobs/{job_id}").status_code == 404
    assert not os.path.exists(out)


def test_server_restart_keeps_every_record_and_interrupts_the_running_job(server):
    c = server.client()
    job_id = c.post("/v1/jobs", json=job_config(16, checkpoint={"every": 2})).json()["id"]
    job = wait_job(c, job_id, lambda j: j["status"] == "running" and j["step"] >= 5, "step 5")
    before = {j["id"]: j for j in c.get("/v1/jobs").json()["jobs"]}

    # Server and worker die without a word (power cut, OOM killer).
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    os.kill(job["worker_pid"], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{job['worker_pid']}"), "worker gone", 10)

    server.start()
    c = server.client()
    after = {j["id"]: j for j in c.get("/v1/jobs").json()["jobs"]}
    assert list(after) == list(before)
    for jid, old in before.items():
        new = after[jid]
        if jid == job_id:
            assert new["status"] == "interrupted" and "worker was gone" in new["error"]
        else:
            for key in ("status", "step", "train_loss", "val_loss", "created_at", "ended_at", "error"):
                assert new[key] == old[key], (jid, key)

    ckpt_step = max(ck["step"] for ck in c.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"])
    assert ckpt_step >= 4
    seq_before = max(r["seq"] for r in c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"])
    assert c.post(f"/v1/jobs/{job_id}/resume").status_code == 200
    job = wait_job(c, job_id, lambda j: j["status"] == "completed", "completed after restart")
    assert job["step"] == 16
    rows = c.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "train"}).json()["metrics"]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["step"] for r in rows if r["seq"] > seq_before] == list(range(ckpt_step + 1, 17))


def test_a_clean_server_shutdown_checkpoints_the_running_job_as_interrupted(server):
    c = server.client()
    job_id = c.post("/v1/jobs", json=job_config(300)).json()["id"]
    wait_job(c, job_id, lambda j: j["status"] == "running" and j["step"] >= 2, "step 2")
    server.stop(signal.SIGTERM)  # the server asks its workers to checkpoint and end
    server.start()
    c = server.client()
    job = wait_job(c, job_id, lambda j: j["status"] == "interrupted", "interrupted", timeout=30)
    assert "server went away" in job["error"] and 2 <= job["step"] < 300
    last = {ck["name"]: ck for ck in c.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]}["last"]
    assert last["step"] == job["step"]
    assert c.delete(f"/v1/jobs/{job_id}", params={"files": "true"}).status_code == 200


def test_a_stop_while_the_worker_is_still_starting_ends_stopped_not_failed(server):
    c = server.client()
    job_id = c.post("/v1/jobs", json=job_config(300)).json()["id"]
    wait_job(c, job_id, lambda j: j["status"] == "running", "running", timeout=30)
    assert c.post(f"/v1/jobs/{job_id}/stop").status_code == 200  # the worker is still importing torch
    job = wait_job(c, job_id, lambda j: j["status"] in ("stopped", "failed"), "ended", timeout=60)
    assert job["status"] == "stopped" and job["error"] is None and job["step"] <= 1, job
    assert c.delete(f"/v1/jobs/{job_id}", params={"files": "true"}).status_code == 200
