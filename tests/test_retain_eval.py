"""Retain-set evaluation (``eval.retain``) and exact match (``eval.metric``): in the loop, in metrics.jsonl,
in the state, in ``nested-learning eval`` and in the service's metrics endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import micro_config, write_data
from nested_learning.config import ConfigError, EvalConfig, load_config
from nested_learning.data import DataError, Sample
from nested_learning.model.embedded import build_embedded
from nested_learning.train.evaluate import evaluate_exact_match
from nested_learning.train.loop import train_loop
from nested_learning.train.metrics import read_metrics
from nested_learning.train.setup import build_run


def _retain_file(root: Path, name: str = "general", n: int = 6) -> Path:
    path = root / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"prompt": f"capital of place {i}? ", "completion": f"city {i * 7 % 10}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _direct_loss(model, path: Path, tokenizer) -> float:
    """Token-weighted completion loss computed the plain way: transformers' own loss, one sample at a time."""
    total, count = 0.0, 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        prompt = [tokenizer.bos_token_id] + tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        labels = torch.tensor([[-100] * len(prompt) + completion])
        n = len(completion)
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return total / count


def test_retain_eval_of_the_base_model_equals_a_direct_loss_and_reaches_metrics(tmp_path):
    data = write_data(tmp_path / "data")
    retain = _retain_file(tmp_path / "retain")
    cfg = micro_config(data, tmp_path / "run", eval={"every": 5, "at_start": True, "retain": [str(retain)]})
    assert cfg.eval.retain == {"general": str(retain)}
    run = build_run(cfg)
    state = train_loop(run)

    base, tokenizer = build_embedded("embedded:micro-llama")  # the same seeded weights the run started from
    direct = _direct_loss(base, retain, tokenizer)
    evals = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 5, 10]
    # Step 0: LoRA's B is zero, so the adapted model is the base model.
    assert evals[0]["retain_loss/general"] == pytest.approx(direct, rel=1e-5)
    assert evals[0]["retain_loss"] == evals[0]["retain_loss/general"]
    assert direct == pytest.approx(5.6, abs=0.1)  # pinned: an untrained 261-token model is near log(261) = 5.56
    # Training on another task moves the retain loss; the state carries the last evaluation.
    assert evals[-1]["retain_loss"] != pytest.approx(evals[0]["retain_loss"], rel=1e-4)
    assert state.retain_loss == evals[-1]["retain_loss"] and state.retain["general"]["loss"] == state.retain_loss
    assert "val_exact_match" not in evals[-1] and state.retain_exact_match is None


def test_exact_match_scores_per_set_and_means_over_sets(tmp_path):
    data = write_data(tmp_path / "data")
    a, b = _retain_file(tmp_path / "r", "a", 4), _retain_file(tmp_path / "r", "b", 8)
    cfg = micro_config(data, tmp_path / "run", schedule={"steps": 4, "warmup_steps": 0},
                       eval={"every": 0, "metric": "exact_match", "retain": {"first": str(a), "second": str(b)}})
    state = train_loop(build_run(cfg))
    row = read_metrics(tmp_path / "run")[-1]
    assert set(row) >= {"val_exact_match", "retain_exact_match", "retain_exact_match/first",
                        "retain_exact_match/second", "retain_loss/first", "retain_loss/second"}
    assert row["retain_loss"] == pytest.approx((row["retain_loss/first"] + row["retain_loss/second"]) / 2)
    assert 0.0 <= state.val_exact_match <= 1.0 and state.retain_exact_match == row["retain_exact_match"]


def test_exact_match_agrees_with_greedy_generation():
    model, tokenizer = build_embedded("embedded:micro-llama", seed=3)
    model.eval()
    samples, expected = [], []
    for k, text in enumerate(["ab", "hello", "x=", "12+3", "zz top", "q"]):
        prompt = tokenizer(text)["input_ids"]
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=3 + k % 3, do_sample=False, pad_token_id=0, eos_token_id=None)
        greedy = out[0, len(prompt):].tolist()
        if k % 2:  # every other sample: the reference differs from the greedy output in its last token
            greedy[-1] = (greedy[-1] + 1) % len(tokenizer)
        samples.append(Sample(prompt + greedy, [-100] * len(prompt) + greedy))
        expected.append(k % 2 == 0)
    res = evaluate_exact_match(model, samples, tokenizer.pad_token_id, batch_size=4)
    assert (res["matched"], res["scored"]) == (sum(expected), len(samples))
    assert res["exact_match"] == pytest.approx(0.5)


def test_retain_config_names_sets_and_rejects_clashes(tmp_path):
    assert EvalConfig(retain="x/general.jsonl").retain == {"general": "x/general.jsonl"}
    assert EvalConfig(retain=["a/one.jsonl", "two.jsonl"]).retain == {"one": "a/one.jsonl", "two": "two.jsonl"}
    with pytest.raises(ValueError, match="two retain sets are named 'one'"):
        EvalConfig(retain=["a/one.jsonl", "b/one.jsonl"])
    with pytest.raises(ConfigError, match="eval.metric"):
        load_config(None, ["eval.metric=accuracy"])
    # A saved config (mapping form) reads back the same.
    cfg = load_config(None, ["eval.retain=[a/one.jsonl]"])
    assert load_config(None, [f"eval.retain={json.dumps(cfg.eval.retain)}"]).eval.retain == {"one": "a/one.jsonl"}


def test_a_bad_retain_record_names_file_and_line_before_the_run_dir_exists(tmp_path):
    data = write_data(tmp_path / "data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    cfg = micro_config(data, tmp_path / "run", eval={"retain": [str(bad)]})
    with pytest.raises(DataError, match=rf"{bad}:2: missing field `completion`"):
        build_run(cfg)
    assert not (tmp_path / "run").exists()


def test_cli_eval_reports_target_and_retain_for_adapter_and_base(tmp_path, capsys):
    from nested_learning.cli import main

    data = write_data(tmp_path / "data")
    retain = _retain_file(tmp_path / "retain")
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), "--set", "model.name_or_path=embedded:micro-llama",
                 "--set", "model.device=cpu", "--set", f"data.dir={data}", "--set", "data.max_length=64",
                 "--set", "schedule.steps=6", "--set", "eval.every=0", "--set", "optim.lr=0.01",
                 "--set", "output.tensorboard=false", "--set", "lora.r=4"]) == 0
    capsys.readouterr()
    adapter = str(out / "checkpoints" / "last")
    target = str(data / "valid.jsonl")
    assert main(["eval", "--adapter", adapter, "--target", target, "--retain", str(retain),
                 "--metric", "exact_match"]) == 0
    tuned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--base", "embedded:micro-llama", "--target", target, "--retain", str(retain)]) == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The adapter's own report carries its base (adapter switched off): the same numbers as the base alone.
    assert tuned["base"]["loss"] == pytest.approx(base["loss"], rel=1e-5)
    assert tuned["base"]["retain"]["general"]["loss"] == pytest.approx(base["retain"]["general"]["loss"], rel=1e-5)
    assert base["retain_loss"] == pytest.approx(_direct_loss(build_embedded("embedded:micro-llama")[0], retain,
                                                             build_embedded("embedded:micro-llama")[1]), rel=1e-5)
    assert tuned["loss"] < base["loss"]  # it learnt the target ...
    assert tuned["retain_loss"] != pytest.approx(base["retain_loss"], rel=1e-4)  # ... and moved on the retain set
    assert 0.0 <= tuned["retain_exact_match"] <= 1.0 and "exact_match" in tuned["base"]
    assert main(["eval", "--base", "embedded:micro-llama"]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["eval", "--base", "embedded:micro-llama", "--retain", "a/x.jsonl", "--retain", "b/x.jsonl"]) == 2
    assert "--retain: two retain sets are named 'x'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def retain_job(tmp_path_factory):
    """A server (bearer token) that ran one job with a retain set to completion: (server, job id)."""
    from servicekit import Server, job_config, kill_workers, wait_job, write_data as write_service_data

    work = tmp_path_factory.mktemp("svc") / "work"
    write_service_data(work)
    _retain_file(work / "data", "held")
    srv = Server(work, token="retain-token").start()
    try:
        c = srv.client()
        r = c.post("/v1/jobs", json=job_config(4, eval={"every": 2, "retain": ["data/held.jsonl"]}))
        assert r.status_code == 201, r.text
        job = wait_job(c, r.json()["id"], lambda j: j["status"] in ("completed", "failed"), "job end")
        assert job["status"] == "completed", job
        yield srv, job["id"]
    finally:
        srv.stop()
        kill_workers(work)


@pytest.mark.slow
def test_service_metrics_carry_retain_loss(retain_job):
    srv, job_id = retain_job
    c = srv.client()
    job = c.get(f"/v1/jobs/{job_id}").json()
    evals = c.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "eval"}).json()["metrics"]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(e["retain_loss"] > 0 and e["retain_loss/held"] == e["retain_loss"] for e in evals)
    assert job["retain_loss"] == evals[-1]["retain_loss"] and job["retain"]["held"]["loss"] == job["retain_loss"]
    assert job["config"]["eval"]["retain"]["held"].endswith("data/held.jsonl")
    bad = c.post("/v1/jobs", json={**job["config"], "eval": {"retain": ["/etc/passwd"]}, "output": {}})
    assert bad.status_code in (403, 422) and "eval.retain.passwd" in bad.text


@pytest.mark.slow
@pytest.mark.browser
def test_dashboard_draws_a_retain_curve(retain_job):
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip(f"{chromium} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    srv, job_id = retain_job
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"],
                                     headless=True)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(srv.url + "/")
        page.fill("input[name=token]", "retain-token")
        page.click("button[type=submit]")
        page.wait_for_selector("#view-list:not([hidden])")
        page.goto(f"{srv.url}/#/jobs/{job_id}")
        page.wait_for_function("window.nl.charts.loss && window.nl.charts.loss.data.length === 4 && "
                               "window.nl.charts.loss.data[3].filter(v => v !== null).length === 2")
        labels = page.evaluate("window.nl.charts.loss.series.map(s => s.label)")
        data = page.evaluate("window.nl.charts.loss.data")
        browser.close()
    evals = srv.client().get(f"/v1/jobs/{job_id}/metrics", params={"kind": "eval"}).json()["metrics"]
    assert labels == ["step", "train", "val", "retain held"]
    assert [v for v in data[3] if v is not None] == [e["retain_loss/held"] for e in evals]
