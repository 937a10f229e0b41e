"""``nested-learning import-run OLD_DIR``: a run of the old desktop app becomes one of ours, listed by the service.

An old run folder (``<output_path>/<experiment_name>/``) holds ``config.json`` (the page's start request),
``metrics/train_metrics.jsonl`` (one row per micro-step: ``step`` from 0, ``loss``, ``step_time``,
``learning_rate``, ``tier_stats``), ``metrics/eval_metrics.jsonl`` (``step``, ``loss``) and
``checkpoints/{best,final,checkpoint_NNNNNNN}/adapters.safetensors`` (mlx-lm adapters). The import writes

- ``config.yaml``: the request mapped as ``POST /nested-learning/start`` maps it (compat_request.py);
- ``metrics.jsonl``: the rows in our format, steps counted from 1 (a row's step is the number of micro-steps
  done, as the old status reported it; the old run's steps are kept, not divided by its accumulation);
- ``checkpoints/{best,last,step-NNNNNN}/``: PEFT adapters converted from the old ones, each with the run's
  ``config.yaml`` naming the base model, when ``--base`` names it (``generate``/``eval``/``merge`` take them);
- ``imported_from.json``: where it came from and what was mapped;

and records the run in the service's job store as an ended job with its metric rows, so the dashboard lists it
with its loss curve.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from nested_learning.config import ConfigError, TrainConfig
from nested_learning.train.checkpoint import CONFIG_FILE, step_name, write_atomic, write_json

__all__ = ["import_run", "read_jsonl"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad line is an error naming ``file:line``. A missing file has no rows."""
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or \
                not isinstance(row.get("loss"), (int, float)):
            raise ConfigError(f"{path}:{n}: expected an object with an integer step and a numeric loss")
        rows.append(row)
    return rows


def _old_config(old: Path) -> dict[str, Any]:
    from nested_learning.inference.convert import read_json_object

    return read_json_object(old / "config.json", "an old run folder holds config.json and metrics/", ConfigError)


def _train_config(old: Path, raw: dict[str, Any], base: str | None, out: Path) -> tuple[TrainConfig, list[str]]:
    from pydantic import ValidationError

    from nested_learning.service.compat_request import OldStartRequest, to_train_config
    from nested_learning.service.jobs import JobError

    try:
        req = OldStartRequest.model_validate({**raw, **({"base_model_path": base} if base else {})})
        data, notes = to_train_config(req)
    except (ValidationError, JobError) as exc:
        raise ConfigError(f"{old / 'config.json'}: {exc}") from None
    if req.adapter_path:
        data["lora"]["init_adapter"] = req.adapter_path  # what the old run started from
    data["output"] = {"dir": str(out), "tensorboard": False}
    return TrainConfig.model_validate(data), notes


def _checkpoint_name(old_name: str) -> str | None:
    if old_name == "best":
        return "best"
    if old_name == "final":
        return "last"
    if old_name.startswith("checkpoint_") and old_name.removeprefix("checkpoint_").isdigit():
        return step_name(int(old_name.removeprefix("checkpoint_")))
    return None


def _convert_checkpoints(old: Path, out: Path, cfg: TrainConfig, base: str | None) -> tuple[list[str], list[str]]:
    from nested_learning.inference.convert import read_adapter, write_peft

    found = sorted(d for d in (old / "checkpoints").glob("*") if (d / "adapters.safetensors").is_file())
    if not found:
        return [], []
    if base is None:
        return [], [f"{len(found)} old adapter(s) not converted: pass --base MODEL to convert them"]
    written = []
    for d in found:
        name = _checkpoint_name(d.name)
        if name is None:
            continue
        adapter = read_adapter(d)
        dst = write_peft(adapter, out / "checkpoints" / name, base=base, overwrite=True)
        # The run's config naming the base model (for generate / eval / merge), with the adapter's own rank and
        # alpha: mlx-lm applied its lora_parameters.scale, whatever lora_alpha the old request held.
        data = json.loads(cfg.model_dump_json())
        data["lora"].update(r=adapter.r, alpha=adapter.alpha, target_modules=adapter.leaf_names())
        write_atomic(dst / CONFIG_FILE, TrainConfig.model_validate(data).to_yaml())
        written.append(name)
    return written, []


def _rows(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our metrics.jsonl rows: train rows, each followed by the evaluation made after that step."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in evals:
        by_step[r["step"] + 1] = {"step": r["step"] + 1, "val_loss": float(r["loss"])}
    out = []
    for r in train:
        tiers = r.get("tier_stats") or {}
        row = {"step": r["step"] + 1, "loss": float(r["loss"]), "lr": r.get("learning_rate"),
               "step_time": r.get("step_time"), "tier_updates": tiers.get("tier_update_counts")}
        out.append(row)
        if row["step"] in by_step:
            out.append(by_step.pop(row["step"]))
    out += [by_step[s] for s in sorted(by_step)]  # evaluations with no train row (a truncated file)
    return out


def _state(rows: list[dict[str, Any]], train: list[dict[str, Any]], cfg: TrainConfig, total: int, status: str,
           out: Path) -> dict[str, Any]:
    train_rows = [r for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    last = train[-1] if train else {}
    tiers = (last.get("tier_stats") or {}).get("tier_parameters") or {}
    periods = cfg.tiers.periods
    stats = []
    for i, p in enumerate(periods):
        t = tiers.get(f"tier_{i}") or {}
        stats.append({"name": f"tier{i}", "period": t.get("frequency", p), "updates": t.get("update_count", 0),
                      "num_params": t.get("parameter_count"), "lr_scale": 1.0})
    return {"status": status, "step": train_rows[-1]["step"] if train_rows else 0, "total_steps": total,
            "train_loss": train_rows[-1]["loss"] if train_rows else None, "val_loss": vals[-1] if vals else None,
            "best_val_loss": min(vals) if vals else None, "lr": train_rows[-1]["lr"] if train_rows else 0.0,
            "tier_stats": stats, "output_dir": str(out)}


def import_run(old_dir: str | Path, *, out: str | Path | None = None, base: str | None = None,
               workdir: str | Path = "outputs/service", db: str | None = None, overwrite: bool = False
               ) -> dict[str, Any]:
    """Import one old run folder; returns what was written (run directory, job id, rows, checkpoints)."""
    from nested_learning.service.store import open_store

    old = Path(old_dir).expanduser().resolve()
    if not old.is_dir():
        raise ConfigError(f"{old}: not a directory (give an old run folder, e.g. nested_learning/checkpoints/NAME)")
    raw = _old_config(old)
    name = str(raw.get("experiment_name") or old.name)
    workdir = Path(workdir).expanduser().resolve()
    out = Path(out).expanduser().resolve() if out else workdir / "imported" / old.name
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: already exists and is not empty (pass --overwrite to import again)")
    cfg, notes = _train_config(old, raw, base, out)
    train = read_jsonl(old / "metrics" / "train_metrics.jsonl")
    evals = read_jsonl(old / "metrics" / "eval_metrics.jsonl")
    if not train and not evals:
        raise ConfigError(f"{old / 'metrics'}: no train_metrics.jsonl or eval_metrics.jsonl rows to import")
    rows = _rows(train, evals)
    total = int(raw.get("num_steps") or cfg.schedule.steps)
    finished = (old / "checkpoints" / "final").is_dir() or (train and train[-1]["step"] + 1 >= total)
    status = "completed" if finished else "stopped"

    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_atomic(out / CONFIG_FILE, cfg.to_yaml())
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    checkpoints, more = _convert_checkpoints(old, out, cfg, base)
    notes += more
    write_json(out / "imported_from.json", {"source": str(old), "experiment_name": name, "notes": notes})

    # The job record: ended, with the rows the dashboard charts (timed by the old step_time where given).
    store = open_store(db or workdir / "jobs.db")
    for job in store.list_jobs():
        if overwrite and Path(job["output_dir"]) == out and job["status"] != "running":
            store.delete_job(job["id"])
    created = (old / "config.json").stat().st_mtime
    t, timed = created, []
    for r in rows:
        if "loss" in r:
            t += float(r.get("step_time") or 0.0)
            timed.append((r["step"], "train", {"train_loss": r["loss"], "lr": r["lr"],
                                               "tier_updates": r["tier_updates"]}, t))
        else:
            timed.append((r["step"], "eval", {"val_loss": r["val_loss"]}, t))
    job_id = store.add_finished_job(cfg.model_dump_json(), str(out), name, status,
                                    _state(rows, train, cfg, total, status, out), timed, created_at=created,
                                    ended_at=max(t, created) if rows else time.time(), owned=[str(out)])
    return {"job_id": job_id, "run_dir": str(out), "name": name, "status": status,
            "train_rows": len(train), "eval_rows": len(evals), "checkpoints": checkpoints, "notes": notes,
            "store": str(store.path)}
