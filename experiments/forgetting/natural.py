"""Learning and forgetting on natural text: pretrain on prose, LoRA-tune on code, measure both losses.

1. *Pretraining* (full fine-tuning, from scratch): a small Llama-config model with the embedded byte tokenizer
   learns domain P (prose, ``natural_data.py``) for a fixed time budget. Its weights go to ``<base>/`` and its
   numbers to ``<out>/base.json``; a rerun reuses them.
2. *LoRA stages*: each arm (``ARMS``) tunes that model on domain C (code) through the library (``build_run`` +
   ``train_loop``), with held-out C as validation (the *target loss*) and held-out P as ``eval.retain`` (the
   *retain loss*: what tuning did to what the model knew). The seed sets the adapter initialisation and the data
   order; the pretrained model is the same for every arm and seed.
3. *Adapter interpolation* (a control that costs no training): the flat arm at ``INTERP_LR`` is re-evaluated with
   its trained adapter scaled by alpha in {0, 0.25, 0.5, 0.75}; alpha 0 is the pretrained model itself.

The LoRA arms run as ``--workers`` processes sharing one device; each claims the next (arm, seed) not yet done,
appends its rows to ``<out>/results.jsonl`` and takes no new job once ``--budget`` seconds (counted from the
start) would be exceeded, so a time-limited run returns whatever finished. A rerun does only what is missing.

    python experiments/forgetting/natural_data.py --out .natural-data
    python experiments/forgetting/natural.py --data .natural-data --out runs/forgetting/natural \
        --base /tmp/natural-base --workers 16 --budget 420
    python experiments/forgetting/natural_report.py runs/forgetting/natural \
        --figure docs/forgetting-natural.png --doc docs/science.md

``--cpu-smoke`` runs the whole pipeline in seconds on the CPU (tiny model, few steps, one seed, two arms).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nested_learning.config import TiersConfig, TrainConfig
from nested_learning.model.embedded import build_embedded, byte_tokenizer
from nested_learning.train.evaluate import evaluate_loss, load_eval_file
from nested_learning.train.loop import train_loop
from nested_learning.train.loss import token_loss_sum
from nested_learning.train.setup import build_run

DOMAINS = {"prose_train": "prose_train.jsonl", "prose_heldout": "prose_heldout.jsonl",
           "code_train": "code_train.jsonl", "code_heldout": "code_heldout.jsonl"}
# ~25 M parameters: wide enough to learn English and Python bytes in minutes on one GPU.
MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512)
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
RANK_LR = 3e-3
INTERP_LR = 1e-2
INTERP_ALPHAS = (0.0, 0.25, 0.5, 0.75)
TIER_LRS = (1e-3, 3e-3)
FLAT = {"periods": [1]}
TIER_CONFIGS: dict[str, dict[str, Any]] = {
    "last [1,4,16]": {"periods": [1, 4, 16], "accumulate": "last"},
    "mean [1,4,16]": {"periods": [1, 4, 16]},
    "mean [1,2,4]": {"periods": [1, 2, 4]},
    "reversed [1,4,16]": {"periods": [1, 4, 16], "reverse": True},
    "attn-fast/mlp-slow [1,16]": {"periods": [1, 16], "strategy": "rules",
                                  "rules": [["*self_attn*", 0], ["*mlp*", 1]]},
    "gradient_norm [1,4,16]": {"periods": [1, 4, 16], "strategy": "gradient_norm"},
    "mean [1,4,16] lr_scales [1,.5,.25]": {"periods": [1, 4, 16], "lr_scales": [1.0, 0.5, 0.25]},
    "mean [1,64]": {"periods": [1, 64]},
}
# Optimizer options that exist only in newer configs: arms for them are added when ``TiersConfig`` has the field.
NEW_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "consolidate every 16 a=0.5": ("consolidate", {"periods": [1], "consolidate": {"every": 16, "alpha": 0.5}}),
    "ema 0.98": ("ema", {"periods": [1], "ema": 0.98}),
}
TIER_CONFIGS.update({name: tiers for name, (field, tiers) in NEW_CONFIGS.items()
                     if field in TiersConfig.model_fields})

# Trainable arms in the order they are run (controls first: a time-limited run keeps them).
ARMS: dict[str, dict[str, Any]] = {
    **{f"flat lr={lr:g}": {"kind": "control", "family": "lr", "lr": lr, "tiers": FLAT} for lr in LRS},
    **{f"flat r={r} lr={RANK_LR:g}": {"kind": "control", "family": "rank", "lr": RANK_LR, "r": r, "tiers": FLAT}
       for r in (2, 32)},
    **{f"tiers {name} lr={lr:g}": {"kind": "tier", "family": name, "lr": lr, "tiers": tiers}
       for name, tiers in TIER_CONFIGS.items() for lr in TIER_LRS},
}
INTERP_ARM = f"flat lr={INTERP_LR:g}"
SMOKE_ARMS = (INTERP_ARM, f"tiers mean [1,4,16] lr={TIER_LRS[1]:g}")


def interp_name(alpha: float) -> str:
    return f"interp a={alpha:g} lr={INTERP_LR:g}"


def load_domains(data: Path, tokenizer, max_length: int, keys=tuple(DOMAINS)) -> dict[str, list]:
    missing = [f for f in DOMAINS.values() if not (data / f).is_file()]
    if missing:
        raise SystemExit(f"{data}: missing {missing}; run experiments/forgetting/natural_data.py --out {data}")
    return {k: load_eval_file(data / DOMAINS[k], tokenizer, max_length=max_length) for k in keys}


def losses(model, samples: dict[str, list], pad_id: int, device: torch.device) -> dict[str, float]:
    """Target loss (held-out code) and retain loss (held-out prose), token-weighted, full logits."""
    return {key: evaluate_loss(model, samples[split], pad_id, batch_size=32, device=device,
                               loss_fn=token_loss_sum)["loss"]
            for key, split in (("target_loss", "code_heldout"), ("retain_loss", "prose_heldout"))}


# ---------------------------------------------------------------------------------------------- pretraining


def pretrain(samples: dict[str, list], tokenizer, device: torch.device, *, model_kwargs: dict, seed: int,
             batch_size: int, max_steps: int, seconds: float, lr: float) -> tuple[Any, dict]:
    """Domain P from scratch, every weight trained (AdamW, warmup then cosine to 10%). The step count is
    ``max_steps`` or what fits in ``seconds`` at the speed measured since step 10, whichever is less."""
    from nested_learning.data import collate
    from nested_learning.model.loading import autocast_context

    model, _ = build_embedded("embedded:tiny-llama", seed=seed, **model_kwargs)
    model.config.use_cache = False
    model.to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if cuda else {}))
    train = samples["prose_train"]
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, min(100, max_steps // 10))
    # The speed is measured from step 10 on and the step count re-fitted to the budget at steps 30, 100 and 300:
    # the first steps after the warm-up can run slower than the rest, and one early estimate then stops the run
    # well short of its budget. (The cosine follows the latest count; it moves little after step 30.)
    total, start, refits = max_steps, 10, (30, 100, 300)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    t_probe = t0
    last = float("nan")
    step = 0
    while step < total:
        if step == start:
            sync()
            t_probe = time.perf_counter()
        if step in refits and total > step:
            sync()
            per_step = (time.perf_counter() - t_probe) / (step - start)
            total = max(step + 1, min(max_steps, int((seconds - (time.perf_counter() - t0)) / per_step) + step))
        frac = (step - warmup) / max(1, total - warmup)
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        idx = torch.randint(len(train), (batch_size,), generator=gen).tolist()
        batch = collate([train[i] for i in idx], tokenizer.pad_token_id).to(device)
        with autocast_context(device):
            loss_sum, n = token_loss_sum(model, batch)
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 200 == 0 or step == total:
            last = loss.item()
            print(f"pretrain step {step}/{total} loss {last:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    sync()
    seconds_used = time.perf_counter() - t0
    model.requires_grad_(False)
    model.eval()
    tokens = int(step * batch_size * sum(len(s) for s in train) / len(train))
    info = {"steps": step, "batch_size": batch_size, "seconds": seconds_used, "lr": lr, "train_loss_last": last,
            "tokens_approx": tokens, "params": sum(p.numel() for p in model.parameters()),
            **losses(model, samples, tokenizer.pad_token_id, device), "model": model_kwargs, "seed": seed}
    return model, info


# ---------------------------------------------------------------------------------------------- LoRA arms


def stage_config(arm: dict[str, Any], seed: int, steps: int, batch_size: int, out: Path, data: Path,
                 device: torch.device, max_length: int) -> TrainConfig:
    r = arm.get("r", 8)
    raw = {
        "seed": seed,
        "model": {"device": str(device), "dtype": "bfloat16" if device.type == "cuda" else "float32"},
        # Eager PEFT modules: the adapter is scaled after training (interpolation), and 16 processes compiling
        # at once would cost more than the runs; the head is small (261 tokens), so full logits are cheap.
        "speed": {"lora_fold": False, "compile": False, "loss_chunk_tokens": 0},
        "lora": {"r": r, "alpha": 2.0 * r},
        "data": {"train": str(data / DOMAINS["code_train"]), "valid": str(data / DOMAINS["code_heldout"]),
                 "max_length": max_length},
        "tiers": arm["tiers"],
        "optim": {"lr": arm["lr"], "batch_size": batch_size},
        "schedule": {"steps": steps, "warmup_steps": max(1, steps // 20), "kind": "cosine"},
        "eval": {"every": 0, "batch_size": 32, "retain": {"prose": str(data / DOMAINS["prose_heldout"])}},
        "checkpoint": {"save_best": False},
        "output": {"dir": str(out), "tensorboard": False, "overwrite": True, "log_every": 10},
    }
    return TrainConfig.model_validate(raw)


def scaled_losses(model, alphas: tuple[float, ...], samples: dict[str, list], pad_id: int,
                  device: torch.device) -> dict[float, dict[str, float]]:
    """Losses with every ``lora_B`` scaled by alpha (the adapter's output is linear in B): alpha 0 is the base
    model, 1 the trained adapter. Restores the trained adapter afterwards."""
    named = [(n, p) for n, p in model.named_parameters() if "lora_B" in n]
    if not named:
        raise RuntimeError("no lora_B parameters to scale (is speed.lora_fold on?)")
    trained = [p.detach().clone() for _, p in named]
    out = {}
    try:
        with torch.no_grad():
            for a in alphas:
                for (_, p), t in zip(named, trained):
                    p.copy_(t * a)
                out[a] = losses(model, samples, pad_id, device)
    finally:
        with torch.no_grad():
            for (_, p), t in zip(named, trained):
                p.copy_(t)
    return out


def run_arm(name: str, seed: int, base, samples: dict[str, list], tokenizer, args, device: torch.device,
            base_losses: dict[str, float]) -> list[dict[str, Any]]:
    arm = ARMS[name]
    t0 = time.perf_counter()
    work = Path(args.work) / f"seed{seed}" / name.replace(" ", "_").replace("/", "-")
    cfg = stage_config(arm, seed, args.steps, args.batch_size, work, Path(args.data), device, args.max_length)
    run = build_run(cfg, tokenizer=tokenizer, base_model=copy.deepcopy(base),
                    data=(samples["code_train"], samples["code_heldout"]))
    state = train_loop(run)
    if state.val_loss is None or state.retain_loss is None:
        raise RuntimeError(f"{name} seed {seed}: the run ended without its final evaluation")
    train_s = time.perf_counter() - t0
    common = {"seed": seed, "lr": arm["lr"], "r": arm.get("r", 8), "steps": args.steps,
              "base_target_loss": base_losses["target_loss"], "base_retain_loss": base_losses["retain_loss"]}
    row = {"arm": name, "kind": arm["kind"], "family": arm["family"], "alpha": 1.0, "tiers": arm["tiers"],
           # the library's own end-of-run evaluation (with tiers.ema, of the averaged adapter)
           "target_loss": state.val_loss, "retain_loss": state.retain_loss, "seconds": train_s, **common}
    rows = [row]
    if name == INTERP_ARM:
        t1 = time.perf_counter()
        scaled = scaled_losses(run.model, (*INTERP_ALPHAS, 1.0), samples, tokenizer.pad_token_id, device)
        row["check_alpha1"] = scaled[1.0]  # the same adapter evaluated here: must match the library's numbers
        each = (time.perf_counter() - t1) / len(scaled)
        rows += [{"arm": interp_name(a), "kind": "control", "family": "interp", "alpha": a, "tiers": FLAT,
                  **scaled[a], "seconds": train_s + each, **common} for a in INTERP_ALPHAS]
    return rows


# ---------------------------------------------------------------------------------------------- scheduling


def read_done(results: Path) -> set[tuple[str, int]]:
    if not results.exists():
        return set()
    return {(r["arm"], r["seed"]) for r in map(json.loads, results.read_text().splitlines()) if r}


def append_rows(results: Path, rows: list[dict]) -> None:
    """One ``write`` of all the job's lines with O_APPEND: concurrent workers never interleave their lines."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def claim(claims: Path, name: str, seed: int) -> bool:
    """Exactly one worker gets each (arm, seed): the one whose exclusive create succeeds."""
    key = hashlib.sha1(f"{name}|{seed}".encode()).hexdigest()[:16]
    try:
        os.close(os.open(claims / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def jobs(names: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    # Arm-major: an arm finishes all its seeds before the next starts, so a cut-off run loses whole arms.
    return [(n, s) for n in names for s in seeds]


def worker(args, index: int) -> int:
    device = resolve(args.device)
    out = Path(args.out)
    results = out / "results.jsonl"
    tokenizer = byte_tokenizer()
    samples = load_domains(Path(args.data), tokenizer, args.max_length,
                           ("code_train", "code_heldout", "prose_heldout"))
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(device)
    base.requires_grad_(False)
    base.config.use_cache = False
    base.eval()
    base_losses = losses(base, samples, tokenizer.pad_token_id, device)
    longest = 0.0
    done = read_done(results)
    for name, seed in jobs(args.arms, args.seeds):
        if (name, seed) in done:
            continue
        if time.time() + longest > args.stop_at:
            print(f"worker {index}: budget reached, stopping", flush=True)
            break
        if not claim(out / "claims", name, seed):
            continue
        t0 = time.perf_counter()
        try:
            rows = run_arm(name, seed, base, samples, tokenizer, args, device, base_losses)
        except Exception as exc:  # one failing arm must not cost the others their device time
            import traceback

            traceback.print_exc()
            append_rows(out / "errors.jsonl", [{"arm": name, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        append_rows(results, rows)
        longest = max(longest, time.perf_counter() - t0)
        print(f"worker {index}: {name} seed {seed}: target {rows[0]['target_loss']:.4f} retain "
              f"{rows[0]['retain_loss']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return 0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def driver(args, argv: list[str]) -> int:
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve(args.device)
    base_dir = Path(args.base)
    if not (base_dir / "config.json").is_file() or not (out / "base.json").is_file():
        tokenizer = byte_tokenizer()
        samples = load_domains(Path(args.data), tokenizer, args.max_length,
                               ("prose_train", "code_heldout", "prose_heldout"))
        model, info = pretrain(samples, tokenizer, device, model_kwargs=args.model_kwargs, seed=args.pretrain_seed,
                               batch_size=args.pretrain_batch, max_steps=args.pretrain_steps,
                               seconds=args.pretrain_seconds, lr=args.pretrain_lr)
        model.save_pretrained(base_dir)
        info["device"] = device_name(device)
        tmp = out / "base.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(out / "base.json")
        print(f"pretrained: {json.dumps({k: v for k, v in info.items() if k != 'model'})}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    claims = out / "claims"
    claims.mkdir(exist_ok=True)
    for f in claims.iterdir():  # claims of an earlier, interrupted run: those jobs have no result, redo them
        f.unlink()
    stop_at = start + args.budget
    extra = ["--stop-at", repr(stop_at)]
    if args.workers <= 0:
        args.stop_at = stop_at
        worker(args, 0)
    else:
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                              os.environ.get("PYTHONPATH", "")])}
        procs = []
        for k in range(args.workers):
            with (logs / f"worker{k}.log").open("w") as log:
                procs.append(subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(k), *extra],
                                              stdout=log, stderr=subprocess.STDOUT, env=env))
        failed = [k for k, p in enumerate(procs) if p.wait() != 0]
        if failed:
            for k in failed:
                print(f"worker {k} failed; its log ends:\n" + (logs / f"worker{k}.log").read_text()[-3000:])
            return 1
    done = read_done(out / "results.jsonl")
    missing = [j for j in jobs(args.arms, args.seeds) if j not in done]
    errors = out / "errors.jsonl"
    if errors.exists():
        print("failed runs:\n" + errors.read_text()[-3000:], flush=True)
    append_rows(out / "runs.jsonl", [{"wall_s": time.time() - start, "workers": args.workers, "budget": args.budget,
                                      "device": device_name(device), "jobs_missing": len(missing),
                                      "argv": argv}])
    print(f"done in {time.time() - start:.0f}s; results: {len(done)} rows; jobs missing: {len(missing)}"
          + (f" (first: {missing[0]})" if missing else ""), flush=True)
    return 0


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=".natural-data", help="directory written by natural_data.py")
    p.add_argument("--out", default="runs/forgetting/natural")
    p.add_argument("--base", help="directory for the pretrained weights (default <out>/base)")
    p.add_argument("--work", help="LoRA run directories (default <out>/work)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="*", help="arm names (default: all)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per LoRA run")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--pretrain-seconds", type=float, default=150.0)
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: run the arms in this process)")
    p.add_argument("--budget", type=float, default=float("inf"),
                   help="seconds from the start after which no new LoRA run is begun")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, few steps, one seed, two arms, CPU")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model_kwargs = MODEL
    if args.cpu_smoke:
        args.device, args.model_kwargs = "cpu", TINY_MODEL
        args.seeds = args.seeds if argv and "--seeds" in argv else [0]
        args.arms = args.arms or list(SMOKE_ARMS)
        args.steps, args.batch_size, args.max_length = min(args.steps, 6), min(args.batch_size, 4), 128
        args.pretrain_steps, args.pretrain_batch, args.pretrain_lr = min(args.pretrain_steps, 30), 8, 3e-3
    args.arms = args.arms or list(ARMS)
    unknown = [n for n in args.arms if n not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; known: {list(ARMS)} (interpolation rows come with {INTERP_ARM!r})")
    args.base = args.base or str(Path(args.out) / "base")
    args.work = args.work or str(Path(args.out) / "work")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-run weight loading bars would drown the one line per run
    threads, logger = torch.get_num_threads(), logging.getLogger("nested_learning")
    level = logger.level
    logger.setLevel(logging.WARNING)  # one line per run, not the trainer's chatter
    if args.worker is not None or args.workers > 0 or args.device == "cpu":
        torch.set_num_threads(1)  # many small processes share the cores
    try:
        if args.worker is not None:
            args.stop_at = args.stop_at if args.stop_at is not None else float("inf")
            return worker(args, args.worker)
        return driver(args, argv)
    finally:  # called in-process (tests): leave the process as it was
        torch.set_num_threads(threads)
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
