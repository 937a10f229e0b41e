"""Checkpoints: a PEFT-format adapter plus everything an exact resume needs, written atomically.

Layout (``<run>/checkpoints/<name>/``, name = ``step-000100``, ``best`` or ``last``)::

    adapter_model.safetensors, adapter_config.json   loadable by peft.PeftModel.from_pretrained
    trainer_state.pt                                 optimizer (with tier state), scheduler, RNG, data position
    config.yaml                                      the run's TrainConfig (names the base model)
    tokenizer files                                  so generate / merge work from the checkpoint alone
    manifest.json                                    size and sha256 of every other file; written last

A checkpoint is written into a temporary sibling directory and renamed into place. Replacing ``best`` or
``last`` renames the old one away first and deletes it only after the new one is in place, so a crash at
any moment leaves a complete checkpoint behind (``find_latest`` recovers one that was renamed away).

The manifest catches what the rename cannot: a file damaged after it was written (a truncated copy, flipped
bits, a disk that lost unsynced data). ``find_latest`` verifies checkpoints newest first, skips damaged ones
with a warning that names them and falls back to the newest intact one; when every checkpoint is damaged it
raises rather than start over. Checkpoints written before manifests existed are accepted when their files load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nested_learning.train.state import CheckpointError

__all__ = [
    "CheckpointError",
    "adapter_is_finite",
    "capture_rng",
    "find_latest",
    "list_checkpoints",
    "load_adapter_weights",
    "load_trainer_state",
    "restore_rng",
    "save_checkpoint",
    "verify_checkpoint",
    "prune_step_checkpoints",
    "resolve_resume",
    "write_atomic",
    "write_json",
]

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
ADAPTER_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
_OLD_PREFIX = ".old-"
_TMP_PREFIX = ".tmp-"

log = logging.getLogger("nested_learning.train")




def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``: readers see the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- RNG state
def capture_rng() -> dict[str, Any]:
    """Every RNG the run draws from; numpy's state is stored as plain lists so ``weights_only`` loading works."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- writing
def adapter_is_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def non_finite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Paths of the floating-point tensors in a nested dict / list that hold NaN or Inf, e.g.
    ``optimizer.state.3.exp_avg``: a checkpoint must not carry a diverged optimizer state forward. (Reported
    numbers such as the last loss are plain floats and may legitimately be NaN; they are not checked.)"""
    if isinstance(obj, torch.Tensor):
        bad = (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all())
        return [prefix] if bad else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found: list[str] = []
    for key, value in items:
        found += non_finite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def _sha256(path: Path, sync: bool = True) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())  # the data is on disk before the manifest vouches for it
    return h.hexdigest()


def write_manifest(path: Path, step: int, val_loss: float | None, required: list[str] | None = None) -> None:
    """Size and sha256 of every file of checkpoint ``path``, plus what listings show without reading the rest.
    ``required``: the files a resume cannot do without (default: the torch layout's; the MLX backend names its own)."""
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.iterdir()) if f.is_file() and f.name != MANIFEST_FILE}
    manifest = {"format": 1, "step": step, "val_loss": val_loss, "files": files}
    if required is not None:
        manifest["required"] = list(required)
    write_json(path / MANIFEST_FILE, manifest)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is renamed away first and deleted last."""
    old = None
    if final.exists():
        old = final.with_name(f"{_OLD_PREFIX}{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        _remove_dir(old)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (not possible on every platform or file system)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    """Rename ``path`` to a hidden name, then delete it: a kill in the middle never leaves a half-deleted
    directory under a name that looks like a checkpoint."""
    doomed = path.with_name(f"{_TMP_PREFIX}del-{path.name}-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete what killed writes left in ``checkpoints/``: hidden ``.tmp-`` directories (never complete
    checkpoints) and renamed-away ``.old-`` copies whose checkpoint is back in place."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    doomed = [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX)]
    doomed += [p for p in root.glob(f"{_OLD_PREFIX}*") if (root / _old_name(p)).is_dir()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return doomed


def _old_name(path: Path) -> str:
    """``.old-last-1234`` -> ``last``."""
    return path.name[len(_OLD_PREFIX):].rsplit("-", 1)[0]


def save_checkpoint(
    output_dir: str | Path, name: str, model, tokenizer, config, trainer_state: dict[str, Any]
) -> Path:
    """Write checkpoint ``name`` atomically, its manifest last; refuses non-finite adapter weights or resume
    state (optimizer moments, accumulators): nothing is written then."""
    if not adapter_is_finite(model):
        raise CheckpointError(f"refusing to write checkpoint {name!r}: adapter weights contain NaN/Inf")
    if bad := non_finite_entries(trainer_state):
        raise CheckpointError(f"refusing to write checkpoint {name!r}: resume state holds NaN/Inf "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        model.save_pretrained(tmp, save_embedding_layers=False)
        readme = tmp / "README.md"  # PEFT's model-card stub says nothing about this run
        if readme.exists():
            readme.unlink()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config.to_yaml())
        if getattr(getattr(config, "checkpoint", None), "mlx_copy", False):
            from nested_learning.inference.convert import write_mlx_beside

            write_mlx_beside(tmp, getattr(getattr(model, "config", None), "num_hidden_layers", None),
                             config.model.name_or_path)
        reported = trainer_state.get("trainer_state") or {}
        write_manifest(tmp, int(trainer_state.get("step", 0)), reported.get("val_loss"))
        _replace_dir(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / name


def prune_step_checkpoints(output_dir: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest ``keep_last_n`` ``step-N`` checkpoints; returns what was deleted."""
    steps = sorted(
        (int(m.group(1)), p) for p in checkpoints_dir(output_dir).glob("step-*") if (m := _STEP_RE.match(p.name))
    )
    doomed = [p for _, p in steps[: max(0, len(steps) - keep_last_n)]]
    for p in doomed:
        _remove_dir(p)
    return doomed


# ------------------------------------------------------------------------------------------------- reading
def load_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no {STATE_FILE})")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"{f}: cannot read resume state ({exc})") from None


def load_adapter_weights(model, path: str | Path) -> None:
    """Load a checkpoint's adapter tensors into an already LoRA-wrapped model (exact, no re-init)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{path}: no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(str(f)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise CheckpointError(f"{path}: adapter does not match the model (unexpected keys, e.g. {unexpected[0]})")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest, ``None`` when it has none (written before manifests existed)."""
    f = path / MANIFEST_FILE
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{f}: unreadable manifest ({exc})") from None
    return manifest


def verify_checkpoint(path: str | Path) -> None:
    """Raise ``CheckpointError`` naming the damaged file when checkpoint ``path`` is not intact.

    With a manifest: every listed file exists with its recorded size and sha256. Without one (older
    checkpoints): the resume state and the adapter load and hold no NaN/Inf (versions before the manifest could
    write a diverged optimizer state).
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        if bad := non_finite_entries(load_trainer_state(path)) + _check_adapter_loads(path):
            raise CheckpointError(f"{path}: holds NaN/Inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        return
    files = manifest["files"]
    for required in manifest.get("required") or (STATE_FILE, ADAPTER_FILE):
        if required not in files:
            raise CheckpointError(f"{path / MANIFEST_FILE}: does not list {required}")
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST_FILE})")
        size = f.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{f}: {size} bytes where {MANIFEST_FILE} records {entry.get('size')} "
                                  "(truncated or replaced)")
        if _sha256(f, sync=False) != entry.get("sha256"):
            raise CheckpointError(f"{f}: sha256 differs from {MANIFEST_FILE} (the file changed after it was written)")


def _check_adapter_loads(path: Path) -> list[str]:
    """The adapter's tensors that hold NaN/Inf; raises when the file does not load."""
    from safetensors.torch import load_file

    f = path / ADAPTER_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_FILE}")
    try:
        tensors = load_file(str(f))
    except Exception as exc:
        raise CheckpointError(f"{f}: unreadable adapter ({' '.join(str(exc).split())})") from None
    return [f"{ADAPTER_FILE}:{name}" for name in non_finite_entries(tensors)]


def _summary(path: Path) -> dict[str, Any] | None:
    """``{name, step, path, val_loss}`` from the manifest (or, for older checkpoints, the resume state);
    ``None`` when neither can be read."""
    try:
        manifest = _read_manifest(path)
    except CheckpointError:
        manifest = None
    if manifest is not None and isinstance(manifest.get("step"), int):
        return {"name": path.name, "step": manifest["step"], "path": str(path), "val_loss": manifest.get("val_loss")}
    if not (path / STATE_FILE).is_file():
        return None
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception:
        return None
    ts = state.get("trainer_state", {})
    return {"name": path.name, "step": int(state["step"]), "path": str(path), "val_loss": ts.get("val_loss")}


def list_checkpoints(output_dir: str | Path) -> list[dict[str, Any]]:
    """Checkpoints of a run: ``[{name, step, path, val_loss}]`` sorted by step (best/last included). Listing
    reads manifests only; ``verify_checkpoint`` tells whether one is intact."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [s for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") if (s := _summary(p))]
    return sorted(found, key=lambda s: (s["step"], s["name"]))


def _candidates(root: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every checkpoint a resume could start from: (summaries, directories whose step cannot be read).
    A ``.old-`` copy counts only while its checkpoint is missing (a crash in the middle of a replace)."""
    known, unknown = [], []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith(_OLD_PREFIX):
            if (root / _old_name(p)).exists():
                continue
        elif p.name.startswith("."):
            continue
        if (s := _summary(p)) is not None:
            known.append(s)
        elif m := _STEP_RE.match(p.name):
            known.append({"name": p.name, "step": int(m.group(1)), "path": str(p), "val_loss": None})
        elif p.name in ("best", "last") or any((p / f).exists() for f in (STATE_FILE, ADAPTER_FILE, MANIFEST_FILE)):
            unknown.append(p)
    return known, unknown


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint (highest step, ``last`` preferred on ties), ``None`` when the run has none.

    Damaged checkpoints are skipped with a warning naming them; when checkpoints exist but none is intact,
    ``CheckpointError`` (a resume must never silently start over). Recovers a checkpoint renamed away by a
    crash in the middle of a replace.
    """
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    known, unknown = _candidates(root)
    damaged = [f"{p}: resume state unreadable and no manifest" for p in unknown]
    for reason in damaged:
        log.warning("skipping damaged checkpoint %s", reason)
    rank = {"last": 2, "best": 0}

    def order(s: dict[str, Any]) -> tuple[int, int]:
        name = Path(s["path"]).name
        return s["step"], rank.get(_old_name(Path(name)) if name.startswith(_OLD_PREFIX) else name, 1)

    for s in sorted(known, key=order, reverse=True):
        try:
            verify_checkpoint(s["path"])
        except CheckpointError as exc:
            damaged.append(str(exc))
            log.warning("skipping damaged checkpoint %s: %s", s["path"], exc)
            continue
        if damaged:
            log.warning("resuming from %s, the newest intact checkpoint", s["path"])
        return Path(s["path"])
    if damaged:
        raise CheckpointError(
            f"{root}: no intact checkpoint to resume from ({'; '.join(damaged)}); nothing was changed. Move the "
            "damaged checkpoints away to start this run over, or resume from a copy of a good checkpoint"
        )
    return None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``None`` → fresh; ``auto`` → the newest intact checkpoint in the run dir (``None`` when the run has
    none); else a checkpoint dir (verified: a damaged one is an error) or a run dir (its newest intact one)."""
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(output_dir)
    p = Path(resume).expanduser()
    if (p / STATE_FILE).is_file() or (p / MANIFEST_FILE).is_file():
        verify_checkpoint(p)
        return p
    if checkpoints_dir(p).is_dir() and (latest := find_latest(p)) is not None:
        return latest
    raise CheckpointError(f"--resume: {resume} is neither a checkpoint directory nor a run with checkpoints")
