"""A fork server for the kill tests (run as a script, never imported by tests).

It imports torch and the package once, then forks one child per request, so each of many short training runs
starts in milliseconds. A child runs ``nested-learning train CONFIG --resume auto --quiet`` (the CLI's own
``main``) and, when told, SIGKILLs itself at one chosen moment: the n-th call of one kind of write, counted
from the start of that child. Some kills land *inside* a write: half a ``trainer_state.pt``, half a metrics
line, half a directory deleted.

Protocol, one JSON object per line: request ``{"config": path, "log": path, "kill": [kind, n] | null,
"after": seconds | null}`` (``after``: the zygote SIGKILLs the child at that time, wherever it is);
replies ``{"pid": pid}`` at fork, then ``{"exit": code, "signal": sig, "counts": {kind: calls}}`` (``counts``
from a completed child). The zygote never runs a tensor op, so forking it is safe.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter


def _arm(kill, note_path: str) -> Counter:
    """Wrap the writes a training run makes; at the chosen call, kill this process (SIGKILL: no cleanup)."""
    import torch

    from nested_learning.optim.adamw import NestedAdamW
    from nested_learning.train.metrics import MetricsLog

    counts: Counter = Counter()
    target = tuple(kill) if kill else None

    def due(kind: str) -> bool:
        counts[kind] += 1
        return target == (kind, counts[kind])

    def die(kind: str) -> None:
        with open(note_path, "a") as f:
            f.write(f"{kind} {counts[kind]}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    real_save, real_replace, real_fsync = torch.save, os.replace, os.fsync
    real_rmtree, real_write, real_step = shutil.rmtree, MetricsLog.write, NestedAdamW.step

    def save(obj, f, *args, **kwargs):
        if due("torch.save"):  # half of the file, then the kill
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            die("torch.save")
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if due("rename"):
            die("rename")
        return real_replace(src, dst, *args, **kwargs)

    def fsync(fd):
        if due("fsync"):
            die("fsync")
        return real_fsync(fd)

    def rmtree(path, *args, **kwargs):
        if due("rmtree"):  # half of the files, then the kill
            files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
            for name in files[: len(files) // 2]:
                os.unlink(name)
            die("rmtree")
        return real_rmtree(path, *args, **kwargs)

    def write(self, record, *args, **kwargs):
        if due("metrics"):  # half a line reaches the file
            line = json.dumps(record)
            self._file.write(line[: len(line) // 2])
            self._file.flush()
            die("metrics")
        return real_write(self, record, *args, **kwargs)

    def step(self, *args, **kwargs):
        if due("step"):
            die("step")
        return real_step(self, *args, **kwargs)

    torch.save, os.replace, os.fsync, shutil.rmtree = save, replace, fsync, rmtree
    MetricsLog.write, NestedAdamW.step = write, step
    return counts


def _child(request: dict) -> int:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    counts = _arm(request.get("kill"), request["log"] + ".kill")
    from nested_learning.cli import main

    code = main(["train", request["config"], "--resume", "auto", "--quiet"])
    with open(request["log"] + ".counts", "w") as f:
        json.dump(counts, f)
    return code


def _wait(pid: int, after: float | None) -> int:
    """The child's exit status; with ``after``, SIGKILL it at that time if it still runs."""
    if after is not None:
        deadline = time.monotonic() + after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped: the pid cannot have been reused
    return os.waitpid(pid, 0)[1]


def serve() -> None:
    import torch

    torch.set_num_threads(1)  # before any tensor op: children never inherit a thread pool
    import nested_learning.cli  # noqa: F401 - the imports every child would otherwise repeat
    import nested_learning.train.loop  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        print(json.dumps({"pid": pid}), flush=True)
        status = _wait(pid, request.get("after"))
        reply = {"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                 "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        counts = request["log"] + ".counts"
        if os.path.exists(counts):
            with open(counts) as f:
                reply["counts"] = json.load(f)
            os.unlink(counts)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
