"""What launching under torchrun costs: the same training, single process against ``torchrun --nproc-per-node 1``.

    python bench/launch_overhead.py                       # Llama-1B shape, 5 warm-up + 30 timed steps, on CUDA
    python bench/launch_overhead.py --json out.json       # + the figures as JSON
    python bench/launch_overhead.py --shape smoke --warmup 1 --steps 3 --cpu   # a quick run on the CPU

Both paths run ``bench/peers.py``'s ``ours`` variant (``build_run`` + ``train_loop`` on the shape's random weights
and synthetic fixed-length data, the speed levers at their defaults), each in its own process and, before it,
``nested_learning.train.distributed.init_from_env`` as ``nested-learning train`` calls it. The direct path runs
``python bench/launch_overhead.py --worker SPEC``; the torchrun path runs the same command under
``python -m torch.distributed.run --standalone --nproc-per-node 1``. Both share one inductor cache
(``TORCHINDUCTOR_CACHE_DIR``, default /tmp/peers-inductor), so only the first pays a cold compile, outside the
timed steps. Printed: the median ms per timed step of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(spec: dict) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from nested_learning.train import distributed

    ctx = distributed.init_from_env()  # what the CLI does first; a world of one starts no process group
    import peers  # noqa: E402  (bench/peers.py: the `ours` variant)

    res = peers.worker(spec)
    res["world"] = ctx.world
    res["torchrun"] = "TORCHELASTIC_RUN_ID" in os.environ
    return res


def run(cmd: list[str], env: dict, timeout: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(lines[-1][7:])
    res["process_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama1b", help="a bench/peers_setup.py shape")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test of the script)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per process")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    sys.path.insert(0, str(ROOT / "bench"))
    from peers_setup import SHAPES

    batch, seq = SHAPES[args.shape][2], SHAPES[args.shape][3]
    spec = dict(shape=args.shape, data="fixed", variant="ours", warmup=args.warmup, steps=args.steps,
                n_tokens=(args.warmup + args.steps + 6) * batch * seq, cpu=args.cpu, profile=None, overrides=[],
                batch=batch)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/peers-inductor"),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    own = [__file__, "--worker", json.dumps(spec)]
    direct = run([sys.executable, *own], env, args.timeout)
    launched = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *own],
                   env, args.timeout)
    assert launched["torchrun"] and not direct["torchrun"] and launched["world"] == direct["world"] == 1
    out = {"shape": args.shape, "batch": batch, "seq": seq, "warmup": args.warmup, "steps": args.steps,
           "device": "cpu" if args.cpu else "cuda",
           "direct_step_ms": direct["step_ms"], "torchrun_step_ms": launched["step_ms"],
           "ratio": launched["step_ms"] / direct["step_ms"],
           "direct_process_s": direct["process_s"], "torchrun_process_s": launched["process_s"],
           "direct_final_loss": direct["final_loss"], "torchrun_final_loss": launched["final_loss"]}
    print(f"{args.shape}: direct {out['direct_step_ms']:.2f} ms/step, torchrun --nproc-per-node 1 "
          f"{out['torchrun_step_ms']:.2f} ms/step, ratio {out['ratio']:.4f} "
          f"(final loss {out['direct_final_loss']:.4f} / {out['torchrun_final_loss']:.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
