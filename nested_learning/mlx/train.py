"""Training on MLX: ``build_mlx_run(config, resume) -> MlxRun``, then ``train_mlx(run, callbacks, stop_event)``.

The same run as :mod:`nested_learning.train.loop`, step for step: micro-batches (gradients summed, each
micro-batch's loss divided by the loss tokens of the whole step) -> one global-norm clip -> the tiered optimizer
(:class:`nested_learning.optim.mlx.NestedAdamW`, tiers from :func:`nested_learning.tiers.assign_tiers`) with the
schedule's lr (:func:`nested_learning.optim.schedule.lr_lambda`) -> report -> eval / checkpoint when due. The data
plan, metrics log, ``TrainerState`` and callbacks are the torch backend's own, so the CLI progress, the service and
the dashboard see the same fields.

``speed.compile`` (default on) compiles each micro-batch's forward + backward with ``mx.compile``: one trace per
batch shape, reused whenever the shape comes back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from nested_learning.config import ConfigError, TrainConfig
from nested_learning.data import BatchPlan, Sample, collate, iterate_batches
from nested_learning.integrations.tracking import open_trackers
from nested_learning.mlx import checkpoint as mck
from nested_learning.mlx.model import (adapter_config, adapter_weights, check_packing, load_base, to_mlx,
                                       token_logits_and_targets, token_loss_sum, wrap_lora)
from nested_learning.optim.mlx import NestedAdamW
from nested_learning.optim.schedule import lr_lambda
from nested_learning.train import checkpoint as ckpt
from nested_learning.train.evaluate import load_retain_sets, perplexity
from nested_learning.train.metrics import MetricsLog
from nested_learning.train.state import Callback, TrainerState, TrainingError

__all__ = ["MlxRun", "build_mlx_run", "evaluate_mlx", "run_training", "train_mlx"]

log = logging.getLogger("nested_learning.train")


@dataclass
class MlxRun:
    """Everything one MLX run is made of (the MLX counterpart of ``nested_learning.train.setup.Run``)."""

    config: TrainConfig
    output_dir: Path
    tokenizer: Any
    model: Any  # the mlx-lm model with LoRA layers; only the adapter is trainable
    model_config: dict
    lora_keys: list[str]
    train_samples: Sequence[Sample]
    valid_samples: Sequence[Sample]
    batch_plan: BatchPlan
    optimizer: NestedAdamW
    tier_assignment: dict[str, int]
    state: TrainerState
    micro_index: int = 0
    bad_evals: int = 0
    resumed_from: Path | None = None
    metrics_rows: int | None = None
    nonfinite: dict[str, int] = dataclasses.field(default_factory=lambda: {"skipped": 0, "consecutive": 0})
    retain_sets: dict[str, list] = dataclasses.field(default_factory=dict)
    grad_fn: Any = None  # Gradients: forward + backward of one micro-batch (compiled or not)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def batches(self) -> Iterable:
        return iterate_batches(self.train_samples, self.batch_plan, self.pad_id, start=self.micro_index)

    def lr(self, steps_taken: int) -> float:
        """The lr of optimizer step ``steps_taken + 1``: what torch's LambdaLR gives (peak lr x lr_lambda)."""
        return self.config.optim.lr * lr_lambda(self.config.schedule)(steps_taken)


# ------------------------------------------------------------------------------------------------ gradients
class Gradients:
    """Forward + backward of one micro-batch: ``(loss_sum / denom, grads)`` of the trainable parameters, compiled
    with ``mx.compile`` when asked (padded and packed batches are two functions: packed ones carry a mask)."""

    def __init__(self, model, compile: bool):
        self.model = model

        def padded(ids, labels, denom):
            return token_loss_sum(model, ids, labels) / denom

        def packed(ids, labels, segments, denom):
            return token_loss_sum(model, ids, labels, segments) / denom

        self.padded = nn.value_and_grad(model, padded)
        self.packed = nn.value_and_grad(model, packed)
        if compile:
            # The weights change between calls and dropout draws keys: both are inputs. value_and_grad sets the
            # model's parameters inside the trace, so the model state is an output too (else it keeps placeholders).
            state = [model.state, mx.random.state]
            self.padded = mx.compile(self.padded, inputs=state, outputs=state)
            self.packed = mx.compile(self.packed, inputs=state, outputs=state)

    def __call__(self, batch, denom: mx.array):
        if batch.segments is None:
            return self.padded(batch.ids, batch.labels, denom)
        return self.packed(batch.ids, batch.labels, batch.segments, denom)


def accumulate(grad_fn: Gradients, step_batches: list) -> tuple[mx.array, dict]:
    """Summed gradients and loss of one optimizer step (each micro-batch divided by the step's loss tokens)."""
    denom = mx.array(float(max(1, sum(b.num_loss_tokens for b in step_batches))), mx.float32)
    loss, grads = None, None
    for batch in step_batches:
        value, g = grad_fn(batch, denom)
        loss = value if loss is None else loss + value
        grads = g if grads is None else tree_map(mx.add, grads, g)
    return loss, grads


def clip(grads: dict, max_norm: float) -> tuple[dict, mx.array]:
    """Global-norm clip as ``torch.nn.utils.clip_grad_norm_``: scale ``min(1, max_norm / (norm + 1e-6))``."""
    norm = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))
    if math.isinf(max_norm):
        return grads, norm
    coef = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: (g * coef).astype(g.dtype), grads), norm


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_mlx(model, samples: Sequence[Sample], pad_id: int, *, batch_size: int = 8, max_batches: int | None = None,
                 metric: str = "loss") -> dict[str, float]:
    """Token-weighted mean loss (and perplexity) over ``samples`` in order, padded rows; with
    ``metric="exact_match"`` also the share of samples whose every loss token is the model's top prediction
    (teacher forcing: the verdict of greedy decoding, as :mod:`nested_learning.train.evaluate`)."""
    total, tokens, batches, hits, scored = 0.0, 0, 0, 0, 0
    for k, start in enumerate(range(0, len(samples), batch_size)):
        if max_batches is not None and k >= max_batches:
            break
        b = to_mlx(collate(samples[start:start + batch_size], pad_id))
        logits, targets, valid = token_logits_and_targets(model, b.ids, b.labels, None)
        ce = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0), reduction="none")
        loss_sum = mx.where(valid, ce, 0.0).sum()
        if metric == "exact_match":
            right = mx.logical_or(mx.argmax(logits, axis=-1) == targets, mx.logical_not(valid)).all(axis=1)
            has = valid.any(axis=1)
            hits += int(mx.logical_and(right, has).sum().item())
            scored += int(has.sum().item())
        total += float(loss_sum.item())
        tokens += b.num_loss_tokens
        batches += 1
    loss = total / max(tokens, 1)
    out = {"loss": loss, "ppl": perplexity(loss), "tokens": tokens, "batches": batches}
    if metric == "exact_match":
        out["exact_match"] = hits / max(scored, 1)
    return out


# ------------------------------------------------------------------------------------------------ building
def _optimizer(cfg: TrainConfig, model, grad_fn: Gradients, probe_batches, saved_assignment):
    """Tier groups (the shared tier module) -> NestedAdamW; returns (optimizer, assignment, printable plan)."""
    from nested_learning.tiers import assign_tiers, format_plan

    t = cfg.tiers
    named = tree_flatten(model.trainable_parameters())
    options: dict[str, Any] = dict(periods=t.periods, lr_scales=t.lr_scales, reverse=t.reverse)
    if t.strategy == "gradient_norm" and saved_assignment:
        options.update(strategy="manual", manual=saved_assignment)
    elif t.strategy == "gradient_norm":
        options.update(strategy="gradient_norm", probe=lambda: _probe(grad_fn, probe_batches, t.probe_steps))
    else:
        options.update(strategy=t.strategy, rules=t.rules, manual=t.manual)
    groups = assign_tiers(named, **options)
    opt = NestedAdamW(learning_rate=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                      weight_decay=cfg.optim.weight_decay, accumulate=t.accumulate, tiers=groups,
                      flush_on_end=t.flush_on_end, ema=t.ema,
                      consolidate=None if t.consolidate is None else (t.consolidate.every, t.consolidate.alpha))
    opt.init(model.trainable_parameters())
    assignment = {name: k for k, g in enumerate(groups) for name in g["param_names"]}
    return opt, assignment, format_plan(groups)


def _probe(grad_fn: Gradients, batches, steps: int) -> dict[str, float]:
    """``gradient_norm`` tiers: mean squared gradient per trainable tensor over ``steps`` micro-batches. (The
    loop reseeds MLX's key before every step, so the probe's dropout draws change nothing in training.)"""
    sums: dict[str, float] = {}
    it = iter(batches)
    for _ in range(steps):
        b = to_mlx(next(it))
        _, g = grad_fn(b, mx.array(float(max(1, b.num_loss_tokens)), mx.float32))
        for name, a in tree_flatten(g):
            sums[name] = sums.get(name, 0.0) + float(mx.mean(mx.square(a.astype(mx.float32))).item())
    return {name: s / steps for name, s in sums.items()}


def _device(cfg: TrainConfig) -> str:
    if cfg.model.device == "cpu":
        mx.set_default_device(mx.cpu)
    elif cfg.model.device == "gpu":
        mx.set_default_device(mx.gpu)
    return str(mx.default_device())


def build_mlx_run(config: TrainConfig, resume: str | None = None, *, tokenizer=None, base_model=None,
                  data: tuple[Sequence[Sample], Sequence[Sample]] | None = None) -> MlxRun:
    """Build everything ``config`` (``backend: mlx``) describes; resume from an MLX checkpoint when asked.

    ``tokenizer`` (a transformers tokenizer), ``base_model`` (an mlx-lm model, or ``(model, config dict)``) and
    ``data`` (train, valid samples) replace what the config would load. Nothing is written before all is built.
    """
    from nested_learning.model.loading import load_tokenizer
    from nested_learning.train.setup import _load_data, check_output_dir

    cfg = config
    out = check_output_dir(cfg, resume)
    resume_from = ckpt.resolve_resume(resume, out)
    saved = mck.load_state(resume_from) if resume_from is not None else None
    device = _device(cfg)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    mx.random.seed(cfg.seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    train, valid, batch_plan = _load_data(cfg, tokenizer, data)
    retain_sets = load_retain_sets(cfg.eval.retain, cfg.data, tokenizer)
    if base_model is None:
        model, model_config = load_base(cfg.model)
    else:
        model, model_config = base_model if isinstance(base_model, tuple) else (base_model, {})
        model_config = model_config or {k: v for k, v in vars(getattr(model, "args", object())).items()}
        model.freeze()
    if cfg.data.packing:
        check_packing(model, model_config)
    keys = wrap_lora(model, cfg.lora, cfg.seed)
    if saved is not None:
        model.load_weights(list(saved[2].items()), strict=False)
    grad_fn = Gradients(model, cfg.speed.compile)
    probe_batches = iterate_batches(train, batch_plan, tokenizer.pad_token_id)
    opt, assignment, tier_plan = _optimizer(cfg, model, grad_fn, probe_batches,
                                            (saved[0] if saved else {}).get("tier_assignment"))
    plan = (f"mlx backend on {device}: mx.compile {'on' if cfg.speed.compile else 'off'}, "
            f"{'DoRA' if cfg.lora.use_dora else 'LoRA'} on {len(keys)} module kind(s), "
            f"base {_quant_text(model_config)}")
    state = TrainerState(total_steps=cfg.schedule.steps, output_dir=str(out), tier_plan=tier_plan, speed_plan=plan)
    run = MlxRun(cfg, out, tokenizer, model, model_config, keys, train, valid, batch_plan, opt, assignment, state,
                 retain_sets=retain_sets, grad_fn=grad_fn)
    if saved is not None:
        _restore(run, saved, resume_from)
    _open_run_dir(run, resume)
    return run


def _quant_text(config: dict) -> str:
    q = config.get("quantization") or config.get("quantization_config")
    return f"{q.get('bits')}-bit (QLoRA)" if isinstance(q, dict) and q.get("bits") else "unquantised"


def _restore(run: MlxRun, saved, resume_from: Path) -> None:
    payload, opt_state, _ = saved
    try:
        run.optimizer.load_state_dict(opt_state, run.model)  # tiers.ema: the fast weights go back into the model
    except ValueError as exc:
        raise ConfigError(f"--resume {resume_from}: the checkpoint does not fit this config: {exc}") from None
    fields = {f.name for f in dataclasses.fields(TrainerState)}
    restored = TrainerState(**{k: v for k, v in payload["trainer_state"].items() if k in fields})
    restored.total_steps, restored.output_dir = run.state.total_steps, run.state.output_dir
    restored.tier_plan, restored.speed_plan = run.state.tier_plan, run.state.speed_plan
    restored.early_stopped, restored.error = False, None
    run.state = restored
    run.micro_index, run.bad_evals, run.resumed_from = payload["micro_index"], payload["bad_evals"], resume_from
    run.metrics_rows, run.nonfinite = payload.get("metrics_rows"), payload.get("nonfinite") or run.nonfinite
    mck.restore_rng(payload["rng"])
    log.info("resuming from %s at step %d", resume_from, run.state.step)


def _open_run_dir(run: MlxRun, resume: str | None) -> None:
    out = run.output_dir
    if run.resumed_from is None and resume is None and out.is_dir():  # output.overwrite
        for stale in ("checkpoints", "tb"):
            shutil.rmtree(out / stale, ignore_errors=True)
    ckpt.remove_incomplete(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_atomic(out / ckpt.CONFIG_FILE, run.config.to_yaml())


# ------------------------------------------------------------------------------------------------ the loop
class _Loop:
    """Hooks, checkpoints and evaluation of one ``train_mlx`` call (the torch loop's small objects, in one)."""

    def __init__(self, run: MlxRun, callbacks: Iterable[Callback], metrics: MetricsLog):
        self.run, self.callbacks, self.metrics = run, list(callbacks), metrics

    def hook(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self.run.state, *args)

    def save(self, name: str) -> Path:
        run, state = self.run, self.run.state
        payload = {"format": 1, "backend": "mlx", "step": state.step, "micro_index": run.micro_index,
                   "bad_evals": run.bad_evals, "rng": mck.capture_rng(), "tier_assignment": run.tier_assignment,
                   "trainer_state": state.to_dict(), "metrics_rows": self.metrics.rows, "nonfinite": run.nonfinite}
        # With tiers.ema the adapter written is the EMA, and the optimizer state (taken first) carries the fast
        # weights a resume continues from (optim/mlx_averaging.py).
        optimizer_state = run.optimizer.state_dict(run.model)
        with run.optimizer.averaged_weights(run.model):
            adapter = adapter_weights(run.model)
        path = mck.save(run.output_dir, name, adapter=adapter,
                        adapter_config=adapter_config(len(run.model.layers), run.lora_keys, run.config.lora,
                                                      run.config.model.name_or_path),
                        optimizer_state=optimizer_state, payload=payload, config=run.config,
                        tokenizer=run.tokenizer)
        if name == "best":
            state.best_checkpoint = str(path)
        else:
            state.last_checkpoint = str(path)
        self.hook("on_checkpoint", str(path))
        return path

    def _score(self, samples) -> dict[str, float]:
        ev = self.run.config.eval
        return evaluate_mlx(self.run.model, samples, self.run.pad_id, batch_size=ev.batch_size or
                            self.run.config.optim.batch_size, max_batches=ev.max_batches, metric=ev.metric)

    def evaluate(self) -> None:
        run, cfg, state = self.run, self.run.config, self.run.state
        if not run.valid_samples:
            return
        run.model.eval()  # no dropout
        with run.optimizer.averaged_weights(run.model):  # tiers.ema: the EMA weights are evaluated
            res = self._score(run.valid_samples)
            retain = {name: self._score(samples) for name, samples in run.retain_sets.items()}
        run.model.train()
        run.bad_evals, new_best = state.record_eval(res, retain, cfg.eval.early_stopping_min_delta, run.bad_evals)
        self.metrics.write({"step": state.step, **state.eval_metrics()}, tb_prefix="eval")
        if new_best and cfg.checkpoint.save_best and state.step > 0:
            self.save("best")
        self.hook("on_eval")

    def should_stop(self) -> bool:
        patience = self.run.config.eval.early_stopping_patience
        return bool(patience) and self.run.bad_evals >= patience


def _nonfinite(run: MlxRun, step: int, loss: float, norm: float) -> bool:
    """``optim.on_nonfinite`` for a step whose loss or gradient norm is NaN/Inf: True = skip it (weights and
    optimizer state unchanged); raises ``TrainingError`` when the run must stop."""
    cfg, counters = run.config.optim, run.nonfinite
    values = f"loss={loss}, grad_norm={norm}"
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    if cfg.on_nonfinite == "stop":
        raise TrainingError(f"non-finite {what} at step {step} ({values}); training stopped, last good checkpoint: "
                            f"{run.state.last_checkpoint or 'none'}")
    counters["consecutive"] += 1
    if counters["consecutive"] > cfg.max_skipped_steps:
        raise TrainingError(f"non-finite {what} at step {step} ({values}): {counters['consecutive']} consecutive "
                            f"non-finite steps, more than optim.max_skipped_steps={cfg.max_skipped_steps}; training "
                            f"stopped, last good checkpoint: {run.state.last_checkpoint or 'none'}")
    counters["skipped"] += 1
    log.warning("skipped step %d with a non-finite loss or gradient norm (%s)", step, values)
    return True


def train_mlx(run: MlxRun, callbacks: Iterable[Callback] = (), stop_event: threading.Event | None = None) -> TrainerState:
    """Train ``run`` until ``schedule.steps``, early stopping, ``stop_event`` or failure; returns the final state."""
    cfg, opt, state, model = run.config, run.optimizer, run.state, run.model
    stop = stop_event or threading.Event()
    if run.resumed_from is not None and state.status == "completed" and state.step >= cfg.schedule.steps:
        state.last_checkpoint = str(run.resumed_from)
        opt.keep_averaged_weights(model)  # tiers.ema: the resume put the fast weights back; keep the final adapter
        for cb in callbacks:
            cb.on_start(state)
            cb.on_end(state)
        return state
    trackers = open_trackers(cfg, run.output_dir, state, resumed=run.resumed_from is not None)
    metrics = MetricsLog(run.output_dir, resume_step=state.step if run.resumed_from else None,
                         keep_rows=run.metrics_rows, tensorboard="tensorboard" in cfg.output.trackers,
                         trackers=trackers)
    loop = _Loop(run, callbacks, metrics)
    grad_fn: Gradients = run.grad_fn
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    total, log_every = cfg.schedule.steps, cfg.output.log_every
    batches = iter(run.batches())
    state.status = "running"
    state.tier_stats, state.lr = opt.tier_stats(), run.lr(state.step)
    loop.hook("on_start")
    try:
        if cfg.eval.at_start and run.resumed_from is None:
            loop.evaluate()
        model.train()
        w_loss, w_steps, w_count, w_tokens, t0 = 0.0, 0, 0, 0, time.perf_counter()
        while state.step < total and not stop.is_set():
            # Dropout keys are a function of (seed, step): a resumed run draws what an uninterrupted one does.
            mx.random.seed((cfg.seed * 1_000_003 + state.step) % 2**63)
            step_batches = [to_mlx(next(batches)) for _ in range(cfg.optim.grad_accum)]
            step_loss, grads = accumulate(grad_fn, step_batches)
            grads, norm = clip(grads, max_norm)
            mx.eval(step_loss, norm, grads)
            run.micro_index += len(step_batches)
            step_tokens = sum(b.num_tokens for b in step_batches)
            loss_v, norm_v = float(step_loss.item()), float(norm.item())
            state.lr = run.lr(state.step)  # the lr this step is taken with
            if math.isfinite(loss_v) and math.isfinite(norm_v):
                run.nonfinite["consecutive"] = 0
                opt.learning_rate = mx.array(state.lr, mx.float32)
                opt.update(model, grads)
                mx.eval(model.trainable_parameters(), opt.state)
                w_loss += loss_v
                w_steps += 1
            else:
                _nonfinite(run, state.step + 1, loss_v, norm_v)
            w_tokens += step_tokens
            w_count += 1
            state.step += 1
            state.epoch = run.micro_index // len(run.batch_plan)
            state.tokens_seen += step_tokens
            state.tier_stats = opt.tier_stats()
            if state.step % log_every == 0 or state.step == total or stop.is_set():
                elapsed = max(time.perf_counter() - t0, 1e-9)
                state.train_loss = w_loss / w_steps if w_steps else float("nan")
                state.grad_norm = norm_v
                state.tokens_per_sec = w_tokens / elapsed
                state.eta_s = elapsed / w_count * (total - state.step)
                row = {"step": state.step, "loss": state.train_loss, "lr": state.lr, "grad_norm": norm_v,
                       "tokens_per_sec": state.tokens_per_sec, "tokens": state.tokens_seen, "epoch": state.epoch,
                       "tier_updates": [t["updates"] for t in state.tier_stats]}
                if run.nonfinite["skipped"]:
                    row["skipped_steps"] = run.nonfinite["skipped"]
                metrics.write(row)
                w_loss, w_steps, w_count, w_tokens = 0.0, 0, 0, 0
                reset_clock = True
            else:
                reset_clock = False
            loop.hook("on_step")
            if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step != total:
                loop.evaluate()
                state.early_stopped = loop.should_stop()
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                loop.save(ckpt.step_name(state.step))
                ckpt.prune_step_checkpoints(run.output_dir, cfg.checkpoint.keep_last_n)
            if state.early_stopped:
                log.info("early stopping at step %d (no improvement in %d evals)", state.step, run.bad_evals)
                break
            if reset_clock:
                t0 = time.perf_counter()

        if stop.is_set() and not state.early_stopped and state.step < total:
            state.status = "stopped"  # resumable as is: no flush, so a resume continues exactly
        else:
            if cfg.tiers.flush_on_end:
                opt.learning_rate = mx.array(run.lr(state.step), mx.float32)  # torch: the lr after the last step
                opt.flush(model)
                state.tier_stats = opt.tier_stats()
            opt.consolidate_final(model)  # tiers.consolidate: the final adapter is the slow memory
            loop.evaluate()
            state.status = "completed"
        loop.save("last")
        if state.status == "completed":
            opt.keep_averaged_weights(model)  # tiers.ema: the model left in memory is the final adapter, as saved
    except BaseException as exc:
        state.status = "failed"
        state.error = str(exc) or type(exc).__name__
        loop.hook("on_end")
        raise
    finally:
        metrics.close()
    loop.hook("on_end")
    return state


def run_training(config: TrainConfig, callbacks: Iterable[Callback] = (), stop_event: threading.Event | None = None,
                 resume: str | None = None) -> TrainerState:
    """Build the MLX run ``config`` describes (resuming when asked), then train it."""
    return train_mlx(build_mlx_run(config, resume), callbacks, stop_event)
