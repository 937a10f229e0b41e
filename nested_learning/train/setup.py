"""Build a run: ``build_run(config, resume) -> Run``, everything the loop needs, in a few named steps.

data -> base model -> LoRA -> (resumed adapter) -> speed plan -> tiers + optimizer -> (resumed state) -> run dir.

Nothing is written before every part is built, so a bad config, data file or model leaves no run directory.
Tests and benchmarks hand in their own tokenizer, base model or samples instead of patching anything.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from nested_learning.config import ConfigError, TrainConfig
from nested_learning.data import BatchPlan, DataError, Sample, iterate_batches, load_splits
from nested_learning.data.sharding import shard_batches
from nested_learning.model.loading import autocast_context, load_model, load_tokenizer, prepare_base, resolve_device
from nested_learning.model.lora import wrap_lora
from nested_learning.optim.adamw import NestedAdamW
from nested_learning.optim.schedule import lr_lambda
from nested_learning.speed.compile import eager_stance
from nested_learning.speed.plan import SpeedPlan, apply_speed, plan_speed
from nested_learning.train import checkpoint as ckpt
from nested_learning.train.distributed import DistContext, current
from nested_learning.train.evaluate import load_retain_sets
from nested_learning.train.grad_sync import GradSync
from nested_learning.train.loss import make_loss_fn
from nested_learning.train.state import TrainerState

__all__ = ["Run", "build_optimizer", "build_run", "make_probe", "seed_everything"]

log = logging.getLogger("nested_learning.train")


@dataclass
class Run:
    """Everything one training run is made of, built once by ``build_run`` and handed to ``train_loop``."""

    config: TrainConfig
    output_dir: Path
    device: torch.device
    tokenizer: Any
    model: Any  # the PEFT model: its adapter is what checkpoints hold
    forward_model: Any  # what the loss calls: ``model``, or its compiled form
    loss_fn: Callable  # (forward_model, batch) -> (summed token loss, loss tokens)
    train_samples: Sequence[Sample]
    valid_samples: Sequence[Sample]
    batch_plan: BatchPlan
    optimizer: NestedAdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tier_assignment: dict[str, int]
    speed_plan: SpeedPlan
    state: TrainerState
    micro_index: int = 0  # micro-batches consumed: the data position a resume continues from
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    resumed_from: Path | None = None
    metrics_rows: int | None = None  # metrics.jsonl rows the resumed checkpoint saw (None: rows up to its step)
    nonfinite: dict[str, int] | None = None  # the non-finite guard's counters at the resumed checkpoint
    retain_sets: dict[str, list] = dataclasses.field(default_factory=dict)  # eval.retain: name -> samples
    dist: DistContext = dataclasses.field(default_factory=DistContext)  # data parallelism (default: one process)
    grad_sync: GradSync | None = None  # sums gradients over ranks (train/grad_sync.py); None for one process
    base_bytes_read: int | None = None  # fsdp: base tensors this rank read whole (0 on ranks other than 0)
    startup_s: dict[str, float] = dataclasses.field(default_factory=dict)  # build_run's phases (startup.json)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def batches(self) -> Iterable:
        """The training micro-batches from the current data position on (this rank's share of each)."""
        if self.dist.active:
            return shard_batches(self.train_samples, self.batch_plan, self.pad_id, rank=self.dist.rank,
                                 world=self.dist.world, start=self.micro_index)
        return iterate_batches(self.train_samples, self.batch_plan, self.pad_id, start=self.micro_index)


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


def make_probe(model, batches: Iterable, device: torch.device, steps: int, loss_fn: Callable):
    """``gradient_norm`` tiers: mean squared gradient per trainable tensor over ``steps`` micro-batches.
    Runs eagerly under a forked RNG and clears the gradients, so training afterwards is unaffected."""

    def probe() -> dict[str, float]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sums = {n: torch.zeros((), device=device) for n in params}
        it = iter(batches)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eager_stance(True):
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
    """Tier groups -> NestedAdamW -> LambdaLR; returns (optimizer, scheduler, assignment, printable plan).
    A resumed ``gradient_norm`` run reuses its saved assignment (a new probe on trained weights could rank
    differently and break the optimizer state)."""
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
        flat=cfg.optim.flat_buffers, ema=t.ema,
        consolidate=None if t.consolidate is None else (t.consolidate.every, t.consolidate.alpha),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule))
    assignment = {name: k for k, g in enumerate(groups) for name in g["param_names"]}
    return optimizer, scheduler, assignment, format_plan(groups)


def _load_data(cfg: TrainConfig, tokenizer, data, world: int = 1):
    """Samples and the batch plan; under data parallelism the plan is that of the global micro-batch
    (``optim.batch_size`` per rank × ranks), which every rank walks in the same order."""
    train, valid = data if data is not None else load_splits(cfg.data, tokenizer, cfg.seed)
    if not train:
        raise DataError("data: no training samples")
    plan = BatchPlan(
        train, cfg.optim.batch_size * world, seed=cfg.seed, shuffle=cfg.data.shuffle,
        group_by_length=cfg.data.group_by_length,
        packing=cfg.data.packing, max_length=cfg.data.max_length,
    )
    return list(train), list(valid), plan


def _restore(run: Run, saved: dict[str, Any], resume_from: Path) -> None:
    """Optimizer (with tier accumulators), schedule, counters, reported state and RNG of a checkpoint."""
    try:
        run.optimizer.load_state_dict(saved["optimizer"])
    except ValueError as exc:  # e.g. tiers changed since the checkpoint was written
        raise ConfigError(f"--resume {resume_from}: the checkpoint does not fit this config: {exc}") from None
    run.scheduler.load_state_dict(saved["scheduler"])
    fields = {f.name for f in dataclasses.fields(TrainerState)}
    restored = TrainerState(**{k: v for k, v in saved["trainer_state"].items() if k in fields})
    restored.total_steps, restored.output_dir = run.state.total_steps, run.state.output_dir
    restored.tier_plan, restored.speed_plan = run.state.tier_plan, run.state.speed_plan
    restored.early_stopped, restored.error = False, None
    run.state = restored
    run.micro_index, run.bad_evals, run.resumed_from = saved["micro_index"], saved["bad_evals"], resume_from
    run.metrics_rows, run.nonfinite = saved.get("metrics_rows"), saved.get("nonfinite")
    _check_global_batch(run, saved, resume_from)
    if run.grad_sync is not None:
        run.grad_sync.after_load()
    ckpt.restore_rng(saved["rng"])
    log.info("resuming from %s at step %d", resume_from, run.state.step)


def _check_global_batch(run: Run, saved: dict[str, Any], resume_from: Path) -> None:
    """The data position a checkpoint holds counts global micro-batches of its size: a resume on another number
    of ranks continues exactly only with the same global micro-batch (``optim.batch_size`` × ranks)."""
    was, now = saved.get("global_batch_size"), run.batch_plan.batch_size
    if was is not None and was != now:
        ranks, world = saved.get("world_size", 1), run.dist.world
        fix = (f"Set optim.batch_size={was // world} to continue it on {world} rank(s)" if was % world == 0
               else f"Continue it on a number of ranks that divides {was}")
        raise ConfigError(
            f"--resume {resume_from}: the checkpoint was trained with a global micro-batch of {was} "
            f"(optim.batch_size {was // ranks} x {ranks} rank(s)); this run has {now} (optim.batch_size "
            f"{run.config.optim.batch_size} x {world} rank(s)). {fix}")


def _check_device(cfg: TrainConfig, dist: DistContext) -> None:
    device = cfg.model.device
    if dist.active and device.startswith("cuda:"):
        raise ConfigError(f"model.device: {device!r} puts every rank on one GPU; under torchrun use 'auto' or "
                          "'cuda' (each rank takes cuda:LOCAL_RANK)")


def _open_run_dir(run: Run, resume: str | None) -> None:
    """Setup succeeded: only now does the run directory appear (or get cleared for a fresh start).

    Only ``output.overwrite`` without a resume clears an old run. ``--resume auto`` that found no checkpoint
    (a run killed before its first one) deletes nothing but what killed writes left half-done."""
    out, cfg = run.output_dir, run.config
    if run.resumed_from is None and resume is None and out.is_dir():  # output.overwrite
        for stale in ("checkpoints", "tb"):
            shutil.rmtree(out / stale, ignore_errors=True)
    ckpt.remove_incomplete(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_atomic(out / "config.yaml", cfg.to_yaml())
    ckpt.write_json(out / "speed_plan.json", run.speed_plan.to_dict())
    if run.state.step < run.state.total_steps:  # a resumed run that is already complete writes nothing new
        ckpt.write_json(out / "startup.json", {name: round(sec, 3) for name, sec in run.startup_s.items()})


def build_run(
    config: TrainConfig,
    resume: str | None = None,
    *,
    tokenizer=None,
    base_model=None,
    data: tuple[Sequence[Sample], Sequence[Sample]] | None = None,
    dist: DistContext | None = None,
) -> Run:
    """Build everything ``config`` describes; resume from a checkpoint when asked.

    ``resume``: ``None`` (fresh), ``"auto"`` (latest checkpoint in ``output.dir``, fresh when none) or a
    checkpoint / run directory. ``tokenizer``, ``base_model`` (a transformers causal LM on its device) and
    ``data`` (train, valid samples) replace what the config would load. ``dist``: this process's place in a
    data-parallel job (default: the process group ``torchrun`` started, if any; see ``train.distributed``).
    """
    cfg = config
    phases: dict[str, float] = {}  # seconds per phase of the start-up, in order (startup.json, the log)
    since = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal since
        now = time.perf_counter()
        phases[name], since = now - since, now

    dist = dist or current()
    _check_device(cfg, dist)
    out = check_output_dir(cfg, resume)
    resume_from = dist.main_first(lambda: ckpt.resolve_resume(resume, out), "finding the checkpoint to resume")
    saved = ckpt.load_trainer_state(resume_from) if resume_from is not None else None

    seed_everything(cfg.seed)
    phase("setup")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    phase("tokenizer")
    train, valid, batch_plan = _load_data(cfg, tokenizer, data, dist.world)
    retain_sets = load_retain_sets(cfg.eval.retain, cfg.data, tokenizer)
    phase("data")

    def load_adapter(model) -> None:
        if saved is not None:
            ckpt.load_adapter_weights(model, resume_from)
        elif cfg.lora.init_adapter:  # continue training an existing adapter (either format)
            from nested_learning.inference.convert import load_adapter_into

            load_adapter_into(model, cfg.lora.init_adapter, cfg.lora.r, cfg.lora.alpha, cfg.lora.use_rslora)

    fsdp = dist.active and cfg.distributed.strategy == "fsdp"  # the frozen base sharded over ranks (train/fsdp.py)
    base_bytes_read = None
    if fsdp and base_model is None:  # built sharded: rank 0 alone reads the base (train/fsdp.py)
        from nested_learning.train.fsdp import load_sharded

        device = resolve_device(cfg.model.device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # cuda:LOCAL_RANK (init_from_env)
        model, base_bytes_read = load_sharded(cfg, dist, device, load_adapter)
    else:
        # Base weights never depend on the run seed; the adapter init is seeded by wrap_lora.
        base = load_model(cfg.model) if base_model is None else prepare_base(base_model, cfg.model)
        device = next(base.parameters()).device
        model = wrap_lora(base, cfg.lora, seed=cfg.seed)
        load_adapter(model)
    phase("model")

    speed = plan_speed(cfg, model, device, world=dist.world)
    batch_plan.fixed_width = speed.on("cuda_graphs")  # one batch shape for graph replay
    loss_fn = make_loss_fn(speed.chunk_tokens, speed.chunk_kernel)
    shard = None
    if fsdp and base_model is not None:  # a base handed in whole: sharded in place
        from nested_learning.train.fsdp import shard_frozen_base

        def shard(m) -> None:
            shard_frozen_base(m, dist, device)
    forward_model = apply_speed(speed, model, cfg, device, before_compile=shard)
    phase("speed")

    probe = make_probe(model, iterate_batches(train, batch_plan, tokenizer.pad_token_id), device,
                       cfg.tiers.probe_steps, loss_fn)
    optimizer, scheduler, assignment, tier_plan = build_optimizer(
        cfg, model, probe, saved_assignment=(saved or {}).get("tier_assignment"))
    phase("optimizer")

    state = TrainerState(total_steps=cfg.schedule.steps, output_dir=str(out), tier_plan=tier_plan,
                         speed_plan=speed.format())
    run = Run(cfg, out, device, tokenizer, model, forward_model, loss_fn, train, valid, batch_plan, optimizer,
              scheduler, assignment, speed, state, retain_sets=retain_sets, dist=dist,
              base_bytes_read=base_bytes_read, startup_s=phases)
    if dist.active:
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        run.grad_sync = GradSync(dist, optimizer, cfg.distributed.tier_sync, max_norm)
    if saved is not None:
        _restore(run, saved, resume_from)
    phase("resume")
    log.info("start-up: %s", ", ".join(f"{name} {sec:.1f} s" for name, sec in phases.items()))
    dist.on_main(lambda: _open_run_dir(run, resume), "opening the run directory")
    return run
