"""Service start-up: seconds from a job's start (the scheduler marks it ``running``) to its first optimizer step,
for a stream of short jobs, with warm workers (the service's default) and with ``--cold-workers``.

    python bench/service_start.py                      # embedded micro-llama on the CPU, 4 jobs each way
    python bench/service_start.py --jobs 6 --set model.name_or_path=/models/llama-1b --set model.device=cuda

Each job is the same small run (``--steps`` steps, no evaluation) queued after the previous one ended, through
the job store and the scheduler the server uses (no HTTP). The first job of a slot always starts cold; with warm
workers the next ones start in a worker that imported torch, transformers and the trainer while the previous job
ran (the benchmark queues the next job once that worker is warm, as when jobs outlast the imports). Times come
from the store: ``started_at`` and the time of the job's first ``train`` metric row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nested_learning.config import load_config  # noqa: E402
from nested_learning.service.scheduler import Scheduler  # noqa: E402
from nested_learning.service.store import open_store  # noqa: E402


def _data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", 64), ("valid.jsonl", 8)):
        with open(root / name, "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"Count {i}: ", "completion": " ".join(map(str, range(i % 9 + 1)))}) + "\n")
    return root


def run(mode: str, jobs: int, steps: int, sets: list[str], work: Path) -> list[float]:
    store = open_store(str(work / "jobs.db"))
    data = _data(work / "data")
    base = ["model.name_or_path=embedded:micro-llama", "model.device=cpu", f"data.dir={data}", "data.max_length=64",
            f"schedule.steps={steps}", "schedule.warmup_steps=0", "eval.every=0", "output.tensorboard=false"]
    sched = Scheduler(store, work, gpus=None, poll_s=0.05, warm=mode == "warm")
    sched.start()
    out = []
    try:
        for i in range(jobs):
            cfg = load_config(None, [*base, *sets, f"output.dir={work / f'job{i}'}"])
            job_id = store.create_job(cfg.model_dump_json(), cfg.output.dir)
            sched.wake()
            while store.get_job(job_id)["status"] in ("queued", "running"):
                time.sleep(0.05)
            job = store.get_job(job_id)
            first = store.metrics(job_id, kind="train", limit=1)
            if job["status"] != "completed" or not first:
                raise SystemExit(f"job {i} ({mode}) ended {job['status']}: {job['error']}")
            out.append(first[0]["time"] - job["started_at"])
            if mode == "warm":  # the next job comes once the slot's new spare is warm (jobs longer than imports)
                spare_log = work / "logs" / f"spare-{sched.slots[0]}.log"
                while not (spare_log.exists() and spare_log.read_text().count("waiting for a job") > i):
                    time.sleep(0.05)
    finally:
        sched.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every job")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = {}
    for mode in ("cold", "warm"):
        with tempfile.TemporaryDirectory() as tmp:
            results[mode] = run(mode, args.jobs, args.steps, args.set, Path(tmp))
        print(f"{mode}: seconds to the first step per job: " + ", ".join(f"{s:.2f}" for s in results[mode]),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "cpu_count": os.cpu_count(), **results},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
