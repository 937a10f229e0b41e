"""NestedAdamW inside ``transformers.Trainer`` (and TRL's ``SFTTrainer``, a ``Trainer`` subclass).

Two pieces::

    optimizer, scheduler = nested_optimizer(model, args, tiers={"periods": [1, 2, 4]})
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, scheduler),
                      callbacks=[NestedTiersCallback(optimizer)], ...)

- :func:`nested_optimizer` builds the tier plan (:func:`nested_learning.assign_tiers`, configured like the
  ``tiers:`` section of a run config) over the model's trainable parameters, ``NestedAdamW`` with the
  hyperparameters of the ``TrainingArguments`` (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``,
  ``weight_decay``), and the learning-rate schedule of :mod:`nested_learning.optim.schedule` mapped from
  ``lr_scheduler_type``, ``warmup_steps`` and ``max_steps``. The schedule is ours, not transformers': its warmup
  reaches the peak at step ``warmup_steps`` (transformers' starts from 0 one step earlier), so a run here and
  the same run through ``nested_learning.train`` follow the same learning rates.
- :class:`NestedTiersCallback` adds each tier's update count to the Trainer's logs (``tier0_updates``, ...) and
  applies the slow tiers' pending gradients when training reaches ``max_steps`` (``flush_on_end``), before the
  caller's ``trainer.save_model()``.

Checkpoints need nothing extra: the Trainer saves ``optimizer.state_dict()`` and loads it on
``train(resume_from_checkpoint=...)``, and that state dict carries the optimizer's step count, every tier's
update and pending counts and the slow tiers' gradient accumulators, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from transformers import TrainerCallback

from nested_learning.config import ScheduleConfig, TiersConfig
from nested_learning.optim.adamw import NestedAdamW
from nested_learning.optim.schedule import lr_lambda
from nested_learning.tiers import assign_tiers

__all__ = ["NestedTiersCallback", "nested_optimizer", "put_first", "schedule_from_args"]

# transformers' scheduler names -> the decay of nested_learning.optim.schedule
_DECAY = {"cosine": "cosine", "cosine_with_min_lr": "cosine", "linear": "linear",
          "constant": "constant", "constant_with_warmup": "constant"}


def _scheduler_name(args) -> str:
    kind = args.lr_scheduler_type
    return getattr(kind, "value", kind)  # an enum in TrainingArguments, a string when set by hand


def schedule_from_args(args, num_training_steps: int | None = None) -> ScheduleConfig:
    """The ``schedule:`` section equivalent to the ``TrainingArguments``; ``num_training_steps`` defaults to
    ``args.max_steps`` (needed: the Trainer only works it out from epochs once it has a dataloader)."""
    steps = num_training_steps if num_training_steps is not None else args.max_steps
    if steps is None or steps <= 0:
        raise ValueError("TrainingArguments.max_steps: set max_steps > 0, or pass num_training_steps "
                         f"(got max_steps={args.max_steps})")
    name = _scheduler_name(args)
    if name not in _DECAY:
        raise ValueError(f"TrainingArguments.lr_scheduler_type: {name!r} is not supported with NestedAdamW; "
                         f"use one of {', '.join(_DECAY)}")
    # transformers' plain "constant" has no warmup whatever warmup_steps says.
    warmup = 0 if name == "constant" else args.get_warmup_steps(steps)
    kwargs = args.lr_scheduler_kwargs or {}
    if name == "cosine_with_min_lr" and "min_lr_rate" not in kwargs:
        raise ValueError("TrainingArguments.lr_scheduler_kwargs: cosine_with_min_lr needs min_lr_rate "
                         "(a fraction of the peak learning rate)")
    return ScheduleConfig(steps=steps, warmup_steps=min(warmup, steps), kind=_DECAY[name],
                          min_lr_ratio=float(kwargs.get("min_lr_rate", 0.0)))


def nested_optimizer(
    model,
    args,
    tiers: TiersConfig | Mapping[str, Any] | None = None,
    *,
    num_training_steps: int | None = None,
    flat: bool = True,
) -> tuple[NestedAdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``.

    ``tiers``: a ``TiersConfig`` or its fields as a mapping (``periods``, ``strategy``, ``lr_scales``,
    ``rules``, ``manual``, ``reverse``, ``accumulate``, ``flush_on_end``); default ``TiersConfig()``. The
    ``gradient_norm`` strategy needs a probe over data and is not offered here: rank the parameters with
    ``assign_tiers(..., probe=...)`` and pass the result as ``manual``. ``flat``: each tier's tensors in one
    buffer (``optim.flat_buffers``).
    """
    t = tiers if isinstance(tiers, TiersConfig) else TiersConfig.model_validate(dict(tiers or {}))
    for name in ("ema", "consolidate"):  # the Trainer evaluates and saves the fast weights, and never consolidates
        if getattr(t, name) is not None:
            raise ValueError(f"tiers.{name}: not supported with the transformers Trainer; use `nested-learning "
                             "train` (or NestedAdamW's ema/consolidate with your own loop)")
    if t.strategy == "gradient_norm":
        raise ValueError("tiers.strategy: gradient_norm needs a probe over training data; compute the ranking "
                         "with nested_learning.assign_tiers(..., probe=...) and pass it as strategy 'manual'")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: no trainable parameters (wrap the model with LoRA first)")
    groups = assign_tiers(named, strategy=t.strategy, periods=t.periods, lr_scales=t.lr_scales, reverse=t.reverse,
                          rules=t.rules, manual=t.manual)
    optimizer = NestedAdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_epsilon, weight_decay=args.weight_decay, accumulate=t.accumulate,
                            flush_on_end=t.flush_on_end, flat=flat)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule_from_args(args, num_training_steps)))
    return optimizer, scheduler


def _unwrap(optimizer) -> NestedAdamW:
    """Our optimizer under accelerate's ``AcceleratedOptimizer`` wrapper (which keeps it as ``.optimizer``)."""
    while not isinstance(optimizer, NestedAdamW):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            raise TypeError(f"NestedTiersCallback needs a NestedAdamW, got {type(optimizer).__name__}")
        optimizer = inner
    return optimizer


class NestedTiersCallback(TrainerCallback):
    """Per-tier update counts in the Trainer's logs; the slow tiers' final flush.

    ``optimizer``: the ``NestedAdamW`` given to the Trainer (``None``: the one the Trainer hands its callbacks).
    Each log gets ``tier<k>_updates``, in ``trainer.state.log_history`` too. Report integrations placed before
    this callback (the Trainer puts ``report_to`` ones first) see the counts only if it runs first:
    :func:`put_first`.

    At the end of training the optimizer's ``finish()`` applies each slow tier's partial chunk, but only when the
    run reached ``max_steps``: a run stopped early (a callback set ``should_training_stop``) is left as its last
    checkpoint has it, so resuming that checkpoint continues exactly.
    """

    def __init__(self, optimizer: NestedAdamW | None = None):
        self.optimizer = optimizer

    def _optimizer(self, kwargs: dict[str, Any]) -> NestedAdamW | None:
        opt = self.optimizer if self.optimizer is not None else kwargs.get("optimizer")
        return None if opt is None else _unwrap(opt)

    def tier_updates(self, optimizer: NestedAdamW) -> dict[str, int]:
        return {f"tier{k}_updates": int(g["updates"]) for k, g in enumerate(optimizer.param_groups)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        opt = self._optimizer(kwargs)
        if opt is None or logs is None:
            return
        counts = self.tier_updates(opt)
        logs.update(counts)
        # The Trainer appended a copy of `logs` to the history just before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(counts)

    def on_train_end(self, args, state, control, **kwargs):
        opt = self._optimizer(kwargs)
        if opt is not None and state.max_steps > 0 and state.global_step >= state.max_steps:
            opt.finish()


def put_first(trainer, callback: TrainerCallback) -> TrainerCallback:
    """Add ``callback`` to ``trainer`` ahead of every other one, so ``report_to`` integrations (MLflow, W&B,
    TensorBoard) log what it adds; returns it."""
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
    callbacks.insert(0, callback)
    return callback
