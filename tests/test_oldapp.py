"""The old desktop app on our server: its page's calls through the drop-in router, its lists, its runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from servicekit import kill_workers, wait_for, write_data

# The page's getDefaultConfig() (NestedLearningPage.tsx), as it posts it.
PAGE_DEFAULT = {
    "base_model_path": "", "adapter_path": "", "train_data_path": "", "val_data_path": "",
    "num_tiers": 3, "tier_update_frequencies": [1, 2, 4], "tier_assignment_strategy": "layer_depth",
    "learning_rate": 1e-5, "batch_size": 1, "num_steps": 1000, "max_seq_length": 128,
    "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
    "warmup_steps": 100, "gradient_accumulation_steps": 2, "checkpoint_every": 100, "eval_every": 100,
    "early_stop": True, "patience": 5, "min_delta": 0.0001,
    "output_path": "./nested_learning/checkpoints", "experiment_name": "nested_learning_experiment",
}


def save_micro_llama(d: Path) -> Path:
    """A local model folder as the page's file dialog would pick: embedded:micro-llama saved with save_pretrained."""
    from nested_learning.model.embedded import build_embedded

    model, tokenizer = build_embedded("embedded:micro-llama")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def old_main(tmp_path, monkeypatch):
    """The old back end's main.py: its own app and CORS, then the one include_router line."""
    from fastapi.middleware.cors import CORSMiddleware

    from nested_learning.service import compat

    root = tmp_path / "home"
    write_data(root, n_train=40, n_valid=4)
    save_micro_llama(root / "models" / "micro")
    monkeypatch.chdir(root)  # the old back end ran from its own folder: ./nested_learning/checkpoints
    monkeypatch.setenv("NL_SERVICE_WORKDIR", str(tmp_path / "service"))
    monkeypatch.setenv("NL_DATA_ROOTS", str(root))
    monkeypatch.setenv("NL_WORKER_STEP_DELAY", "0.05")
    assert compat._default.svc is None

    app = FastAPI(title="MLX Fine-Tuning GUI API")
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    from nested_learning.service.compat import router as nested_learning_router

    app.include_router(nested_learning_router)
    try:
        with TestClient(app) as client:
            yield client, root
    finally:
        compat._default.shutdown()
        kill_workers(tmp_path / "service")


def _job(job_id: str) -> dict:
    from nested_learning.service import compat
    from nested_learning.service.jobs import job_view

    return job_view(compat._default().get(job_id), full=True)


def _wait_end(c, job_id: str, timeout: float = 120) -> dict:
    def ended():
        s = c.get(f"/nested-learning/status?job_id={job_id}").json()
        return s if s["job_status"] in ("completed", "stopped", "failed") else None

    status = wait_for(ended, f"job {job_id} to end", timeout)
    assert status["job_status"] != "failed", status["message"]
    return status


@pytest.mark.slow  # three training jobs, each a worker process (about a minute on two busy CPU cores)
def test_page_replay_through_the_drop_in_router(old_main):
    c, root = old_main
    assert c.get("/nested-learning/status").json()["status"] == "idle"
    body = {**PAGE_DEFAULT, "base_model_path": str(root / "models" / "micro"),
            "train_data_path": str(root / "data" / "train.jsonl")}

    # 1. start with the page's defaults: val_data_path "" splits the training data, num_steps counts micro-steps
    r = c.post("/nested-learning/start", json=body)
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["success"] is True and first["experiment_name"] == "nested_learning_experiment"
    assert "500 optimizer steps of 2 micro-batches" in first["message"]
    assert "10% of the training data is held out" in first["message"]
    cfg = _job(first["job_id"])["config"]
    assert cfg["data"]["valid"] is None and cfg["schedule"]["steps"] == 500 and cfg["schedule"]["warmup_steps"] == 50
    assert (cfg["eval"]["every"], cfg["eval"]["early_stopping_patience"], cfg["eval"]["early_stopping_min_delta"]) \
        == (50, 5, 1e-4)
    assert (cfg["seed"], cfg["checkpoint"]["keep_last_n"], cfg["optim"]["grad_accum"]) == (42, 5, 2)
    assert cfg["output"]["dir"] == str(root / "nested_learning" / "checkpoints" / "nested_learning_experiment")

    # 2. the page polls status: chart rows with loss, tier tiles [n, n/2, n/4], progress in micro-steps
    def training():
        s = c.get("/nested-learning/status").json()
        return s if s["status"] == "running" and s["optimizer_step"] >= 8 and s["metrics_history"] else None

    s = wait_for(training, "the first run to train 8 steps", 90)
    n = s["optimizer_step"]
    assert s["total_steps"] == 1000 and s["current_step"] == 2 * n
    assert s["tier_stats"]["tier_update_frequencies"] == [1, 2, 4]
    assert s["tier_stats"]["tier_update_counts"] == [n, n // 2, n // 4]
    assert s["tier_stats"]["tier_parameters"]["tier_1"]["frequency"] == 2
    # micro-llama has two blocks: layer_depth gives each of the first two tiers one block of rank-8 LoRA tensors
    assert [t["parameter_count"] for t in s["tier_stats"]["tier_parameters"].values()] == [4096, 4096, 0]
    rows = s["metrics_history"]
    assert [r["optimizer_step"] for r in rows] == list(range(rows[0]["optimizer_step"], rows[-1]["optimizer_step"] + 1))
    for row in rows:
        k = row["optimizer_step"]
        assert row["step"] == 2 * k and isinstance(row["loss"], float) and row["learning_rate"] > 0
        assert row["tier_stats"]["tier_update_counts"] == [k, k // 2, k // 4]
    assert all(r["step_time"] >= 0.05 for r in rows[1:])  # each worker step pauses 0.05 s here

    # 3. stop: within one step
    r = c.post("/nested-learning/stop")
    assert r.status_code == 200 and r.json()["success"] is True
    s = _wait_end(c, first["job_id"], 30)
    job = _job(first["job_id"])
    assert s["status"] == "idle" and job["status"] == "stopped"
    assert job["step"] - job["stop_seen_at_step"] <= 1 and job["step"] < 500
    assert c.post("/nested-learning/stop").status_code == 400

    # 4. start again with the same name (the page never changes it): a new run beside the first, completing
    r = c.post("/nested-learning/start", json={**body, "num_steps": 40, "learning_rate": 5e-3, "eval_every": 10,
                                                           "warmup_steps": 0})
    second = r.json()
    assert r.status_code == 200 and second["experiment_name"] == "nested_learning_experiment-2"
    assert "nested_learning_experiment already exists; this run is nested_learning_experiment-2" in second["message"]
    s = _wait_end(c, second["job_id"])
    assert s["status"] == "completed" and s["current_step"] == s["total_steps"] == 40
    run1 = root / "nested_learning" / "checkpoints" / "nested_learning_experiment"
    run2 = run1.with_name("nested_learning_experiment-2")
    assert (run1 / "checkpoints" / "last").is_dir() and (run2 / "checkpoints" / "last").is_dir()
    # The old app's adapter list looks for <run>/checkpoints/best/adapters.safetensors with mlx-lm's config.
    from nested_learning.inference.convert import _read_mlx, _read_peft

    best = run2 / "checkpoints" / "best"
    mlx_side, peft_side = _read_mlx(best), _read_peft(best)
    assert json.loads((best / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0
    assert all(torch.equal(mlx_side.tensors[m][i], peft_side.tensors[m][i]) for m in peft_side.tensors for i in (0, 1))
    history2 = c.get(f"/nested-learning/metrics?job_id={second['job_id']}").json()["metrics_history"]
    losses2 = [h["loss"] for h in history2 if "loss" in h]
    assert len(losses2) == 20 and any("val_loss" in h for h in history2)

    # 5. start from the adapter just trained: the first loss is that adapter's, not a fresh one's
    r = c.post("/nested-learning/start", json={**body, "num_steps": 4, "learning_rate": 5e-3, "warmup_steps": 0,
                                                "adapter_path": str(run2 / "checkpoints" / "last")})
    third = r.json()
    assert r.status_code == 200 and "continuing the adapter" in third["message"], r.text
    _wait_end(c, third["job_id"])
    losses3 = [h["loss"] for h in c.get(f"/nested-learning/metrics?job_id={third['job_id']}").json()[
        "metrics_history"] if "loss" in h]
    # The same seed and data order: step 1 sees the batch run 2's step 1 saw, on trained weights this time.
    assert losses3[0] < losses2[0] - 0.2, (losses3, losses2)
    assert abs(losses3[0] - min(losses2[-5:])) < abs(losses3[0] - losses2[0])

    # An adapter that cannot be loaded is a 4xx naming the file, and no job is created.
    bad = root / "broken_adapter"
    bad.mkdir()
    (bad / "adapters.safetensors").write_bytes(b"junk")
    (bad / "adapter_config.json").write_text('{"lora_parameters": {"rank": 8, "scale": 20.0}}')
    r = c.post("/nested-learning/start", json={**body, "adapter_path": str(bad)})
    assert r.status_code == 422 and "broken_adapter/adapters.safetensors" in r.json()["detail"]
    assert len(c.get("/nested-learning/experiments").json()["experiments"]) == 3
    info = c.get("/nested-learning/tier-info").json()
    assert {"description", "tiers", "benefits", "strategies"} <= set(info)
    assert info["tiers"]["tier_2"]["frequency"] == 4


def _old_run_fixture(d: Path, steps: int = 12, eval_every: int = 4) -> Path:
    """An old run folder in the old trainer's format (config.json + metric rows), written from that format."""
    (d / "metrics").mkdir(parents=True)
    config = {**PAGE_DEFAULT, "base_model_path": "/Users/someone/models/Qwen2.5-0.5B-Instruct",
              "train_data_path": "/Users/someone/data/train.jsonl", "num_steps": steps,
              "gradient_accumulation_steps": 1, "eval_every": eval_every, "experiment_name": d.name,
              "max_grad_norm": 1.0, "save_best_only": False, "keep_last_n_checkpoints": 5, "seed": 42,
              "mixed_precision": True}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    with open(d / "metrics" / "train_metrics.jsonl", "w") as f:
        for step in range(steps):
            counts = [(step + 1) // p for p in (1, 2, 4)]
            tiers = {"global_step": step + 1, "tier_update_counts": counts, "tier_update_frequencies": [1, 2, 4],
                     "tier_parameters": {f"tier_{i}": {"frequency": p, "update_count": counts[i],
                                                       "parameter_count": 0} for i, p in enumerate((1, 2, 4))}}
            f.write(json.dumps({"step": step, "loss": 3.0 - 0.1 * step, "step_time": 0.2,
                                "learning_rate": 1e-5, "tier_stats": tiers}) + "\n")
    with open(d / "metrics" / "eval_metrics.jsonl", "w") as f:
        for step in range(eval_every - 1, steps, eval_every):
            f.write(json.dumps({"loss": 2.9 - 0.1 * step, "step": step}) + "\n")
    return d


def test_import_run_shows_on_the_dashboard(tmp_path):
    from nested_learning.cli import main
    from nested_learning.service.app import create_app
    from nested_learning.service.jobs import Settings

    old = _old_run_fixture(tmp_path / "old" / "b1")
    work = tmp_path / "service"
    assert main(["import-run", str(old), "--workdir", str(work)]) == 0
    run = work / "imported" / "b1"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r] == [
        (4, pytest.approx(2.6)), (8, pytest.approx(2.2)), (12, pytest.approx(1.8))]
    assert "early_stopping_patience: 5" in (run / "config.yaml").read_text()
    assert main(["import-run", str(old), "--workdir", str(work)]) == 2  # not twice into one directory

    app = create_app(Settings(db=str(work / "jobs.db"), workdir=work, run_scheduler=False))
    with TestClient(app) as c:
        jobs = c.get("/v1/jobs").json()["jobs"]
        assert [(j["name"], j["status"], j["step"], j["total_steps"]) for j in jobs] == [("b1", "completed", 12, 12)]
        assert jobs[0]["train_loss"] == pytest.approx(1.9) and jobs[0]["best_val_loss"] == pytest.approx(1.8)
        metrics = c.get(f"/v1/jobs/{jobs[0]['id']}/metrics").json()["metrics"]
        train = [m for m in metrics if m["kind"] == "train"]
        assert [m["train_loss"] for m in train] == pytest.approx([3.0 - 0.1 * s for s in range(12)])
        assert train[-1]["tier_updates"] == [12, 6, 3]
        assert [m["val_loss"] for m in metrics if m["kind"] == "eval"] == pytest.approx([2.6, 2.2, 1.8])
        old_status = c.get(f"/nested-learning/status?job_id={jobs[0]['id']}").json()
        assert old_status["status"] == "completed" and old_status["tier_stats"]["tier_update_counts"] == [12, 6, 3]


def test_import_run_errors_name_the_file(tmp_path):
    from nested_learning.service.oldruns import import_run

    old = _old_run_fixture(tmp_path / "b2")
    with open(old / "metrics" / "train_metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"b2/metrics/train_metrics.jsonl:13: not valid JSON"):
        import_run(old, workdir=tmp_path / "svc")
    (old / "config.json").unlink()
    with pytest.raises(ValueError, match=r"b2/config.json: not found"):
        import_run(old, workdir=tmp_path / "svc")


def test_standalone_serve_lists_models_and_adapters_and_answers_cors(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    from nested_learning.service.app import create_app
    from nested_learning.service.jobs import Settings

    root = tmp_path / "root"
    save_micro_llama(root / "models" / "micro")
    old_best = root / "nested_learning" / "checkpoints" / "b1" / "checkpoints" / "best"
    old_best.mkdir(parents=True)
    save_file({"model.layers.1.self_attn.q_proj.lora_a": np.zeros((32, 8), np.float32),
               "model.layers.1.self_attn.q_proj.lora_b": np.zeros((8, 32), np.float32)},
              str(old_best / "adapters.safetensors"))
    (old_best / "adapter_config.json").write_text(json.dumps(
        {"lora_rank": 8, "lora_alpha": 16, "lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0},
         "num_layers": 2}))
    app = create_app(Settings(db=str(tmp_path / "jobs.db"), workdir=tmp_path / "work", data_roots=[root],
                              run_scheduler=False))
    with TestClient(app) as c:
        models = c.get("/models").json()["models"]
        assert models == [{"name": "micro", "path": str(root / "models" / "micro"), "model_type": "llama",
                           "vocab_size": 261}]
        adapters = c.get("/adapters").json()["adapters"]
        assert adapters == [{"name": "b1 (nested)", "path": str(old_best), "type": "nested_learning",
                             "format": "mlx", "lora_rank": 8, "lora_alpha": 16}]
        pre = c.options("/nested-learning/start", headers={"Origin": "http://localhost:3000",
                                                           "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        far = c.options("/nested-learning/start", headers={"Origin": "http://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in far.headers
        got = c.get("/nested-learning/status", headers={"Origin": "http://127.0.0.1:5173"})
        assert got.headers["access-control-allow-origin"] == "http://127.0.0.1:5173"
        # /v1/generate with an old MLX adapter: a 422 saying how to convert it, not a 500.
        r = c.post("/v1/generate", json={"adapter": str(old_best), "prompt": "hi"})
        assert r.status_code == 422 and "nested-learning convert-adapter" in r.json()["detail"]


def test_import_run_with_base_converts_the_old_adapters(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from nested_learning.inference.generate import load_for_inference
    from nested_learning.service.oldruns import import_run

    base = save_micro_llama(tmp_path / "micro")
    old = _old_run_fixture(tmp_path / "old" / "b3")
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.1, (32, 4)).astype(np.float32), rng.normal(0, 0.1, (4, 32)).astype(np.float32)
    for name in ("best", "final"):
        d = old / "checkpoints" / name
        d.mkdir(parents=True)
        save_file({"model.layers.1.self_attn.q_proj.lora_a": a, "model.layers.1.self_attn.q_proj.lora_b": b},
                  str(d / "adapters.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(
            {"lora_rank": 4, "lora_alpha": 16, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
             "num_layers": 1, "model": "/Users/someone/models/x"}))
    res = import_run(old, base=str(base), workdir=tmp_path / "svc")
    assert sorted(res["checkpoints"]) == ["best", "last"] and res["status"] == "completed"
    model, _ = load_for_inference(adapter=Path(res["run_dir"]) / "checkpoints" / "best", device="cpu")
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    assert np.array_equal(q.lora_B["default"].weight.detach().numpy(), b.T)
    assert q.scaling["default"] == 10.0  # mlx-lm's scale, not the old config's lora_alpha / rank
