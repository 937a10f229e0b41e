"""The training loop on micro-llama: pinned losses, exact resume, accumulation, stop, NaN, early stopping."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from nested_learning.config import ConfigError, ScheduleConfig
from nested_learning.data import collate, encode_records, read_jsonl
from nested_learning.model.embedded import build_embedded
from nested_learning.train.loss import token_loss_sum
from nested_learning.train.metrics import read_metrics
from nested_learning.optim.schedule import lr_lambda
from nested_learning.train.loop import accumulate_gradients, run_training, train_loop
from nested_learning.train.setup import build_run
from nested_learning.train.state import TrainingError
from conftest import Recorder, adapter_tensors, micro_config, write_data

# Obtained by running test_pinned_loss_curve's config once (torch 2.13 CPU); any change to the model, data order,
# loss, optimizer or schedule moves them.
PINNED_LOSSES = [
    5.551883220672607, 5.56399393081665, 5.474539279937744, 5.431235313415527, 5.36873197555542,
    5.362778663635254, 5.3348307609558105, 5.352463722229004, 5.338820934295654, 5.315835952758789,
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def train_losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir) if "loss" in r]


def test_pinned_loss_curve(data_dir, tmp_path):
    cfg = micro_config(data_dir, tmp_path / "run")
    rec = Recorder()
    state = run_training(cfg, [rec])
    losses = train_losses(tmp_path / "run")
    assert state.status == "completed" and state.step == 10 and len(losses) == 10
    assert [s for s, _ in rec.steps] == list(range(1, 11))
    assert [loss for _, loss in rec.steps] == losses
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-5)
    # two tiers, periods 1 and 2, flushed at the end (10 is a multiple of 2: nothing pending)
    assert [t["updates"] for t in state.tier_stats] == [10, 5]


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    # dropout draws from the RNG, grad_accum and a period-4 tier hold state across the stop at step 6
    sections = dict(lora={"dropout": 0.1}, tiers={"periods": [1, 4]}, optim={"grad_accum": 2}, eval={"every": 4})
    full = run_training(micro_config(data_dir, tmp_path / "full", **sections))
    assert full.status == "completed"

    cfg = micro_config(data_dir, tmp_path / "split", **sections)
    stop = threading.Event()
    rec = Recorder(stop_at=6, stop_event=stop)
    stopped = run_training(cfg, [rec], stop)
    assert stopped.status == "stopped" and stopped.step == 6
    assert rec.events == ["start", "end"] and rec.checkpoints[-1] == "last"

    resumed = run_training(cfg, resume="auto")
    assert resumed.status == "completed" and resumed.step == 10
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")  # bit-identical
    a, b = adapter_tensors(full.last_checkpoint), adapter_tensors(resumed.last_checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.tier_stats == full.tier_stats
    assert resumed.best_val_loss == full.best_val_loss


def _samples(data_dir, tok, n):
    records = read_jsonl(data_dir / "train.jsonl")[:n]
    return encode_records(records, tok, "completion", max_length=64)[0]


def test_accumulation_four_by_two_equals_one_by_eight(data_dir):
    from nested_learning.config import LoraConfig
    from nested_learning.model.lora import wrap_lora

    base, tok = build_embedded("embedded:micro-llama")
    model = wrap_lora(base, LoraConfig(r=4, alpha=8), seed=0)
    # give lora_B non-zero values so every adapter tensor has a gradient
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    samples = _samples(data_dir, tok, 8)
    assert len({len(s) for s in samples}) > 1  # unequal lengths: padding differs between the two layouts
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batches):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, batches, token_loss_sum, torch.device("cpu"))
        return loss, [p.grad.clone() for p in params]

    loss8, g8 = grads([collate(samples, tok.pad_token_id)])
    loss2, g2 = grads([collate(samples[i : i + 2], tok.pad_token_id) for i in range(0, 8, 2)])
    assert float(loss2) == pytest.approx(float(loss8), rel=1e-6)
    for a, b in zip(g8, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the naive mean of per-micro-batch means differs: the test can tell the two apart
    with torch.no_grad():
        micro = [collate(samples[i : i + 2], tok.pad_token_id) for i in range(0, 8, 2)]
        means = [float(token_loss_sum(model, b)[0]) / b.num_loss_tokens for b in micro]
    assert abs(sum(means) / 4 - float(loss8)) > 1e-4


def test_accumulation_same_run(data_dir, tmp_path):
    """bs 2 x accum 4 and bs 8 x accum 1 over 3 steps: same losses, same adapter (sequential data order)."""
    data = {"shuffle": False, "group_by_length": False}
    a = run_training(micro_config(data_dir, tmp_path / "a", data=data, optim={"batch_size": 2, "grad_accum": 4},
                                  schedule={"steps": 3, "warmup_steps": 0}, eval={"every": 0}))
    b = run_training(micro_config(data_dir, tmp_path / "b", data=data, optim={"batch_size": 8, "grad_accum": 1},
                                  schedule={"steps": 3, "warmup_steps": 0}, eval={"every": 0}))
    assert train_losses(tmp_path / "a") == pytest.approx(train_losses(tmp_path / "b"), rel=1e-5)
    ta, tb = adapter_tensors(a.last_checkpoint), adapter_tensors(b.last_checkpoint)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)


def test_loss_only_on_completion_and_packing_equals_padding(data_dir):
    base, tok = build_embedded("embedded:micro-llama")
    samples = _samples(data_dir, tok, 6)
    record = read_jsonl(data_dir / "train.jsonl")[0]
    n_completion = len(tok(record["completion"], add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert sum(l != -100 for l in samples[0].labels) == n_completion

    padded = collate(samples, tok.pad_token_id)
    packed = collate(samples, tok.pad_token_id, packing=True, max_length=64)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    sum_pad, n_pad = token_loss_sum(base, padded)
    sum_pack, n_pack = token_loss_sum(base, packed)
    assert n_pad == n_pack == sum(sum(l != -100 for l in s.labels) for s in samples)
    torch.testing.assert_close(sum_pack, sum_pad, rtol=1e-5, atol=1e-5)

    # the loss is the CE of completion tokens alone: changing a prompt token's label target changes nothing
    logits = base(**padded.model_inputs()).logits[:, :-1].float()
    targets = padded.labels[:, 1:]
    mask = targets != -100
    manual = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
    torch.testing.assert_close(sum_pad, manual)


def test_stop_ends_within_one_step_with_loadable_checkpoint(data_dir, tmp_path):
    from peft import PeftModel

    stop = threading.Event()
    rec = Recorder(stop_at=3, stop_event=stop)
    state = run_training(micro_config(data_dir, tmp_path / "run", schedule={"steps": 50}), [rec], stop)
    assert state.status == "stopped" and state.step == 3
    assert rec.final["status"] == "stopped"
    base, _ = build_embedded("embedded:micro-llama")
    model = PeftModel.from_pretrained(base, state.last_checkpoint)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_stop_from_another_thread(data_dir, tmp_path):
    stop = threading.Event()
    started = threading.Event()

    class Slow(Recorder):
        def on_step(self, state):
            super().on_step(state)
            started.set()

    timer = threading.Thread(target=lambda: (started.wait(30), stop.set()))
    timer.start()
    state = run_training(micro_config(data_dir, tmp_path / "run", schedule={"steps": 500}), [Slow()], stop)
    timer.join()
    assert state.status == "stopped" and state.step < 500


def test_nan_loss_fails_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    calls = {"n": 0}
    rec = Recorder()
    cfg = micro_config(data_dir, tmp_path / "run", checkpoint={"every": 2}, eval={"every": 0})
    run = build_run(cfg)
    good_loss = run.loss_fn

    def bad_loss(model, batch):
        calls["n"] += 1
        loss_sum, n = good_loss(model, batch)
        return (loss_sum * float("nan") if calls["n"] == 5 else loss_sum), n

    run.loss_fn = bad_loss
    with pytest.raises(TrainingError, match="non-finite loss at step 5"):
        train_loop(run, [rec])
    assert rec.final["status"] == "failed" and "step 5" in rec.final["error"]
    assert rec.events == ["start", "end"]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    tensors = adapter_tensors(ckpts / "step-000004")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # the failed step was never applied: resuming from step 4 with a healthy loss works
    state = run_training(cfg, resume="auto")
    assert state.status == "completed" and state.step == 10


def test_early_stopping(data_dir, tmp_path):
    rec = Recorder()
    cfg = micro_config(data_dir, tmp_path / "run", schedule={"steps": 40},
                       eval={"every": 2, "early_stopping_patience": 2, "early_stopping_min_delta": 10.0})
    state = run_training(cfg, [rec])
    # first eval sets the baseline; two more without a 10-nat improvement stop the run at step 6
    assert state.early_stopped and state.status == "completed" and state.step == 6
    assert [s for s, _ in rec.evals][:3] == [2, 4, 6]
    assert state.best_val_loss == min(v for _, v in rec.evals)


def test_eval_and_state_fields(data_dir, tmp_path):
    rec = Recorder()
    state = run_training(micro_config(data_dir, tmp_path / "run", eval={"every": 5, "at_start": True}), [rec])
    assert [s for s, _ in rec.evals] == [0, 5, 10]
    assert rec.evals[-1][1] < rec.evals[0][1]  # it learns
    d = state.to_dict()
    for key in ("step", "total_steps", "train_loss", "val_loss", "best_val_loss", "lr", "tokens_per_sec", "eta_s",
                "tier_stats", "tokens_seen"):
        assert d[key] is not None, key
    assert d["eta_s"] == 0 and d["tokens_per_sec"] > 0
    assert math.exp(state.val_loss) == pytest.approx(state.val_ppl)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5, 10]
    assert all({"loss", "lr", "grad_norm", "tokens_per_sec", "tier_updates"} <= r.keys() for r in records if "loss" in r)


@pytest.mark.parametrize("max_norm", [1e-3, 0.0])
def test_grad_clip_once_per_step(data_dir, tmp_path, max_norm):
    """The optimizer sees the gradient accumulated over the step's micro-batches, scaled once to ``max_norm``
    (clipping each micro-batch, or not at all, would give another norm); 0 disables clipping."""
    run = build_run(micro_config(data_dir, tmp_path / "run", optim={"max_grad_norm": max_norm, "grad_accum": 2},
                                 schedule={"steps": 3}, eval={"every": 0}, tiers={"periods": [1]}))
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    seen, step = [], run.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable]))))
        return step(*args, **kwargs)

    run.optimizer.step = recording_step
    state = train_loop(run)
    reported = [r["grad_norm"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert state.status == "completed" and len(seen) == len(reported) == 3
    if max_norm:
        assert all(n > 100 * max_norm for n in reported)  # the reported norm is the accumulated one, before clipping
        assert seen == pytest.approx([max_norm] * 3, rel=1e-4)
    else:
        assert seen == pytest.approx(reported, rel=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule(kind):
    f = lr_lambda(ScheduleConfig(steps=10, warmup_steps=2, kind=kind, min_lr_ratio=0.1))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    if kind == "constant":
        assert f(9) == 1.0
    else:
        assert 0.1 < f(9) < f(5) < 1.0
        assert f(10) == pytest.approx(0.1)


def test_gradient_norm_strategy_and_resume(data_dir, tmp_path):
    cfg = micro_config(data_dir, tmp_path / "run", tiers={"strategy": "gradient_norm", "probe_steps": 2},
                       eval={"every": 0})
    stop = threading.Event()
    run_training(cfg, [Recorder(stop_at=3, stop_event=stop)], stop)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last" / "trainer_state.pt", weights_only=False)
    # The probe ran on the initial adapter, where lora_B = 0 leaves every lora_A without gradient: all lora_A
    # tensors rank slowest. A new probe on the trained adapter would rank them otherwise.
    assert {k for n, k in saved["tier_assignment"].items() if "lora_A" in n} == {1}
    run = build_run(cfg, resume="auto")
    assert run.tier_assignment == saved["tier_assignment"]
    assert {n: k for k, g in enumerate(run.optimizer.param_groups) for n in g["param_names"]} == run.tier_assignment
    state = train_loop(run)
    assert state.status == "completed"
    assert sum(t["num_tensors"] for t in state.tier_stats) == 28  # 2 layers x 7 projections x (A, B)


def test_non_empty_output_dir_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="output.dir"):
        run_training(micro_config(data_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_resume_with_changed_tiers_is_a_config_error(data_dir, tmp_path):
    run_training(micro_config(data_dir, tmp_path / "run", schedule={"steps": 2}, eval={"every": 0}))
    with pytest.raises(ConfigError, match="does not fit this config"):
        run_training(micro_config(data_dir, tmp_path / "run", tiers={"periods": [1, 3]}), resume="auto")


def test_dora_and_gradient_checkpointing(data_dir, tmp_path):
    plain = run_training(micro_config(data_dir, tmp_path / "a", schedule={"steps": 3}, eval={"every": 0},
                                      lora={"use_dora": True}))
    ckpt = run_training(micro_config(data_dir, tmp_path / "b", schedule={"steps": 3}, eval={"every": 0},
                                     lora={"use_dora": True}, model={"gradient_checkpointing": True}))
    # DoRA adds a magnitude vector per adapted layer: 3 tensors per projection
    assert sum(t["num_tensors"] for t in plain.tier_stats) == 2 * 7 * 3
    # recomputing activations does not change the numbers
    assert train_losses(tmp_path / "a") == pytest.approx(train_losses(tmp_path / "b"), rel=1e-6)
    ta, tb = adapter_tensors(plain.last_checkpoint), adapter_tensors(ckpt.last_checkpoint)
    assert any("magnitude" in k for k in ta)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
