"""The natural-text benchmark (experiments/forgetting/natural*.py) in its CPU smoke form: plumbing, not results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import forgetting_module


def _sources(root: Path) -> tuple[str, str, str]:
    """Small prose and code trees standing in for /usr/share and /usr/lib/python3.*."""
    docs, logs, code = root / "docs", root / "logs", root / "code"
    for d in (docs, logs, code):
        d.mkdir(parents=True)
    shared = "Permission is hereby granted, free of charge, to any person obtaining a copy."
    for i in range(30):
        (docs / f"pkg{i:02d}.txt").write_text(f"{shared}\n\n" + f"Package {i} is documented here. " * 6 + "\n")
        (logs / f"log{i:02d}.txt").write_text(f"  * Fixed bug number {i} in the parser.\n" * 8)
        (code / f"mod{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n\n" * 8)
    return str(docs / "*.txt"), str(logs / "*.txt"), str(code / "*.py")


def test_data_preparation_is_deterministic_and_splits_by_file(tmp_path):
    data = forgetting_module("natural_data")
    prose, logs, code = _sources(tmp_path / "src")
    kw = dict(chunk=120, heldout_share=0.3, prose_globs=(prose,), log_globs=(logs,), code_globs=(code,))
    first = data.prepare(tmp_path / "a", **kw)
    data.prepare(tmp_path / "b", **kw)
    for name in ("prose_train", "prose_heldout", "code_train", "code_heldout"):
        a = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert a == (tmp_path / "b" / f"{name}.jsonl").read_text()
        texts = [json.loads(line)["text"] for line in a.splitlines()]
        assert texts and all(0 < len(t.encode()) <= 120 for t in texts)
    # The licence sentence shared by every prose file survives once, in the first file (sorted order) only.
    prose_text = "".join(json.loads(line)["text"] for name in ("prose_train", "prose_heldout")
                         for line in (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines())
    assert prose_text.count("Permission is hereby granted") == 1
    for part in ("prose/docs", "prose/logs", "code"):
        files = first["domains"][part]["files"]
        assert files["train"] > 0 and files["heldout"] > 0 and files["train"] + files["heldout"] == 30


def test_cpu_smoke_runs_the_pipeline_and_interpolation_starts_at_the_base_model(tmp_path, capsys):
    data_mod, natural, report = forgetting_module("natural_data"), forgetting_module("natural"), forgetting_module("natural_report")
    prose, logs, code = _sources(tmp_path / "src")
    data_mod.prepare(tmp_path / "data", chunk=200, heldout_share=0.3, prose_globs=(prose,), log_globs=(logs,),
                     code_globs=(code,))
    out = tmp_path / "out"
    args = ["--cpu-smoke", "--data", str(tmp_path / "data"), "--out", str(out)]
    assert natural.main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    interp = [natural.interp_name(a) for a in natural.INTERP_ALPHAS]
    assert sorted(r["arm"] for r in rows) == sorted([*natural.SMOKE_ARMS, *interp])
    for r in rows:
        assert math.isfinite(r["target_loss"]) and math.isfinite(r["retain_loss"])
    by = {r["arm"]: r for r in rows}
    base = json.loads((out / "base.json").read_text())
    # alpha 0 switches the adapter off: exactly the pretrained model's losses
    zero = by[natural.interp_name(0.0)]
    assert zero["target_loss"] == pytest.approx(base["target_loss"], abs=1e-6)
    assert zero["retain_loss"] == pytest.approx(base["retain_loss"], abs=1e-6)
    # alpha 1 evaluated here equals the library's own end-of-run evaluation of the same adapter
    flat = by[natural.INTERP_ARM]
    assert flat["check_alpha1"]["target_loss"] == pytest.approx(flat["target_loss"], rel=1e-6)
    assert flat["check_alpha1"]["retain_loss"] == pytest.approx(flat["retain_loss"], rel=1e-6)
    # the tuned model moved off the base point
    assert flat["target_loss"] != pytest.approx(base["target_loss"], abs=1e-6)
    # a rerun does only what is missing: nothing
    assert natural.main(args) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)

    doc = tmp_path / "science.md"
    doc.write_text(f"before\n{report.MARK_START}\nold\n{report.MARK_END}\nafter\n")
    pytest.importorskip("matplotlib")
    assert report.main([str(out), "--figure", str(tmp_path / "front.png"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert f"| {natural.SMOKE_ARMS[1]} |" in text and (tmp_path / "front.png").stat().st_size > 10_000
    capsys.readouterr()
