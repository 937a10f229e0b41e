"""The fastest a LoRA training step of a shape could be on this GPU: its matrix products and attention alone.

A step of any trainer that computes the same numbers (frozen base, LoRA adapters, no recomputation) runs at least
these kernels: per decoder layer, the projections' forward products and their input-gradient products (frozen
weights get no weight gradient), causal attention forward and backward, and the head's forward and input-gradient
products. This script times exactly those with cuBLAS and torch's attention kernels (the fastest of flash, cuDNN
and memory-efficient), each layer with its own weights, and nothing else: no norms, activations, rotary tables,
loss, LoRA products or optimizer. The sum is a floor for the step time, and ``useful FLOP / floor`` over the
8192^3 matmul rate is the highest MFU ``bench/peers.py`` could report for the shape.

    python bench/step_floor.py --shapes llama1b,llama8b --json floor.json
    python bench/step_floor.py --shapes llama8b --batch 1 --seq-len 16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_report import matmul_peak, useful_flops_per_step  # noqa: E402
from peers_setup import SHAPES, model_config  # noqa: E402


def linear_products(cfg, tokens: int) -> list[tuple[str, int, int, int]]:
    """``(name, m, k, n)`` of every product a step runs through the frozen linear layers of one decoder layer and
    the head (``m x k`` times ``k x n``): the forward product and the input-gradient product of each, with
    q/k/v and gate/up each as one product (what the fastest trainer would run)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layer = [("qkv", h, q + 2 * kv), ("o", q, h), ("gate_up", h, 2 * inter), ("down", inter, h)]
    out = []
    for name, d_in, d_out in layer:
        out.append((f"{name} forward", tokens, d_in, d_out))
        out.append((f"{name} input gradient", tokens, d_out, d_in))
    return out


def head_products(cfg, tokens: int) -> list[tuple[str, int, int, int]]:
    return [("head forward", tokens, cfg.hidden_size, cfg.vocab_size),
            ("head input gradient", tokens, cfg.vocab_size, cfg.hidden_size)]


def linear_flops(cfg, tokens: int) -> int:
    """FLOPs of the products above for the whole model (2 m k n each)."""
    per_layer = sum(2 * m * k * n for _, m, k, n in linear_products(cfg, tokens))
    return cfg.num_hidden_layers * per_layer + sum(2 * m * k * n for _, m, k, n in head_products(cfg, tokens))


def timed(fn, reps: int = 5) -> float:
    """Median ms of ``fn()`` over ``reps`` runs after two warm-up runs (CUDA events)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def time_products(products, layers: int) -> float:
    """ms for every product once per layer, each layer with its own right-hand matrix (no cache reuse)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    total = 0.0
    for _, m, k, n in products:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(layers)]
        total += timed(lambda a=a, ws=ws: [a @ w for w in ws])
        del a, ws
    return total


def time_attention(cfg, batch: int, seq: int, layers: int) -> tuple[float, str]:
    """(ms of causal attention forward + backward for all layers, the kernel that gave it): the fastest
    backend that runs the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_attention_heads, seq, hd)  # K/V expanded to every query head: the same FLOPs
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    best = (float("inf"), "none")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def step(backend=backend):
            with sdpa_kernel([backend]):
                for _ in range(layers):
                    torch.autograd.grad(sdpa(q, k, v, is_causal=True), (q, k, v), grad)
        try:
            ms = timed(step)
        except RuntimeError as e:  # this backend cannot run the shape
            print(f"  attention {backend.name}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        best = min(best, (ms, backend.name))
    return best


def floor(shape: str, batch: int, seq: int, peak: float) -> dict:
    cfg = model_config(shape)
    tokens, layers = batch * seq, cfg.num_hidden_layers
    res = dict(shape=shape, batch=batch, seq=seq)
    res["linear_ms"] = time_products(linear_products(cfg, tokens), layers)
    res["head_ms"] = time_products(head_products(cfg, tokens), 1)
    res["attention_ms"], res["attention_kernel"] = time_attention(cfg, batch, seq, layers)
    res["floor_ms"] = res["linear_ms"] + res["head_ms"] + res["attention_ms"]
    useful = useful_flops_per_step(cfg, [seq] * batch, 0)
    res["linear_tflop_per_s"] = linear_flops(cfg, tokens) / ((res["linear_ms"] + res["head_ms"]) / 1e3) / 1e12
    res["matmul_peak_tflop_per_s"] = peak
    res["mfu_at_floor"] = useful / (res["floor_ms"] / 1e3) / 1e12 / peak
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama1b,llama8b")
    ap.add_argument("--batch", type=int, default=None, help="rows per step instead of the shape's own")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row instead of the shape's own")
    ap.add_argument("--json", default=None, help="write the results here (a list, one entry per shape)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("step_floor.py times CUDA kernels; no CUDA device here")
    peak = matmul_peak(False)
    out = []
    for shape in args.shapes.split(","):
        _, _, batch, seq = SHAPES[shape]
        r = floor(shape, args.batch or batch, args.seq_len or seq, peak)
        out.append(r)
        print(f"{shape} b{r['batch']}x{r['seq']}: floor {r['floor_ms']:.1f} ms = linear {r['linear_ms']:.1f} + head "
              f"{r['head_ms']:.1f} + attention {r['attention_ms']:.1f} ({r['attention_kernel']}); products at "
              f"{r['linear_tflop_per_s']:.0f} TFLOP/s (8192^3: {peak:.0f}); MFU at the floor {r['mfu_at_floor']:.3f}",
              flush=True)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
