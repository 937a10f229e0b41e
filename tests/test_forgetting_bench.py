"""The synthetic sequential benchmark (experiments/forgetting) in a reduced form: plumbing, not results."""

from __future__ import annotations

import json

import pytest

from conftest import forgetting_module


def test_reduced_benchmark_runs_every_kind_of_arm_and_reports(tmp_path, capsys):
    bench, report = forgetting_module("bench"), forgetting_module("report")
    arms = ["flat lr=0.01", "interp a=0.5 lr=0.01", "tiers mean [1,4,16] lr=0.003"]
    args = ["--out", str(tmp_path / "out"), "--seeds", "0", "1", "--steps", "3", "--pretrain-steps", "4",
            "--facts", "6", "--arms", *arms]
    assert bench.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for a in arms for s in (0, 1))
    for r in rows:
        assert len(r["matrix"]) == 3 and all(set(m) == {"A", "B", "C"} for m in r["matrix"])
        assert r["learning"] == pytest.approx((r["matrix"][1]["B"] + r["matrix"][2]["C"]) / 2)
        assert r["retain_A"] == r["matrix"][2]["A"] and r["retain_loss_A"] == r["loss_matrix"][2]["A"]
        # each LoRA stage went through the library with the earlier tasks as retain sets
        assert [set(s["retain"]) for s in r["stages"]] == [{"A"}, {"A", "B"}]
    # The interpolated arm's adapter was scaled: it differs from the flat arm it shares a learning rate with.
    by = {(r["arm"], r["seed"]): r for r in rows}
    assert by[("interp a=0.5 lr=0.01", 0)]["loss_matrix"][1] != by[("flat lr=0.01", 0)]["loss_matrix"][1]
    # A rerun skips what is done.
    assert bench.main(args) == 0
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == len(rows)
    capsys.readouterr()

    doc = tmp_path / "science.md"
    doc.write_text(f"before\n{report.MARK_START}\nold\n{report.MARK_END}\nafter\n")
    pytest.importorskip("matplotlib")
    assert report.main([str(tmp_path / "out"), "--figure", str(tmp_path / "front.png"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| tiers mean [1,4,16] lr=0.003 |" in text and (tmp_path / "front.png").stat().st_size > 10_000


def test_front_value_interpolates_between_pareto_points():
    report = forgetting_module("report")
    pts = [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (0.2, 0.1)]  # the last point is dominated
    assert report.front_value(pts, 0.25) == pytest.approx(0.75)
    assert report.front_value(pts, -1.0) == 1.0 and report.front_value(pts, 2.0) == 0.0
    assert report.mean_ci([1.0, 2.0, 3.0]) == pytest.approx((2.0, 4.303 * 1.0 / 3 ** 0.5))
