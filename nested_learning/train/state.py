"""What a run reports while it trains: ``TrainerState``, the ``Callback`` hooks, ``TrainingError``.

No torch here: the CLI and the service import this module at start-up without loading a tensor library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Callback", "CheckpointError", "TrainerState", "TrainingError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the path."""


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
    tier_plan: str = ""  # the printable tier table (tiers.format_plan)
    val_ppl: float | None = None
    speed_plan: str = ""  # the printable speed plan (speed.plan.SpeedPlan.format)
    # eval.retain / eval.metric: the forgetting curve next to the learning curve (None when not evaluated)
    retain_loss: float | None = None  # mean over retain sets
    val_exact_match: float | None = None
    retain_exact_match: float | None = None  # mean over retain sets
    retain: dict[str, dict[str, float]] = field(default_factory=dict)  # set name -> {loss, exact_match}

    def record_eval(self, val: dict[str, float], retain: dict[str, dict[str, float]], min_delta: float,
                    bad_evals: int) -> tuple[int, bool]:
        """Take one evaluation's scores (``val``: loss, ppl, maybe exact_match; ``retain``: the same per set).
        Returns (evaluations without an improvement of more than ``min_delta``, whether val_loss is a new best).
        Both backends' evaluators call this, so best and early stopping mean one thing."""
        self.val_loss, self.val_ppl, self.val_exact_match = val["loss"], val["ppl"], val.get("exact_match")
        if retain:
            self.retain = {name: {k: r[k] for k in ("loss", "exact_match") if k in r} for name, r in retain.items()}
            # Each set counts once in the mean, whatever its size: a small set is not drowned by a large one.
            self.retain_loss = sum(r["loss"] for r in retain.values()) / len(retain)
            if all("exact_match" in r for r in retain.values()):
                self.retain_exact_match = sum(r["exact_match"] for r in retain.values()) / len(retain)
        improved = self.best_val_loss is None or val["loss"] < self.best_val_loss - min_delta
        new_best = self.best_val_loss is None or val["loss"] < self.best_val_loss
        if new_best:
            self.best_val_loss = val["loss"]
        return (0 if improved else bad_evals + 1), new_best

    def eval_metrics(self) -> dict[str, Any]:
        """The numbers of the latest evaluation, keyed as in metrics.jsonl eval rows (``retain_loss/<name>``)."""
        out: dict[str, Any] = {"val_loss": self.val_loss, "val_ppl": self.val_ppl}
        if self.val_exact_match is not None:
            out["val_exact_match"] = self.val_exact_match
        if self.retain:
            out["retain_loss"] = self.retain_loss
            out.update({f"retain_loss/{name}": r["loss"] for name, r in self.retain.items()})
        if self.retain_exact_match is not None:
            out["retain_exact_match"] = self.retain_exact_match
            out.update({f"retain_exact_match/{name}": r["exact_match"] for name, r in self.retain.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Callback:
    """Override what you need; every hook receives the live ``TrainerState``."""

    def on_start(self, state: TrainerState) -> None: ...
    def on_step(self, state: TrainerState) -> None: ...
    def on_eval(self, state: TrainerState) -> None: ...
    def on_checkpoint(self, state: TrainerState, path: str) -> None: ...
    def on_end(self, state: TrainerState) -> None: ...
