"""The training job: ``run_training(config) -> TrainerState``.

Setup is a few named functions (data, model, optimizer, resume); then one loop reads top to bottom:
micro-batches -> clip -> nested optimizer step -> schedule -> eval -> checkpoint -> callbacks.

Nothing is written before setup has succeeded, so a bad config, data file or model leaves no run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from nested_learning import checkpoint as ckpt
from nested_learning.attention import use_causal_sdpa
from nested_learning.config import ConfigError, ScheduleConfig, TrainConfig
from nested_learning.evaluate import evaluate_loss
from nested_learning.loss import make_loss_fn
from nested_learning.metrics import MetricsLog
from nested_learning.rotary import use_outer_rotary
from nested_learning.folded_lora import fold_lora_groups
from nested_learning.fused_lora import fuse_lora_groups
from nested_learning.model import (
    apply_kernel_choices, autocast_context, load_model, load_tokenizer, maybe_compile, resolve_device,
    uses_cuda_graphs, wrap_lora,
)

__all__ = ["Callback", "TrainerState", "TrainingError", "accumulate_gradients", "lr_lambda", "run_training"]

log = logging.getLogger("nested_learning.trainer")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss or gradient); the last good checkpoint is left intact."""


@dataclass
class TrainerState:
    """What callbacks (CLI progress, the service's job store) see after every step and eval."""

    status: str = "pending"  # pending | running | completed | stopped | failed
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    lr: float = 0.0
    grad_norm: float | None = None
    tokens_per_sec: float | None = None
    tokens_seen: int = 0
    eta_s: float | None = None
    tier_stats: list[dict[str, Any]] = field(default_factory=list)
    early_stopped: bool = False
    error: str | None = None
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    output_dir: str | None = None
    tier_plan: str = ""  # the printable tier table (format_plan)
    val_ppl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Callback:
    """Override what you need; every hook receives the live ``TrainerState``."""

    def on_start(self, state: TrainerState) -> None: ...
    def on_step(self, state: TrainerState) -> None: ...
    def on_eval(self, state: TrainerState) -> None: ...
    def on_checkpoint(self, state: TrainerState, path: str) -> None: ...
    def on_end(self, state: TrainerState) -> None: ...


def lr_lambda(cfg: ScheduleConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr for optimizer step ``i + 1`` (``i`` steps taken): linear warmup, then decay."""
    warmup, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}
        return floor + (1.0 - floor) * decay[cfg.kind]

    return factor


# --------------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_output_dir(cfg: TrainConfig, resume: str | None) -> Path:
    out = Path(cfg.output.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir: {out} exists and is not a directory")
    if resume is None and out.is_dir() and any(out.iterdir()) and not cfg.output.overwrite:
        raise ConfigError(
            f"output.dir: {out} already exists and is not empty; resume it (--resume auto) "
            "or allow overwriting (output.overwrite=true)"
        )
    return out


def prepare_data(cfg: TrainConfig, tokenizer):
    from nested_learning.data import BatchPlan, DataError, load_splits

    train, valid = load_splits(cfg.data, tokenizer, cfg.seed)
    if not train:
        raise DataError("data: no training samples")
    plan = BatchPlan(
        train, cfg.optim.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, group_by_length=cfg.data.group_by_length,
        packing=cfg.data.packing, max_length=cfg.data.max_length,
    )
    return train, valid, plan


def eager_stance(enabled: bool):
    """Run compiled modules eagerly inside this block (``torch.compiler.set_stance``) when ``enabled``."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if not enabled or set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def make_probe(model, batches: Iterable, device: torch.device, steps: int, loss_fn: Callable):
    """``gradient_norm`` tiers: mean squared gradient per trainable tensor over ``steps`` micro-batches.
    Runs under a forked RNG and clears the gradients, so training afterwards is unaffected."""

    def probe() -> dict[str, float]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sums = {n: torch.zeros((), device=device) for n in params}
        it = iter(batches)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for _ in range(steps):
                batch = next(it).to(device)
                with autocast_context(device):
                    loss_sum, n = loss_fn(model, batch)
                (loss_sum / max(n, 1)).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        sums[name] += p.grad.detach().float().pow(2).mean()
                model.zero_grad(set_to_none=True)
        return {name: float(s) / steps for name, s in sums.items()}

    return probe


def build_optimizer(cfg: TrainConfig, model, probe=None, saved_assignment: dict[str, int] | None = None):
    """Tier groups -> NestedAdamW -> LambdaLR. A resumed ``gradient_norm`` run reuses its saved assignment
    (a new probe on trained weights could rank differently and break the optimizer state)."""
    from nested_learning.optim.torch import NestedAdamW
    from nested_learning.tiers import assign_tiers, format_plan

    t = cfg.tiers
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    options: dict[str, Any] = dict(periods=t.periods, lr_scales=t.lr_scales, reverse=t.reverse)
    if t.strategy == "gradient_norm" and saved_assignment:
        options.update(strategy="manual", manual=saved_assignment)
    elif t.strategy == "gradient_norm":
        options.update(strategy="gradient_norm", probe=probe)
    else:
        options.update(strategy=t.strategy, rules=t.rules, manual=t.manual)
    groups = assign_tiers(named, **options)
    optimizer = NestedAdamW(
        groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, accumulate=t.accumulate, flush_on_end=t.flush_on_end,
        flat=cfg.optim.flat_buffers,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule))
    assignment = {name: k for k, g in enumerate(groups) for name in g["param_names"]}
    return optimizer, scheduler, assignment, format_plan(groups)


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


# ---------------------------------------------------------------------------------------------------- run
def run_training(
    config: TrainConfig,
    callbacks: Iterable[Callback] = (),
    stop_event: threading.Event | None = None,
    resume: str | None = None,
    *,
    loss_fn: Callable | None = None,
) -> TrainerState:
    """Train ``config`` to completion, early stop, ``stop_event`` or failure; returns the final state.

    ``resume``: ``None`` (fresh), ``"auto"`` (latest checkpoint in ``output.dir``, fresh when none) or a
    checkpoint / run directory. ``loss_fn(model, batch) -> (loss_sum, n_loss_tokens)`` can be swapped;
    by default it is ``make_loss_fn(model.loss_chunk_tokens)`` (chunked head + cross-entropy, or full logits).
    """
    loss_fn = loss_fn or make_loss_fn(config.model.loss_chunk_tokens, config.model.loss_chunk_kernel)
    cfg, callbacks, stop_event = config, list(callbacks), stop_event or threading.Event()
    out = check_output_dir(cfg, resume)
    resume_from = ckpt.resolve_resume(resume, out)
    saved = ckpt.load_trainer_state(resume_from) if resume_from is not None else None

    seed_everything(cfg.seed)
    from nested_learning.data import iterate_batches

    tokenizer = load_tokenizer(cfg.model)
    train, valid, plan = prepare_data(cfg, tokenizer)
    cuda_graphs = uses_cuda_graphs(cfg.model, resolve_device(cfg.model.device), cfg.data.packing, cfg.optim.grad_accum)
    plan.fixed_width = cuda_graphs  # one batch shape for graph replay
    base = load_model(cfg.model)  # base weights never depend on the run seed
    device = next(base.parameters()).device
    apply_kernel_choices(cfg.model, device)  # also when a caller's load_model stands in for ours
    model = wrap_lora(base, cfg.lora, seed=cfg.seed)
    if cfg.model.skip_causal_mask:
        use_causal_sdpa(model)
    if cfg.model.outer_rotary:
        use_outer_rotary(model)
    if saved is not None:
        ckpt.load_adapter_weights(model, resume_from)
    if cfg.model.fused_lora:
        fuse_lora_groups(model)
    elif cfg.model.lora_fold and cfg.model.gradient_checkpointing:
        log.info("model.lora_fold: off under model.gradient_checkpointing (PEFT's path; see the option's help)")
    elif cfg.model.lora_fold:
        fold_lora_groups(model)
    pad_id = tokenizer.pad_token_id
    probe = make_probe(model, iterate_batches(train, plan, pad_id), device, cfg.tiers.probe_steps, loss_fn)
    optimizer, scheduler, assignment, plan_text = build_optimizer(
        cfg, model, probe, saved_assignment=(saved or {}).get("tier_assignment")
    )
    forward_model = maybe_compile(model, cfg.model, device, cuda_graphs=cuda_graphs)

    state = TrainerState(total_steps=cfg.schedule.steps, output_dir=str(out), tier_plan=plan_text)
    micro_index, bad_evals = 0, 0
    if saved is not None:
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except ValueError as exc:  # e.g. tiers changed since the checkpoint was written
            raise ConfigError(f"--resume {resume_from}: the checkpoint does not fit this config: {exc}") from None
        scheduler.load_state_dict(saved["scheduler"])
        fields = {f.name for f in dataclasses.fields(TrainerState)}
        state = TrainerState(**{k: v for k, v in saved["trainer_state"].items() if k in fields})
        state.total_steps, state.output_dir, state.tier_plan = cfg.schedule.steps, str(out), plan_text
        state.early_stopped, state.error = False, None
        micro_index, bad_evals = saved["micro_index"], saved["bad_evals"]
        ckpt.restore_rng(saved["rng"])
        log.info("resuming from %s at step %d", resume_from, state.step)

    # Setup succeeded: only now does the run directory appear.
    if saved is None and out.is_dir():  # output.overwrite, or --resume auto with nothing to resume
        for stale in ("checkpoints", "tb"):
            shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    metrics = MetricsLog(out, resume_step=state.step if saved else None, tensorboard=cfg.output.tensorboard)
    log.debug("tier plan:\n%s", plan_text)  # printed by the CLI callbacks, not here

    trainable = [p for p in model.parameters() if p.requires_grad]
    eval_bs = cfg.eval.batch_size or cfg.optim.batch_size
    batches = iterate_batches(train, plan, pad_id, start=micro_index)

    def emit(hook: str, *args) -> None:
        for cb in callbacks:
            getattr(cb, hook)(state, *args)

    def save(name: str) -> Path:
        payload = {
            "format": 1, "step": state.step, "micro_index": micro_index, "bad_evals": bad_evals,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": ckpt.capture_rng(),
            "tier_assignment": assignment, "trainer_state": state.to_dict(),
        }
        path = ckpt.save_checkpoint(out, name, model, tokenizer, cfg, payload)
        if name == "best":
            state.best_checkpoint = str(path)
        else:
            state.last_checkpoint = str(path)
        emit("on_checkpoint", str(path))
        return path

    def run_eval() -> bool:
        """Evaluate; update best (saving ``best``) and the early-stopping counter. True when it improved."""
        nonlocal bad_evals
        if not valid:
            return False
        with eager_stance(cuda_graphs):  # padded eval batches vary in shape: no graph per shape
            res = evaluate_loss(forward_model, valid, pad_id, batch_size=eval_bs, max_batches=cfg.eval.max_batches,
                                device=device, loss_fn=loss_fn)
        state.val_loss, state.val_ppl = res["loss"], res["ppl"]
        improved = state.best_val_loss is None or res["loss"] < state.best_val_loss - cfg.eval.early_stopping_min_delta
        bad_evals = 0 if improved else bad_evals + 1
        if state.best_val_loss is None or res["loss"] < state.best_val_loss:
            state.best_val_loss = res["loss"]
            if cfg.checkpoint.save_best and state.step > 0:
                save("best")
        metrics.write({"step": state.step, "val_loss": res["loss"], "val_ppl": res["ppl"]}, tb_prefix="eval")
        emit("on_eval")
        return improved

    state.status = "running"
    state.tier_stats = optimizer.tier_stats()
    state.lr = optimizer.param_groups[0]["lr"]
    emit("on_start")
    try:
        if cfg.eval.at_start and saved is None:
            run_eval()
        model.train()
        window_loss = torch.zeros((), device=device)
        window_steps, window_tokens, window_t0 = 0, 0, time.perf_counter()

        def fetch_step() -> list:
            # Collated and sent (pinned, non-blocking) while the device still works on the previous step.
            return [next(batches).to(device, non_blocking=True) for _ in range(cfg.optim.grad_accum)]

        upcoming = fetch_step() if state.step < cfg.schedule.steps else []
        while state.step < cfg.schedule.steps and not stop_event.is_set():
            step_batches = upcoming
            step_loss = accumulate_gradients(forward_model, step_batches, loss_fn, device)
            if state.step + 1 < cfg.schedule.steps:
                upcoming = fetch_step()  # the step's kernels are queued; prepare the next one meanwhile
            micro_index += len(step_batches)
            window_loss += step_loss
            window_steps += 1
            window_tokens += sum(b.num_tokens for b in step_batches)

            # Clip the accumulated gradient once per optimizer step (a no-op scale when disabled).
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)

            # Read back only every log_every steps (a device sync); a bad loss stops before it is applied.
            read_back = ((state.step + 1) % cfg.output.log_every == 0 or state.step + 1 == cfg.schedule.steps
                         or stop_event.is_set())
            if read_back:
                loss_value, norm_value = window_loss.item() / window_steps, grad_norm.item()
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    raise TrainingError(
                        f"non-finite {what} at step {state.step + 1} (loss={loss_value}, grad_norm={norm_value}); "
                        f"training stopped, last good checkpoint: {state.last_checkpoint or 'none'}"
                    )

            state.lr = optimizer.param_groups[0]["lr"]  # the lr this step is taken with
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.epoch = micro_index // len(plan)
            state.tokens_seen += sum(b.num_tokens for b in step_batches)
            state.tier_stats = optimizer.tier_stats()

            if read_back:
                elapsed = max(time.perf_counter() - window_t0, 1e-9)
                state.train_loss, state.grad_norm = loss_value, norm_value
                state.tokens_per_sec = window_tokens / elapsed
                state.eta_s = elapsed / window_steps * (cfg.schedule.steps - state.step)
                metrics.write({
                    "step": state.step, "loss": loss_value, "lr": state.lr, "grad_norm": norm_value,
                    "tokens_per_sec": state.tokens_per_sec, "tokens": state.tokens_seen, "epoch": state.epoch,
                    "tier_updates": [t["updates"] for t in state.tier_stats],
                })
                window_loss = torch.zeros((), device=device)
                window_steps, window_tokens = 0, 0
            emit("on_step")

            last_step = state.step == cfg.schedule.steps
            if cfg.eval.every and state.step % cfg.eval.every == 0 and not last_step:
                run_eval()
                if cfg.eval.early_stopping_patience and bad_evals >= cfg.eval.early_stopping_patience:
                    state.early_stopped = True
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                save(ckpt.step_name(state.step))
                ckpt.prune_step_checkpoints(out, cfg.checkpoint.keep_last_n)
            if state.early_stopped:
                log.info("early stopping at step %d (no improvement in %d evals)", state.step, bad_evals)
                break
            if read_back:  # tokens/s and ETA measure training steps, not callbacks, evals and checkpoints
                window_t0 = time.perf_counter()

        if stop_event.is_set() and not state.early_stopped and state.step < cfg.schedule.steps:
            state.status = "stopped"  # resumable as is: no flush, so a resume continues exactly
        else:
            if cfg.tiers.flush_on_end:
                optimizer.flush()  # slow tiers apply the gradients of their partial chunk
                state.tier_stats = optimizer.tier_stats()
            run_eval()
            state.status = "completed"
        save("last")
    except BaseException as exc:
        state.status = "failed"
        state.error = str(exc) or type(exc).__name__
        emit("on_end")
        raise
    finally:
        metrics.close()
    emit("on_end")
    return state
