"""The largest batch that fits, searched: ``bench/peers.py --fit`` runs a variant at candidate batch sizes (each in
its own process, a few steps, so optimizer state and the compiled graph are in place) and brackets the largest
one that runs without running out of GPU memory. The search starts at an estimate (the ``fit_batch`` of an earlier
run of the same shape and variant) and spends a fixed number of tries, so a compiled variant costs a known time.
``--fit-seq`` searches the longest row at batch 1 the same way (``search_longest``), doubling instead of +10%."""

from __future__ import annotations

import math
from collections.abc import Callable

OOM_MARKERS = ("OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom(error: str) -> bool:
    """Whether a worker's error text is an out-of-memory failure (anything else is a real error)."""
    return any(m in error for m in OOM_MARKERS)


def search_fit(fits: Callable[[int], bool], start: int, tries: int = 3, step: float = 1.1,
               known_fit: int | None = None, known_oom: int | None = None) -> tuple[int | None, int | None]:
    """``(largest batch seen to fit, smallest seen to fail)`` after at most ``tries`` calls of ``fits``
    (``known_fit`` / ``known_oom``: batches already seen to fit / to fail, never tried again).

    From ``start``: while no failure is seen, go up by ``step``; while no fit is seen, go down by ``step``; once
    both are known, bisect. Either bound is ``None`` if the tries ran out before it was seen. ``fits`` raises
    for anything other than running out of memory."""
    lo, hi = known_fit, known_oom
    b = max(1, start)
    for _ in range(tries):
        if hi == 1 or (lo is not None and hi is not None and hi - lo <= 1):
            break
        if fits(b):
            lo = max(b, lo or 0)
        else:
            hi = b
        if lo is not None and hi is not None:
            b = (lo + hi) // 2
        elif hi is None:
            b = max(lo + 1, math.ceil(round(lo * step, 6)))
        else:
            b = min(hi - 1, max(1, math.floor(round(hi / step, 6))))
    return lo, hi


def fit_table(searches: list[dict]) -> str:
    """Markdown: per shape and variant, the largest batch that ran and the smallest that ran out of memory."""
    lines = ["| shape | variant | rows x length that fit | ran out at | peak GiB at the fit | tries |",
             "|---|---|---:|---:|---:|---|"]
    for s in searches:
        tried = ", ".join(f"{t['batch']}{'' if t['fits'] else ' OOM'}" for t in s["tries"])
        fit = f"{s['fit']} x {s['seq']}" if s["fit"] is not None else "-"
        peak = next((f"{t['peak_gib']:.1f}" for t in s["tries"] if t["batch"] == s["fit"] and "peak_gib" in t), "-")
        lines.append(f"| {s['shape']} | {s['variant']} | {fit} | {s['oom'] if s['oom'] is not None else '-'} | "
                     f"{peak} | {tried} |")
    return "\n".join(lines)


def search_longest(fits: Callable[[int], bool], start: int, tries: int = 6,
                   step: int = 1024, grow: float = 2.0) -> tuple[int | None, int | None]:
    """``(longest row seen to fit, shortest seen to fail)`` after at most ``tries`` calls of ``fits``.

    From ``start``: grow by ``grow`` (rounded up to ``step``) while every row fits, shrink by it while none does,
    then bisect on multiples of ``step`` until the bracket is ``step`` wide. ``grow`` below 2 brackets tightly
    from a good estimate in few tries. ``fits`` raises for anything other than running out of memory."""
    lo = hi = None
    n = max(1, start)
    for _ in range(tries):
        if fits(n):
            lo = n
        else:
            hi = n
        if hi is None:
            n = max(lo + step, math.ceil(lo * grow / step) * step)
        elif lo is None:
            n = max(step, int(hi / grow) // step * step)
            if n >= hi:  # cannot go below one step
                break
        else:
            n = (lo + hi) // 2 // step * step
            if n <= lo:  # the bracket is one step wide
                break
    return lo, hi


def seq_table(searches: list[dict]) -> str:
    """Markdown: per shape and variant, the longest row (batch 1) that ran and the shortest that ran out of memory."""
    lines = ["| shape | variant | longest row that fit | ran out at | peak GiB at the fit | tok/s at the fit | tries |",
             "|---|---|---:|---:|---:|---:|---|"]
    for s in searches:
        best = next((t for t in s["tries"] if t["seq"] == s["fit"]), {})
        tried = ", ".join(f"{t['seq']}{'' if t['fits'] else ' OOM'}" for t in s["tries"])
        peak = f"{best['peak_gib']:.1f}" if "peak_gib" in best else "-"
        tps = f"{best['real_tokens_per_s']:,.0f}" if best.get("real_tokens_per_s") else "-"
        lines.append(f"| {s['shape']} | {s['variant']} | {s['fit'] if s['fit'] is not None else '-'} | "
                     f"{s['oom'] if s['oom'] is not None else '-'} | {peak} | {tps} | {tried} |")
    return "\n".join(lines)
