"""Cold start: seconds from launching ``nested-learning train`` to its first optimizer step and to step N.

    python bench/cold_start.py --shape llama1b --json docs/cold-start.json     # cold, then warm
    python bench/cold_start.py --shape llama8b --batch 4 --steps 10 --json docs/cold-start.json
    python bench/cold_start.py --shape llama1b --set speed.cuda_graphs=false --tag nographs --json c.json
    python bench/cold_start.py --shape llama1b --scopes model,layers --json c.json  # cold + warm per compile scope
    python bench/cold_start.py --cpu-smoke                                       # tiny embedded model, CPU

A randomly initialised model of a ``bench/peers_setup.py`` shape (``--cpu-smoke``: the embedded micro-llama) is
saved once with ``save_pretrained`` (bf16 on CUDA; with the byte tokenizer, so the CLI loads it as it loads any
local model) beside synthetic text records, then the same ``python -m nested_learning train config.yaml`` process
is launched twice:

- **cold**: fresh, empty ``TORCHINDUCTOR_CACHE_DIR`` (inductor's FX-graph and AOTAutograd caches, dynamo's
  profile-guided shapes, and Triton's kernels under it), ``TRITON_CACHE_DIR`` and ``CUDA_CACHE_PATH``;
- **warm**: the same folders again, as the cold run left them.

``compile_cache.py`` only adds a digest of the package to torch's cache key, so a warm run hits exactly the
entries the cold run wrote. Both runs read the model from the page cache (it was just written).

The times come from the trainer's own ``metrics.jsonl`` (``output.log_every: 1``: one flushed row per step):
the file's modification time when row k appears is when step k finished, against the launch time;
the trainer's own ``tokens_per_sec`` of row 1 gives the first step's duration (compilation included), so
``to_first_step_s - first_step_s`` is start-up before the loop (imports, model load, data, speed plan).
``--scopes model,layers`` repeats cold + warm once per ``speed.compile_scope``, each scope with its own fresh
caches (tag: the scope), so the two scopes' cold runs are both cold. Each result records the compile and CUDA-graph
lines of the run's own speed plan, which show the scope took effect (the CPU runs eager: no scope applies there).
Results: one JSON object per run (``--json`` merges by shape and tag).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
SMOKE_MODEL = "embedded:micro-llama"
CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")


def save_model(shape: str, out: Path, cuda: bool) -> Path:
    """A random-weight model of ``shape`` (a peers shape or ``embedded:<name>``) and the byte tokenizer, saved to
    ``out`` once (an existing save is reused)."""
    import torch

    from nested_learning.model.embedded import build_embedded, byte_tokenizer

    if (out / "config.json").is_file():
        return out
    if shape.startswith("embedded:"):
        model, _ = build_embedded(shape)
    else:
        from peers_setup import build_base

        model = build_base(shape, torch.device("cuda" if cuda else "cpu"))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    tmp.replace(out)  # a save cut short is never taken for a model
    del model
    if cuda:
        torch.cuda.empty_cache()  # the timed runs get the whole device
    return out


def write_data(path: Path, rows: int, chars: int, seed: int = 0) -> Path:
    """``rows`` text records of ``chars`` random letters (one byte token each, plus BOS and EOS)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": "".join(rng.choices(string.ascii_lowercase + " ", k=chars))}) + "\n")
    return path


def train_config(model: Path, data: Path, valid: Path, out: Path, *, seq: int, batch: int, steps: int,
                 cpu: bool) -> dict:
    """The run: LoRA r=16 on the 7 projections, packed rows, tiers [1, 2, 4], one metrics row per step, no
    evaluation or checkpoint before the end (the final evaluation reads one short record)."""
    return {
        "seed": 0,
        "model": {"name_or_path": str(model), **({"device": "cpu"} if cpu else {})},
        "lora": {"r": 16, "alpha": 32,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"train": str(data), "valid": str(valid), "max_length": seq, "packing": True},
        "tiers": {"periods": [1, 2, 4]},
        "optim": {"lr": 2e-4, "batch_size": batch},
        "schedule": {"steps": steps, "warmup_steps": 0, "kind": "constant"},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "save_best": False},
        "output": {"dir": str(out), "log_every": 1, "tensorboard": False, "overwrite": True},
    }


def timed_run(config: Path, out: Path, env: dict, steps: int, timeout: float, overrides: list[str]) -> dict:
    """Launch the CLI and follow ``metrics.jsonl``: when each step's row appeared, seconds after the launch."""
    metrics = out / "metrics.jsonl"
    cmd = [sys.executable, "-m", "nested_learning", "train", str(config), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    done: list[float] = []  # seconds after launch at which row k+1 was written
    rows: list[dict] = []
    launched = time.time()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        seen = 0
        while True:
            finished = proc.poll() is not None
            if metrics.is_file():
                lines = metrics.read_text().split("\n")[:-1]  # complete lines only
                if len(lines) > seen:
                    written = metrics.stat().st_mtime - launched  # the newest row's; earlier ones were polled late
                    for line in lines[seen:]:
                        rows.append(json.loads(line))
                        done.append(written)
                    seen = len(lines)
            if finished:
                break
            if time.time() - launched > timeout:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.02)
        exit_s = time.time() - launched
        log.seek(0)
        tail = log.read()[-2000:]
    train = [(t, r) for t, r in zip(done, rows) if "loss" in r]
    if proc.returncode != 0 or len(train) < steps:
        return {"error": f"exit {proc.returncode} after {exit_s:.1f} s, {len(train)} of {steps} steps: {tail}"}
    first = train[0][1]
    step_ms = [r["tokens"] / r["tokens_per_sec"] * 1e3 if i == 0 else
               (r["tokens"] - train[i - 1][1]["tokens"]) / r["tokens_per_sec"] * 1e3
               for i, (_, r) in enumerate(train)]
    plan = json.loads((out / "speed_plan.json").read_text())["levers"]
    phases = json.loads((out / "startup.json").read_text()) if (out / "startup.json").is_file() else {}
    return {
        "plan": {k: ("on  " if plan[k]["on"] else "off ") + plan[k]["note"] for k in ("compile", "cuda_graphs")},
        "to_first_step_s": train[0][0],
        "first_step_s": step_ms[0] / 1e3,  # the trainer's own clock: compilation and the first step
        "startup_s": train[0][0] - step_ms[0] / 1e3,  # launch to the loop: imports, load, data, plan
        "build_run_s": phases,  # the trainer's own clock per start-up phase (data, model, speed, optimizer)
        f"to_step_{steps}_s": train[steps - 1][0],
        "steady_step_ms": statistics.median(step_ms[len(step_ms) // 2 :]),
        "exit_s": exit_s,
        "first_loss": first["loss"],
        "steps": len(train),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama1b", help="a bench/peers_setup.py shape")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default: the shape's own)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the shape's own)")
    ap.add_argument("--steps", type=int, default=20, help="steps per run; the time to the last is reported too")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both runs")
    ap.add_argument("--tag", default="", help="suffix for the result's name (with --set)")
    ap.add_argument("--scopes", default=None, help="comma-separated speed.compile_scope values (model,layers): cold "
                    "and warm runs for each, with its own caches; the scope joins the tag")
    ap.add_argument("--work", default=None, help="folder for the model, data and caches (default: a temp folder; "
                    "a saved model there is reused)")
    ap.add_argument("--timeout", type=float, default=540, help="seconds per run")
    ap.add_argument("--json", default=None, help="write (or merge into) this JSON file")
    ap.add_argument("--cpu-smoke", action="store_true", help="embedded micro-llama on the CPU, 64-token rows, 3 steps")
    args = ap.parse_args(argv)

    import torch
    from peers_setup import SHAPES

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if args.cpu_smoke:
        shape, batch, seq, steps = SMOKE_MODEL, args.batch or 2, args.seq_len or 64, min(args.steps, 3)
    else:
        shape, steps = args.shape, args.steps
        batch, seq = args.batch or SHAPES[shape][2], args.seq_len or SHAPES[shape][3]
    work = Path(args.work or tempfile.mkdtemp(prefix="cold-start-"))
    work.mkdir(parents=True, exist_ok=True)
    model = save_model(shape, work / f"model-{shape.replace(':', '-')}", cuda)
    data = write_data(work / "train.jsonl", rows=(steps + 2) * batch, chars=seq - 2)
    valid = write_data(work / "valid.jsonl", rows=1, chars=30, seed=1)
    results = []
    for scope in args.scopes.split(",") if args.scopes else [None]:
        tag = "+".join(t for t in (args.tag, scope) if t)
        overrides = [*args.set, *([f"speed.compile_scope={scope}"] if scope else [])]
        result = cold_and_warm(work, f"{shape}+{tag}" if tag else shape, tag, overrides, model=model, data=data,
                               valid=valid, seq=seq, batch=batch, steps=steps, cuda=cuda, timeout=args.timeout)
        results.append(result)
    if args.json:
        path = Path(args.json)
        prior = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        done = {(r["shape"], r["device"]) for r in results}
        prior["runs"] = [r for r in prior["runs"] if (r["shape"], r["device"]) not in done] + results
        prior["meta"] = {"torch": torch.__version__, "argv": sys.argv,
                         "gpu": torch.cuda.get_device_name(0) if cuda else None}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(prior, indent=1))
        tmp.replace(path)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return results[0] if len(results) == 1 else {"runs": results}


def cold_and_warm(work: Path, name: str, tag: str, overrides: list[str], *, model: Path, data: Path, valid: Path,
                  seq: int, batch: int, steps: int, cuda: bool, timeout: float) -> dict:
    """The cold run on fresh caches of its own, then the warm run on what it left."""
    caches = work / (f"caches-{tag}" if tag else "caches")
    shutil.rmtree(caches, ignore_errors=True)  # cold: nothing compiled before
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for var in CACHE_VARS:
        env[var] = str(caches / var.lower())
    result = {"shape": name, "batch": batch, "seq": seq, "steps": steps, "device": "cuda" if cuda else "cpu",
              "overrides": overrides}
    for run in ("cold", "warm"):
        out = work / f"run-{run}"
        shutil.rmtree(out, ignore_errors=True)  # rows of an earlier invocation must not be read as this one's
        config = work / f"{run}.yaml"
        config.write_text(json.dumps(train_config(model, data, valid, out, seq=seq, batch=batch, steps=steps,
                                                  cpu=not cuda)))  # JSON is YAML
        result[run] = timed_run(config, out, env, steps, timeout, overrides)
        print(name, run, json.dumps(result[run]), flush=True)
    cold, warm = result["cold"], result["warm"]
    if "error" not in cold and "error" not in warm:
        result["warm_saves_s"] = cold["to_first_step_s"] - warm["to_first_step_s"]
    return result


if __name__ == "__main__":
    main()
