"""Checkpoint manifests and ``--resume auto`` over damaged runs: damaged checkpoints are skipped (with a warning
naming them) for the newest intact one, or the resume stops with an error and changes nothing; older checkpoints
without a manifest still resume; metrics rows appear exactly once across interruptions."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch

from nested_learning.train import checkpoint as ckpt
from nested_learning.train.loop import run_training
from nested_learning.train.metrics import MetricsLog, read_metrics
from conftest import adapter_tensors, micro_config, write_data

SECTIONS = dict(schedule={"steps": 6}, eval={"every": 3}, checkpoint={"every": 2, "keep_last_n": 3},
                tiers={"periods": [1, 4]})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run: checkpoints step-2/4/6, best, last."""
    out = tmp_path_factory.mktemp("ref") / "run"
    state = run_training(micro_config(data_dir, out, **SECTIONS))
    assert state.status == "completed"
    return out


def _copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def _rows(out):
    """metrics.jsonl without its wall-clock field."""
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in read_metrics(out)]


def _assert_same_run(out, reference):
    assert _rows(out) == _rows(reference)  # every row once, same numbers
    a, b = adapter_tensors(out / "checkpoints" / "last"), adapter_tensors(reference / "checkpoints" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _files(out) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10  # one bit, inside the tensor data (the header is at the start)
    path.write_bytes(bytes(data))


def _newer_than(out, step):
    return [c for c in ckpt.list_checkpoints(out) if c["step"] > step]


def test_manifest_lists_every_file_with_its_checksum(reference):
    for c in ckpt.list_checkpoints(reference):
        path = reference / "checkpoints" / c["name"]
        manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
        on_disk = {p.name for p in path.iterdir()} - {ckpt.MANIFEST_FILE}
        assert set(manifest["files"]) == on_disk and {ckpt.STATE_FILE, ckpt.ADAPTER_FILE} <= on_disk
        for name, entry in manifest["files"].items():
            data = (path / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert manifest["step"] == c["step"] == torch.load(path / ckpt.STATE_FILE, weights_only=True)["step"]
        ckpt.verify_checkpoint(path)
    assert not any(p.name.startswith(".") for p in (reference / "checkpoints").iterdir())


def test_damaged_newest_checkpoints_are_skipped_for_the_newest_intact_one(reference, data_dir, tmp_path, caplog):
    out = _copy(reference, tmp_path)
    damaged = _newer_than(out, 4)  # step-000006, last, and best when it is step 6
    assert {"last", "step-000006"} <= {c["name"] for c in damaged}
    for i, c in enumerate(damaged):
        path = out / "checkpoints" / c["name"]
        _truncate(path / ckpt.STATE_FILE) if i % 2 == 0 else _flip(path / ckpt.ADAPTER_FILE)
    with caplog.at_level(logging.WARNING, logger="nested_learning.train"):
        state = run_training(micro_config(data_dir, out, **SECTIONS), resume="auto")
    warned = caplog.text
    for c in damaged:
        assert f"skipping damaged checkpoint {out / 'checkpoints' / c['name']}" in warned
    assert "sha256 differs" in warned and "bytes where manifest.json records" in warned
    assert f"resuming from {out / 'checkpoints' / 'step-000004'}" in warned
    assert state.status == "completed" and state.step == 6
    _assert_same_run(out, reference)  # bit-identical to the uninterrupted run
    for c in ckpt.list_checkpoints(out):
        ckpt.verify_checkpoint(c["path"])  # the damaged ones were replaced as the run passed them again


def test_all_damaged_stops_with_an_error_and_changes_nothing(reference, data_dir, tmp_path, capsys):
    from nested_learning.cli import main

    out = _copy(reference, tmp_path)
    for c in ckpt.list_checkpoints(out):
        _truncate(out / "checkpoints" / c["name"] / ckpt.STATE_FILE)
    before = _files(out)
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint to resume from") as err:
        run_training(micro_config(data_dir, out, **SECTIONS), resume="auto")
    assert "step-000002" in str(err.value) and "last" in str(err.value)
    assert _files(out) == before  # no restart from step 0: nothing deleted, metrics.jsonl untouched
    config = tmp_path / "config.yaml"
    config.write_text(micro_config(data_dir, out, **SECTIONS).to_yaml())
    assert main(["train", str(config), "--resume", "auto", "--quiet"]) == 2  # the CLI: an error, not exit 0
    assert f"error: {out / 'checkpoints'}: no intact checkpoint to resume from" in capsys.readouterr().err
    assert _files(out) == before
    with pytest.raises(ckpt.CheckpointError, match=r"step-000004/trainer_state.pt: \d+ bytes"):
        ckpt.resolve_resume(str(out / "checkpoints" / "step-000004"), out)  # named explicitly: an error too


def test_checkpoints_without_manifest_still_resume(reference, data_dir, tmp_path):
    """Checkpoints written before manifests (and before the metrics row count) resume exactly."""
    out = _copy(reference, tmp_path)
    for c in _newer_than(out, 4):
        shutil.rmtree(c["path"])
    for c in ckpt.list_checkpoints(out):
        path = out / "checkpoints" / c["name"]
        (path / ckpt.MANIFEST_FILE).unlink()
        saved = torch.load(path / ckpt.STATE_FILE, weights_only=True)
        del saved["metrics_rows"], saved["nonfinite"]
        torch.save(saved, path / ckpt.STATE_FILE)
    assert ckpt.find_latest(out).name == "step-000004"
    state = run_training(micro_config(data_dir, out, **SECTIONS), resume="auto")
    assert state.status == "completed"
    _assert_same_run(out, reference)
    # without a manifest, a file that does not load is still caught
    old = out / "checkpoints" / "step-000002"  # not rewritten: still no manifest
    saved = torch.load(old / ckpt.STATE_FILE, weights_only=True)
    next(iter(saved["optimizer"]["state"].values()))["exp_avg_sq"].view(-1)[0] = float("nan")
    torch.save(saved, old / ckpt.STATE_FILE)  # what a diverged run of an earlier version could write
    with pytest.raises(ckpt.CheckpointError, match=r"holds NaN/Inf \(optimizer.state.0.exp_avg_sq\)"):
        ckpt.verify_checkpoint(old)
    _truncate(old / ckpt.ADAPTER_FILE)
    with pytest.raises(ckpt.CheckpointError, match="unreadable adapter"):
        ckpt.verify_checkpoint(old)


def test_resuming_a_completed_run_writes_nothing(reference, data_dir, tmp_path):
    out = _copy(reference, tmp_path)
    before = _files(out)
    state = run_training(micro_config(data_dir, out, **SECTIONS), resume="auto")
    assert state.status == "completed" and state.step == 6
    assert state.last_checkpoint == str(out / "checkpoints" / "last")
    after = _files(out)
    del before["config.yaml"], after["config.yaml"]  # the run's config names its (copied) output.dir
    assert after == before  # no second final eval row, no rewritten checkpoint


def test_kill_between_eval_row_and_best_writes_the_row_once(reference, data_dir, tmp_path, monkeypatch):
    """The eval row precedes `best`: a crash between them resumes from an earlier checkpoint and evaluates
    again, so the row appears once."""
    out = tmp_path / "run"
    real_save = ckpt.save_checkpoint

    def crash_at_best(output_dir, name, *args, **kwargs):
        if name == "best":
            raise KeyboardInterrupt("killed while writing best")
        return real_save(output_dir, name, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", crash_at_best)
    with pytest.raises(KeyboardInterrupt):
        run_training(micro_config(data_dir, out, **SECTIONS))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert [r["step"] for r in read_metrics(out) if "val_loss" in r] == [3]  # the row went in before `best`
    assert ckpt.find_latest(out).name == "step-000002"
    run_training(micro_config(data_dir, out, **SECTIONS), resume="auto")
    _assert_same_run(out, reference)


def test_auto_resume_without_checkpoints_restarts_and_deletes_nothing_else(reference, data_dir, tmp_path):
    """A run killed before its first checkpoint: ``--resume auto`` starts it over; only the half-written
    checkpoint directory goes, other files stay."""
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-000002-abc").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-000002-abc" / ckpt.STATE_FILE).write_bytes(b"cut")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    (out / "notes.txt").write_text("mine")
    run_training(micro_config(data_dir, out, **SECTIONS), resume="auto")
    _assert_same_run(out, reference)
    assert (out / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


# -- metrics.jsonl ------------------------------------------------------------------------------------------

def test_cut_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="nested_learning.train"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert f"{path}: ignoring the cut last line 3" in caplog.text
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo\n{"step": 3, "loss": 2.3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(path)


def test_resume_rewrites_metrics_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "l'
    path.write_text(original)

    def killed(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(tmp_path, resume_step=3, keep_rows=3, tensorboard=False)
    monkeypatch.undo()
    assert path.read_text() == original  # the old file is whole until the new one replaces it
    log = MetricsLog(tmp_path, resume_step=3, keep_rows=3, tensorboard=False)
    log.write({"step": 4, "loss": 0.2})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4] and log.rows == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
