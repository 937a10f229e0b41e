"""Optimizer step time: NestedAdamW vs torch.optim.AdamW on the LoRA tensors of a Qwen2.5-0.5B-shaped model.

    python bench/optimizer.py [--device cuda] [--steps 400] [--json out.json]

LoRA r=16 on all 7 projections of 24 layers (336 tensors, ~8.8M parameters), fp32 parameters, random
gradients refreshed in place each step (as backward would). Each variant is timed from before ``step()`` to
after the device finished it (host overhead included: that is what a training step pays), median and mean over
``--steps`` steps after a warm-up; for tiered variants the mean over whole cycles is the fair figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nested_learning import NestedAdamW, assign_tiers  # noqa: E402

# Qwen2.5-0.5B: hidden 896, MLP 4864, 14 query heads / 2 KV heads of 64, 24 layers.
HIDDEN, MLP, KV, LAYERS, RANK = 896, 4864, 128, 24, 16
PROJ = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
        "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (HIDDEN, MLP), "mlp.up_proj": (HIDDEN, MLP),
        "mlp.down_proj": (MLP, HIDDEN)}


def lora_params(device: str) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    named = []
    for layer in range(LAYERS):
        for proj, (d_in, d_out) in PROJ.items():
            prefix = f"base_model.model.model.layers.{layer}.{proj}"
            a = torch.randn(RANK, d_in, generator=g) * 0.01
            b = torch.randn(d_out, RANK, generator=g) * 0.01
            named.append((f"{prefix}.lora_A.default.weight", torch.nn.Parameter(a.to(device))))
            named.append((f"{prefix}.lora_B.default.weight", torch.nn.Parameter(b.to(device))))
    return named


class SeedStyleTieredAdam:
    """The old app's approach, for reference: a Python loop over tensors, skipped tiers drop their gradients."""

    def __init__(self, named, periods, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        groups = assign_tiers(named, periods=periods)
        self.tier_of = {id(p): k for k, g in enumerate(groups) for p in g["params"]}
        self.periods = list(periods)
        self.params = [p for _, p in named]
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = {id(p): torch.zeros_like(p) for p in self.params}
        self.v = {id(p): torch.zeros_like(p) for p in self.params}
        self.n = [0] * len(periods)
        self.step_count = 0

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        due = [self.step_count % per == 0 for per in self.periods]
        self.n = [n + d for n, d in zip(self.n, due)]
        for p in self.params:
            k = self.tier_of[id(p)]
            if not due[k]:
                continue  # this step's gradient is lost
            g = p.grad + self.wd * p  # L2 folded into the gradient, as the old app did
            m, v = self.m[id(p)], self.v[id(p)]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** self.n[k])).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.n[k]))

    def zero_grad(self, set_to_none=True):
        pass


def make_optimizer(kind: str, named, periods):
    params = [p for _, p in named]
    if kind == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if kind == "seed_style":
        return SeedStyleTieredAdam(named, periods)
    flat = kind.endswith("flat")
    return NestedAdamW(assign_tiers(named, periods=periods), lr=1e-4, flat=flat)


def time_variant(kind: str, periods, device: str, steps: int, warmup: int) -> dict:
    named = lora_params(device)
    params = [p for _, p in named]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = make_optimizer(kind, named, periods)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(warmup + steps):
        # Fresh gradients land in .grad in place (as autograd accumulation does); not timed.
        torch._foreach_copy_([p.grad for p in params], grads)
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    cycle = 4 * (len(times) // 4)
    return {"variant": kind, "periods": periods, "median_ms": statistics.median(times),
            "mean_ms": statistics.fmean(times[:cycle]), "min_ms": min(times), "steps": steps,
            "tensors": len(params), "params": sum(p.numel() for p in params)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    variants = [("adamw_foreach", [1]), ("nested", [1, 1, 1]), ("nested_flat", [1, 1, 1]),
                ("nested", [1, 2, 4]), ("nested_flat", [1, 2, 4]), ("seed_style", [1, 2, 4])]
    if on_cuda:
        variants.insert(1, ("adamw_fused", [1]))
    rows = [time_variant(k, p, args.device, args.steps, args.warmup) for k, p in variants]
    ref_kind = "adamw_fused" if on_cuda else "adamw_foreach"
    ref = next(r for r in rows if r["variant"] == ref_kind)["mean_ms"]
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}, {rows[0]['tensors']} tensors, "
          f"{rows[0]['params'] / 1e6:.2f}M params")
    print(f"| variant | periods | mean ms/step | median ms | vs {ref_kind} (mean) |")
    print("|---|---|---|---|---|")
    for r in rows:
        r["ratio_vs_ref"] = r["mean_ms"] / ref
        print(f"| {r['variant']} | {r['periods']} | {r['mean_ms']:.3f} | {r['median_ms']:.3f} | "
              f"{r['ratio_vs_ref']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
