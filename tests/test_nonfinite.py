"""Non-finite steps: checked every step on the device, never applied; ``optim.on_nonfinite: stop`` halts with an
error naming the step and values, ``skip`` skips (up to ``optim.max_skipped_steps`` in a row); no checkpoint
with non-finite weights or optimizer state is written."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from nested_learning.model.embedded import build_embedded
from nested_learning.optim.adamw import NestedAdamW
from nested_learning.train import checkpoint as ckpt
from nested_learning.train.loop import train_loop
from nested_learning.train.metrics import read_metrics
from nested_learning.train.nonfinite import NonFiniteGuard
from nested_learning.train.setup import build_run
from nested_learning.train.state import Callback, TrainerState, TrainingError
from conftest import adapter_tensors, micro_config, write_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


class Snapshots(Callback):
    """Adapter weights and optimizer state (moments, step counts, accumulators) after every step."""

    def __init__(self, run):
        self.run, self.after = run, {}

    def on_step(self, state):
        params = [p.detach().clone() for p in self.run.model.parameters() if p.requires_grad]
        self.after[state.step] = (params, copy.deepcopy(self.run.optimizer.state_dict()["state"]))


def _same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys() and all(
        sa[k].keys() == sb[k].keys() and all(torch.equal(sa[k][n], sb[k][n]) for n in sa[k]) for k in sa)


def _poisoned(run, bad_steps, value=float("nan")):
    """The loss of the given steps (one micro-batch per step) multiplied by NaN or Inf."""
    good, calls = run.loss_fn, {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss_sum, n = good(model, batch)
        return (loss_sum * value if calls["n"] in bad_steps else loss_sum), n

    run.loss_fn = loss_fn


def _finite_checkpoints(out):
    for c in ckpt.list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in adapter_tensors(c["path"]).values()), c["name"]
        saved = torch.load(f"{c['path']}/{ckpt.STATE_FILE}", weights_only=True)
        assert not ckpt.non_finite_entries(saved), c["name"]


def test_stop_with_slow_tiers_and_sparse_read_back(data_dir, tmp_path):
    """A bad step between read-backs (log_every 4) is never applied; the run halts at the next sync point (the
    step-6 checkpoint) with the step and values, and the last checkpoint stays the step-4 one."""
    cfg = micro_config(data_dir, tmp_path / "run", tiers={"periods": [1, 4]}, output={"log_every": 4,
                       "tensorboard": False}, checkpoint={"every": 2}, eval={"every": 0}, schedule={"steps": 8})
    run = build_run(cfg)
    _poisoned(run, {5})
    snaps = Snapshots(run)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5 \(loss=nan, grad_norm=nan\); training "
                                            r"stopped, last good checkpoint: .*step-000004"):
        train_loop(run, [snaps])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    _finite_checkpoints(tmp_path / "run")
    assert _same(snaps.after[5], snaps.after[4]) and _same(snaps.after[6], snaps.after[4])  # frozen once halted
    saved = adapter_tensors(tmp_path / "run" / "checkpoints" / "step-000004")
    live = {k: v for k, v in run.model.state_dict().items() if "lora" in k}
    assert len(saved) == len(live) and all(torch.equal(saved[k], live[k.replace(".weight", ".default.weight")])
                                           for k in saved)


def test_skip_leaves_the_bad_step_out(data_dir, tmp_path, caplog):
    cfg = micro_config(data_dir, tmp_path / "run", tiers={"periods": [1, 4]}, optim={"on_nonfinite": "skip"},
                       checkpoint={"every": 2}, eval={"every": 0}, schedule={"steps": 7})
    run = build_run(cfg)
    _poisoned(run, {5}, value=float("inf"))
    snaps = Snapshots(run)
    with caplog.at_level(logging.WARNING, logger="nested_learning.train"):
        state = train_loop(run, [snaps])
    assert state.status == "completed" and state.step == 7
    assert "skipped 1 step(s) with a non-finite loss or gradient norm, the latest: step 5 (loss=inf" in caplog.text
    assert _same(snaps.after[5], snaps.after[4])  # weights, moments, step counts and accumulators untouched
    assert not _same(snaps.after[6], snaps.after[5])  # training went on
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert rows[4]["loss"] is None and all(r["loss"] is not None for r in rows[:4] + rows[5:])
    assert [r.get("skipped_steps") for r in rows] == [None] * 4 + [1] * 3
    _finite_checkpoints(tmp_path / "run")


def test_skip_stops_after_too_many_in_a_row(data_dir, tmp_path):
    cfg = micro_config(data_dir, tmp_path / "run", optim={"on_nonfinite": "skip", "max_skipped_steps": 2},
                       checkpoint={"every": 1}, eval={"every": 0}, schedule={"steps": 6})
    run = build_run(cfg)
    _poisoned(run, set(range(3, 7)))
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5 \(loss=nan, grad_norm=nan\): 3 consecutive "
                                            r"non-finite steps, more than optim.max_skipped_steps=2"):
        train_loop(run)
    # steps 3 and 4 were skipped (and checkpointed: their state is the step-2 state); step 5 halted the run
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000003", "step-000004"]
    a, b = (adapter_tensors(tmp_path / "run" / "checkpoints" / n) for n in ("step-000002", "step-000004"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    _finite_checkpoints(tmp_path / "run")


def test_checkpoint_refuses_non_finite_optimizer_state(tmp_path):
    from nested_learning.config import LoraConfig, TrainConfig
    from nested_learning.model.lora import wrap_lora

    base, tok = build_embedded("embedded:micro-llama")
    model = wrap_lora(base, LoraConfig(r=2, alpha=4), seed=0)
    payload = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2), "acc": torch.tensor([1.0, 1e39])}}},
               "rng": ckpt.capture_rng()}
    with pytest.raises(ckpt.CheckpointError, match=r"resume state holds NaN/Inf \(optimizer.state.0.acc\)"):
        ckpt.save_checkpoint(tmp_path, "last", model, tok, TrainConfig(), payload)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


def test_guard_and_fused_step_need_no_host_sync(monkeypatch):
    """The per-step path, guard plus a fused optimizer step, reads nothing back to the host; only ``check``
    (called where the loop syncs anyway) does."""
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    opt = NestedAdamW([{"params": params[:1]}, {"params": params[1:], "period": 2}], lr=0.1, fused=True, flat=True)
    guard = NonFiniteGuard(torch.device("cpu"), "skip", 3, step=0)
    reads = []
    for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _real=real, _name=name, **k: (reads.append(_name), _real(self, *a, **k))[1])
    for s in range(6):
        for p in params:
            p.grad = torch.full_like(p, float("nan") if s == 3 else 0.5)
        loss = torch.tensor(float("nan") if s == 3 else 1.0)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        opt.step(found_inf=guard.update(loss, norm))
    assert reads == []
    monkeypatch.undo()
    assert guard.check(TrainerState()) == 1 and all(torch.isfinite(p).all() for p in params)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the fused kernel's device-side skip")


@cuda
@pytest.mark.parametrize("flat", [False, True])
def test_cuda_steps_never_sync_and_skip_like_the_host_path(flat):
    """On CUDA the default (fused) step takes the flag on the device: sync debug mode would raise on any read."""

    def build():
        g = torch.Generator().manual_seed(7)
        params = [torch.nn.Parameter(torch.randn(64, 8, generator=g).cuda()) for _ in range(4)]
        return params, NestedAdamW([{"params": params[:2]}, {"params": params[2:], "period": 2}], lr=0.1, flat=flat)

    (params, opt), (host_params, host) = build(), build()
    host._skips_on_device = lambda: False
    assert opt._skips_on_device()
    guard, host_guard = (NonFiniteGuard(torch.device("cuda"), "skip", 3, step=0) for _ in range(2))
    for s in range(8):
        for ps in (params, host_params):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, float("nan") if s in (3, 5) else 0.1 * (i + 1) * (s + 1))
        loss = torch.tensor(float("inf") if s in (3, 5) else 1.0, device="cuda")
        norms = [torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True) for ps in (params, host_params)]
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(found_inf=guard.update(loss, norms[0]))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        host.step(found_inf=host_guard.update(loss, norms[1]))
    assert all(torch.equal(a, b) for a, b in zip(params, host_params))
    assert guard.check(TrainerState()) == 2 and all(torch.isfinite(p).all() for p in params)


@cuda
def test_cuda_run_skips_a_bad_step(data_dir, tmp_path):
    cfg = micro_config(data_dir, tmp_path / "run", model={"name_or_path": "embedded:micro-llama", "device": "cuda"},
                       speed={"compile": False, "cuda_graphs": False}, tiers={"periods": [1, 4]},
                       optim={"on_nonfinite": "skip"}, output={"log_every": 3, "tensorboard": False},
                       eval={"every": 0}, checkpoint={"every": 2})
    run = build_run(cfg)
    assert run.optimizer._skips_on_device()
    _poisoned(run, {5})
    snaps = Snapshots(run)
    state = train_loop(run, [snaps])
    assert state.status == "completed" and state.step == 10
    assert _same(snaps.after[5], snaps.after[4]) and not _same(snaps.after[6], snaps.after[5])
    _finite_checkpoints(tmp_path / "run")


@cuda
@pytest.mark.parametrize("flat", [False, True])
def test_cuda_state_dict_round_trip_keeps_steps_on_the_device(flat, tmp_path):
    g = torch.Generator().manual_seed(8)
    grads = [[torch.randn(16, 4, generator=g).cuda() for _ in range(3)] for _ in range(7)]

    def build():
        params = [torch.nn.Parameter(torch.ones(16, 4, device="cuda") * i) for i in range(3)]
        return params, NestedAdamW([{"params": params[:1]}, {"params": params[1:], "period": 3}], lr=0.1, flat=flat)

    def drive(params, opt, steps):
        for s in steps:
            for p, grad in zip(params, grads[s]):
                p.grad = grad.clone()
            opt.step()

    full_params, full = build()
    drive(full_params, full, range(7))
    params, opt = build()
    drive(params, opt, range(4))
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    resumed_params, resumed = build()
    with torch.no_grad():
        for p, v in zip(resumed_params, saved["params"]):
            p.copy_(v)
    resumed.load_state_dict(saved["opt"])
    assert all(st["step"].is_cuda for st in resumed.state.values())
    drive(resumed_params, resumed, range(4, 7))
    assert all(torch.equal(a, b) for a, b in zip(resumed_params, full_params))
