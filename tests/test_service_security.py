"""Bad input and access control: every rejection names the problem and writes nothing.

The server runs with a token, a data root separate from its workdir and a small body limit. No request
here is meant to create a job, so no worker ever starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from servicekit import REPO, Server, job_config, kill_workers, write_data

from nested_learning.service.security import PathNotAllowed, PathPolicy

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("sec")
    root, work, outside = base / "root", base / "work", base / "outside"
    write_data(root)
    write_data(outside)
    (root / "escape").symlink_to(outside / "data")  # a symlink inside the root pointing out of it
    srv = Server(work, token=TOKEN, extra_args=["--data-root", str(root), "--max-body", "20000"]).start()
    yield srv, root, work, outside
    srv.stop()
    kill_workers(work)


def assert_nothing_written(c, root, work) -> None:
    assert c.get("/v1/jobs").json()["jobs"] == []
    assert not (work / "jobs").exists() and not (work / "logs").exists()
    assert sorted(p.name for p in root.iterdir()) == ["data", "escape"]


def test_healthz_is_open_and_everything_else_needs_the_token(env):
    srv, root, work, _ = env
    anon = srv.client(token=None)
    assert anon.get("/v1/healthz").status_code == 200
    r = anon.get("/v1/jobs")
    assert r.status_code == 401 and "missing API token" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = anon.post("/v1/jobs", json=job_config(3))
    assert r.status_code == 401
    assert anon.post("/nested-learning/start", json={}).status_code == 401
    assert anon.get("/docs").status_code == 401
    r = srv.client(token="wrong").get("/v1/jobs")
    assert r.status_code == 401 and "invalid API token" in r.json()["detail"]
    # The dashboard: a sign-in page, then the token cookie opens it.
    page = anon.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and 'action="/login"' in page.text
    login = anon.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert login.status_code == 303 and "nl_token" in login.headers["set-cookie"]
    assert "samesite=strict" in login.headers["set-cookie"].lower()
    assert anon.get("/", headers={"Accept": "text/html"}).status_code == 200  # cookie kept by the client
    assert srv.client().get("/openapi.json").json()["components"]["schemas"]["TrainConfig"]
    assert_nothing_written(srv.client(), root, work)


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"optim": {"lr": "fast"}}, "optim.lr", "valid number"),
        ({"optim": {"batch_size": 2.5}}, "optim.batch_size", "valid integer"),
        ({"tiers": {"periods": "1,2"}}, "tiers.periods", "valid list"),
        ({"optim": {"lrr": 0.1}}, "optim.lrr", "Extra inputs are not permitted"),
        ({"epochs": 3}, "epochs", "Extra inputs are not permitted"),
        ({"schedule": {"steps": -5}}, "schedule.steps", "greater than 0"),
        ({"tiers": {"periods": [1, 0]}}, "tiers.periods", "every period must be an integer >= 1"),
        ({"schedule": {"steps": 5, "warmup_steps": 9}}, "(body)", "warmup_steps (9) exceeds schedule.steps (5)"),
    ],
)
def test_invalid_bodies_are_422_with_the_field_named(env, body, field, words):
    srv, root, work, _ = env
    c = srv.client()
    cfg = job_config(3)
    for key, value in body.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    r = c.post("/v1/jobs", json=cfg)
    assert r.status_code == 422, r.text
    problems = r.json()["detail"]
    assert any(p["field"] == field and words in p["msg"] for p in problems), problems
    assert field in r.json()["message"]
    assert_nothing_written(c, root, work)


def test_a_body_that_is_not_a_config_is_422(env):
    srv, root, work, _ = env
    c = srv.client()
    assert c.post("/v1/jobs", json=[1, 2]).status_code == 422
    r = c.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = c.post("/v1/jobs", json=job_config(3, data={"train": None, "valid": None}))
    assert r.status_code == 422 and "no training data" in r.json()["detail"]
    r = c.post("/v1/jobs", json=job_config(3, data={"train": "data/missing.jsonl"}))
    assert r.status_code == 422 and "data.train: file not found" in r.json()["detail"]
    assert_nothing_written(c, root, work)


@pytest.mark.parametrize(
    "section, field",
    [("data", "train"), ("data", "valid"), ("data", "dir"), ("output", "dir"), ("model", "name_or_path")],
)
def test_paths_outside_the_data_root_are_403(env, section, field):
    srv, root, work, outside = env
    c = srv.client()
    target = str(outside / "data" / ("train.jsonl" if field != "dir" else ""))
    attempts = [target, "../outside/data/train.jsonl" if field != "dir" else "../outside/data",
                "escape/train.jsonl" if field != "dir" else "escape"]
    for value in attempts:
        r = c.post("/v1/jobs", json=job_config(3, **{section: {field: value}}))
        assert r.status_code == 403, (value, r.text)
        msg = r.json()["detail"]
        assert msg.startswith(f"{section}.{field}: path {value!r}") and "outside the allowed root" in msg, msg
        assert str(outside) in msg and str(root) in msg
    assert_nothing_written(c, root, work)


def test_generate_refuses_an_adapter_outside_the_root(env):
    srv, root, work, outside = env
    r = srv.client().post("/v1/generate", json={"adapter": str(outside), "prompt": "hi"})
    assert r.status_code == 403 and r.json()["detail"].startswith("adapter: path")
    r = srv.client().post("/v1/generate", json={"prompt": "hi"})
    assert r.status_code == 422 and "exactly one of job_id or adapter" in r.json()["message"]


def test_oversized_bodies_are_413(env):
    srv, root, work, _ = env
    c = srv.client()
    cfg = job_config(3, tiers={"manual": {f"layer.{i}.weight": 0 for i in range(2000)}})
    r = c.post("/v1/jobs", json=cfg)
    assert r.status_code == 413 and "limit is 20000 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit counts the streamed bytes
        for _ in range(30):
            yield b" " * 1000

    r = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # An oversized body is refused before authentication is even looked at.
    assert srv.client(token=None).post("/v1/jobs", json=cfg).status_code == 413
    assert_nothing_written(c, root, work)


def test_a_non_loopback_bind_without_a_token_is_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NL_API_TOKEN", None)
    r = subprocess.run([sys.executable, "-m", "nested_learning.service", "--host", "0.0.0.0", "--port", "0",
                        "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0
    assert "refusing to bind 0.0.0.0" in r.stderr and "NL_API_TOKEN" in r.stderr
    assert not (tmp_path / "w").exists()


def test_path_policy_lets_hub_ids_and_embedded_models_through(tmp_path):
    policy = PathPolicy([tmp_path])
    assert policy.model("embedded:micro-llama") == "embedded:micro-llama"
    assert policy.model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert policy.model("models/m") == str(tmp_path / "models" / "m")
    for bad in ("/etc", "../x", "~/x", "./../../y"):
        with pytest.raises(PathNotAllowed):
            policy.model(bad)
