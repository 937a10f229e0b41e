"""What every ``bench/peers.py`` variant shares: the model shapes, the random model and LoRA wrapping, the
synthetic data, and the step clock. Nothing here picks a variant."""

from __future__ import annotations

import math
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (architecture, config kwargs, batch, sequence length)
SHAPES = {
    "qwen0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                               max_position_embeddings=32768, tie_word_embeddings=True), 8, 1024),
    "llama1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                              rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True), 8, 2048),
    "llama8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False), 4, 2048),
    "smoke": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                            max_position_embeddings=512, tie_word_embeddings=False), 2, 64),
}


def dims(spec: dict) -> tuple[int, int]:
    """(batch rows, sequence length) of a run: the shape's own, or ``--batch`` / ``--seq-len`` when given."""
    _, _, batch, seq = SHAPES[spec["shape"]]
    return spec.get("batch") or batch, spec.get("seq") or seq


def model_config(shape: str):
    from transformers import LlamaConfig, Qwen2Config

    arch, kwargs, _, _ = SHAPES[shape]
    return (Qwen2Config if arch == "qwen2" else LlamaConfig)(**kwargs, use_cache=False)


def build_base(shape: str, device: torch.device, seed: int = 0):
    """Random weights (seeded), frozen, bf16 on CUDA / float32 on CPU; what load_model returns."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def make_samples(shape: str, setting: str, n_tokens: int, seed: int = 0, seq: int | None = None) -> list[list[int]]:
    """Token-id samples for rows of ``seq`` tokens (the shape's own length when None): all of length ``seq``
    (fixed), lognormal lengths of mean ~300 capped at ``seq`` (realistic), or lognormal lengths of mean
    ``seq / 8`` cut so that consecutive samples fill rows of exactly ``seq`` tokens (packed: ``packed_rows``
    regroups them; a sample that would cross a row's end is cut there)."""
    _, kwargs, _, own = SHAPES[shape]
    seq = seq or own
    g = torch.Generator().manual_seed(seed)
    vocab = kwargs["vocab_size"]
    out, total = [], 0
    mean = max(8, seq // 8) if setting == "packed" else min(300, seq // 4)
    mu, sigma = math.log(mean) - 0.5, 1.0
    while total < n_tokens:
        if setting == "fixed":
            n = seq
        else:
            n = int(min(seq, max(8, round(math.exp(mu + sigma * float(torch.randn((), generator=g)))))))
        if setting == "packed":
            n = min(n, seq - total % seq)  # what is left of the row
        out.append(torch.randint(3, vocab, (n,), generator=g).tolist())
        total += n
    return out


def packed_rows(samples: list[list[int]], seq: int) -> list[list[list[int]]]:
    """``packed`` samples regrouped into their rows of exactly ``seq`` tokens (a short last row is dropped)."""
    rows, row, used = [], [], 0
    for s in samples:
        row.append(s)
        used += len(s)
        if used == seq:
            rows.append(row)
            row, used = [], 0
    return rows


def pack_batch(rows: list[list[list[int]]], device) -> dict:
    """Rows of several samples each, as transformers reads packed rows: no attention mask, ``position_ids``
    restarting at 0 for each sample, and no loss on a sample's first token (nothing of its own precedes it)."""
    ids, pos, labels = [], [], []
    for row in rows:
        ids.append([t for s in row for t in s])
        pos.append([i for s in row for i in range(len(s))])
        labels.append([-100 if i == 0 else t for s in row for i, t in enumerate(s)])
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_t(ids), "position_ids": as_t(pos), "labels": as_t(labels)}


def lora(model, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # as nested_learning.model.lora.wrap_lora does
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def pad_batch(rows: list[list[int]], device) -> dict:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class StepClock:
    """Synchronised wall time at each step boundary, CUDA-event optimizer time, per-step real tokens."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks: list[float] = []
        self.opt_events: list = []
        self.tokens: list[int] = []
        self.lengths: list[list[int]] = []
        self.losses: list = []

    def mark(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def wrap_step(self, step_fn):
        def timed(*a, **k):
            if not self.cuda:
                t0 = time.perf_counter()
                out = step_fn(*a, **k)
                self.opt_events.append((time.perf_counter() - t0) * 1e3)
                return out
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = step_fn(*a, **k)
            e.record()
            self.opt_events.append((s, e))
            return out

        return timed

    def summary(self, warmup: int, timed: int | None = None) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        end = warmup + timed if timed else None  # steps after the timed window (profiled ones) are left out
        steps = [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])][warmup:end]
        opt = [x if isinstance(x, float) else x[0].elapsed_time(x[1]) for x in self.opt_events][warmup:end]
        toks = self.tokens[warmup : warmup + len(steps)]
        return {"step_ms": statistics.median(steps), "step_ms_all": steps,
                "opt_ms": statistics.median(opt) if opt else None,
                "real_tokens_per_s": sum(toks) / (sum(steps) / 1e3) if steps else None,
                "timed_steps": len(steps), "lengths": self.lengths[warmup : warmup + len(steps)]}
