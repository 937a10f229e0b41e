"""Sequential learning and forgetting on synthetic tasks: does a tier configuration forget less than flat LoRA?

A small Llama-style model is trained from scratch (full fine-tuning) on task A, then LoRA-tuned on task B and
then on task C; after each LoRA stage the adapter is merged into the weights. After every stage the exact-match
accuracy on every task is recorded: the accuracy matrix ``R[stage][task]``. Each arm is one way of running the
LoRA stages (``ARMS``); every LoRA stage goes through the library (``build_run`` + ``train_loop``), with the
earlier tasks as ``eval.retain`` sets and ``eval.metric: exact_match``.

    python experiments/forgetting/bench.py --out runs/forgetting/s012 --seeds 0 1 2
    python experiments/forgetting/bench.py --out runs/forgetting/s34 --seeds 3 4
    python experiments/forgetting/report.py runs/forgetting/s012 runs/forgetting/s34 \
        --figure docs/forgetting-front.png --doc docs/science.md

Results go to ``<out>/results.jsonl``, one line per (arm, seed), appended as each finishes; a rerun skips the
(arm, seed) pairs already there, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tasks import fact_sets, write_jsonl  # noqa: E402

from nested_learning.config import TrainConfig  # noqa: E402
from nested_learning.model.embedded import build_embedded  # noqa: E402
from nested_learning.train.evaluate import evaluate_exact_match, evaluate_loss, load_eval_file  # noqa: E402
from nested_learning.train.loss import token_loss_sum  # noqa: E402
from nested_learning.train.loop import train_loop  # noqa: E402
from nested_learning.train.setup import build_run  # noqa: E402

TASKS = ("A", "B", "C")
# The model: embedded tiny-llama's shape, narrowed so every stage takes seconds on a CPU core.
MODEL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)

# Each arm: the LoRA stages' lr, rank, tiers (see ``stage_config``), and ``alpha`` (adapter interpolation).
# Controls: flat LoRA (one tier, period 1) at nine learning rates, at three ranks, and interpolated back toward
# each stage's start. Tier arms: each tier configuration at four learning rates, so each traces its own curve
# (a slow tier takes fewer steps, which alone acts like a lower learning rate).
LRS = (1e-4, 3e-4, 5e-4, 7e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 1e-2)
TIER_LRS = (1e-3, 2e-3, 3e-3, 1e-2)
FLAT = {"periods": [1]}
TIER_CONFIGS: dict[str, dict[str, Any]] = {
    "mean [1,4,16]": {"periods": [1, 4, 16]},
    "mean [1,2,4]": {"periods": [1, 2, 4]},
    "last [1,4,16]": {"periods": [1, 4, 16], "accumulate": "last"},
    "reversed [1,4,16]": {"periods": [1, 4, 16], "reverse": True},
    "attn-fast/mlp-slow [1,16]": {"periods": [1, 16], "strategy": "rules",
                                  "rules": [["*self_attn*", 0], ["*mlp*", 1]]},
    "gradient_norm [1,4,16]": {"periods": [1, 4, 16], "strategy": "gradient_norm"},
    # two more shapes: a long period, and slow tiers that also take smaller steps
    "mean [1,64]": {"periods": [1, 64]},
    "mean [1,4,16] lr_scales [1,.5,.25]": {"periods": [1, 4, 16], "lr_scales": [1.0, 0.5, 0.25]},
}
# Slow weights fed by fast ones (tiers.consolidate, tiers.ema; docs/tiers.md), on flat LoRA and on tiers.
AVERAGE_CONFIGS: dict[str, dict[str, Any]] = {
    "consolidate k=16 a=.5": {"periods": [1], "consolidate": {"every": 16, "alpha": 0.5}},
    "consolidate k=8 a=.25": {"periods": [1], "consolidate": {"every": 8, "alpha": 0.25}},
    "ema .99": {"periods": [1], "ema": 0.99},
    "ema .995": {"periods": [1], "ema": 0.995},
    "tiers mean [1,4,16] + consolidate k=16 a=.5": {"periods": [1, 4, 16], "consolidate": {"every": 16, "alpha": 0.5}},
}
ARMS: dict[str, dict[str, Any]] = {
    **{f"flat lr={lr:g}": {"kind": "control", "family": "lr", "lr": lr, "tiers": FLAT} for lr in LRS},
    **{f"flat r={r} lr=0.003": {"kind": "control", "family": "rank", "lr": 3e-3, "r": r, "tiers": FLAT}
       for r in (2, 32)},
    **{f"interp a={a:g} lr=0.01": {"kind": "control", "family": "interp", "lr": 1e-2, "alpha": a, "tiers": FLAT}
       for a in (0.25, 0.5, 0.75)},
    # where the slow-weight arms below sit: interpolation from a lower learning rate too
    **{f"interp a={a:g} lr=0.002": {"kind": "control", "family": "interp lr=0.002", "lr": 2e-3, "alpha": a,
                                    "tiers": FLAT} for a in (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)},
    **{f"interp a={a:g} lr=0.003": {"kind": "control", "family": "interp lr=0.003", "lr": 3e-3, "alpha": a,
                                    "tiers": FLAT} for a in (0.625, 0.75, 0.875)},
    **{f"tiers {name} lr={lr:g}": {"kind": "tier", "family": name, "lr": lr, "tiers": tiers}
       for name, tiers in TIER_CONFIGS.items() for lr in TIER_LRS},
    **{f"{name} lr={lr:g}": {"kind": "tier", "family": name, "lr": lr, "tiers": tiers}
       for name, tiers in AVERAGE_CONFIGS.items() for lr in TIER_LRS},
    # the EMA lags: a larger learning rate reaches further into learning
    "ema .99 lr=0.03": {"kind": "tier", "family": "ema .99", "lr": 3e-2, "tiers": AVERAGE_CONFIGS["ema .99"]},
}


def make_tasks(seed: int, size: dict[str, int], root: Path) -> dict[str, Path]:
    """Three disjoint fact sets: A (pretraining), B and C (the LoRA stages)."""
    facts = fact_sets(seed, 3, size["facts"])
    records = dict(zip(TASKS, facts))
    return {t: write_jsonl(r, root / f"seed{seed}" / f"{t}.jsonl") for t, r in records.items()}


def scores(model, samples: dict[str, list], pad_id: int) -> dict[str, dict[str, float]]:
    """Exact match and loss of ``model`` on every task."""
    return {t: {"acc": evaluate_exact_match(model, s, pad_id, batch_size=64)["exact_match"],
                "loss": evaluate_loss(model, s, pad_id, batch_size=64, loss_fn=token_loss_sum)["loss"]}
            for t, s in samples.items()}


def pretrain(seed: int, samples: list, tokenizer, steps: int, lr: float = 3e-3, batch_size: int = 32):
    """Task A from scratch, all weights trained (the stand-in for what a base model knows)."""
    from nested_learning.data import collate

    model, _ = build_embedded("embedded:tiny-llama", seed=seed, **MODEL)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(samples), (batch_size,), generator=gen).tolist()
        batch = collate([samples[i] for i in idx], tokenizer.pad_token_id)
        loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return model.eval()


def stage_config(arm: dict[str, Any], seed: int, steps: int, out: Path, train: Path, retain: dict[str, str]):
    raw = {
        "seed": seed,
        "model": {"device": "cpu", "dtype": "float32"},
        "speed": {"lora_fold": False},  # the adapter is merged after each stage: keep PEFT's own modules
        "lora": {"r": arm.get("r", 8), "alpha": 2.0 * arm.get("r", 8)},
        "data": {"train": str(train), "valid": str(train), "max_length": 32},
        "tiers": arm["tiers"],
        "optim": {"lr": arm["lr"], "batch_size": 16},
        "schedule": {"steps": steps, "warmup_steps": max(1, steps // 20), "kind": "cosine"},
        "eval": {"every": 0, "metric": "exact_match", "retain": retain},
        "checkpoint": {"save_best": False},
        "output": {"dir": str(out), "tensorboard": False, "overwrite": True, "log_every": 10},
    }
    return TrainConfig.model_validate(raw)


def scale_adapter(model, alpha: float) -> None:
    """WiSE-FT-style interpolation between the stage's start (alpha 0) and its trained adapter (alpha 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(alpha)


def run_arm(name: str, arm: dict, seed: int, base, files: dict[str, Path], samples: dict[str, list], tokenizer,
            steps: int, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    pad = tokenizer.pad_token_id
    table = [scores(base, samples, pad)]
    model = copy.deepcopy(base)
    stage_metrics = []
    for k, task in enumerate(TASKS[1:], 1):
        retain = {t: str(files[t]) for t in TASKS[:k]}
        cfg = stage_config(arm, seed, steps, work / f"stage{task}", files[task], retain)
        run = build_run(cfg, tokenizer=tokenizer, base_model=model, data=(samples[task], samples[task]))
        state = train_loop(run)
        stage_metrics.append({"task": task, "val_exact_match": state.val_exact_match,
                              "retain_exact_match": state.retain_exact_match, "val_loss": state.val_loss,
                              "retain_loss": state.retain_loss, "retain": state.retain})
        scale_adapter(run.model, arm.get("alpha", 1.0))
        model = run.model.merge_and_unload()
        model.eval()
        table.append(scores(model, samples, pad))
    matrix = [{t: row[t]["acc"] for t in TASKS} for row in table]
    loss_matrix = [{t: row[t]["loss"] for t in TASKS} for row in table]
    losses = {"target_loss": (loss_matrix[1]["B"] + loss_matrix[2]["C"]) / 2, "retain_loss_A": loss_matrix[2]["A"]}
    return {"arm": name, "seed": seed, "kind": arm["kind"], "family": arm["family"], "lr": arm["lr"],
            "alpha": arm.get("alpha", 1.0), "r": arm.get("r", 8), "matrix": matrix, "loss_matrix": loss_matrix,
            "stages": stage_metrics,
            "seconds": time.perf_counter() - t0, **summarize(matrix), **losses}


def summarize(matrix: list[dict[str, float]]) -> dict[str, float]:
    """learning: mean accuracy of B and C right after their stage. retain_A: A's accuracy at the end.
    forgetting: mean over A, B of (best accuracy at any stage from its own on) - (final accuracy).
    bwt: mean over A, B of (final accuracy) - (accuracy right after its own stage)."""
    final = matrix[-1]
    own = {t: matrix[i][t] for i, t in enumerate(TASKS)}
    earlier = TASKS[:-1]
    return {
        "learning": (own["B"] + own["C"]) / 2,
        "retain_A": final["A"],
        "final_avg": sum(final.values()) / len(final),
        "forgetting": sum(max(matrix[i][t] for i in range(TASKS.index(t), len(TASKS) - 1)) - final[t]
                          for t in earlier) / len(earlier),
        "bwt": sum(final[t] - own[t] for t in earlier) / len(earlier),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/forgetting")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="*", help="arm names (default: all)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per LoRA stage")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--facts", type=int, default=48, help="facts per fact set")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the runs are tiny)")
    args = p.parse_args(argv)
    threads, logger = torch.get_num_threads(), logging.getLogger("nested_learning")
    level = logger.level
    torch.set_num_threads(args.threads)
    logger.setLevel(logging.WARNING)  # one line per arm, not the trainer's per-run chatter
    try:
        return _run(p, args)
    finally:  # called in-process (tests): leave the process as it was
        torch.set_num_threads(threads)
        logger.setLevel(level)


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["arm"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.exists() else set()
    names = args.arms or list(ARMS)
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; known: {list(ARMS)}")
    from nested_learning.model.embedded import byte_tokenizer

    tokenizer = byte_tokenizer()
    size = {"facts": args.facts}
    for seed in args.seeds:
        todo = [n for n in names if (n, seed) not in done]
        if not todo:
            continue
        files = make_tasks(seed, size, out / "data")
        samples = {t: load_eval_file(f, tokenizer, max_length=32) for t, f in files.items()}
        t0 = time.perf_counter()
        base = pretrain(seed, samples["A"], tokenizer, args.pretrain_steps)
        print(f"seed {seed}: pretrained A in {time.perf_counter() - t0:.0f}s: "
              f"{scores(base, samples, tokenizer.pad_token_id)}", flush=True)
        for name in todo:
            res = run_arm(name, ARMS[name], seed, base, files, samples, tokenizer, args.steps,
                          out / "work" / f"seed{seed}" / name.replace(" ", "_").replace("/", "-"))
            with results.open("a") as f:
                f.write(json.dumps(res) + "\n")
                f.flush()
                os.fsync(f.fileno())
            print(f"seed {seed} {name:32s} learn {res['learning']:.3f} retainA {res['retain_A']:.3f} "
                  f"forget {res['forgetting']:.3f} bwt {res['bwt']:+.3f} ({res['seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
