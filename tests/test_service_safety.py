"""Service attacks that must stay fixed: DELETE removes only what a job created, a job's output directory is its
own, /v1/generate passes the path policy and never runs remote code, and every bad input is a 4xx naming the
field. In-process (FastAPI's TestClient, no scheduler): no worker ever starts.
"""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from conftest import write_data

from nested_learning.service.app import create_app
from nested_learning.service.jobs import Settings


@pytest.fixture
def checkpoint(micro_checkpoint) -> Path:
    return micro_checkpoint


def service(work: Path, **settings) -> TestClient:
    write_data(work / "data")
    app = create_app(Settings(db=str(work / "jobs.db"), workdir=work, run_scheduler=False, **settings))
    return TestClient(app)


@pytest.fixture
def svc(tmp_path):
    with service(tmp_path / "work") as c:
        yield c, tmp_path / "work"


def job(**sections) -> dict:
    cfg = {"model": {"name_or_path": "embedded:micro-llama"}, "data": {"dir": "data"}}
    cfg.update(sections)
    return cfg


def files_under(p: Path) -> list[str]:
    return sorted(str(f.relative_to(p)) for f in p.rglob("*"))


# ---- DELETE removes only what the job created -----------------------------------------------------------------
def test_delete_with_files_removes_only_the_directories_the_job_created(svc):
    c, work = svc
    (work / "runs").mkdir()
    (work / "runs" / "dataset.jsonl").write_text("{}\n")  # someone else's file beside the job's output
    default = c.post("/v1/jobs", json=job()).json()["id"]
    nested = c.post("/v1/jobs", json=job(output={"dir": "runs/a/b"})).json()["id"]
    assert (work / "jobs" / default).is_dir() and (work / "runs" / "a" / "b").is_dir()
    (work / "runs" / "a" / "b" / "metrics.jsonl").write_text("{}\n")  # what training writes
    (work / "logs").mkdir()
    (work / "logs" / f"{default}.log").write_text("log\n")
    with sqlite3.connect(work / "jobs.db") as db:
        db.execute("UPDATE jobs SET log_path = ? WHERE id = ?", (str(work / "logs" / f"{default}.log"), default))

    r = c.delete(f"/v1/jobs/{nested}", params={"files": "true"})
    assert r.status_code == 200 and r.json()["removed"] == [str(work / "runs" / "a")] and r.json()["kept"] == []
    assert files_under(work / "runs") == ["dataset.jsonl"]
    r = c.delete(f"/v1/jobs/{default}", params={"files": "true"}).json()
    assert r["removed"] == [str(work / "jobs" / default), str(work / "logs" / f"{default}.log")]
    assert (work / "jobs").is_dir() and (work / "logs").is_dir() and (work / "jobs.db").is_file()
    assert c.get("/v1/jobs").json()["jobs"] == []


@pytest.mark.parametrize("out, why", [
    ("data", "already exists"),  # a pre-existing dataset directory
    (".", "which the service keeps for itself"),  # the default data root = the workdir, holding jobs.db
    ("logs", "which the service keeps for itself"),
    ("jobs/mine", "which the service keeps for itself"),
])
def test_an_output_dir_that_is_not_the_jobs_own_is_refused(svc, out, why):
    c, work = svc
    before = files_under(work)
    r = c.post("/v1/jobs", json=job(output={"dir": out}))
    assert r.status_code == 409 and r.json()["field"] == "output.dir" and why in r.json()["detail"]
    assert r.json()["detail"].startswith("output.dir: ")
    assert files_under(work) == before


def test_an_output_dir_inside_another_jobs_output_is_refused(svc):
    c, work = svc
    assert c.post("/v1/jobs", json=job(output={"dir": "runs/a"})).status_code == 201
    r = c.post("/v1/jobs", json=job(output={"dir": "runs/a/inner"}))
    assert r.status_code == 409 and "overlaps job" in r.json()["detail"] and not (work / "runs/a/inner").exists()


def test_delete_keeps_what_an_old_record_or_a_swapped_path_does_not_prove_is_the_jobs(svc):
    c, work = svc
    legacy = c.post("/v1/jobs", json=job(output={"dir": "old"})).json()["id"]
    swapped = c.post("/v1/jobs", json=job(output={"dir": "swapped"})).json()["id"]
    precious = work / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    with sqlite3.connect(work / "jobs.db") as db:
        # A record written before ownership was kept, pointing at a directory the job never made.
        db.execute("UPDATE jobs SET owned_json = NULL, output_dir = ? WHERE id = ?", (str(precious), legacy))
    (work / "swapped").rmdir()
    (work / "swapped").symlink_to(precious)  # the job's directory replaced by a link to something else

    r = c.delete(f"/v1/jobs/{legacy}", params={"files": "true"}).json()
    assert r["removed"] == [] and r["kept"] == [f"{precious}: not created by this job"]
    r = c.delete(f"/v1/jobs/{swapped}", params={"files": "true"}).json()
    assert r["removed"] == [] and "no longer the directory the job created" in r["kept"][0]
    assert (precious / "keep.txt").read_text() == "keep"


def test_an_output_dir_under_a_file_or_on_a_read_only_mount_is_a_422(svc, monkeypatch):
    c, work = svc
    (work / "afile").write_text("x")
    r = c.post("/v1/jobs", json=job(output={"dir": "afile/run"}))
    assert r.status_code == 422 and r.json()["field"] == "output.dir" and "a parent is a file" in r.json()["detail"]

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    r = c.post("/v1/jobs", json=job(output={"dir": "ro/run"}))
    assert r.status_code == 422 and r.json()["detail"].endswith("Read-only file system")
    assert c.get("/v1/jobs").json()["jobs"] == []


# ---- generate: the path policy for the base model, no remote code ------------------------------------------------
def adapter_copy(checkpoint: Path, dest: Path, **model) -> Path:
    shutil.copytree(checkpoint, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["model"].update(model)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


def evil_model(root: Path) -> Path:
    """A model directory whose config asks for its own Python code, which would leave a marker if it ran."""
    d = root / "evil"
    d.mkdir()
    marker = root / "remote-code-ran"
    (d / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                               "from transformers import PretrainedConfig\n"
                               "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    return marker


def test_generate_never_runs_remote_code_and_confines_the_base_model(svc, checkpoint, tmp_path):
    c, work = svc
    marker = evil_model(work)
    for name, trust, status, words in [
        (str(work / "evil"), False, 422, "cannot load"),  # transformers refuses the auto_map without trust
        (str(work / "evil"), True, 403, "--allow-remote-code"),
        (str(tmp_path), False, 403, "outside the allowed root"),
    ]:
        target = work / f"ckpt-{trust}-{status}"
        adapter_copy(checkpoint, target, name_or_path=name, trust_remote_code=trust)
        r = c.post("/v1/generate", json={"adapter": target.name, "prompt": "add 1 and 2: "})
        assert r.status_code == status and r.json()["field"] == "adapter" and words in r.json()["detail"], r.text
    assert not marker.exists()


def test_trust_remote_code_in_a_job_needs_the_server_flag(svc, tmp_path):
    c, work = svc
    r = c.post("/v1/jobs", json=job(model={"name_or_path": "embedded:micro-llama", "trust_remote_code": True}))
    assert r.status_code == 403 and r.json()["field"] == "model.trust_remote_code"
    assert "--allow-remote-code" in r.json()["detail"] and c.get("/v1/jobs").json()["jobs"] == []
    with service(tmp_path / "allowing", allow_remote_code=True) as allowing:
        r = allowing.post("/v1/jobs", json=job(model={"name_or_path": "embedded:micro-llama",
                                                      "trust_remote_code": True}))
        assert r.status_code == 201


def test_the_serve_flag_reaches_the_server(monkeypatch):
    import nested_learning.service as service_module
    from nested_learning.cli import build_parser

    seen = []
    monkeypatch.setattr(service_module, "serve", lambda **kw: seen.append(kw["allow_remote_code"]))
    for argv in (["serve"], ["serve", "--allow-remote-code"]):
        args = build_parser().parse_args(argv)
        args.func(args)
    assert seen == [False, True]


def test_generate_answers_as_the_cli_does_and_refuses_damaged_adapters(svc, checkpoint):
    from nested_learning.inference.generate import generate_text, load_for_inference

    c, work = svc
    good = adapter_copy(checkpoint, work / "good")
    r = c.post("/v1/generate", json={"adapter": "good", "prompt": "add 1 and 2: ", "max_new_tokens": 8})
    model, tok = load_for_inference(adapter=good)
    assert r.status_code == 200 and r.json()["text"] == generate_text(model, tok, prompt="add 1 and 2: ",
                                                                       max_new_tokens=8)

    r = c.post("/v1/generate", json={"adapter": "data", "prompt": "x"})
    assert r.status_code == 422 and "not a checkpoint directory" in r.json()["detail"]
    r = c.post("/v1/generate", json={"adapter": "", "prompt": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "adapter"

    corrupt = adapter_copy(checkpoint, work / "corrupt")
    f = corrupt / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    r = c.post("/v1/generate", json={"adapter": "corrupt", "prompt": "x"})
    assert r.status_code == 422 and "not a readable safetensors file" in r.json()["detail"]

    nonfinite = adapter_copy(checkpoint, work / "nonfinite")
    f = nonfinite / "adapter_model.safetensors"
    tensors = load_file(str(f))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(f))
    r = c.post("/v1/generate", json={"adapter": "nonfinite", "prompt": "x"})
    assert r.status_code == 422 and f"tensor {name} holds non-finite values" in r.json()["detail"]

    r = c.post("/v1/generate", json={"adapter": "good", "prompt": "x" * 300})
    assert r.status_code == 422 and r.json()["field"] == "max_new_tokens"


# ---- bad input: a 4xx naming the field ---------------------------------------------------------------------------
PATH_FIELDS = [("data", "train"), ("data", "valid"), ("data", "dir"), ("output", "dir"), ("model", "name_or_path")]


@pytest.mark.parametrize("section, key", PATH_FIELDS)
@pytest.mark.parametrize("value, words", [("data/tr\x00ain.jsonl", "NUL byte"),
                                          ("d/" * 2500, "5000 characters long"),
                                          ("x" * 300, "component is 300 characters")])
def test_unusable_path_text_in_any_path_field_is_a_422(svc, section, key, value, words):
    c, work = svc
    r = c.post("/v1/jobs", json=job(**{section: {key: value}}))
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["field"] == f"{section}.{key}" and words in problem["msg"]


def raw_post(c, url: str, text: str, content_type: str = "application/json"):
    return c.post(url, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": content_type})


def test_non_finite_numbers_deep_yaml_duplicate_keys_and_surrogates_are_422s(svc):
    c, work = svc
    r = raw_post(c, "/v1/jobs", '{"data": {"dir": "data"}, "optim": {"lr": Infinity}}')
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "optim.lr"
    r = raw_post(c, "/v1/config/from-yaml", "optim:\n  lr: .inf\n", "text/plain")
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "optim.lr"
    r = raw_post(c, "/v1/config/from-yaml", "[" * 5000 + "]" * 5000, "text/plain")
    assert r.status_code == 422 and r.json()["detail"].startswith("(body):1: nested more than 64 levels")
    r = raw_post(c, "/v1/config/from-yaml", "optim:\n  lr: 0.1\nseed: 1\noptim:\n  eps: 0.1\n", "text/plain")
    assert r.status_code == 422 and r.json()["detail"] == "(body):4: duplicate key 'optim' (first given at line 1)"
    r = raw_post(c, "/v1/jobs", '{"data": {"dir": "data", "chat_template": "\\ud800"}}')
    assert r.status_code == 422 and "lone surrogate" in r.json()["message"]
    r = raw_post(c, "/v1/generate", '{"adapter": "x", "prompt": "\\udfff"}')
    assert r.status_code == 422 and "prompt: the text holds a lone surrogate" in r.json()["message"]
    r = raw_post(c, "/v1/generate", '{"adapter": "x", "prompt": "p", "temperature": Infinity}')
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "temperature"
    assert c.get("/v1/jobs").json()["jobs"] == []


def test_query_and_header_values_out_of_range_are_4xx(svc):
    c, work = svc
    job_id = c.post("/v1/jobs", json=job()).json()["id"]
    for query in ("since=1e20", "since=100000000000000000000", "after=-1", "limit=0", "limit=10001"):
        r = c.get(f"/v1/jobs/{job_id}/metrics?{query}")
        assert r.status_code == 422 and r.json()["detail"][0]["field"].startswith("query."), query
    r = c.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"})
    assert r.status_code == 400 and r.json()["field"] == "Last-Event-ID"
    r = c.get(f"/v1/jobs/{job_id}/events?after=99999999999999999999")
    assert r.status_code == 422
    r = c.patch(f"/v1/jobs/{job_id}")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "DELETE"}


# ---- paged metrics ------------------------------------------------------------------------------------------------
def test_metrics_come_in_pages_with_a_cursor(svc):
    c, work = svc
    job_id = c.post("/v1/jobs", json=job()).json()["id"]
    store = c.app.state.jobs.store
    for step in range(1, 1201):
        store.add_metric(job_id, step, "train", {"train_loss": 1.0 / step})
        if step % 100 == 0:
            store.add_metric(job_id, step, "eval", {"val_loss": 2.0 / step})
    first = c.get(f"/v1/jobs/{job_id}/metrics").json()
    assert len(first["metrics"]) == 1000 and first["next_after"] == first["metrics"][-1]["seq"]
    rows, after = list(first["metrics"]), first["next_after"]
    while after is not None:
        page = c.get(f"/v1/jobs/{job_id}/metrics", params={"after": after, "limit": 150}).json()
        rows += page["metrics"]
        after = page["next_after"]
    assert [r["seq"] for r in rows] == sorted({r["seq"] for r in rows}) and len(rows) == 1212
    evals = c.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "eval", "since": 1000}).json()
    assert [(r["step"], r["val_loss"]) for r in evals["metrics"]] == [(1100, 2.0 / 1100), (1200, 2.0 / 1200)]
    assert evals["next_after"] is None


# ---- cached views: what pollers read ------------------------------------------------------------------------------
def test_cached_views_follow_writes_from_other_processes(svc):
    from nested_learning.service.store import open_store

    c, work = svc
    job_id = c.post("/v1/jobs", json=job()).json()["id"]
    assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # the service's own write: seen at once
    other = open_store(work / "jobs.db")  # another connection, as a worker process has
    other.transition(job_id, ["queued"], "running")
    other.save_progress(job_id, {"step": 7, "train_loss": 0.25}, (7, "train", {"train_loss": 0.25}))
    views = c.app.state.jobs.views
    views.refresh()  # what the refresh thread does every views.interval seconds
    got = c.get(f"/v1/jobs/{job_id}").json()
    assert (got["status"], got["step"], got["train_loss"]) == ("running", 7, 0.25)
    assert views.metric_head(job_id) == c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"][-1]["seq"]
    assert [j["id"] for j in c.get("/v1/jobs", params={"status": "running"}).json()["jobs"]] == [job_id]
    other.transition(job_id, ["running"], "failed")
    assert other.delete_job(job_id)
    views.refresh()
    assert c.get(f"/v1/jobs/{job_id}").status_code == 404 and c.get("/v1/jobs").json()["jobs"] == []


def test_a_saved_config_validates_again_as_it_did_first():
    from nested_learning.config import TrainConfig

    # cuda_graphs asked for without packing: refused up front, not only once saved (a job record re-read by its
    # worker sets every data field, which once made the same config fail there).
    with pytest.raises(Exception, match="speed.cuda_graphs needs data.packing"):
        TrainConfig.model_validate({"speed": {"cuda_graphs": True}})
    cfg = TrainConfig.model_validate({"speed": {"cuda_graphs": True}, "data": {"packing": True}})
    assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_the_event_stream_of_an_ended_job_replays_its_rows_then_ends(svc):
    c, work = svc
    job_id = c.post("/v1/jobs", json=job()).json()["id"]
    store = c.app.state.jobs.store
    for step in (1, 2, 3):
        store.add_metric(job_id, step, "train", {"train_loss": 1.0 / step})
    store.transition(job_id, ["queued"], "completed")
    c.app.state.jobs.views.refresh()
    seqs = [r["seq"] for r in c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]]
    with c.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(seqs[0])}) as r:
        text = "".join(r.iter_text())
    events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    ids = [int(line.removeprefix("id: ")) for line in text.splitlines() if line.startswith("id: ")]
    assert events == ["metric", "metric", "status", "end"] and ids == seqs[1:]
    assert '"status": "completed"' in text.split("event: end")[1]


def test_views_see_new_writes_after_the_newest_job_is_deleted(svc):
    c, work = svc
    first = c.post("/v1/jobs", json=job()).json()["id"]
    newest = c.post("/v1/jobs", json=job()).json()["id"]
    assert c.delete(f"/v1/jobs/{newest}").status_code == 200
    c.app.state.jobs.store.transition(first, ["queued"], "failed", error="from a worker")
    c.app.state.jobs.views.refresh()
    assert c.get(f"/v1/jobs/{first}").json()["status"] == "failed"
    later = c.post("/v1/jobs", json=job()).json()["id"]
    assert c.get(f"/v1/jobs/{later}").json()["status"] == "queued"
