"""One chunk of the chunked cross-entropy: the Triton row kernel vs torch.compile's kernels, alone.

    python bench/ce_kernel.py                 # CUDA; 2048-row chunks at the Llama-3 and Qwen2.5 vocabularies

Per vocabulary: bf16 logits (normal, std 3), 5% of targets -100. Each variant gets a fresh copy of the logits
per call (it writes the gradient in place); the time is CUDA events around the call alone, median of 50 after
10. Also the largest gradient and loss differences against a float64 reference, and the bandwidth the
call reaches counting two reads and one write of the logits (the Triton kernel's traffic).
Optional ``--configs 2048x4,4096x8,...`` tries other BLOCK x num_warps settings of the kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nested_learning.speed import ce_kernel  # noqa: E402
from nested_learning.speed.chunked_loss import _ce_chunk, _compiled  # noqa: E402

VOCABS = {"llama3": 128256, "qwen2.5": 151936}


def timed(fn, master: torch.Tensor, targets: torch.Tensor, reps: int = 50, warmup: int = 10) -> tuple[float, torch.Tensor]:
    times = []
    for i in range(warmup + reps):
        logits = master.clone()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        loss = fn(logits, targets, True)
        e.record()
        e.synchronize()
        if i >= warmup:
            times.append(s.elapsed_time(e))
    return statistics.median(times), (loss, logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--configs", default="", help="extra BLOCKxWARPS settings of the Triton kernel")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, vocab in VOCABS.items():
        master = (torch.randn(args.rows, vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
        targets = torch.randint(0, vocab, (args.rows,), device="cuda", generator=g)
        targets[torch.rand(args.rows, device="cuda", generator=g) < 0.05] = -100
        ref_grad = master.double()
        ref_loss = _ce_chunk(ref_grad, targets, True)  # overwrites ref_grad with the float64 gradient
        variants = [("compile", _compiled(torch.device("cuda"))), ("triton", ce_kernel.ce_chunk)]
        for cfg in filter(None, args.configs.split(",")):
            block, warps = map(int, cfg.split("x"))

            def run(logits, t, want, block=block, warps=warps):
                default = ce_kernel.BLOCK, ce_kernel.NUM_WARPS
                ce_kernel.BLOCK, ce_kernel.NUM_WARPS = block, warps
                try:
                    return ce_kernel.ce_chunk(logits, t, want)
                finally:
                    ce_kernel.BLOCK, ce_kernel.NUM_WARPS = default

            variants.append((f"triton {block}x{warps}", run))
        gb = 3 * master.numel() * master.element_size() / 1e9
        for label, fn in variants:
            ms, (loss, grad) = timed(fn, master, targets)
            dgrad = (grad.double() - ref_grad).abs().max().item()
            dloss = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
            print(f"{name:8} {args.rows}x{vocab}  {label:18} {ms:7.3f} ms  {gb / ms * 1e3:7.0f} GB/s (2 reads + 1 write)"
                  f"  loss rel diff {dloss:.1e}  grad max diff {dgrad:.1e}", flush=True)


if __name__ == "__main__":
    main()
