"""The training loop: ``train_loop(run, callbacks, stop_event) -> TrainerState``, and ``run_training`` (build, then loop).

One optimizer step: micro-batches (backward each) -> clip once -> nested optimizer step -> schedule -> report ->
eval / checkpoint when due. Evaluation with early stopping, checkpoints and the throughput window are small
objects below, so the loop reads top to bottom.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from nested_learning.config import TrainConfig
from nested_learning.model.loading import autocast_context
from nested_learning.speed.compile import eager_stance
from nested_learning.train import checkpoint as ckpt
from nested_learning.train import distributed
from nested_learning.train.evaluate import evaluate_samples
from nested_learning.integrations.tracking import open_trackers
from nested_learning.train.metrics import MetricsLog
from nested_learning.train.nonfinite import NonFiniteGuard
from nested_learning.train.setup import Run, build_run
from nested_learning.train.state import Callback, TrainerState

__all__ = ["accumulate_gradients", "run_training", "train_loop"]

log = logging.getLogger("nested_learning.train")


def accumulate_gradients(model, step_batches: list, loss_fn: Callable, device: torch.device) -> torch.Tensor:
    """Backward over the micro-batches of one optimizer step; returns the step loss (on the device).

    Each micro-batch's summed token loss is divided by the loss tokens of the *whole step*, so the accumulated
    gradient equals that of one big batch: 4 micro-batches of 2 == 1 batch of 8, padding and packing aside.
    """
    step_loss_tokens = max(1, sum(b.num_loss_tokens for b in step_batches))
    step_loss = torch.zeros((), device=device)
    for batch in step_batches:
        batch = batch.to(device, non_blocking=True)
        with autocast_context(device):
            loss_sum, _ = loss_fn(model, batch)
        (loss_sum / step_loss_tokens).backward()
        step_loss += loss_sum.detach() / step_loss_tokens
    return step_loss


class Hooks:
    """The callbacks, each called with the live state."""

    def __init__(self, run: Run, callbacks: Iterable[Callback]):
        self.run, self.callbacks = run, list(callbacks)

    def __call__(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self.run.state, *args)


class Checkpoints:
    """Writes ``step-N``, ``best`` and ``last``: the adapter plus everything an exact resume needs, including
    how many metrics rows exist (a resume cuts ``metrics.jsonl`` back to them) and the non-finite counters."""

    def __init__(self, run: Run, hooks: Hooks, metrics: MetricsLog, guard: NonFiniteGuard):
        self.run, self.hooks, self.metrics, self.guard = run, hooks, metrics, guard

    def save(self, name: str) -> Path:
        run, state = self.run, self.run.state
        self.guard.check(state)  # a halted run writes nothing more: its last checkpoint stays the good one
        payload = {
            "format": 1, "step": state.step, "micro_index": run.micro_index, "bad_evals": run.bad_evals,
            "optimizer": distributed.optimizer_state(run), "scheduler": run.scheduler.state_dict(),
            "rng": ckpt.capture_rng(), "global_batch_size": run.batch_plan.batch_size, "world_size": run.dist.world,
            "tier_assignment": run.tier_assignment, "trainer_state": state.to_dict(),
            "metrics_rows": self.metrics.rows, "nonfinite": self.guard.counters(),
        }
        # With tiers.ema the adapter written is the EMA; the payload's optimizer state (taken above) carries the
        # fast weights a resume continues from (optim/averaging.py).
        with run.optimizer.averaged_weights():
            path = distributed.save_checkpoint(run, name, payload)  # rank 0 writes; every rank returns once written
        if name == "best":
            state.best_checkpoint = str(path)
        else:
            state.last_checkpoint = str(path)
        self.hooks("on_checkpoint", str(path))
        return path

    def save_step(self) -> None:
        self.save(ckpt.step_name(self.run.state.step))
        if self.run.dist.is_main:
            ckpt.prune_step_checkpoints(self.run.output_dir, self.run.config.checkpoint.keep_last_n)


class Evaluator:
    """Validation loss at eval points: updates ``best`` (saving that checkpoint) and the early-stopping count.
    The retain sets (``eval.retain``) are evaluated at the same points: the forgetting curve next to the
    learning curve. ``eval.metric: exact_match`` adds exact-match scores to both."""

    def __init__(self, run: Run, metrics: MetricsLog, checkpoints: Checkpoints, hooks: Hooks):
        self.run, self.metrics, self.checkpoints, self.hooks = run, metrics, checkpoints, hooks

    def _score(self, samples) -> dict[str, float]:
        run, ev = self.run, self.run.config.eval
        max_batches = ev.max_batches
        if ev.batch_size is None and max_batches is not None:
            # The default eval batch is a rank's micro-batch, and one process's is the global one (optim.batch_size
            # x ranks): the cap counts global batches, so any number of ranks scores the samples one process does.
            max_batches *= run.dist.world
        with eager_stance(run.speed_plan.on("cuda_graphs")):  # padded eval batches vary in shape: no graph each
            return evaluate_samples(run.forward_model, samples, run.pad_id, metric=ev.metric,
                                    batch_size=ev.batch_size or run.config.optim.batch_size,
                                    max_batches=max_batches, device=run.device, loss_fn=run.loss_fn,
                                    logits_model=run.model,  # the forward model may stop at the hidden states
                                    ranks=run.dist)  # each rank a share of the batches, sums over ranks

    def __call__(self) -> None:
        run, cfg, state = self.run, self.run.config, self.run.state
        if not run.valid_samples:
            return
        with run.optimizer.averaged_weights():  # tiers.ema: the EMA weights are evaluated
            res = self._score(run.valid_samples)
            retain = {name: self._score(samples) for name, samples in run.retain_sets.items()}
        run.bad_evals, new_best = state.record_eval(res, retain, cfg.eval.early_stopping_min_delta, run.bad_evals)
        # The row goes in before `best` is saved, so that checkpoint counts it: a resume from `best` keeps the
        # row, a kill before `best` is in place resumes from an earlier checkpoint and writes it again, once.
        self.metrics.write({"step": state.step, **state.eval_metrics()}, tb_prefix="eval")
        if new_best and cfg.checkpoint.save_best and state.step > 0:
            self.checkpoints.save("best")
        self.hooks("on_eval")

    def should_stop(self) -> bool:
        patience = self.run.config.eval.early_stopping_patience
        return bool(patience) and self.run.bad_evals >= patience


class Throughput:
    """Loss, tokens and wall time since the last read-back: tokens/s and ETA measure training steps only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()
        self.restart_clock()

    def reset(self) -> None:
        self.loss, self.steps, self.tokens = torch.zeros((), device=self.device), 0, 0
        self.skipped = torch.zeros((), device=self.device)

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, step_loss: torch.Tensor, tokens: int, found_inf: torch.Tensor) -> None:
        self.loss += torch.where(found_inf.bool(), 0, step_loss)  # a skipped step's loss is not averaged in
        self.skipped += found_inf
        self.steps += 1
        self.tokens += tokens

    def mean_loss(self) -> float:
        """The mean loss of the steps taken since the last read-back (a sync); NaN when all were skipped."""
        taken = self.steps - int(self.skipped.item())
        return self.loss.item() / taken if taken else float("nan")

    def report(self, state: TrainerState) -> None:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        state.tokens_per_sec = self.tokens / elapsed
        state.eta_s = elapsed / self.steps * (state.total_steps - state.step)


def train_loop(run: Run, callbacks: Iterable[Callback] = (), stop_event: threading.Event | None = None) -> TrainerState:
    """Train ``run`` until ``schedule.steps``, early stopping, ``stop_event`` or failure; returns the final state."""
    cfg, opt, state, device = run.config, run.optimizer, run.state, run.device
    stop = stop_event or threading.Event()
    # Data-parallel: rank 0 alone reports through the callbacks; a stop asked on any rank is agreed by all.
    callbacks, stop = distributed.for_rank(run.dist, callbacks, stop)
    hooks = Hooks(run, callbacks)
    if run.resumed_from is not None and state.status == "completed" and state.step >= cfg.schedule.steps:
        # Resuming a finished run (its `last`): nothing to train, evaluate or write again. (A longer schedule
        # continues it instead.)
        state.last_checkpoint = str(run.resumed_from)
        opt.keep_averaged_weights()  # tiers.ema: the resume put the fast weights back; the model is the final adapter
        hooks("on_start")
        hooks("on_end")
        return state
    if run.dist.is_main:  # data-parallel: rank 0 alone writes metrics.jsonl and TensorBoard
        trackers = open_trackers(cfg, run.output_dir, state, resumed=run.resumed_from is not None)
        metrics = MetricsLog(run.output_dir, resume_step=state.step if run.resumed_from else None,
                             keep_rows=run.metrics_rows, tensorboard="tensorboard" in cfg.output.trackers,
                             trackers=trackers)
    else:
        metrics = distributed.NullMetrics()
    guard = NonFiniteGuard(device, cfg.optim.on_nonfinite, cfg.optim.max_skipped_steps, state.step, run.nonfinite)
    checkpoints = Checkpoints(run, hooks, metrics, guard)
    evaluate = Evaluator(run, metrics, checkpoints, hooks)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    total, log_every = cfg.schedule.steps, cfg.output.log_every
    batches = iter(run.batches())

    def next_step_batches() -> list:
        # Collated and sent (pinned, non-blocking) while the device still works on the previous step.
        return [next(batches).to(device, non_blocking=True) for _ in range(cfg.optim.grad_accum)]

    state.status = "running"
    state.tier_stats, state.lr = opt.tier_stats(), opt.param_groups[0]["lr"]
    hooks("on_start")
    try:
        if cfg.eval.at_start and run.resumed_from is None:
            evaluate()
        run.model.train()
        window = Throughput(device)
        upcoming = next_step_batches() if state.step < total else []
        while state.step < total and not stop.is_set():
            step_batches = upcoming
            step_loss = accumulate_gradients(run.forward_model, step_batches, run.loss_fn, device)
            if state.step + 1 < total:
                upcoming = next_step_batches()  # the step's kernels are queued; prepare the next one meanwhile
            run.micro_index += len(step_batches)
            step_tokens = sum(b.num_tokens for b in step_batches)

            # Clip the accumulated gradient once per optimizer step (a no-op scale when disabled).
            if run.grad_sync is None:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)
            else:  # data-parallel: sum what this step applies over ranks, clip it (train/grad_sync.py)
                step_loss, grad_norm = run.grad_sync.reduce_and_clip(step_loss, trainable)
            # Checked every step on the device: a non-finite step is never applied (see train/nonfinite.py).
            found_inf = guard.update(step_loss, grad_norm)
            window.add(step_loss, step_tokens, found_inf)

            # Read back only every log_every steps (a device sync); a halted run stops here.
            read_back = (state.step + 1) % log_every == 0 or state.step + 1 == total or stop.is_set()
            if read_back:
                skipped = guard.check(state)
                loss, norm = window.mean_loss(), grad_norm.item()

            state.lr = opt.param_groups[0]["lr"]  # the lr this step is taken with
            opt.step(found_inf=found_inf)
            run.scheduler.step()
            opt.zero_grad(set_to_none=False)  # flat tiers keep their gradients as views into one buffer
            state.step += 1
            state.epoch = run.micro_index // len(run.batch_plan)
            state.tokens_seen += step_tokens
            state.tier_stats = opt.tier_stats()

            if read_back:
                state.train_loss, state.grad_norm = loss, norm
                window.report(state)
                metrics.write({
                    "step": state.step, "loss": loss, "lr": state.lr, "grad_norm": norm,
                    "tokens_per_sec": state.tokens_per_sec, "tokens": state.tokens_seen, "epoch": state.epoch,
                    "tier_updates": [t["updates"] for t in state.tier_stats],
                    **({"skipped_steps": skipped} if skipped else {}),
                })
                window.reset()
            hooks("on_step")

            if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step != total:
                guard.check(state)
                evaluate()
                state.early_stopped = evaluate.should_stop()
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                checkpoints.save_step()
            if state.early_stopped:
                log.info("early stopping at step %d (no improvement in %d evals)", state.step, run.bad_evals)
                break
            if read_back:
                window.restart_clock()

        if stop.is_set() and not state.early_stopped and state.step < total:
            state.status = "stopped"  # resumable as is: no flush, so a resume continues exactly
        else:
            guard.check(state)
            if cfg.tiers.flush_on_end:
                opt.flush()  # slow tiers apply the gradients of their partial chunk
                state.tier_stats = opt.tier_stats()
            opt.consolidate_final()  # tiers.consolidate: the final adapter is the slow memory
            evaluate()
            state.status = "completed"
        checkpoints.save("last")
        if state.status == "completed":
            opt.keep_averaged_weights()  # tiers.ema: the model left in memory is the final adapter, as saved
    except BaseException as exc:
        state.status = "failed"
        state.error = str(exc) or type(exc).__name__
        hooks("on_end")
        raise
    finally:
        metrics.close()
    hooks("on_end")
    return state


def run_training(
    config: TrainConfig,
    callbacks: Iterable[Callback] = (),
    stop_event: threading.Event | None = None,
    resume: str | None = None,
) -> TrainerState:
    """Build the run ``config`` describes (resuming when asked: see ``build_run``), then train it.
    ``backend: mlx`` hands the run to :mod:`nested_learning.mlx.train` (mlx is imported only then)."""
    if config.backend == "mlx":
        from nested_learning.mlx import require_mlx

        require_mlx()
        from nested_learning.mlx.train import run_training as run_mlx

        return run_mlx(config, callbacks, stop_event, resume)
    return train_loop(build_run(config, resume), callbacks, stop_event)
