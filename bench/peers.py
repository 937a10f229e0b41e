"""Training speed and memory, side by side: our trainer against what a user would run instead.

    python bench/peers.py --shapes qwen0.5b,llama1b --data fixed,realistic --json docs/peers.json
    python bench/peers.py --cpu-smoke            # tiny model on the CPU: checks every variant runs
    python bench/peers.py --variants ours --set speed.lora_fold=false --tag nofold   # a lever off, side by side
    python bench/peers.py --variants ours,peft_compile --profile prof/   # + kernel-time breakdown per variant
    python bench/peers.py --shapes qwen0.5b --data fixed --variants ours --batch 165   # does the estimate fit?
    python bench/peers.py --shapes llama1b --variants ours,peft_adamw --fit --json f.json   # largest batch, searched
    PEERS_UNSLOTH_PATH=/tmp/unsloth-site python bench/peers.py --shapes llama1b --data fixed \
        --variants peft_adamw,peer_unsloth,peer_unsloth_gc     # + the step-by-step loss check against peft_adamw
    python bench/peers.py --shapes llama1b --data fixed,packed --batch 1 --seq-len 16384 --warmup 2 --steps 5 \
        --variants all --json long.json        # long rows, every variant: labelled ours@b1x16384; also 32768, llama8b
    python bench/peers.py --fit-seq --shapes llama8b --seq-len 16384 --variants all --json seq.json  # longest row
    python bench/peers.py --cpu-smoke --data packed --batch 2 --seq-len 256     # the long-row paths, on the CPU

Every variant runs in its own process (own peak memory, own compile cache state) on the same randomly
initialised model of a real architecture (shapes below; no download), the same synthetic token data, LoRA
r=16 / alpha=32 on all 7 projections, bf16 autocast on CUDA, seed 0; ``--warmup`` steps, then the median of
``--steps`` timed steps (the device is synchronised at each step boundary, the same for every variant).

Variants:
  ours          ``build_run`` + ``train_loop`` (what ``nested-learning train`` runs): BatchPlan + collate, the
                chunked head + cross-entropy, NestedAdamW(flat) at tiers [1,2,4], clip, schedule, callbacks;
                the speed levers at their defaults, data.packing on, output.log_every=10. Only model / tokenizer /
                data *loading* is replaced (random weights, token ids instead of JSONL).
  ours_eager    the same with speed.compile off.
  ours_check    ``ours`` at tiers [1] (plain AdamW) and no shuffling, fixed-length data only: its losses are
                compared with ``peft_adamw``'s after the same steps (same math, so they must agree).
  peft_adamw    PEFT LoRA + torch.optim.AdamW(fused=True), plain loop, ``model(..., labels=...).loss``.
  peft_compile  the same loop on ``torch.compile(model)``.
  peft_liger    the same loop with Liger Kernel's RMSNorm / SwiGLU / RoPE / fused linear cross-entropy.
  hf_trainer    transformers.Trainer, optim adamw_torch_fused, bf16, padding to the longest in the batch.
  seed_style    the plain loop with the old app's per-tensor tiered Adam (skipped tiers drop gradients).
  peer_unsloth  the plain loop on Unsloth's FastLanguageModel (16-bit LoRA, same weights and initial adapter),
                ``use_gradient_checkpointing=False``; ``peer_unsloth_gc``: ``"unsloth"``, its recommended setting.
                Needs Unsloth in a folder named by ``PEERS_UNSLOTH_PATH`` and a GPU (``bench/peers_unsloth.py``).

Data: ``fixed`` rows of exactly the sequence length; ``realistic`` lognormal lengths (mean ~300 tokens, capped
at the sequence length). Plain loops and hf_trainer pad each batch to its longest sample; ours packs.
``packed``: rows of exactly the sequence length, each several samples of lognormal lengths (mean 1/8 of the
row); the plain PEFT loops and hf_trainer get them packed as transformers reads packed rows (position ids
restarting per sample, no mask, as ``DataCollatorWithFlattening`` hands them over), Unsloth's variants get the
same samples padded one per row; ours packs them itself (``data.packing``). ``--seq-len`` sets the row length
(``--batch`` the rows), for long-context runs. ``--fit-seq``: the longest row that fits at batch 1, searched.

Figures (real tokens/s, step and optimizer ms, peak GiB, MFU, ``fit_batch``): ``bench/peers_report.py``; the
``--fit`` and ``--fit-seq`` searches: ``bench/peers_search.py`` (their rules: ``bench/peers_fit.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from peers_search import search_all, search_seq_all  # noqa: E402
from peers_report import (  # noqa: E402, F401
    add_figures, fmt_row, loss_agreement, matmul_peak, read_runs, record, table, write_json,
)
import peers_unsloth  # noqa: E402
from peers_setup import (  # noqa: E402
    SHAPES, TARGETS, StepClock, build_base, dims, lora, make_samples, model_config, pack_batch, packed_rows, pad_batch,
)
from stepprof import StepProfiler  # noqa: E402

VARIANTS = ["ours", "ours_eager", "peft_adamw", "peft_compile", "peft_liger", "hf_trainer", "seed_style",
            *peers_unsloth.VARIANTS]
LR = 2e-4


# ----------------------------------------------------------------------------------------------- variants
def run_plain(spec: dict, device) -> dict:
    """peft_adamw / peft_compile / peft_liger / seed_style / peer_unsloth*: the loop most hand-written trainers
    have."""
    shape, variant = spec["shape"], spec["variant"]
    batch, _ = dims(spec)
    if variant == "peft_liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

        patch = apply_liger_kernel_to_qwen2 if SHAPES[shape][0] == "qwen2" else apply_liger_kernel_to_llama
        patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    if variant in peers_unsloth.VARIANTS:
        model = peers_unsloth.build(shape, device, gc=variant == "peer_unsloth_gc", seq=dims(spec)[1])
    else:
        model = lora(build_base(shape, device))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "seed_style":
        from optimizer import SeedStyleTieredAdam  # bench/optimizer.py

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = SeedStyleTieredAdam(named, [1, 2, 4], lr=LR)
    else:
        opt = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    fwd = torch.compile(model) if variant == "peft_compile" else model
    clock = StepClock(device)
    opt_step = clock.wrap_step(opt.step)
    n_steps = spec["warmup"] + spec["steps"]
    mem_before = torch.cuda.memory_allocated() if clock.cuda else 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if clock.cuda else torch.autocast("cpu", enabled=False)
    losses = []
    prof = StepProfiler(spec.get("profile"), f"{shape}-{spec['data']}-{spec.get('label', variant)}", n_steps)
    n_steps += prof.extra_steps
    clock.mark()
    for i in range(n_steps):
        inputs, lengths = step_batch(spec, i, batch, device, packs=variant not in peers_unsloth.VARIANTS)
        with autocast:
            loss = fwd(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt_step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        clock.tokens.append(sum(lengths))
        clock.lengths.append(lengths)
        clock.mark()
        prof.tick(i + 1)
    out = clock.summary(spec["warmup"], spec["steps"])
    out["losses"] = [float(x) for x in torch.stack(losses).float().cpu()]
    out["mem_before_first_step"] = mem_before
    out["n_lora"] = sum(p.numel() for p in params)
    if hasattr(model, "peers_adapter_from_peft"):
        out["adapter_from_peft"] = model.peers_adapter_from_peft
    return out


def step_batch(spec: dict, i: int, batch: int, device, packs: bool) -> tuple[dict, list[int]]:
    """Model inputs of step ``i`` and its sample lengths. ``packed`` data: ``batch`` rows of several samples,
    packed (``packs``: position ids restarting per sample, no mask) or, for a peer that cannot pack, the same
    samples padded one per row; otherwise ``batch`` samples padded to the longest."""
    if spec["data"] == "packed":
        rows = [spec["rows"][(i * batch + j) % len(spec["rows"])] for j in range(batch)]
        flat = [s for r in rows for s in r]
        return (pack_batch(rows, device) if packs else pad_batch(flat, device)), [len(s) for s in flat]
    samples = spec["samples"]
    rows = [samples[(i * batch + j) % len(samples)] for j in range(batch)]
    return pad_batch(rows, device), [len(r) for r in rows]


def run_hf_trainer(spec: dict, device) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    shape = spec["shape"]
    batch, _ = dims(spec)
    model = lora(build_base(shape, device))
    params = [p for p in model.parameters() if p.requires_grad]
    clock = StepClock(device)
    packed = spec["data"] == "packed"
    items = spec["rows"] if packed else spec["samples"]  # packed: one item is a row of samples

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    def collator(rows):
        lengths = [len(s) for r in rows for s in r] if packed else [len(r) for r in rows]
        clock.tokens.append(sum(lengths))
        clock.lengths.append(lengths)
        # packed rows as DataCollatorWithFlattening hands them over: position ids restarting, no mask
        return pack_batch(rows, "cpu") if packed else pad_batch(rows, "cpu")

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.mark()

        def on_step_end(self, args, state, control, **kw):
            clock.mark()

    n_steps = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=n_steps, learning_rate=LR,
            lr_scheduler_type="constant", optim="adamw_torch_fused" if clock.cuda else "adamw_torch",
            bf16=clock.cuda, logging_steps=10**6, save_strategy="no", report_to="none", dataloader_num_workers=0,
            seed=0, remove_unused_columns=False, max_grad_norm=1.0, disable_tqdm=True, use_cpu=not clock.cuda,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Data(), data_collator=collator, callbacks=[Clock()])
        trainer.create_optimizer()
        trainer.optimizer.step = clock.wrap_step(trainer.optimizer.step)
        mem_before = torch.cuda.memory_allocated() if clock.cuda else 0
        trainer.train()
    out = clock.summary(spec["warmup"], spec["steps"])
    out["mem_before_first_step"] = mem_before
    out["n_lora"] = sum(p.numel() for p in params)
    return out


def run_ours(spec: dict, device) -> dict:
    """Our trainer as users run it: ``build_run`` on random weights and pre-tokenised samples, then ``train_loop``."""
    from nested_learning.config import TrainConfig, apply_overrides
    from nested_learning.data import Sample
    from nested_learning.train.loop import train_loop
    from nested_learning.train.setup import build_run
    from nested_learning.train.state import Callback

    shape, variant = spec["shape"], spec["variant"]
    batch, seq = dims(spec)
    check = variant == "ours_check"
    n_steps = spec["warmup"] + spec["steps"]
    out_dir = tempfile.mkdtemp(prefix="peers-ours-")
    raw = {
        "seed": 0,
        "model": {"name_or_path": f"bench:{shape}"},
        "speed": {"compile": variant != "ours_eager"},
        "lora": {"r": 16, "alpha": 32, "target_modules": TARGETS},
        "data": {"max_length": seq, "packing": True, "shuffle": not check},
        "tiers": {"periods": [1] if check else [1, 2, 4]},
        # weight_decay 0.01 is torch.optim.AdamW's default, as in the plain loop.
        "optim": {"lr": LR, "batch_size": batch, "weight_decay": 0.01, "max_grad_norm": 1.0},
        "schedule": {"steps": n_steps, "warmup_steps": 0, "kind": "constant"},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "save_best": False},
        "output": {"dir": out_dir, "log_every": 1 if check else 10, "tensorboard": False, "overwrite": True},
    }
    prof = StepProfiler(spec.get("profile"), f"{shape}-{spec['data']}-{spec.get('label', variant)}", n_steps)
    raw["schedule"]["steps"] = n_steps + prof.extra_steps
    # --set KEY=VALUE, parsed as `nested-learning train --set` parses them
    cfg = TrainConfig.model_validate(apply_overrides(raw, spec.get("overrides", [])))
    samples = [Sample(ids, list(ids)) for ids in spec["samples"]]

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def save_pretrained(self, path):
            pass

    run = build_run(cfg, tokenizer=Tok(), base_model=build_base(shape, device), data=(samples, []))
    print(run.speed_plan.format(), file=sys.stderr)
    clock = StepClock(device)
    run.optimizer.step = clock.wrap_step(run.optimizer.step)
    # Sample lengths per step (for the attention FLOP term): micro-batch k is batch k % len of epoch k // len.
    plan = run.batch_plan
    for k in range(raw["schedule"]["steps"]):
        epoch, i = divmod(k, len(plan))
        clock.lengths.append([plan.lengths[j] for j in plan.epoch(epoch)[i]])
    real = {"seen": 0}
    mem, losses = {}, []

    class Clock(Callback):
        def on_start(self, state):
            mem["before"] = torch.cuda.memory_allocated() if clock.cuda else 0
            clock.mark()

        def on_step(self, state):
            clock.mark()
            clock.tokens.append(state.tokens_seen - real["seen"])
            real["seen"] = state.tokens_seen
            if check:
                losses.append(state.train_loss)
            prof.tick(state.step)

    state = train_loop(run, callbacks=[Clock()])
    out = clock.summary(spec["warmup"], spec["steps"])
    out["mem_before_first_step"] = mem.get("before", 0)
    out["n_lora"] = sum(n for t in state.tier_stats for n in [t.get("num_params", 0)])
    out["final_loss"] = state.train_loss
    out["speed_plan"] = run.speed_plan.to_dict()
    if check:
        out["losses"] = losses
    return out


def worker(spec: dict) -> dict:
    if spec["variant"] in peers_unsloth.VARIANTS:
        why = peers_unsloth.unavailable()
        if why:
            raise SystemExit(f"{spec['variant']}: {why}")
        peers_unsloth.import_unsloth()  # before transformers and PEFT, which it patches
    device = torch.device("cuda" if torch.cuda.is_available() and not spec.get("cpu") else "cpu")
    torch.manual_seed(0)
    seq = dims(spec)[1]
    spec["samples"] = make_samples(spec["shape"], spec["data"], spec["n_tokens"], seq=seq)
    if spec["data"] == "packed":
        spec["rows"] = packed_rows(spec["samples"], seq)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    v = spec["variant"]
    t0 = time.perf_counter()
    res = run_ours(spec, device) if v.startswith("ours") else run_hf_trainer(spec, device) if v == "hf_trainer" \
        else run_plain(spec, device)
    res["wall_s"] = time.perf_counter() - t0
    return add_figures(res, model_config(spec["shape"]), dims(spec)[0], device.type == "cuda")


# ------------------------------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen0.5b,llama1b")
    ap.add_argument("--data", default="fixed,realistic")
    ap.add_argument("--variants", default=",".join(VARIANTS) + ",ours_check",
                    help="comma-separated; `all`: every variant but ours_check")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None, help="write (or merge into) this JSON file")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per variant process")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the ours* variants (e.g. speed.lora_fold=false)")
    ap.add_argument("--tag", default="", help="suffix for the ours* variant names in the results (with --set)")
    ap.add_argument("--profile", default=None, help="write a kernel-time breakdown of 3 steps per variant here")
    ap.add_argument("--batch", type=int, default=None,
                    help="rows per step instead of the shape's own (results are labelled @bN); e.g. to check that "
                         "the estimated largest batch fits")
    ap.add_argument("--fit", action="store_true",
                    help="search the largest batch that fits at each shape's length, per variant (fixed rows)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per row instead of the shape's own (results are labelled @bBxT); with --fit-seq, "
                         "the first length tried")
    ap.add_argument("--fit-seq", action="store_true",
                    help="search the longest row that fits at batch 1, per variant (fixed rows; growing by --seq-grow "
                         "from the shape's length or --seq-len, then bisecting to --seq-step tokens)")
    ap.add_argument("--seq-step", type=int, default=1024, help="resolution of a --fit-seq search (tokens)")
    ap.add_argument("--seq-grow", type=float, default=2.0,
                    help="factor a --fit-seq search grows (or shrinks) by until it brackets; e.g. 1.15 from an "
                         "estimated length")
    ap.add_argument("--fit-tries", type=int, default=None,
                    help="runs per variant in a --fit search (default 3) or a --fit-seq search (default 6)")
    ap.add_argument("--worker-log", type=int, default=0, metavar="CHARS",
                    help="print the end of each variant's own log (e.g. with TORCH_LOGS=recompiles)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, 1+2 steps per variant")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = worker(json.loads(args.worker))
        print("RESULT " + json.dumps(res))
        return

    if args.cpu_smoke:
        args.shapes, args.warmup, args.steps = "smoke", 1, 2
        args.seq_step = min(args.seq_step, 32)
    if args.fit_tries is None:
        args.fit_tries = 6 if args.fit_seq else 3
    if args.variants == "all":
        args.variants = ",".join(VARIANTS)
    peak = matmul_peak(args.cpu_smoke)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/peers-inductor"),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    results = read_runs(args.json)

    def launch(shape: str, setting: str, variant: str, batch: int, warmup: int, steps: int, label: bool,
               seq: int | None = None) -> dict:
        """One variant in its own process; its result (or ``error``) recorded under its (labelled) name."""
        seq = seq or args.seq_len or SHAPES[shape][3]
        n_tokens = (warmup + steps + 6) * batch * seq * (2 if setting == "realistic" else 1)
        spec = dict(shape=shape, data=setting, variant=variant, warmup=warmup, steps=steps, n_tokens=n_tokens,
                    cpu=args.cpu_smoke, profile=args.profile, overrides=args.set if variant.startswith("ours") else [],
                    batch=batch, seq=seq)
        if variant.startswith("ours") and args.tag:
            variant = spec["label"] = f"{variant}+{args.tag}"
        if seq != SHAPES[shape][3]:  # another row length: @b<rows>x<length>
            variant = spec["label"] = f"{variant}@b{batch}x{seq}"
        elif label:
            variant = spec["label"] = f"{variant}@b{batch}"
        t0 = time.perf_counter()
        own_env = peers_unsloth.worker_env(env) if spec["variant"] in peers_unsloth.VARIANTS else env
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=own_env,
                                  capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"error": (proc.stderr or proc.stdout)[-1500:]}
            log = proc.stderr
        except subprocess.TimeoutExpired as exc:  # what the worker wrote before it was stopped says where it was
            log = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            res = {"error": f"timeout after {args.timeout} s; its last output: {log[-600:]}"}
        if args.worker_log and log:
            print(f"--- {variant}: the last {args.worker_log} characters of its log ---\n{log[-args.worker_log:]}",
                  file=sys.stderr)
        res.update(shape=shape, data=setting, variant=variant, batch=batch, seq=seq,
                   process_s=time.perf_counter() - t0)
        nonlocal results
        results = record(results, res, peak, args.json)
        return res

    if args.fit:
        search_all(args, results, launch, peak)
        return
    if args.fit_seq:
        search_seq_all(args, launch, peak)
        return
    for shape in args.shapes.split(","):
        batch = args.batch or SHAPES[shape][2]
        for setting in args.data.split(","):
            for variant in args.variants.split(","):
                if variant == "ours_check" and setting != "fixed":
                    continue
                if variant in peers_unsloth.VARIANTS and args.cpu_smoke:
                    print(f"{variant}: skipped in --cpu-smoke (Unsloth trains on a GPU only)", flush=True)
                    continue
                steps = 10 if variant == "ours_check" and not args.cpu_smoke else args.steps
                launch(shape, setting, variant, batch, args.warmup, steps, label=bool(args.batch or args.seq_len))
    print()
    print(table(results))
    for line in loss_agreement(results):
        print(line)


if __name__ == "__main__":
    main()
