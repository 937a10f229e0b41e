"""Inference from a checkpoint (adapter + the base its config names) or a plain base model."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from nested_learning.train.checkpoint import CONFIG_FILE, CheckpointError
from nested_learning.config import ModelConfig, load_config
from nested_learning.model.embedded import is_embedded
from nested_learning.model.loading import autocast_context, load_model, load_tokenizer

__all__ = ["load_for_inference", "generate_text", "encode_prompt"]


def _adapter_model_config(adapter: Path, base: str | None, device: str) -> ModelConfig:
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"--adapter: {adapter} has no adapter_config.json (not a checkpoint directory)")
    if (adapter / CONFIG_FILE).is_file():
        model_cfg = load_config(adapter / CONFIG_FILE).model
    elif base is None:
        raise CheckpointError(f"--adapter: {adapter} has no {CONFIG_FILE}; name the base model with --model")
    else:
        model_cfg = ModelConfig(name_or_path=base)
    update: dict[str, Any] = {"device": device, "gradient_checkpointing": False, "compile": False}
    if base is not None:
        update["name_or_path"] = base
    return model_cfg.model_copy(update=update)


def check_adapter_weights(adapter: Path) -> None:
    """The adapter file must be a readable safetensors file of finite tensors: a damaged or diverged
    checkpoint is an error naming the file (and a tensor), never a model that generates nothing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = adapter / "adapter_model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"--adapter: {adapter} has no adapter_model.safetensors (not a checkpoint directory)")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{f}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{f}: tensor {name} holds non-finite values (NaN or Inf); "
                                  "the run diverged before this checkpoint")


def load_for_inference(adapter: str | Path | None = None, base: str | None = None, device: str = "auto"):
    """(model in eval mode, tokenizer). ``adapter`` is a checkpoint dir whose ``config.yaml`` names the base
    (``base`` overrides it); without ``adapter``, ``base`` alone is loaded."""
    from peft import PeftModel

    if adapter is None and base is None:
        raise ValueError("name an adapter (--adapter DIR) or a base model (--model NAME)")
    if adapter is None:
        model_cfg = ModelConfig(name_or_path=base, device=device)
        model, tokenizer = load_model(model_cfg), load_tokenizer(model_cfg)
        return model.eval(), tokenizer
    adapter = Path(adapter).expanduser()
    if (adapter / "adapters.safetensors").is_file() and not (adapter / "adapter_model.safetensors").is_file():
        from nested_learning.inference.convert import ensure_peft

        adapter, base = ensure_peft(adapter, base)  # the old app's mlx-lm adapter, converted to PEFT on the fly
    model_cfg = _adapter_model_config(adapter, base, device)
    check_adapter_weights(adapter)
    if not is_embedded(model_cfg.name_or_path) and (adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter))  # the checkpoint's own copy
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(model_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations raised inside PEFT
        model = PeftModel.from_pretrained(load_model(model_cfg), str(adapter))
    return model.eval(), tokenizer


def encode_prompt(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids laid out as in training: ``bos + prompt`` for a plain prompt (as the completion format
    encodes it), the chat template with the assistant header for messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if messages is not None:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if len(ids) > 1 and ids[-1] == tokenizer.eos_token_id:  # some tokenizers append eos; a prompt continues
        ids = ids[:-1]
    return ids


def _stop_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(ids)


def generate_text(
    model,
    tokenizer,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    stream: bool = False,
) -> str | Iterator[str]:
    """Greedy (temperature 0) or sampled continuation; ``stream=True`` yields text pieces as they decode."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt, messages)], device=device)
    kwargs: dict[str, Any] = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=temperature > 0, pad_token_id=tokenizer.pad_token_id, eos_token_id=_stop_ids(model, tokenizer),
    )
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:  # greedy: clear sampling knobs a hub generation_config may carry, so no warning is printed
        kwargs.update(temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)

    def run(**extra):
        with torch.no_grad(), autocast_context(device):
            return model.generate(**kwargs, **extra)

    if not stream:
        out = run()
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=run, kwargs={"streamer": streamer}, daemon=True)
    worker.start()

    def pieces() -> Iterator[str]:
        yield from streamer
        worker.join()

    return pieces()
