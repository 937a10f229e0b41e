"""The kill attack: SIGKILL a training run (the CLI, ``--resume auto``) at many moments, some inside checkpoint
and metrics writes, resume after each, and require the result of the uninterrupted run: the same losses, the
same adapter bit for bit, every metrics row exactly once, every checkpoint intact.

The moments come from a fixed RNG: a kind of write and which call of it (counted from the start of each
attempt), so the attack is the same on every machine; one trial kills at wall-clock times instead."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from nested_learning.train import checkpoint as ckpt
from nested_learning.train.metrics import read_metrics
from conftest import adapter_tensors, micro_config, write_data

KINDS = ("torch.save", "rename", "fsync", "rmtree", "metrics", "step")
SECTIONS = dict(schedule={"steps": 6}, eval={"every": 3}, checkpoint={"every": 2, "keep_last_n": 2},
                tiers={"periods": [1, 4]}, lora={"r": 4, "alpha": 8, "dropout": 0.1})
MOMENT_KILLS, KILLS_PER_TRIAL, TIMED_KILLS = 21, 6, 3


class Zygote:
    """tests/killkit.py: forks one training child per request."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("killkit.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, config: Path, log: Path, kill=None, after=None) -> dict:
        self.proc.stdin.write(json.dumps({"config": str(config), "log": str(log), "kill": kill, "after": after})
                              + "\n")
        self.proc.stdin.flush()
        json.loads(self.proc.stdout.readline())  # {"pid": ...}
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _trial_config(data_dir: Path, root: Path) -> Path:
    root.mkdir(parents=True)
    config = root / "config.yaml"
    config.write_text(micro_config(data_dir, root / "run", **SECTIONS).to_yaml())
    return config


def _rows(out: Path):
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in read_metrics(out)]


def _log(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_run(tmp_path):
    data_dir = write_data(tmp_path / "data")
    zygote = Zygote()
    try:
        ref_config = _trial_config(data_dir, tmp_path / "ref")
        ref = zygote.run(ref_config, tmp_path / "ref" / "log")
        assert ref["exit"] == 0, _log(tmp_path / "ref" / "log")
        full_counts, ref_out = ref["counts"], tmp_path / "ref" / "run"
        assert all(full_counts.get(k, 0) > 0 for k in KINDS), full_counts
        ref_rows = _rows(ref_out)
        ref_adapter = adapter_tensors(ref_out / "checkpoints" / "last")

        rng = random.Random(16)
        killed: Counter = Counter()
        for trial in range(8):
            root = tmp_path / f"trial{trial}"
            config = _trial_config(data_dir, root)
            timed = sum(killed.values()) >= MOMENT_KILLS  # the last trial kills at wall-clock times
            for attempt in range(KILLS_PER_TRIAL if not timed else TIMED_KILLS):
                log = root / f"log{attempt}"
                if timed:
                    result = zygote.run(config, log, after=rng.uniform(0.05, 1.5))
                else:
                    kind = rng.choice(KINDS)
                    result = zygote.run(config, log, kill=[kind, rng.randint(1, full_counts[kind])])
                if result["signal"] == signal.SIGKILL:
                    note = Path(f"{log}.kill")
                    killed[note.read_text().split()[0] if note.exists() else "timer"] += 1
                    continue
                assert result["exit"] == 0, _log(log)  # the run finished before its kill moment
                break
            final = zygote.run(config, root / "final")
            assert final["exit"] == 0, _log(root / "final")
            out = root / "run"
            assert _rows(out) == ref_rows, trial  # every row once, the same numbers
            adapter = adapter_tensors(out / "checkpoints" / "last")
            assert adapter.keys() == ref_adapter.keys() and all(torch.equal(adapter[k], ref_adapter[k])
                                                                for k in adapter), trial
            for c in ckpt.list_checkpoints(out):
                ckpt.verify_checkpoint(c["path"])
            assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
            if timed:
                break
    finally:
        zygote.close()
    print(f"\nkills survived: {sum(killed.values())} {dict(killed)}")
    assert sum(killed.values()) >= 20
    assert killed["torch.save"] and killed["metrics"] and killed["rmtree"] and killed["rename"]
