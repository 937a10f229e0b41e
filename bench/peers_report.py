"""Reporting side of ``bench/peers.py``: the figures of one variant's run, the matmul peak for MFU, the JSON file,
the per-run line and the markdown table.

Figures: real (non-padding) tokens/s, step ms (median), optimizer ms (CUDA events around ``optimizer.step``,
median), peak GiB (``torch.cuda.max_memory_allocated``), and MFU = useful FLOP/s over a bf16 matmul rate
measured in the same run (median of 8192^3 products). Useful FLOP per real token: ``4 * N_lin`` (forward and
input-gradient backward through the frozen linear layers and the head; frozen weights get no weight gradient)
``+ 6 * N_lora + 6 * L * d_attn * ctx`` (causal attention, forward and backward), ``ctx`` the token's own
sample length. ``fit_batch`` estimates the largest batch at this length: (usable memory - memory before the first
step) / ((peak - memory before the first step) / batch), usable = 95% of the card.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

GiB = 2**30


def useful_flops_per_step(cfg, lengths: list[int], n_lora: int) -> float:
    """4*N_lin + 6*N_lora per token, plus causal attention 6*L*d_attn*ctx per token (ctx: own sample length)."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    n_lin = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + cfg.vocab_size * h
    tokens = sum(lengths)
    return (4 * n_lin + 6 * n_lora) * tokens + 6 * layers * q * sum(n * n for n in lengths)


def add_figures(res: dict, cfg, batch: int, cuda: bool) -> dict:
    """Peak memory and ``fit_batch`` (CUDA), useful TFLOP/s and mean sample length, from a variant's raw result;
    ``cfg`` is the model config, ``batch`` the shape's batch size. Drops the per-step lengths."""
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        res["reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        total = torch.cuda.get_device_properties(0).total_memory
        per_sample = (torch.cuda.max_memory_allocated() - res["mem_before_first_step"]) / batch
        res["fit_batch"] = int((0.95 * total - res["mem_before_first_step"]) // max(per_sample, 1))
    flops = [useful_flops_per_step(cfg, lens, res.get("n_lora", 0)) for lens in res["lengths"]]
    res["useful_tflop_per_s"] = (sum(flops) / (sum(res["step_ms_all"]) / 1e3) / 1e12) if flops else None
    res["mean_len"] = statistics.mean(n for lens in res["lengths"] for n in lens) if res["lengths"] else None
    del res["lengths"]
    return res


def matmul_peak(cpu: bool) -> float:
    """Median bf16 TFLOP/s of a random 8192^3 product (the MFU denominator)."""
    if cpu or not torch.cuda.is_available():
        return float("nan")
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ b
    times = []
    for _ in range(30):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return 2 * n**3 / (statistics.median(times) / 1e3) / 1e12


def read_runs(path: str | None) -> list:
    """The runs already in the JSON file at ``path`` (merged into, not overwritten); none without one."""
    return json.loads(Path(path).read_text()).get("runs", []) if path and Path(path).exists() else []


def record(results: list, res: dict, peak: float, path: str | None) -> list:
    """``results`` with ``res`` in place of an earlier run of the same shape / data / variant, its MFU against
    ``peak`` added; prints its line (and the last line of an error) and rewrites the JSON file at ``path``."""
    if res.get("useful_tflop_per_s") and peak == peak:
        res["mfu"] = res["useful_tflop_per_s"] / peak
    key = (res["shape"], res["data"], res["variant"])
    results = [r for r in results if (r["shape"], r["data"], r["variant"]) != key]
    results.append(res)
    print(fmt_row(res), flush=True)
    if "error" in res:
        print("   ", res["error"].strip().splitlines()[-1] if res["error"].strip() else "", flush=True)
    if path:
        write_json(path, results, peak)
    return results


def write_json(path: str, results: list, peak: float, fit_search: list | None = None,
               fit_seq_search: list | None = None) -> None:
    """``{"meta", "runs", "fit_search", "fit_seq_search"}``; a file's earlier searches are kept unless new ones
    are given."""
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "matmul_peak_tflops": peak, "argv": sys.argv}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    prior = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    old = prior.get("meta", {})
    if peak != peak and old.get("matmul_peak_tflops"):
        meta["matmul_peak_tflops"] = old["matmul_peak_tflops"]
    out = {"meta": meta, "runs": results}
    for key, given in (("fit_search", fit_search), ("fit_seq_search", fit_seq_search)):
        if given is not None or prior.get(key):
            out[key] = given if given is not None else prior[key]
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


def fmt_row(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']:9} {r['data']:9} {r['variant']:13} ERROR"
    f = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    return (f"{r['shape']:9} {r['data']:9} {r['variant']:13} {r['real_tokens_per_s'] / 1e3:8.1f}k tok/s "
            f"{r['step_ms']:8.1f} ms  opt {f(r.get('opt_ms'), 2):>6} ms  peak {f(r.get('peak_gib'))} GiB  "
            f"mfu {f(r.get('mfu'), 3)}  fit_b {r.get('fit_batch', '-')}")


def loss_agreement(results: list) -> list[str]:
    """Same math: per shape and data, the largest step-by-step loss difference of every run that kept its losses
    (``ours_check``, the Unsloth variants) against ``peft_adamw``'s, over the steps both ran."""
    base = {(r["shape"], r["data"]): r["losses"] for r in results if r["variant"] == "peft_adamw" and r.get("losses")}
    lines = []
    for r in results:
        ref = base.get((r["shape"], r["data"]))
        if r["variant"] == "peft_adamw" or not ref or not r.get("losses"):
            continue
        n = min(len(ref), len(r["losses"]))
        diff = max(abs(a - b) for a, b in zip(ref[:n], r["losses"][:n]))
        lines.append(f"same math: {r['shape']} {r['data']} {r['variant']} vs peft_adamw, {n} steps: "
                     f"max |loss difference| {diff:.2e} (losses {ref[0]:.4f} -> {ref[n - 1]:.4f})")
    return lines


def table(results: list) -> str:
    lines = ["| shape | data | variant | real tok/s | vs peft_adamw | step ms | opt ms | peak GiB | vs peft_adamw "
             "| MFU | est. max batch |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["shape"], r["data"]): r for r in results if r["variant"] == "peft_adamw" and "error" not in r}
    for r in results:
        if r["variant"] == "ours_check":
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['data']} | {r['variant']} | error | | | | | | | |")
            continue
        b = base.get((r["shape"], r["data"]))
        sp = f"{r['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}x" if b else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if b and r.get("peak_gib") else "-"
        opt = f"{r['opt_ms']:.2f}" if r.get("opt_ms") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['shape']} | {r['data']} | {r['variant']} | {r['real_tokens_per_s']:,.0f} | {sp} | "
                     f"{r['step_ms']:.1f} | {opt} | {peak} | {mem} | {mfu} | {r.get('fit_batch', '-')} |")
    return "\n".join(lines)
