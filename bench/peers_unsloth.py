"""The Unsloth variants of ``bench/peers.py``: ``peer_unsloth`` (``use_gradient_checkpointing=False``) and
``peer_unsloth_gc`` (``"unsloth"``, its recommended setting, which keeps checkpointed layer inputs in host memory).

Unsloth loads models only through ``FastLanguageModel.from_pretrained``, so the random model every variant trains
is saved to a temporary folder (with a small word-level tokenizer, which no step reads) and loaded from there in
bf16, 16-bit LoRA (``load_in_4bit=False``). Its LoRA tensors are then overwritten with the ones PEFT draws for the
other variants (``peers_setup.lora``), so all variants start from the same adapter and their losses can be compared
step by step. Peak memory is counted from the loaded model on (the save and the reference adapter are freed first).

Unsloth and its own packages are not installed with the project: ``peers.py`` runs these variants with
``PEERS_UNSLOTH_PATH`` (a folder they were installed to) and ``bench/standins`` (the ``bitsandbytes`` stand-in) on
``PYTHONPATH``, in their processes only. Unsloth must be imported before transformers and PEFT: ``import_unsloth``
does that first thing in the worker.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from peers_setup import SHAPES, TARGETS, build_base, lora

VARIANTS = ("peer_unsloth", "peer_unsloth_gc")
STANDINS = Path(__file__).resolve().parent / "standins"


def worker_env(env: dict) -> dict:
    """The environment of an Unsloth worker process: the stand-in and ``PEERS_UNSLOTH_PATH`` ahead of ``PYTHONPATH``,
    no statistics download, no hub access, Unsloth's compile cache outside the repository."""
    path = [str(STANDINS)] + [p for p in env.get("PEERS_UNSLOTH_PATH", "").split(os.pathsep) if p]
    path += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(env, PYTHONPATH=os.pathsep.join(path), UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1",
                UNSLOTH_COMPILE_LOCATION=os.path.join(tempfile.gettempdir(), "peers-unsloth-cache"))


def unavailable() -> str | None:
    """Why the Unsloth variants cannot run in this process (``None`` when they can)."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not importable (install it to a folder and name it in PEERS_UNSLOTH_PATH)"
    if not torch.cuda.is_available():
        return "Unsloth trains on a GPU only"
    return None


def import_unsloth() -> None:
    """Import Unsloth before anything imports transformers or PEFT (it patches them on import)."""
    import unsloth  # noqa: F401


def save_random_model(shape: str, device, folder: str) -> dict[str, torch.Tensor]:
    """Write the benchmark's random model of ``shape`` (and a tokenizer) to ``folder``; return PEFT's initial LoRA
    tensors for it (``peers_setup.lora``'s seed), keyed by parameter name, on the CPU."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    base = build_base(shape, device)
    base.save_pretrained(folder)
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(special)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    ref = lora(base)
    adapter = {n: p.detach().cpu().clone() for n, p in ref.named_parameters() if p.requires_grad}
    del ref, base
    return adapter


def build(shape: str, device, gc: bool, seq: int | None = None):
    """Unsloth's LoRA model of ``shape``, the benchmark's weights and initial adapter; gradient checkpointing
    ``"unsloth"`` when ``gc``, else off. ``seq``: the row length trained (the shape's own when None)."""
    from unsloth import FastLanguageModel

    seq = seq or SHAPES[shape][3]
    checkpointing = "unsloth" if gc else False
    with tempfile.TemporaryDirectory(prefix="peers-unsloth-") as folder:
        adapter = save_random_model(shape, device, folder)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, _ = FastLanguageModel.from_pretrained(
            folder, max_seq_length=seq, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            load_in_4bit=False, load_in_8bit=False, use_gradient_checkpointing=checkpointing)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing=checkpointing, random_state=0, max_seq_length=seq)
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    same = set(own) == set(adapter) and all(own[n].shape == adapter[n].shape for n in own)
    if not same:
        # Still timed, but from Unsloth's own initial adapter: the loss check will show it.
        print(f"peers_unsloth: trainable tensors differ from PEFT's ({len(own)} vs {len(adapter)}, e.g. "
              f"{sorted(set(own) ^ set(adapter))[:4]}); Unsloth's own initial adapter kept", file=sys.stderr)
    else:
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(adapter[name])
    model.peers_adapter_from_peft = same  # recorded with the run
    model.train()
    return model
