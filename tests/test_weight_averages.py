"""tiers.consolidate and tiers.ema: the optimizer's slow weights against hand-written references, the saved
adapters of a whole run, exact resume, and the config errors."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from pydantic import ValidationError

from nested_learning.config import TrainConfig
from nested_learning.optim.adamw import NestedAdamW
from nested_learning.train.loop import run_training, train_loop
from nested_learning.train.metrics import read_metrics
from nested_learning.train.setup import build_run
from conftest import Recorder, adapter_tensors, micro_config, write_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


# ------------------------------------------------------------------------------------- hand-computed numbers
def _descend(opt_kwargs: dict, steps: int) -> tuple[torch.Tensor, NestedAdamW]:
    """One scalar weight at 1.0, loss = weight (gradient 1), AdamW with lr 0.1 and eps 0: each step takes it
    down by exactly 0.1 (Adam's update is m̂/√v̂ = 1 for a constant gradient)."""
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = NestedAdamW([w], lr=0.1, eps=0.0, **opt_kwargs)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
    return w, opt


def test_ema_hand_numbers():
    w, opt = _descend({"ema": 0.5}, 3)  # fast: 0.9, 0.8, 0.7
    assert w.item() == pytest.approx(0.7, abs=1e-12)
    # ema0 = 1; then 0.5 * ema + 0.5 * fast: 0.95, 0.875, 0.7875
    assert opt.state[w]["ema"].item() == pytest.approx(0.7875, abs=1e-12)
    with opt.averaged_weights():
        assert w.item() == pytest.approx(0.7875, abs=1e-12)
    assert w.item() == pytest.approx(0.7, abs=1e-12)  # the fast weight is back
    opt.keep_averaged_weights()
    assert w.item() == pytest.approx(0.7875, abs=1e-12)


def test_consolidate_hand_numbers():
    w, opt = _descend({"consolidate": (2, 0.5)}, 5)
    # step 1: 0.9; step 2: 0.8 -> slow = 1 + 0.5 (0.8 - 1) = 0.9, fast <- 0.9; step 3: 0.8;
    # step 4: 0.7 -> slow = 0.9 + 0.5 (0.7 - 0.9) = 0.8, fast <- 0.8; step 5: 0.7 (not consolidated yet)
    assert w.item() == pytest.approx(0.7, abs=1e-12)
    assert opt.state[w]["slow"].item() == pytest.approx(0.8, abs=1e-12)
    opt.finish()  # the last consolidation: 0.8 + 0.5 (0.7 - 0.8)
    assert w.item() == pytest.approx(0.75, abs=1e-12) and opt.state[w]["slow"].item() == pytest.approx(0.75)


# ------------------------------------------------------------------------- references on a tiny parameter set
def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64))]
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params] for _ in range(9)]
    return params, grads


def _optimizer(params, flat: bool, **kwargs) -> NestedAdamW:
    groups = [{"params": params[:2], "period": 1}, {"params": params[2:], "period": 2}]
    return NestedAdamW(groups, lr=0.05, weight_decay=0.01, flat=flat, **kwargs)


@pytest.mark.parametrize("flat", [False, True])
def test_ema_matches_reference(flat):
    params, grads = _problem()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = _optimizer(params, flat, ema=0.8), _optimizer(ref_params, flat)
    ema = [p.detach().clone() for p in ref_params]
    for gs in grads:
        for p, q, g in zip(params, ref_params, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        ema = [0.8 * e + 0.2 * q.detach() for e, q in zip(ema, ref_params)]
    # the fast weights train exactly as without the EMA; the EMA is the recurrence on them
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))
    for p, e in zip(params, ema):
        torch.testing.assert_close(opt.state[p]["ema"], e, rtol=1e-13, atol=1e-14)
    with opt.averaged_weights():
        for p, e in zip(params, ema):
            torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-14)
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))


@pytest.mark.parametrize("flat", [False, True])
def test_consolidation_matches_reference(flat):
    params, grads = _problem(1)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = _optimizer(params, flat, consolidate=(4, 0.25)), _optimizer(ref_params, flat)
    slow = [p.detach().clone() for p in ref_params]
    for s, gs in enumerate(grads, 1):
        for p, q, g in zip(params, ref_params, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        if s % 4 == 0:
            with torch.no_grad():
                slow = [w + 0.25 * (q.detach() - w) for w, q in zip(slow, ref_params)]
                for q, w in zip(ref_params, slow):
                    q.copy_(w)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-13, atol=1e-14)
    # 9 steps: step 9 is pending; finish() flushes the period-2 tier's partial chunk, then consolidates
    opt.finish()
    ref.finish()
    with torch.no_grad():
        slow = [w + 0.25 * (q.detach() - w) for w, q in zip(slow, ref_params)]
    for p, w in zip(params, slow):
        torch.testing.assert_close(p.detach(), w, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["slow"], w, rtol=1e-13, atol=1e-14)


def test_state_dict_round_trip_continues_exactly():
    """Saved after 5 steps, loaded into a fresh optimizer over parameters holding the EMA (as an adapter
    saved with EMA weights would): the fast weights come back from the state, and 4 more steps match."""
    params, grads = _problem(2)
    opt = _optimizer(params, True, ema=0.9, consolidate=(3, 0.5))
    for gs in grads[:5]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin = [torch.nn.Parameter(opt.state[p]["ema"].clone()) for p in params]
    other = _optimizer(twin, True, ema=0.9, consolidate=(3, 0.5))
    other.load_state_dict(saved)
    assert all(torch.equal(p, q) for p, q in zip(params, twin))  # the fast weights, not the EMA
    for gs in grads[5:]:
        for p, q, g in zip(params, twin, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin))
    assert all(torch.equal(opt.state[p][k], other.state[q][k]) for p, q in zip(params, twin) for k in ("ema", "slow"))


def test_off_by_default_adds_no_state():
    params, grads = _problem()
    opt = _optimizer(params, False)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    assert not any(k in st for st in opt.state.values() for k in ("ema", "slow", "fast"))
    assert not any("fast" in st for st in opt.state_dict()["state"].values())


# ------------------------------------------------------------------------------------------------ whole runs
def _param_names(run) -> dict[str, torch.Tensor]:
    """Trainable parameters by the names PEFT saves them under (no adapter name)."""
    return {n.replace(".default", ""): p for n, p in run.model.named_parameters() if p.requires_grad}


def test_ema_run_saves_and_evaluates_the_ema(data_dir, tmp_path):
    cfg = micro_config(data_dir, tmp_path / "run", tiers={"periods": [1, 2], "ema": 0.9}, eval={"every": 5})
    run = build_run(cfg)
    state = train_loop(run)
    assert state.status == "completed"
    saved = adapter_tensors(state.last_checkpoint)
    params = _param_names(run)
    assert saved.keys() == params.keys()
    for name, p in params.items():
        ema = run.optimizer.state[p]["ema"]
        assert torch.equal(saved[name], ema)  # the final adapter is the EMA
        assert torch.equal(p.detach(), ema)  # and so is the model left in memory
    fast = torch.load(f"{state.last_checkpoint}/trainer_state.pt", weights_only=False)["optimizer"]["state"]
    assert any(not torch.equal(st["fast"], st["ema"]) for st in fast.values())  # the resume point differs
    # the final eval row scored the EMA weights: the same loss as a plain evaluation of the saved adapter
    from nested_learning.train.evaluate import evaluate_samples

    again = evaluate_samples(run.forward_model, run.valid_samples, run.pad_id, batch_size=4, device=run.device,
                             loss_fn=run.loss_fn)
    assert [r for r in read_metrics(tmp_path / "run") if "val_loss" in r][-1]["val_loss"] == again["loss"]
    # resuming the finished run trains nothing; its model is the final adapter again (not the fast weights)
    done = build_run(cfg, resume="auto")
    assert train_loop(done).step == 10
    assert all(torch.equal(p.detach(), saved[n]) for n, p in _param_names(done).items())


def test_consolidated_run_saves_the_slow_weights(data_dir, tmp_path):
    cfg = micro_config(data_dir, tmp_path / "run", tiers={"periods": [1, 2], "consolidate": {"every": 4, "alpha": 0.5}},
                       optim={"flat_buffers": True}, eval={"every": 0})
    run = build_run(cfg)
    state = train_loop(run)
    saved = adapter_tensors(state.last_checkpoint)
    for name, p in _param_names(run).items():
        assert torch.equal(saved[name], run.optimizer.state[p]["slow"])  # 10 steps: consolidated at 4, 8, end
    plain = run_training(micro_config(data_dir, tmp_path / "plain", tiers={"periods": [1, 2]},
                                      optim={"flat_buffers": True}, eval={"every": 0}))
    other = adapter_tensors(plain.last_checkpoint)
    assert any(not torch.equal(saved[k], other[k]) for k in saved)


@pytest.mark.parametrize("tiers, resume", [
    ({"ema": 0.8}, "auto"),
    ({"consolidate": {"every": 4, "alpha": 0.5}}, "auto"),
    # both, three tiers summing their chunks, per-tensor state; resumed from `best` (step 4, the EMA's best)
    ({"ema": 0.8, "consolidate": {"every": 3, "alpha": 0.5}, "periods": [1, 4, 16], "accumulate": "sum"}, "best"),
], ids=["ema", "consolidate", "both-from-best"])
def test_resume_equals_uninterrupted(data_dir, tmp_path, tiers, resume):
    # stopped at step 6: mid-way between consolidations, the period-4 tier holding a partial chunk
    sections = dict(tiers={"periods": [1, 4], **tiers}, eval={"every": 4},
                    optim={"flat_buffers": resume == "auto"})
    full = run_training(micro_config(data_dir, tmp_path / "full", **sections))
    cfg = micro_config(data_dir, tmp_path / "split", **sections)
    stop = threading.Event()
    stopped = run_training(cfg, [Recorder(stop_at=6, stop_event=stop)], stop)
    assert stopped.status == "stopped" and stopped.step == 6
    if resume == "best":
        best = tmp_path / "split" / "checkpoints" / "best"
        assert torch.load(best / "trainer_state.pt", weights_only=False)["step"] == 4
        resume = str(best)
    resumed = run_training(cfg, resume=resume)
    assert resumed.status == "completed"

    def rows(out):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "time", "wall")}
                for r in read_metrics(out)]

    assert [r.get("loss") for r in rows(tmp_path / "split")] == [r.get("loss") for r in rows(tmp_path / "full")]
    assert [r.get("val_loss") for r in rows(tmp_path / "split")] == [r.get("val_loss") for r in rows(tmp_path / "full")]
    a, b = adapter_tensors(full.last_checkpoint), adapter_tensors(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_val_loss == full.best_val_loss


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("tiers, field", [
    ({"ema": 1.0}, "tiers.ema"),
    ({"ema": 0}, "tiers.ema"),
    ({"consolidate": {"every": 0, "alpha": 0.5}}, "tiers.consolidate.every"),
    ({"consolidate": {"every": 4, "alpha": 1.5}}, "tiers.consolidate.alpha"),
    ({"consolidate": {"every": 4}}, "tiers.consolidate.alpha"),
    ({"consolidate": {"every": 4, "alpha": 0.5, "reset": True}}, "tiers.consolidate.reset"),
])
def test_bad_values_name_the_field(tiers, field):
    from nested_learning.config import format_validation_error

    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"tiers": tiers})
    assert f"  {field}: " in format_validation_error(info.value)


@pytest.mark.parametrize("tiers", [{"ema": 0.99}, {"consolidate": {"every": 8, "alpha": 0.5}}])
def test_mlx_backend_accepts_them(tiers):
    """The MLX backend implements both (tests/test_mlx_backend.py checks it against this one)."""
    name = next(iter(tiers))
    cfg = TrainConfig.model_validate({"backend": "mlx", "tiers": tiers})
    assert getattr(cfg.tiers, name) is not None


def test_set_override_and_trainer_integration(tmp_path):
    from nested_learning.config import load_config
    from nested_learning.integrations.hf_trainer import nested_optimizer

    cfg = load_config(None, ["tiers.consolidate.every=16", "tiers.consolidate.alpha=0.5", "tiers.ema=0.995"])
    assert (cfg.tiers.consolidate.every, cfg.tiers.consolidate.alpha, cfg.tiers.ema) == (16, 0.5, 0.995)
    assert TrainConfig().tiers.consolidate is None and TrainConfig().tiers.ema is None
    with pytest.raises(ValueError, match="tiers.ema: not supported with the transformers Trainer"):
        nested_optimizer(torch.nn.Linear(2, 2), None, {"ema": 0.99})


def test_optimizer_rejects_bad_arguments():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="ema must be a decay"):
        NestedAdamW([w], ema=1.0)
    with pytest.raises(ValueError, match="consolidate: every"):
        NestedAdamW([w], consolidate=(0, 0.5))
    with pytest.raises(ValueError, match="consolidate: alpha"):
        NestedAdamW([w], consolidate=(2, 0.0))
