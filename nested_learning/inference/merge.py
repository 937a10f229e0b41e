"""Merge a LoRA checkpoint into its base: a plain Hugging Face model directory that needs no PEFT.

Refuses to write anything when a merged weight is NaN/Inf; the output appears only complete (temp dir + rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from nested_learning.train.checkpoint import CheckpointError

__all__ = ["merge_adapter"]


def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | None = None, device: str = "cpu",
                  overwrite: bool = False) -> Path:
    from nested_learning.inference.generate import load_for_inference

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out: {out} is a file; the merged model is a directory (choose a new path)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"--out: {out} already exists; pass --overwrite to replace it")
    for parent in out.parents:  # checked before the (slow) load: a parent that is a file can never hold it
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"--out: cannot create {out}: {parent} is a file, not a directory")
            break
    model, tokenizer = load_for_inference(adapter=adapter, base=base, device=device)
    merged = model.merge_and_unload()
    bad = [name for name, t in merged.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to merge {adapter}: non-finite values in merged weights ({', '.join(bad[:3])})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    except OSError as exc:  # read-only mount, no permission
        raise CheckpointError(f"--out: cannot create {out}: {exc.strerror or exc}") from None
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
