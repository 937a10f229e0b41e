"""The old app's front-end calls (/nested-learning/start|status|stop|metrics|experiments|tier-info).

The request bodies use the old `NestedLearningRequest` field names; the answers keep the old status fields.
"""

from __future__ import annotations

import pytest

from servicekit import running_server, wait_for

pytestmark = pytest.mark.slow

OLD_START = {
    "base_model_path": "embedded:micro-llama",
    "adapter_path": "",
    "train_data_path": "data/train.jsonl",
    "val_data_path": "data/valid.jsonl",
    "num_tiers": 2,
    "tier_update_frequencies": [1, 2, 4],
    "tier_assignment_strategy": "layer_depth",
    "learning_rate": 1e-3,
    "batch_size": 4,
    "num_steps": 300,
    "max_seq_length": 64,
    "lora_rank": 4,
    "lora_alpha": 8,
    "warmup_steps": 2,
    "gradient_accumulation_steps": 1,
    "checkpoint_every": 100,
    "eval_every": 3,
    "experiment_name": "compat_run",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("compat")) as srv:
        yield srv


def test_idle_before_any_job(server):
    c = server.client()
    status = c.get("/nested-learning/status").json()
    assert status["status"] == "idle" and status["current_step"] == 0 and status["total_steps"] == 0
    assert c.get("/nested-learning/experiments").json() == {"experiments": []}
    assert c.post("/nested-learning/stop").status_code == 400


def test_old_start_status_stop_flow(server):
    c = server.client()
    r = c.post("/nested-learning/start", json=OLD_START)
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["success"] is True and started["experiment_name"] == "compat_run"
    job_id = started["job_id"]

    # The old request landed in the same TrainConfig the /v1 API uses.
    cfg = c.get(f"/v1/jobs/{job_id}").json()["config"]
    assert cfg["tiers"]["periods"] == [1, 2] and cfg["tiers"]["strategy"] == "layer_depth"
    assert cfg["schedule"] == {**cfg["schedule"], "steps": 300, "warmup_steps": 2, "kind": "constant"}
    assert (cfg["optim"]["lr"], cfg["optim"]["batch_size"], cfg["lora"]["r"], cfg["data"]["max_length"]) == (
        1e-3, 4, 4, 64)
    assert cfg["data"]["train"].endswith("data/train.jsonl") and cfg["eval"]["every"] == 3

    def running_with_progress():
        s = c.get("/nested-learning/status").json()
        return s if s["status"] == "running" and s["current_step"] >= 4 and s["current_val_loss"] else None

    status = wait_for(running_with_progress, "old status shows progress", 90)
    assert status["total_steps"] == 300 and status["experiment_name"] == "compat_run"
    assert isinstance(status["current_train_loss"], float)
    tiers = status["tier_stats"]["tier_parameters"]
    assert set(tiers) == {"tier_0", "tier_1"}
    assert tiers["tier_0"]["frequency"] == 1 and tiers["tier_1"]["frequency"] == 2
    assert tiers["tier_0"]["update_count"] >= 4 and tiers["tier_1"]["update_count"] >= 2

    stop = c.post("/nested-learning/stop")
    assert stop.status_code == 200 and stop.json()["success"] is True and stop.json()["job_id"] == job_id

    def stopped():
        s = c.get("/nested-learning/status").json()
        return s if s["job_status"] == "stopped" else None

    status = wait_for(stopped, "old status after stop", 30)
    assert status["status"] == "idle" and 4 <= status["current_step"] < 300
    assert f"stopped at step {status['current_step']}" in status["message"]
    wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["status"] == "stopped", "the same job, seen through /v1", 10)
    assert c.post("/nested-learning/stop").status_code == 400  # "No training in progress", as before

    metrics = c.get("/nested-learning/metrics").json()
    history = metrics["metrics_history"]
    assert metrics["experiment_name"] == "compat_run" and metrics["current_step"] == status["current_step"]
    assert [h["step"] for h in history] == list(range(1, status["current_step"] + 1))
    assert all(isinstance(h["loss"], float) for h in history if "loss" in h)
    assert any("val_loss" in h for h in history)

    exps = c.get("/nested-learning/experiments").json()["experiments"]
    assert [(e["experiment_name"], e["job_id"], e["status"]) for e in exps] == [("compat_run", job_id, "stopped")]
    info = c.get("/nested-learning/tier-info").json()
    assert "description" in info and "layer_depth" in info["strategies"]
    assert info["tiers"]["tier_1"]["frequency"] == 2


def test_old_requests_that_cannot_map_are_422(server):
    c = server.client()
    r = c.post("/nested-learning/start", json={**OLD_START, "num_tiers": 5})
    assert r.status_code == 422 and "num_tiers (5)" in r.json()["detail"]
    r = c.post("/nested-learning/start", json={**OLD_START, "tier_assignment_strategy": "manual"})
    assert r.status_code == 422 and "manual" in r.json()["detail"]
    r = c.post("/nested-learning/start", json={**OLD_START, "learning_rate": -1})
    assert r.status_code == 422 and "optim.lr" in r.json()["detail"]
    r = c.post("/nested-learning/start", json={**OLD_START, "train_data_path": "/etc/passwd"})
    assert r.status_code == 403 and "data.train" in r.json()["detail"]
    r = c.post("/nested-learning/start", json={**OLD_START, "base_model_path": "./models/missing"})
    assert r.status_code == 422 and r.json()["detail"].startswith("base_model_path: model directory not found")
    r = c.post("/nested-learning/start", json={**OLD_START, "experiment_name": "../escape"})
    assert r.status_code == 422 and "experiment_name" in r.json()["detail"]
    assert len(c.get("/nested-learning/experiments").json()["experiments"]) == 1
