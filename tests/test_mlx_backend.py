"""The MLX backend (``backend: mlx``) on Linux CPU MLX: parity with torch step for step, CLI training, exact
resume, QLoRA on a 4-bit folder, adapters that mlx-lm itself loads (and that convert to PEFT), the demo."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from conftest import Recorder, micro_config, write_data  # noqa: E402

from nested_learning.cli import main  # noqa: E402
from nested_learning.config import TrainConfig  # noqa: E402


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in _metrics(run_dir) if "loss" in r]


def _last_val(run_dir) -> float:
    return [r["val_loss"] for r in _metrics(run_dir) if "val_loss" in r][-1]


def _mlx_adapter(ckpt) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(Path(ckpt) / "adapters.safetensors")).items()}


# ------------------------------------------------------------------------------------------------ 1. parity
# tiers section per case (periods [1, 2, 4] in all); grad_accum 2 in the first. With ema / consolidate the run
# also evaluates every 4 steps: the eval rows (EMA weights, or fast weights consolidated every 3 steps) must match.
PARITY_CASES = {
    "mean": {"accumulate": "mean"},
    "sum": {"accumulate": "sum"},
    "last": {"accumulate": "last"},
    "ema": {"accumulate": "mean", "ema": 0.8},
    "consolidate": {"accumulate": "sum", "consolidate": {"every": 3, "alpha": 0.5}},
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_torch_and_mlx_take_the_same_steps(tmp_path, case):
    """The embedded micro-llama in torch and its MLX twin (the same weights), the same LoRA init (copied from
    the PEFT model), the same batches: the 10 step losses agree within 2e-5 (float32, relative), periods [1, 2, 4],
    grad_accum 2 (in one mode) and clipping on, for every accumulate mode and with tiers.ema / tiers.consolidate;
    so do the final adapters (the EMA, or the slow weights after the end-of-run consolidation) and eval rows."""
    from mlx.utils import tree_flatten, tree_unflatten

    from nested_learning.mlx.train import build_mlx_run, train_mlx
    from nested_learning.train.loop import train_loop
    from nested_learning.train.setup import build_run

    data = write_data(tmp_path / "data")
    tiers = {"periods": [1, 2, 4], **PARITY_CASES[case]}
    averaging = "ema" in tiers or "consolidate" in tiers
    sections = dict(tiers=tiers,
                    optim={"lr": 1e-2, "batch_size": 4, "grad_accum": 2 if case == "mean" else 1,
                           "max_grad_norm": 0.5},
                    eval={"every": 4 if averaging else 0}, checkpoint={"save_best": False})
    torch_run = build_run(micro_config(data, tmp_path / "torch", **sections))
    mlx_run = build_mlx_run(micro_config(data, tmp_path / "mlx", backend="mlx", **sections))

    copied = []  # PEFT lora_A (r, in) / lora_B (out, r) -> mlx-lm lora_a (in, r) / lora_b (r, out)
    for name, p in torch_run.model.named_parameters():
        if p.requires_grad:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            leaf = "lora_a" if ".lora_A." in name else "lora_b"
            copied.append((f"{module}.{leaf}", mx.array(p.detach().numpy().T.copy())))
    assert len(copied) == len(tree_flatten(mlx_run.model.trainable_parameters()))
    mlx_run.model.update(tree_unflatten(copied))

    torch_state = train_loop(torch_run)
    mlx_state = train_mlx(mlx_run)
    lt, lm = _train_losses(tmp_path / "torch"), _train_losses(tmp_path / "mlx")
    assert len(lt) == len(lm) == 10
    np.testing.assert_allclose(lm, lt, rtol=2e-5)
    assert lm[-1] < lm[0]
    assert [t["updates"] for t in mlx_state.tier_stats] == [t["updates"] for t in torch_state.tier_stats]
    from conftest import adapter_tensors

    theirs = adapter_tensors(torch_state.last_checkpoint)
    ours = _mlx_adapter(mlx_state.last_checkpoint)
    for key, value in theirs.items():
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        leaf = "lora_a" if ".lora_A." in key else "lora_b"
        # Adam divides by the root of the second moment, so an element with tiny gradients turns float32 reduction
        # order into visible update differences: 1e-4 absolute is 1% of one step at lr 1e-2.
        np.testing.assert_allclose(ours[f"{module}.{leaf}"], value.numpy().T, rtol=1e-3, atol=1e-4)
    if averaging:
        evals_t = [r for r in _metrics(tmp_path / "torch") if "val_loss" in r]
        evals_m = [r for r in _metrics(tmp_path / "mlx") if "val_loss" in r]
        assert [r["step"] for r in evals_m] == [r["step"] for r in evals_t] == [4, 8, 10]
        np.testing.assert_allclose([r["val_loss"] for r in evals_m], [r["val_loss"] for r in evals_t], rtol=2e-5)
        # the averaging acted: the final adapter is not the fast weights the optimizer state ends with
        opt_state = mx.load(str(Path(mlx_state.last_checkpoint) / "optimizer.safetensors"))
        copy = "ema" if "ema" in tiers else "slow"
        copies = {k.removeprefix("params.").removesuffix(f".{copy}"): v for k, v in opt_state.items()
                  if k.endswith(f".{copy}")}
        assert copies.keys() == ours.keys()
        for key, value in copies.items():
            np.testing.assert_array_equal(ours[key], np.array(value))  # the adapter written is the slow copy
        if copy == "ema":
            assert any(not np.array_equal(np.array(opt_state[f"params.{k}.fast"]), v) for k, v in ours.items())


# ------------------------------------------------------------------------------------------------ 2. training
def _write_config(path: Path, cfg: TrainConfig) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def test_cli_trains_and_resumes_exactly(tmp_path, capsys):
    """``nested-learning train --backend mlx``: the loss falls; a run stopped after 6 steps and continued with
    ``--resume auto`` ends with the same adapter, optimizer state and metrics as an uninterrupted one."""
    from nested_learning.train.loop import run_training

    data = write_data(tmp_path / "data")
    full_cfg = micro_config(data, tmp_path / "full", tiers={"periods": [1, 2, 4]})
    assert main(["train", str(_write_config(tmp_path / "full.yaml", full_cfg)), "--backend", "mlx", "--quiet"]) == 0
    full = _metrics(tmp_path / "full")
    losses = _train_losses(tmp_path / "full")
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])

    cut_cfg = micro_config(data, tmp_path / "cut", backend="mlx", tiers={"periods": [1, 2, 4]})
    stop = threading.Event()
    state = run_training(cut_cfg, [Recorder(stop_at=6, stop_event=stop)], stop)
    assert (state.status, state.step) == ("stopped", 6)
    rc = main(["train", str(_write_config(tmp_path / "cut.yaml", cut_cfg)), "--resume", "auto", "--quiet"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "completed"

    a, b = tmp_path / "full/checkpoints/last", tmp_path / "cut/checkpoints/last"
    for key, value in _mlx_adapter(a).items():
        np.testing.assert_array_equal(_mlx_adapter(b)[key], value)
    opt_a, opt_b = mx.load(str(a / "optimizer.safetensors")), mx.load(str(b / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys() and any(".acc" in k for k in opt_a)
    for key in opt_a:
        np.testing.assert_array_equal(np.array(opt_b[key]), np.array(opt_a[key]))
    strip = [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in full]
    assert [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in _metrics(tmp_path / "cut")] == strip


def test_ema_and_consolidate_resume_exactly(tmp_path):
    """tiers.ema + tiers.consolidate (every 3) on MLX: a run stopped after step 5 (between two consolidations, a
    partial slow-tier chunk pending) and resumed ends with the adapter, optimizer state (EMA, slow and fast
    weights) and metrics of an uninterrupted one, bit for bit. The stopped checkpoint's adapter is the EMA and
    its state carries the fast weights, which the resume continues from."""
    from nested_learning.train.loop import run_training

    data = write_data(tmp_path / "data")
    tiers = {"periods": [1, 2, 4], "ema": 0.8, "consolidate": {"every": 3, "alpha": 0.5}}

    def config(name):
        return micro_config(data, tmp_path / name, backend="mlx", tiers=tiers, eval={"every": 4})

    assert run_training(config("full")).status == "completed"
    stop = threading.Event()
    state = run_training(config("cut"), [Recorder(stop_at=5, stop_event=stop)], stop)
    assert (state.status, state.step) == ("stopped", 5)
    cut = tmp_path / "cut/checkpoints/last"
    saved, opt_cut = _mlx_adapter(cut), mx.load(str(cut / "optimizer.safetensors"))
    for key, value in saved.items():
        np.testing.assert_array_equal(value, np.array(opt_cut[f"params.{key}.ema"]))
    assert any(not np.array_equal(np.array(opt_cut[f"params.{k}.fast"]), v) for k, v in saved.items())
    assert run_training(config("cut"), resume="auto").status == "completed"

    a, b = tmp_path / "full/checkpoints/last", tmp_path / "cut/checkpoints/last"
    for key, value in _mlx_adapter(a).items():
        np.testing.assert_array_equal(_mlx_adapter(b)[key], value)
    opt_a, opt_b = mx.load(str(a / "optimizer.safetensors")), mx.load(str(b / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys()
    assert all(any(k.endswith(f".{copy}") for k in opt_a) for copy in ("ema", "slow", "fast", "acc"))
    for key in opt_a:
        np.testing.assert_array_equal(np.array(opt_b[key]), np.array(opt_a[key]))
    strip = [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in _metrics(tmp_path / "full")]
    assert [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in _metrics(tmp_path / "cut")] == strip


def _twin_folder(path: Path, bits: int | None = None) -> Path:
    from nested_learning.mlx.model import embedded_twin, save_model_dir
    from nested_learning.model.embedded import byte_tokenizer

    model, config = embedded_twin("embedded:micro-llama")
    return save_model_dir(model, config, byte_tokenizer(), path, bits=bits, group_size=32)


def test_adapter_loads_in_mlx_lm_and_converts_to_peft(tmp_path):
    """The checkpoint is an mlx-lm adapter: ``mlx_lm.load(base, adapter_path=...)`` gives the trained model's
    logits exactly; converted to PEFT (``convert_adapter``), the torch model's logits agree within 1e-4."""
    import mlx_lm
    import torch

    from nested_learning.inference.convert import convert_adapter
    from nested_learning.inference.generate import load_for_inference
    from nested_learning.mlx.model import forward
    from nested_learning.mlx.train import build_mlx_run, train_mlx

    data = write_data(tmp_path / "data")
    run = build_mlx_run(micro_config(data, tmp_path / "run", backend="mlx"))
    state = train_mlx(run)
    ids = np.array([[1, 70, 71, 72, 33, 44, 55, 66, 77, 88]], dtype=np.int32)
    ours = np.array(forward(run.model, mx.array(ids)))

    loaded, _ = mlx_lm.load(str(_twin_folder(tmp_path / "base")), adapter_path=state.last_checkpoint)
    np.testing.assert_allclose(np.array(loaded(mx.array(ids))), ours, rtol=0, atol=1e-5)

    peft_dir = convert_adapter(state.last_checkpoint, tmp_path / "peft", "peft", base="embedded:micro-llama")
    model, _ = load_for_inference(adapter=str(peft_dir), device="cpu")
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
    assert np.abs(ours - np.array(forward(mlx_lm.load(str(tmp_path / "base"))[0], mx.array(ids)))).max() > 1e-3


def test_qlora_on_a_4bit_folder(tmp_path):
    """A 4-bit quantised mlx-lm folder trains (QLoRA): base weights stay packed, the loss falls, and mlx-lm
    loads the adapter onto the quantised base with the trained logits."""
    import mlx.nn as nn
    import mlx_lm

    from nested_learning.mlx.model import forward
    from nested_learning.mlx.train import build_mlx_run, train_mlx

    folder = _twin_folder(tmp_path / "q4", bits=4)
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == 4
    data = write_data(tmp_path / "data")
    run = build_mlx_run(micro_config(data, tmp_path / "run", backend="mlx",
                                     model={"name_or_path": str(folder)}, eval={"every": 0, "at_start": True}))
    assert isinstance(run.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert "4-bit" in run.state.speed_plan
    evals = Recorder()
    state = train_mlx(run, [evals])
    assert evals.evals[-1][1] < evals.evals[0][1] - 0.05
    losses = _train_losses(tmp_path / "run")
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    ids = mx.array([[1, 70, 71, 72, 33, 44, 55]])
    loaded, _ = mlx_lm.load(str(folder), adapter_path=state.last_checkpoint)
    np.testing.assert_allclose(np.array(loaded(ids)), np.array(forward(run.model, ids)), rtol=0, atol=1e-5)

    from nested_learning.model.loading import ModelError, load_model

    with pytest.raises(ModelError, match="quantised to 4 bits.*backend: mlx"):  # the torch backend says why not
        load_model(micro_config(data, tmp_path / "t", model={"name_or_path": str(folder)}).model)


def test_dora_and_gradient_norm_tiers(tmp_path):
    """DoRA (mlx-lm's DoRALinear, magnitudes trained too) with gradient-norm tiers: the probe ranks every
    adapter tensor into the two tiers, the loss falls, and mlx-lm loads the DoRA adapter with the trained logits."""
    import mlx_lm

    from nested_learning.mlx.model import forward
    from nested_learning.mlx.train import build_mlx_run, train_mlx

    data = write_data(tmp_path / "data")
    run = build_mlx_run(micro_config(data, tmp_path / "run", backend="mlx", lora={"use_dora": True},
                                     tiers={"periods": [1, 2], "strategy": "gradient_norm", "probe_steps": 2}))
    assert any(name.endswith(".m") for name in run.tier_assignment)
    assert sorted(set(run.tier_assignment.values())) == [0, 1]
    state = train_mlx(run)
    losses = _train_losses(tmp_path / "run")
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert json.loads((Path(state.last_checkpoint) / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    ids = mx.array([[1, 70, 71, 72, 33, 44, 55]])
    loaded, _ = mlx_lm.load(str(_twin_folder(tmp_path / "base")), adapter_path=state.last_checkpoint)
    np.testing.assert_allclose(np.array(loaded(ids)), np.array(forward(run.model, ids)), rtol=0, atol=1e-5)


def test_packed_rows_give_the_padded_loss(tmp_path):
    """Packed rows (block-diagonal causal mask, no position restart: rotary depends on distances) give the
    same summed loss as one sample per row, within float32 rounding."""
    from nested_learning.data import collate, load_splits
    from nested_learning.mlx.model import embedded_twin, to_mlx, token_loss_sum
    from nested_learning.model.embedded import byte_tokenizer

    tok = byte_tokenizer()
    cfg = micro_config(write_data(tmp_path / "data"), tmp_path / "run", backend="mlx")
    samples = load_splits(cfg.data, tok, 0)[0][:6]
    model, _ = embedded_twin("embedded:micro-llama")
    padded = to_mlx(collate(samples, tok.pad_token_id))
    packed = to_mlx(collate(samples, tok.pad_token_id, packing=True, max_length=64))
    assert padded.segments is None and packed.segments is not None and packed.ids.shape[0] < 6
    a = float(token_loss_sum(model, padded.ids, padded.labels).item())
    b = float(token_loss_sum(model, packed.ids, packed.labels, packed.segments).item())
    assert packed.num_loss_tokens == padded.num_loss_tokens
    assert b == pytest.approx(a, rel=1e-5)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, field", [
    ("speed.lora_fold=false", "speed.lora_fold"),
    ("model.attn_implementation=eager", "model.attn_implementation"),
    ("optim.flat_buffers=false", "optim.flat_buffers"),
    ("model.device=cuda", "model.device"),
])
def test_torch_only_fields_are_refused_by_name(tmp_path, capsys, override, field):
    rc = main(["train", "--backend", "mlx", "--set", override, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and field in err and "mlx" in err
    assert not (tmp_path / "run").exists()


def test_missing_mlx_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # what an install without the extra looks like
    data = write_data(tmp_path / "data")
    cfg = _write_config(tmp_path / "c.yaml", micro_config(data, tmp_path / "run"))
    assert main(["train", str(cfg), "--backend", "mlx", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and 'pip install "nested-learning[mlx]"' in err[0]


# ------------------------------------------------------------------------------------------------ 3. demo
@pytest.mark.slow  # tiny-llama on MLX's CPU backend: one step, two evaluations, two generations (about 20 s)
def test_demo_runs_on_mlx(tmp_path, capsys):
    """``nested-learning demo --backend mlx``: the embedded tiny-llama's MLX twin learns (val loss falls)."""
    assert main(["demo", "--backend", "mlx", "--steps", "1", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["status"] == "completed" and res["steps"] == 1
    assert res["val_loss_after"] < res["val_loss_before"] - 0.1
    assert (Path(res["adapter"]) / "adapters.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ service
def test_scheduler_runs_mlx_jobs_one_at_a_time(tmp_path, monkeypatch):
    """Two free slots, two MLX jobs and a torch job queued in that order: the first MLX job and the torch job
    start; the second MLX job waits until the first has ended."""
    from nested_learning.service.scheduler import Scheduler, _Run
    from nested_learning.service.store import open_store

    store = open_store(str(tmp_path / "jobs.db"))
    ids = [store.create_job(json.dumps({"backend": b} if b else {}), str(tmp_path / f"out{i}"))
           for i, b in enumerate(["mlx", "mlx", None])]
    ids = [j if isinstance(j, str) else j["id"] for j in ids]
    sched = Scheduler(store, tmp_path, gpus=["0", "1"])
    started: list[str] = []

    def spawn(job, slot):
        started.append(job["id"])
        sched.runs[job["id"]] = _Run(job["id"], slot, 0, None, mlx=json.loads(job["config_json"]).get("backend") == "mlx")

    monkeypatch.setattr(sched, "_spawn", spawn)
    sched._launch()
    assert started == [ids[0], ids[2]]
    sched.runs.pop(ids[0])  # the first MLX job ended
    sched._launch()
    assert started == [ids[0], ids[2], ids[1]]


def test_generate_and_merge_an_mlx_checkpoint(tmp_path, capsys):
    """``generate`` and ``merge`` take an MLX run's checkpoint: the merged mlx-lm folder gives the adapted
    model's logits, and greedy generation from the CLI is what the adapted model generates."""
    import mlx_lm

    from nested_learning.mlx.generate import generate_mlx, load_mlx_checkpoint

    data = write_data(tmp_path / "data")
    cfg = micro_config(data, tmp_path / "run", backend="mlx", schedule={"steps": 4}, eval={"every": 0})
    from nested_learning.train.loop import run_training

    ckpt_dir = run_training(cfg).last_checkpoint
    model, tok = load_mlx_checkpoint(ckpt_dir)
    assert main(["generate", "--adapter", ckpt_dir, "--prompt", "add 1 and 2: ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip("\n") == generate_mlx(model, tok, prompt="add 1 and 2: ", max_new_tokens=8)
    assert main(["eval", "--adapter", ckpt_dir, "--target", str(data / "valid.jsonl")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["loss"] == pytest.approx(_last_val(tmp_path / "run"), rel=1e-5)
    assert res["base"]["loss"] > res["loss"]
    assert main(["merge", "--adapter", ckpt_dir, "--out", str(tmp_path / "merged")]) == 0
    merged, _ = mlx_lm.load(str(tmp_path / "merged"))
    ids = mx.array([[1, 70, 71, 72, 33, 44]])
    np.testing.assert_allclose(np.array(merged(ids)), np.array(model(ids)), rtol=0, atol=1e-4)


def test_torch_path_and_mlx_config_checks_never_import_mlx():
    """The torch loop, the CLI and validating an MLX config import no mlx (it stays an optional extra)."""
    import subprocess

    code = ("import sys; import nested_learning.cli, nested_learning.train.loop; "
            "from nested_learning.config import TrainConfig; TrainConfig(backend='mlx'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
