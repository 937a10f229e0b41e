"""``bench/cold_start.py --cpu-smoke``: two launches of the CLI on a saved random-weight model, timed from the
trainer's own metrics rows; ``--scopes`` passes the compile scope to both launches (the CPU runs eager)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_cold_and_warm_runs_time_the_first_step_and_train_the_same(tmp_path):
    import cold_start

    res = cold_start.main(["--cpu-smoke", "--steps", "2", "--work", str(tmp_path / "w"), "--scopes", "layers",
                           "--json", str(tmp_path / "c.json")])
    cold, warm = res["cold"], res["warm"]
    assert "error" not in cold and "error" not in warm, res
    for run in (cold, warm):
        assert run["steps"] == 2
        # launch -> loop start -> first step done -> step 2 done -> exit, in that order
        assert 0 < run["startup_s"] < run["to_first_step_s"] <= run["to_step_2_s"] <= run["exit_s"]
        assert 0 < run["first_step_s"] < run["to_first_step_s"]
        # the trainer's own start-up phases (startup.json), in order; together less than launch to the loop
        assert list(run["build_run_s"]) == ["setup", "tokenizer", "data", "model", "speed", "optimizer",
                                           "resume"]
        assert all(v >= 0 for v in run["build_run_s"].values())
        assert 0 < sum(run["build_run_s"].values()) < run["startup_s"]
        assert run["plan"] == {"compile": "off CPU runs eager (exact float32)", "cuda_graphs": "off compile is off"}
    assert cold["first_loss"] == warm["first_loss"]  # the same model, data and seed: the same first step
    assert (tmp_path / "w" / "model-embedded-micro-llama" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [r["shape"] for r in saved["runs"]] == ["embedded:micro-llama+layers"]
    assert saved["runs"][0]["overrides"] == ["speed.compile_scope=layers"]
    assert saved["runs"][0]["warm_saves_s"] == cold["to_first_step_s"] - warm["to_first_step_s"]

