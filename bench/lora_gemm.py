"""One decoder layer's LoRA projection groups in isolation: PEFT's per-projection path vs the folded GEMM.

    python bench/lora_gemm.py            # CUDA, bf16 autocast; forward + backward, median of 50 after 10

For each shape, groups q/k/v and gate/up at batch x sequence tokens, LoRA r=16: PEFT's three/two LoRA linears
(eager, then ``torch.compile``) and ``nested_learning.speed.lora_fold`` (compiled: both groups, gate/up only, q/k/v only). Prints ms per
forward+backward and the ratio to PEFT eager.
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nested_learning.speed.lora_fold import fold_lora_groups  # noqa: E402

SHAPES = {  # hidden, q out, kv out, intermediate, tokens
    "qwen0.5b": (896, 896, 128, 4864, 8 * 1024),
    "llama1b": (2048, 2048, 512, 8192, 8 * 2048),
    "llama8b": (4096, 4096, 1024, 14336, 4 * 2048),
}


class Block(torch.nn.Module):
    def __init__(self, h, q, kv, inter):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = torch.nn.Linear(h, q), torch.nn.Linear(h, kv), torch.nn.Linear(h, kv)
        self.gate_proj, self.up_proj = torch.nn.Linear(h, inter, bias=False), torch.nn.Linear(h, inter, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        g, u = self.gate_proj(x), self.up_proj(x)
        return q.sum() + k.float().pow(2).sum() + v.sum() + (torch.nn.functional.silu(g) * u).float().sum()


def timed(fn, x, n=50, warm=10):
    for _ in range(warm):
        fn(x)
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main():
    from peft import LoraConfig, get_peft_model

    for name, (h, q, kv, inter, tokens) in SHAPES.items():
        torch.manual_seed(0)
        block = Block(h, q, kv, inter).cuda().to(torch.bfloat16).requires_grad_(False)
        peft = get_peft_model(block, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "gate_proj", "up_proj"]))
        def folded(groups, peft=peft):
            m = copy.deepcopy(peft)
            fold_lora_groups(m, groups)
            return torch.compile(m)

        x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = []
        variants = (("peft", lambda p=peft: p), ("peft_compiled", lambda p=peft: torch.compile(copy.deepcopy(p))),
                    ("folded_compiled", lambda: folded((("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")))),
                    ("folded_mlp", lambda: folded((("gate_proj", "up_proj"),))),
                    ("folded_qkv", lambda: folded((("q_proj", "k_proj", "v_proj"),))))
        for label, make in variants:
            torch._dynamo.reset()  # each variant compiles afresh (copies of one model share code objects)
            model = make()

            def step(inp, m=model):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = m(inp)
                out.backward()
            row.append((label, timed(step, x)))
        base = row[0][1]
        print(f"{name:9} " + "  ".join(f"{lab} {ms:.3f} ms ({base / ms:.2f}x)" for lab, ms in row), flush=True)


if __name__ == "__main__":
    main()
