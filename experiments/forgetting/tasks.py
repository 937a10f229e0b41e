"""Synthetic tasks with one right answer each, generated from a seed (no downloads).

A task is a set of facts, prompt/completion records ``"qzv="`` -> ``"mlk"``: random 3-letter keys mapped to random
3-letter values, scored by exact match. Keys never repeat across the fact sets of one seed, so a later set can
only interfere with an earlier one, never help it by overlap.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

LETTERS = string.ascii_lowercase


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def fact_sets(seed: int, n_sets: int, n_facts: int) -> list[list[dict]]:
    rng = random.Random(f"forgetting/facts/{seed}")
    used: set[str] = set()
    out = []
    for _ in range(n_sets):
        facts = []
        while len(facts) < n_facts:
            key = _word(rng, 3)
            if key in used:
                continue
            used.add(key)
            facts.append({"prompt": f"{key}=", "completion": _word(rng, 3)})
        out.append(facts)
    return out


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path
