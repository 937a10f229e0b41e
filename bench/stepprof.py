"""Kernel-time breakdown of a few training steps (``torch.profiler``), for ``bench/peers.py --profile DIR``.

Writes ``<dir>/<shape>-<data>-<variant>.txt``: CUDA time per step by kernel family (GEMM, attention, Triton
fused, copies, the rest), the 80 kernels that take the most time, and where the GPU sat idle: the time between
the first kernel's start and the last kernel's end that no kernel covered, with the largest gaps and the
kernels on either side of each (the host was late there: launches, guards, a synchronisation).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import torch

FAMILIES = [
    ("gemm", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas|wgmma", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|efficient_attention", re.I)),
    ("triton", re.compile(r"^triton_", re.I)),
    ("copy/cast", re.compile(r"copy|memcpy|memset|cast|fill", re.I)),
    ("reduce", re.compile(r"reduce|softmax|norm", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled", re.I)),
]


class StepProfiler:
    """Call ``tick(step)`` after every optimizer step; profiles steps ``start`` .. ``start + count - 1``."""

    def __init__(self, out_dir: str | None, name: str, start: int, count: int = 3):
        self.out = Path(out_dir) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.txt" if out_dir else None
        self.start, self.count, self.prof = start, count, None
        # steps the caller adds after its timed ones (profiling slows the steps it covers)
        self.extra_steps = count + 1 if self.out is not None and torch.cuda.is_available() else 0

    def tick(self, step: int) -> None:
        if self.out is None or not torch.cuda.is_available():
            return
        if step == self.start:
            torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CUDA]
            if os.environ.get("NL_PROF_HOST"):  # also the host side: what runs while the GPU waits
                activities.append(torch.profiler.ProfilerActivity.CPU)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        elif step == self.start + self.count and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.report())
            self.prof = None

    def report(self) -> str:
        per = defaultdict(float)
        rows = []
        for ev in self.prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t <= 0 or ev.key.startswith("ProfilerStep"):
                continue
            fam = next((f for f, rx in FAMILIES if rx.search(ev.key)), "other")
            per[fam] += t
            rows.append((t, ev.count, fam, ev.key))
        total = sum(per.values())
        lines = [f"CUDA kernel time per step: {total / self.count / 1e3:.2f} ms (sum over kernels)"]
        for fam, t in sorted(per.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {fam:12} {t / self.count / 1e3:8.2f} ms  {100 * t / total:5.1f}%")
        lines.append("")
        lines.append(f"{'ms/step':>8} {'calls/step':>10}  family       kernel")
        for t, n, fam, key in sorted(rows, reverse=True)[:80]:
            lines.append(f"{t / self.count / 1e3:8.3f} {n / self.count:10.1f}  {fam:12} {key[:150]}")
        lines.append("")
        lines.extend(self.idle_report())
        return "\n".join(lines) + "\n"

    def idle_report(self, top: int = 25) -> list[str]:
        spans = sorted(
            (ev.time_range.start, ev.time_range.end, ev.name)
            for ev in self.prof.events()
            if str(getattr(ev, "device_type", "")).endswith("CUDA") and ev.time_range.end > ev.time_range.start
        )
        if not spans:
            return ["GPU idle: no kernel spans recorded"]
        gaps, gaps_at, busy_end, prev = [], [], spans[0][0], spans[0][2]
        for start, end, name in spans:
            if start > busy_end:
                gaps.append((start - busy_end, prev, name))
                gaps_at.append((start - busy_end, busy_end, start))
            if end > busy_end:
                busy_end, prev = end, name
        wall = busy_end - spans[0][0]
        idle = sum(g for g, _, _ in gaps)
        self.largest_gaps = sorted(gaps_at, reverse=True)[: self.count]
        out = [f"GPU idle per step: {idle / self.count / 1e3:.2f} ms of {wall / self.count / 1e3:.2f} ms "
               f"(first kernel start to last kernel end; {len(gaps) / self.count:.0f} gaps per step)",
               f"{'gap us':>8}  after -> before"]
        for g, a, b in sorted(gaps, reverse=True)[:top]:
            out.append(f"{g:8.0f}  {a[:70]} -> {b[:70]}")
        return out + self.host_report()

    def host_report(self, top: int = 40) -> list[str]:
        """With NL_PROF_HOST: host ranges and ops that overlap the largest gaps (one per step), by overlap."""
        cpu = [ev for ev in self.prof.events() if str(getattr(ev, "device_type", "")).endswith("CPU")]
        if not cpu or not getattr(self, "largest_gaps", None):
            return []
        overlap = defaultdict(float)
        for _, a, b in self.largest_gaps:
            for ev in cpu:
                o = min(b, ev.time_range.end) - max(a, ev.time_range.start)
                if o > 0:
                    overlap[ev.name] += o
        lines = ["", "host ranges overlapping the largest gap of each step (us per step, nested ranges all count)"]
        for name, o in sorted(overlap.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{o / len(self.largest_gaps):8.0f}  {name[:120]}")
        return lines
