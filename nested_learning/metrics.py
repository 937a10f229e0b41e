"""``metrics.jsonl`` (one flushed line per record, so a tail sees it at once) plus optional TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics"]


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity: write null so every line stays parseable by any reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Append-only metrics of one run. On resume, records after the resumed step are dropped first, so the
    file reads like one uninterrupted run."""

    def __init__(self, output_dir: str | Path, *, resume_step: int | None, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", buffering=1)  # line-buffered: one flush per record
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=resume_step)

    def write(self, record: dict[str, Any], tb_prefix: str = "train") -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
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
