"""Load on the job service while a job trains: N pollers of one job's status and M `/events` followers.

    python bench/service_load.py [--pollers 100] [--followers 10] [--seconds 20] [--baseline 10]

Starts ``nested-learning serve`` on a free loopback port in a temporary workdir, queues a small embedded-model
job, and once it trains:

1. measures the training step rate with no load (``--baseline`` seconds);
2. runs the load for ``--seconds``: each poller is one keep-alive connection sending ``GET /v1/jobs/{id}`` every
   ``--interval`` s (0: back to back, the most the server can answer); each follower holds
   ``GET /v1/jobs/{id}/events`` open and counts the events it reads;
3. prints one JSON object: requests/s, latency p50/p90/p99/max (ms), errors, events read, the step rate under
   load vs. without, and the CPU seconds used by this client, the server and the worker.

The client is plain asyncio over raw sockets (HTTP/1.1, no client library) so that it costs as little CPU as it
can; its own CPU time is reported so the numbers can be read against it. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def write_data(root: Path) -> None:
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", 256), ("valid.jsonl", 16)):
        with open(root / name, "w") as f:
            for _ in range(n):
                text = " ".join(rng.choice(words) for _ in range(6))
                f.write(json.dumps({"prompt": f"Repeat: {text}\n", "completion": text}) + "\n")


class Conn:
    """One keep-alive HTTP/1.1 connection; ``get`` returns (status, body)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                      if k.strip().lower() == b"content-length")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def poller(port: int, path: str, until: float, interval: float, latencies: list[float],
                 errors: list[str]) -> None:
    """Polls every ``interval`` s (0: back to back). Latency runs from when the request was due, so a slow
    answer that delays the next poll is counted in full (no coordinated omission)."""
    conn = Conn(port)
    try:
        await conn.open()
        due = time.perf_counter() + random.random() * interval  # spread the pollers' phases
        while time.monotonic() < until:
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            status, _ = await conn.get(path)
            latencies.append(time.perf_counter() - due)
            due = max(due + interval, time.perf_counter()) if interval else time.perf_counter()
            if status != 200:
                errors.append(f"HTTP {status}")
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


async def follower(port: int, path: str, until: float, counts: list[int], errors: list[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        errors.append(f"events: {exc}")
        return
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    events = 0
    try:
        while time.monotonic() < until:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=max(0.05, until - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if not line:
                break
            if line.startswith(b"event:"):
                events += 1
    finally:
        counts.append(events)
        writer.close()


async def load(port: int, job_id: str, pollers: int, followers: int, seconds: float, interval: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    counts: list[int] = []
    until = time.monotonic() + seconds
    start = time.monotonic()
    tasks = [poller(port, f"/v1/jobs/{job_id}", until, interval, latencies, errors) for _ in range(pollers)]
    tasks += [follower(port, f"/v1/jobs/{job_id}/events", until, counts, errors) for _ in range(followers)]
    await asyncio.gather(*tasks)
    wall = time.monotonic() - start
    latencies.sort()

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else None

    return {"requests": len(latencies), "req_per_s": round(len(latencies) / wall, 1), "p50_ms": pct(0.50),
            "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0), "errors": len(errors),
            "first_errors": errors[:3], "events_read": sum(counts), "wall_s": round(wall, 2)}


def http_json(port: int, method: str, path: str, body: dict | None = None) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    conn.close()
    if resp.status >= 400:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data}")
    return data


def step_rate(port: int, job_id: str, seconds: float) -> float:
    first = http_json(port, "GET", f"/v1/jobs/{job_id}")["step"]
    time.sleep(seconds)
    last = http_json(port, "GET", f"/v1/jobs/{job_id}")["step"]
    return (last - first) / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pollers", type=int, default=100)
    ap.add_argument("--followers", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=0.2,
                    help="seconds between one poller's requests (0.2: 100 pollers offer 500 req/s; 0: back to back)")
    ap.add_argument("--baseline", type=float, default=10.0, help="seconds of step-rate measurement without load")
    ap.add_argument("--steps", type=int, default=100_000, help="the job's schedule.steps (it is stopped at the end)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nl-load-"))
    write_data(work / "data")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NL_API_TOKEN", None)
    server = subprocess.Popen([sys.executable, "-m", "nested_learning.service", "--port", str(port), "--workdir",
                               str(work), "--log-level", "warning"], stdout=subprocess.DEVNULL,
                              stderr=open(work / "server.log", "wb"), env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                http_json(port, "GET", "/v1/healthz")
                break
            except (OSError, RuntimeError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
                time.sleep(0.2)
        cfg = {"model": {"name_or_path": "embedded:micro-llama", "device": "cpu"}, "lora": {"r": 4},
               "data": {"dir": "data", "max_length": 64}, "tiers": {"periods": [1, 4]},
               "optim": {"batch_size": 4}, "schedule": {"steps": args.steps}, "eval": {"every": 50},
               "output": {"tensorboard": False}}
        job_id = http_json(port, "POST", "/v1/jobs", cfg)["id"]
        deadline = time.monotonic() + 120
        while True:
            job = http_json(port, "GET", f"/v1/jobs/{job_id}")
            if job["status"] == "running" and job["step"] >= 3:
                break
            if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
                raise SystemExit(f"the job did not start training: {job}")
            time.sleep(0.5)
        worker = job["worker_pid"]
        base_rate = step_rate(port, job_id, args.baseline)

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        srv0, wrk0 = cpu_seconds(server.pid), cpu_seconds(worker)
        step0 = http_json(port, "GET", f"/v1/jobs/{job_id}")["step"]
        coro = load(port, job_id, args.pollers, args.followers, args.seconds, args.interval)
        try:  # the leaner event loop when installed (the serve extra brings it)
            import uvloop

            result = uvloop.run(coro)
        except ImportError:
            result = asyncio.run(coro)
        step1 = http_json(port, "GET", f"/v1/jobs/{job_id}")["step"]
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        result.update(
            pollers=args.pollers, followers=args.followers, interval_s=args.interval, cpus=os.cpu_count(),
            load_average=round(os.getloadavg()[0], 2),
            steps_per_s_without_load=round(base_rate, 2),
            steps_per_s_under_load=round((step1 - step0) / result["wall_s"], 2),
            client_cpu_s=round(client_cpu, 2), server_cpu_s=round(cpu_seconds(server.pid) - srv0, 2),
            worker_cpu_s=round(cpu_seconds(worker) - wrk0, 2),
        )
        http_json(port, "POST", f"/v1/jobs/{job_id}/stop")
        print(json.dumps(result))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
