"""``output.report_to``: a tiny training tracked in MLflow, read back through MLflow's own client; the
``tensorboard`` switch keeps working; a missing tracker package is one clear error naming the extra."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
import threading

import pytest

from conftest import Recorder, micro_config
from nested_learning.config import ConfigError, OutputConfig
from nested_learning.integrations.tracking import flat_config
from nested_learning.train import run_training
from nested_learning.train.metrics import read_metrics


def _mlflow():
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("skipping: mlflow is not installed (pip install 'nested-learning[mlflow]')", file=sys.stderr)
        pytest.skip("mlflow is not installed (pip install 'nested-learning[mlflow]')")
    from mlflow.tracking import MlflowClient

    return MlflowClient


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_mlflow_run_reads_back(data_dir, tmp_path):
    """Stopped at step 4 and resumed: one MLflow run holds the whole training, every row once."""
    MlflowClient = _mlflow()
    out = tmp_path / "run"
    cfg = micro_config(data_dir, out, tiers={"periods": [1, 2, 4]}, output={"report_to": ["mlflow"]})
    stop = threading.Event()
    assert run_training(cfg, [Recorder(stop_at=4, stop_event=stop)], stop_event=stop).status == "stopped"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    first = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(first).info.status == "KILLED"
    assert run_training(cfg, resume="auto").status == "completed"
    assert not (out / "tb").exists()  # report_to decides: no TensorBoard unless listed

    experiment = client.get_experiment_by_name("nested-learning")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == first and run.info.status == "FINISHED" and run.info.run_name == "run"

    # Params: the flat config, every field of it.
    params = run.data.params
    assert params == flat_config(cfg)
    assert params["tiers.periods"] == "[1, 2, 4]" and params["optim.lr"] == "0.01"
    assert params["model.name_or_path"] == "embedded:micro-llama" and params["seed"] == "0"

    # Metrics: every metrics.jsonl row, train and eval, tier update counts included.
    rows = read_metrics(out)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11)) and [r["step"] for r in evals] == [5, 10]
    assert _history(client, first, "train/loss") == [(r["step"], r["loss"]) for r in train]
    assert _history(client, first, "train/lr") == [(r["step"], r["lr"]) for r in train]
    assert _history(client, first, "eval/val_loss") == [(r["step"], r["val_loss"]) for r in evals]
    for k, period in enumerate([1, 2, 4]):
        got = _history(client, first, f"tiers/updates_{k}")
        assert got == [(r["step"], float(r["tier_updates"][k])) for r in train]
        assert got[-1] == (10, float(10 // period))

    # Artifacts: the final adapter, byte for byte.
    names = sorted(a.path for a in client.list_artifacts(first, "adapter"))
    assert names == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    local = client.download_artifacts(first, "adapter/adapter_model.safetensors", str(tmp_path))
    last = out / "checkpoints" / "last" / "adapter_model.safetensors"
    assert open(local, "rb").read() == last.read_bytes()


def test_report_to_and_the_tensorboard_switch(data_dir, tmp_path):
    assert OutputConfig().trackers == ["tensorboard"]
    assert OutputConfig(tensorboard=False).trackers == []
    assert OutputConfig(report_to=["mlflow", "tensorboard"]).trackers == ["mlflow", "tensorboard"]
    with pytest.raises(ValueError, match="output.tensorboard is false but output.report_to lists tensorboard"):
        OutputConfig(report_to=["tensorboard"], tensorboard=False)
    with pytest.raises(ValueError, match="each tracker may appear once"):
        OutputConfig(report_to=["mlflow", "mlflow"])
    with pytest.raises(ValueError, match="report_to"):
        OutputConfig(report_to=["neptune"])


def _wandb_records(path):
    """The records of an offline W&B run file: LevelDB's log format (32 KiB blocks of chunks, each with a
    7-byte header: crc32, length, type) after a 7-byte ``:W&B`` file header; each record a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        chunk, pos = raw[pos + 7:pos + 7 + n], pos + 7 + n
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL / FIRST start a record
        if kind in (1, 4):  # FULL / LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run(data_dir, tmp_path):
    try:
        import wandb
    except ImportError:
        print("skipping: wandb is not installed (pip install 'nested-learning[wandb]')", file=sys.stderr)
        pytest.skip("wandb is not installed (pip install 'nested-learning[wandb]')")
    out = tmp_path / "run"
    cfg = micro_config(data_dir, out, tiers={"periods": [1, 2, 4]}, output={"report_to": ["wandb"]})
    assert run_training(cfg).status == "completed"
    wandb.teardown()  # the W&B service process writes the run file on its own time; this waits until it is done

    run_id = json.loads((out / "wandb_run.json").read_text())["run_id"]
    (log_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")  # offline: nothing sent
    records = list(_wandb_records(log_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["tiers.periods"] == "[1, 2, 4]" and config["optim.lr"] == "0.01"

    # W&B keeps one history row per step: a step's eval row joins its train row.
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history[row["_step"]] = row
    rows = read_metrics(out)
    for r in rows:
        got = history[r["step"]]
        for key in ("loss", "lr", "val_loss"):
            if key in r:
                assert got[f"{'eval' if key == 'val_loss' else 'train'}/{key}"] == pytest.approx(r[key], rel=1e-12)
        if "tier_updates" in r:
            assert [got[f"tiers/updates_{k}"] for k in range(3)] == r["tier_updates"]
    assert sorted(history) == list(range(1, 11)) and history[10]["tiers/updates_2"] == 2

    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model"
    digests = {e.path: e.digest for e in artifact.manifest.contents}
    last = out / "checkpoints" / "last" / "adapter_model.safetensors"
    assert digests["adapter_model.safetensors"] == base64.b64encode(hashlib.md5(last.read_bytes()).digest()).decode()
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_tracker_package_is_one_clear_error(data_dir, tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import <tracker>` now raises ImportError
    cfg = micro_config(data_dir, tmp_path / "run", output={"report_to": [tracker]})
    with pytest.raises(ConfigError, match=rf"output.report_to: '{tracker}' needs the {tracker} package; install it "
                                          rf"with: pip install 'nested-learning\[{tracker}\]'"):
        run_training(cfg)
    assert read_metrics(tmp_path / "run") == []  # nothing trained
