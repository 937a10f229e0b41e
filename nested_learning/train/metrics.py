"""``metrics.jsonl`` (one flushed line per record, so a tail sees it at once) plus optional TensorBoard.

A kill can land anywhere, so the file is only ever appended to, or replaced whole (temporary file + rename):

- a kill in the middle of an append leaves a cut last line; readers drop it with a warning naming the file;
- a resume rewrites the file to exactly the rows the resumed checkpoint had seen (it records their count), so
  every row, eval rows included, appears once however often the run was killed and resumed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from nested_learning.train.checkpoint import write_atomic

__all__ = ["MetricsLog", "read_metrics"]

log = logging.getLogger("nested_learning.train")


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity: write null so every line stays parseable by any reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (``path``: the file or the run directory); ``[]`` when absent.

    A cut last line (a write interrupted by a kill) is dropped with a warning; a damaged line anywhere else is
    a ``ValueError`` naming the file and line.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        return []
    text = p.read_text(errors="replace")
    lines = text.split("\n")  # a complete file ends with "\n": its last piece is empty
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if number == len(lines):  # no newline after it: the write was cut short
                log.warning("%s: ignoring the cut last line %d (a write was interrupted)", p, number)
                break
            raise ValueError(f"{p}:{number}: not a metrics record ({exc})") from None
        records.append(record)
    return records


class MetricsLog:
    """Append-only metrics of one run.

    ``resume_step``: ``None`` starts an empty file; otherwise the file is cut back to what the resumed checkpoint
    had seen: its first ``keep_rows`` records (checkpoints record how many), or, for checkpoints written before
    that count existed, the records up to ``resume_step``. ``rows`` counts the records in the file.
    ``trackers``: objects with ``log_row(record, prefix)`` and ``close()`` (``output.report_to``), handed every
    record written and closed with the log.
    """

    def __init__(self, output_dir: str | Path, *, resume_step: int | None, keep_rows: int | None = None,
                 tensorboard: bool = True, trackers: Sequence[Any] = ()):
        self.path = Path(output_dir) / "metrics.jsonl"
        for stale in self.path.parent.glob(f".tmp-{self.path.name}-*"):  # left by a kill during a rewrite
            stale.unlink(missing_ok=True)
        if resume_step is None:
            kept: list[dict[str, Any]] = []
        elif keep_rows is not None:
            kept = read_metrics(self.path)[:keep_rows]
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.rows = len(kept)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: one write per record
        # Trackers (MLflow, W&B: nested_learning.integrations.tracking) get every row written from here on.
        self._trackers = list(trackers)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step hides events of steps that are about to be written again (all of them on a restart)
                self._tb = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=resume_step or 0)

    def write(self, record: dict[str, Any], tb_prefix: str = "train") -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self.rows += 1
        for tracker in self._trackers:
            tracker.log_row(record, tb_prefix)
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{tb_prefix}/{key}", value, step)
                elif key == "tier_updates" and isinstance(value, list):
                    for k, n in enumerate(value):
                        self._tb.add_scalar(f"tiers/updates_{k}", n, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()
