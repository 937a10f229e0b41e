"""``train --sweep``: every combination of some fields' values, trained in turn in one process. The grid and its
run directories, bad axes refused before any run starts, a failed run recorded while the sweep goes on, a stop
ending it, and a run inside a sweep training exactly what it trains alone."""

from __future__ import annotations

import json

import pytest

from conftest import write_data
from nested_learning.config import ConfigError
from nested_learning.train.state import TrainerState
from nested_learning.train.sweep import expand_sweep, run_sweep, sweep_table


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _micro_args(data, out) -> list[str]:
    return ["model.name_or_path=embedded:micro-llama", "model.device=cpu", f"data.dir={data}", "data.max_length=64",
            "schedule.steps=6", "schedule.warmup_steps=1", "eval.every=3", "output.tensorboard=false", "lora.r=4",
            "optim.batch_size=4", f"output.dir={out}"]


def test_the_grid_its_names_and_directories(tmp_path):
    runs = expand_sweep(None, [f"output.dir={tmp_path}"],
                        ["optim.lr=[1.0e-4, 3.0e-4]", "tiers.periods=[[1], [1, 4, 16]]"])
    assert [r.name for r in runs] == ["lr=0.0001_periods=1", "lr=0.0001_periods=1-4-16",
                                      "lr=0.0003_periods=1", "lr=0.0003_periods=1-4-16"]  # the first axis slowest
    assert runs[1].overrides == ["optim.lr=0.0001", "tiers.periods=[1, 4, 16]"]
    assert runs[1].config.optim.lr == 1e-4 and runs[1].config.tiers.periods == [1, 4, 16]
    assert runs[3].config.output.dir == str(tmp_path / "lr=0.0003_periods=1-4-16")
    assert all(r.status == "pending" for r in runs)
    one = expand_sweep(None, [], ["model.name_or_path=[embedded:micro-llama]"])
    assert [r.name for r in one] == ["name_or_path=embedded-micro-llama"]
    # Strings YAML would read as something else go through quoted: each run gets exactly the listed value.
    odd = expand_sweep(None, [], ['model.revision=["a: b", "true", "[1]", main]'])
    assert [r.config.model.revision for r in odd] == ["a: b", "true", "[1]", "main"]
    assert [r.overrides[0] for r in odd] == ['model.revision="a: b"', 'model.revision="true"',
                                             'model.revision="[1]"', "model.revision=main"]


@pytest.mark.parametrize("axes, message", [
    (["optim.lr"], r"--sweep 'optim.lr': expected KEY=\[VALUE, ...\]"),
    (["optim.lr=1e-4"], r"--sweep optim.lr: expected a list of values in brackets"),
    (["optim.lr=[]"], r"--sweep optim.lr: expected a list"),
    (["optim.lr=[1.0e-4]", "optim.lr=[2.0e-4]"], r"--sweep: optim.lr given more than once"),
    (["output.dir=[a, b]"], r"--sweep output.dir: each run's directory is named after its values"),
    (["optim.lr=[1.0e-4, -1]"], r"(?s)--sweep combination optim.lr=-1: .*optim.lr: Input should be greater"),
    (["data.dir=[a/b, a-b]"], r"two combinations would share a run directory: dir=a-b"),
])
def test_bad_axes_are_refused_before_any_run(tmp_path, axes, message):
    with pytest.raises(ConfigError, match=message):
        expand_sweep(None, [f"output.dir={tmp_path}"], axes)
    assert not any(tmp_path.iterdir())


def test_a_failed_run_is_recorded_and_the_sweep_goes_on_a_stop_ends_it(tmp_path):
    import threading

    runs = expand_sweep(None, [f"output.dir={tmp_path}"], ["optim.lr=[0.1, 0.2, 0.3, 0.4]"])
    stop = threading.Event()
    seen = []

    def train(cfg, callbacks, stop_event, resume):
        seen.append((cfg.optim.lr, resume))
        if cfg.optim.lr == 0.2:
            raise RuntimeError("loss is not finite")
        state = TrainerState(status="completed", step=5, val_loss=cfg.optim.lr)
        for cb in callbacks:
            cb.on_step(state)
        if cfg.optim.lr == 0.3:
            stop.set()
            state.status = "stopped"
        return state

    ended = []
    run_sweep(runs, stop_event=stop, resume="auto", train=train, on_run_end=ended.append)
    assert seen == [(0.1, "auto"), (0.2, "auto"), (0.3, "auto")]  # the stop during the third ends the sweep
    assert [r.status for r in runs] == ["completed", "failed", "stopped", "pending"]
    assert runs[1].error == "RuntimeError: loss is not finite" and runs[1].to_first_step_s is None
    assert runs[0].val_loss == 0.1 and runs[0].step == 5 and runs[0].to_first_step_s >= 0
    assert ended == runs[:3]
    table = sweep_table(runs).splitlines()
    assert table[0].startswith("| run | status |") and len(table) == 6
    assert table[3].startswith("| lr=0.2 | failed | 0 | - |") and table[5].startswith("| lr=0.4 | pending |")


def test_a_run_in_a_sweep_trains_what_it_trains_alone(tmp_path, capsys):
    """The second run of a CLI sweep (after another in the same process) writes the same losses as that config
    trained alone; sweep.json and the table report every run."""
    from nested_learning.cli import main

    data = write_data(tmp_path / "data")
    alone = ["train", "--quiet", "--set", "optim.lr=3.0e-3"]
    for item in _micro_args(data, tmp_path / "alone"):
        alone += ["--set", item]
    assert main(alone) == 0
    capsys.readouterr()
    out = tmp_path / "sweep"
    argv = ["train", "--quiet", "--sweep", "optim.lr=[1.0e-2, 3.0e-3]"]
    for item in _micro_args(data, out):
        argv += ["--set", item]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    reports = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["name"] for r in reports] == ["lr=0.01", "lr=0.003"]
    assert all(r["status"] == "completed" and r["step"] == 6 for r in reports)
    assert any(line.startswith("| lr=0.003 | completed | 6 |") for line in lines)
    swept = [(r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(out / "lr=0.003") if "step" in r]
    ref = [(r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(tmp_path / "alone") if "step" in r]
    assert swept == ref and len(swept) >= 6
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["lr=0.01", "lr=0.003"]
    assert summary["runs"][1]["best_val_loss"] == reports[1]["best_val_loss"]
    assert main([*argv, "--nproc", "2"]) == 2
    assert "--sweep runs in this process; --nproc (torchrun) cannot take it" in capsys.readouterr().err
    assert main([*argv, "--resume", str(out / "lr=0.01" / "checkpoints" / "last")]) == 2
    assert "every run resumes from its own directory; use --resume auto" in capsys.readouterr().err


def test_a_stopped_sweep_resumes_where_it_stopped(tmp_path):
    """A stop at step 3 of the first run leaves it ``stopped`` and the second ``pending``; the same sweep again
    with ``resume="auto"`` finishes the first from its checkpoint (its losses as a run never stopped: the trainer
    resumes bit-exact) and trains the second."""
    import threading

    from conftest import Recorder

    data = write_data(tmp_path / "data")
    args = _micro_args(data, tmp_path / "sweep")
    axes = ["optim.lr=[1.0e-2, 3.0e-3]"]
    stop = threading.Event()
    runs = run_sweep(expand_sweep(None, args, axes), [Recorder(stop_at=3, stop_event=stop)], stop)
    assert [(r.status, r.step) for r in runs] == [("stopped", 3), ("pending", 0)]
    again = run_sweep(expand_sweep(None, args, axes), resume="auto")
    assert [(r.status, r.step) for r in again] == [("completed", 6), ("completed", 6)]
    straight = run_sweep(expand_sweep(None, _micro_args(data, tmp_path / "straight"), ["optim.lr=[1.0e-2]"]))
    assert again[0].val_loss == straight[0].val_loss and again[0].best_val_loss == straight[0].best_val_loss


def test_a_finished_run_s_model_is_let_go_before_the_next(tmp_path):
    """Nothing keeps a finished run's model alive (callbacks, logging, caches): on a GPU its memory is free for the
    next run of the sweep."""
    import gc
    import weakref

    from nested_learning.train.loop import train_loop
    from nested_learning.train.setup import build_run

    data = write_data(tmp_path / "data")
    models = []

    def train(cfg, callbacks, stop_event, resume):
        run = build_run(cfg, resume)
        models.append(weakref.ref(run.model))
        return train_loop(run, callbacks, stop_event)

    def check(run):
        gc.collect()
        assert all(ref() is None for ref in models), f"a model outlived its run ({run.name})"

    runs = expand_sweep(None, _micro_args(data, tmp_path / "sweep"), ["optim.lr=[1.0e-2, 3.0e-3]"])
    run_sweep(runs, train=train, on_run_end=check)
    assert len(models) == 2 and [r.status for r in runs] == ["completed", "completed"]
