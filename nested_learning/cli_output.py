"""What ``nested-learning`` prints while it trains, and how it hears a stop: the progress callbacks (log lines, or
a live bar on a terminal), the logging set-up, and SIGINT/SIGTERM as a stop after the current step."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading

from nested_learning.train.state import Callback, TrainerState

__all__ = ["LogLines", "RichProgress", "StopSignals", "progress_callback", "setup_logging"]

log = logging.getLogger("nested_learning")


def _eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _step_line(s: TrainerState) -> str:
    loss = f"{s.train_loss:.4f}" if s.train_loss is not None else "?"
    tps = f"{s.tokens_per_sec:,.0f}" if s.tokens_per_sec else "?"
    return f"loss {loss}  lr {s.lr:.2e}  {tps} tok/s  ETA {_eta(s.eta_s)}"


def _eval_line(s: TrainerState) -> str:
    line = f"val_loss {s.val_loss:.4f}  val_ppl {s.val_ppl:.2f}"
    if s.val_exact_match is not None:
        line += f"  val_exact_match {s.val_exact_match:.3f}"
    if s.retain_loss is not None:
        line += f"  retain_loss {s.retain_loss:.4f}"
    if s.retain_exact_match is not None:
        line += f"  retain_exact_match {s.retain_exact_match:.3f}"
    return line


class LogLines(Callback):
    """``--quiet``: plain log lines, one per logged step and eval."""

    def __init__(self, every: int = 1):
        self.every = every

    def on_start(self, state):
        log.info("tier plan:\n%s", state.tier_plan)
        log.info("%s", state.speed_plan)
        log.info("training %d steps -> %s", state.total_steps, state.output_dir)

    def on_step(self, state):
        if state.step % self.every == 0 or state.step == state.total_steps:
            log.info("step %d/%d  %s", state.step, state.total_steps, _step_line(state))

    def on_eval(self, state):
        log.info("step %d  %s", state.step, _eval_line(state))

    def on_checkpoint(self, state, path):
        log.info("checkpoint %s", path)

    def on_end(self, state):
        log.info("%s at step %d%s", state.status, state.step, f": {state.error}" if state.error else "")


class RichProgress(LogLines):
    """A progress bar with loss, lr, tokens/s and ETA; evals and checkpoints print above it."""

    def __init__(self, console):
        super().__init__()
        self.console, self.progress, self.task = console, None, None

    def on_start(self, state):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console.print(state.tier_plan)
        self.console.print(state.speed_plan, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.total_steps, completed=state.step, info="")

    def on_step(self, state):
        self.progress.update(self.task, completed=state.step, info=_step_line(state))

    def on_eval(self, state):
        self.console.print(f"step {state.step}: {_eval_line(state)}")

    def on_checkpoint(self, state, path):
        self.console.print(f"[dim]checkpoint {path}[/dim]")

    def on_end(self, state):
        if self.progress is not None:
            self.progress.stop()
        super().on_end(state)


def setup_logging(quiet: bool):
    from rich.console import Console

    console = Console(stderr=True)
    root = logging.getLogger("nested_learning")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    if quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False, show_time=False)
    root.addHandler(handler)
    root.propagate = False
    return console


def progress_callback(quiet: bool, console, every: int = 1) -> Callback:
    return LogLines(every) if quiet or not console.is_terminal else RichProgress(console)


class StopSignals:
    """SIGINT/SIGTERM ask the run to stop after the current step (and save); a second Ctrl-C aborts."""

    def __init__(self, stop: threading.Event):
        self.stop, self.saved = stop, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop.set()
        log.warning("stop requested: finishing the current step and saving (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
