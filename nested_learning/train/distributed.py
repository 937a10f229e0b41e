"""Data-parallel training on ``torch.distributed``: the process group ``torchrun`` describes, and who does what.

``torchrun`` (or Slurm, Kubernetes' PyTorchJob, Ray's TorchTrainer, which build on it) starts one process per
GPU with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in the environment.
``init_from_env`` joins that group (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU) with
``distributed.timeout_s`` as the collective timeout, and keeps a ``DistContext`` that ``build_run`` puts on the
``Run``. A world of one starts no group at all: ``torchrun --nproc-per-node 1`` runs the single-process trainer.

Who does what (docs/distributed.md):

- every rank builds the same run (same seed, same adapter init, same global micro-batch stream) and trains on
  its share of each global micro-batch (``nested_learning.data.sharding``); ``train.grad_sync`` sums gradients;
- rank 0 alone writes the run directory: config, checkpoints, ``metrics.jsonl``, TensorBoard, and reports
  progress through the callbacks; every rank resumes from those files (a shared filesystem across nodes);
- a stop (Ctrl-C, SIGTERM, a service's cancel) asked on any rank is agreed by all ranks at the end of the step;
- a failed collective (a rank died, or did not answer within the timeout) raises ``TrainingError`` naming the
  rank and what failed, on every surviving rank: the job ends, it never hangs.

There is no DDP wrapper: gradients are summed by explicit all-reduces, so slow tiers can skip theirs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from nested_learning.train import checkpoint as ckpt
from nested_learning.train.state import Callback, CheckpointError, TrainingError

__all__ = ["DistContext", "NullMetrics", "current", "for_rank", "init_from_env", "launch", "optimizer_state",
           "save_checkpoint", "shutdown"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; the default is a single process (no collectives at all)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = 600.0
    control: Any = None  # a gloo group for host-side agreement (stop, save results); None: the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # Every collective below raises TrainingError on failure, naming the rank and what was being exchanged.
    def _failed(self, what: str, exc: BaseException) -> TrainingError:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return TrainingError(f"rank {self.rank} of {self.world}: {what} across ranks failed: another rank died or "
                             f"did not answer within distributed.timeout_s={self.timeout_s:g}s ({detail})")

    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        """Sum ``tensor`` over ranks in place (nothing to do for one process)."""
        if not self.active:
            return
        try:
            dist.all_reduce(tensor)
        except RuntimeError as exc:
            raise self._failed(what, exc) from None

    def agree_any(self, flag: bool, what: str) -> bool:
        """True on every rank when ``flag`` is true on any (host-side, no device sync)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        except RuntimeError as exc:
            raise self._failed(what, exc) from None
        return bool(t.item())

    def barrier(self, what: str) -> None:
        if not self.active:
            return
        try:
            dist.barrier(group=self.control)
        except RuntimeError as exc:
            raise self._failed(what, exc) from None

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on rank 0 only; every rank returns when it is done (others get ``None``) and every rank
        raises when it failed with a user-facing error (the others as ``CheckpointError`` naming rank 0's)."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except (ValueError, OSError) as exc:  # CheckpointError, ConfigError, a refused path
                error = exc
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        try:
            dist.broadcast_object_list(message, src=0, group=self.control)
        except RuntimeError as exc:
            raise self._failed(what, exc) from None
        if error is not None:
            raise error
        if message[0] is not None:
            raise CheckpointError(f"rank 0 failed at {what}: {message[0]}")
        return result

    def main_first(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn`` on rank 0, then on the other ranks (reads that may repair files, e.g. finding a checkpoint)."""
        if not self.active:
            return fn()
        if self.is_main:
            try:
                return fn()
            finally:
                self.barrier(what)
        self.barrier(what)
        return fn()


_CONTEXT: DistContext | None = None


def init_from_env(timeout_s: float = 600.0, device: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes in the environment (once per process); a world of one (or
    no ``WORLD_SIZE``) is the single-process context. ``device``: ``model.device``, which picks NCCL (CUDA,
    each rank on ``cuda:LOCAL_RANK``) or gloo (CPU)."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=timeout_s)
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        control = None
    _CONTEXT = DistContext(rank, world, local_rank, timeout_s, control)
    return _CONTEXT


def current() -> DistContext:
    """The context of this process: the one ``init_from_env`` made, one for a process group started by other
    code, or a single process."""
    global _CONTEXT
    if _CONTEXT is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        _CONTEXT = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                               control=control)
    return _CONTEXT or DistContext()


def shutdown() -> None:
    """Leave the process group (end of a training command)."""
    global _CONTEXT
    if _CONTEXT is not None and _CONTEXT.active and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


# ------------------------------------------------------------------------------------- the loop's pieces
class AgreedStop:
    """A stop event every rank reads the same: ``is_set()`` is the agreed value, updated at the end of each step
    (``agree``); ``set()`` asks locally, as a ``threading.Event`` would."""

    def __init__(self, local: threading.Event, ctx: DistContext):
        self.local, self.ctx, self.agreed = local, ctx, False

    def set(self) -> None:
        self.local.set()

    def is_set(self) -> bool:
        return self.agreed

    def agree(self) -> None:
        self.agreed = self.ctx.agree_any(self.local.is_set(), "agreeing on a stop") or self.agreed
        if self.agreed:
            self.local.set()


class _StopAgreement(Callback):
    """Runs last at every step on every rank, after the callbacks that may ask for a stop."""

    def __init__(self, stop: AgreedStop):
        self.stop = stop

    def on_step(self, state) -> None:
        self.stop.agree()


def for_rank(ctx: DistContext, callbacks: Iterable[Callback], stop) -> tuple[list[Callback], Any]:
    """(callbacks, stop event) for this rank's loop: rank 0 keeps the callbacks (progress, job store), the others
    report nothing; the stop becomes an ``AgreedStop``. A single process gets them back unchanged."""
    callbacks = list(callbacks)
    if not ctx.active:
        return callbacks, stop
    agreed = AgreedStop(stop, ctx)
    return (callbacks if ctx.is_main else []) + [_StopAgreement(agreed)], agreed


class NullMetrics:
    """What ranks other than 0 write metrics to: nothing."""

    rows = 0

    def write(self, record: dict[str, Any], tb_prefix: str = "train") -> None:
        self.rows += 1

    def close(self) -> None:
        pass


def optimizer_state(run) -> dict[str, Any]:
    """The optimizer state a checkpoint holds (accumulators summed over ranks under data parallelism)."""
    return run.grad_sync.state_dict() if run.grad_sync is not None else run.optimizer.state_dict()


def save_checkpoint(run, name: str, payload: dict[str, Any]) -> Path:
    """``checkpoint.save_checkpoint`` on rank 0; every rank returns its path once it is written."""

    def save() -> Path:
        return ckpt.save_checkpoint(run.output_dir, name, run.model, run.tokenizer, run.config, payload)

    path = run.dist.on_main(save, f"saving checkpoint {name!r}")
    return path if path is not None else ckpt.checkpoints_dir(run.output_dir) / name


# ------------------------------------------------------------------------------------------- launching
def launch(nproc: int, argv: list[str]) -> int:
    """``nested-learning train --nproc N ...``: run ``torchrun --standalone --nproc-per-node N -m nested_learning
    ARGV`` (one node; use torchrun itself for several) and return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "nested_learning", *argv]
    # Ctrl-C reaches torchrun and every rank through the terminal; this process only waits for their end.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return subprocess.run(cmd).returncode
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
