"""Training tokens/s of the demo run (`nested-learning demo`) on torch CPU and on MLX CPU, interleaved.

Both backends train the demo config (embedded tiny-llama, LoRA r=16 on every projection and the head, tiers
[1, 2, 4], batch 16, rows up to 96 tokens) from the same base weights on the same batches; evaluation is off, so
only training steps are timed. Rounds alternate torch and MLX, which spreads a busy machine's noise over both.
Prints one JSON line: the median tokens/s of each backend over its steps (the first step of each round, which
compiles, is left out).

    python bench/mlx_demo.py [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from nested_learning.demo import demo_config, make_demo_data
from nested_learning.train.metrics import read_metrics


def one_round(root: Path, backend: str, steps: int, k: int) -> list[float]:
    cfg = demo_config(root / f"{backend}{k}", steps, backend=backend, eval__every=0, eval__at_start=False,
                      output__tensorboard=False, data__dir=str(root / "data"), checkpoint__save_best=False)
    if backend == "mlx":
        from nested_learning.mlx.train import build_mlx_run, train_mlx

        train_mlx(build_mlx_run(cfg))
    else:
        from nested_learning.train.loop import train_loop
        from nested_learning.train.setup import build_run

        train_loop(build_run(cfg))
    rows = [r for r in read_metrics(cfg.output.dir) if "loss" in r]
    return [r["tokens_per_sec"] for r in rows[1:]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nl-mlx-bench-"))
    make_demo_data(root / "data")
    tps: dict[str, list[float]] = {"torch": [], "mlx": []}
    for k in range(args.rounds):
        for backend in ("torch", "mlx"):
            tps[backend] += one_round(root, backend, args.steps, k)
    print(json.dumps({f"{b}_cpu_tokens_per_sec": round(statistics.median(v)) for b, v in tps.items()}
                     | {"steps_timed": {b: len(v) for b, v in tps.items()}}))


if __name__ == "__main__":
    main()
