"""``speed.fit_memory``: turn on gradient checkpointing (and host offload) by itself when a micro-batch would not fit.

Before training on CUDA, the peak of one micro-batch is estimated from the model's shape and compared with the
device memory still free once the base is loaded:

- adapter state: 16 bytes per trainable parameter (fp32 weight, gradient and two Adam moments);
- the loss: one chunk's logits in the activation dtype, whose gradient the chunk writes in place
  (``speed.loss_chunk_tokens`` x vocabulary), or, unchunked, the whole micro-batch's logits (half precision, fp32
  and its gradient: 10 bytes each);
- activations kept for backward, per token and decoder layer: ``a * hidden + b * intermediate`` elements of the
  activation dtype, a = 1.33, b = 3.05. The two constants fit the peaks the trainer measured at its defaults on an
  H200 (``docs/benchmarks.md``: Llama-3.2-1B 8 x 2048 16.5 GiB, Llama-3.1-8B 4 x 2048 40.1 GiB) once weights,
  adapter state and the loss chunk are taken out; for Qwen2.5-0.5B 8 x 1024 they give 1.8% more than measured;
- with gradient checkpointing, each layer keeps only its input (``hidden`` elements per token), plus, while one
  layer is recomputed and back-propagated, 3.25 times that layer's activations; with
  ``speed.offload_activations`` the inputs live in host memory and the device holds two of them at most. Against
  the Llama-3.2-1B peaks measured with checkpointing (7.1 GiB) and with offload too (5.4 GiB), these come 5.5%
  below and 8% above (the factor sits between the two).

The first mode that fits in 90% of the free memory wins, starting from what the config asks: as set, then
checkpointing, then checkpointing with offload, then offload with each layer recomputed over groups of whole
rows (``speed.recompute_tokens``; the plan takes the largest group whose estimate fits: half the rows, a third, ...,
down to one row). A lever set explicitly that a mode would turn off keeps that mode
out (``speed.lora_fold: true`` rules out checkpointing; ``speed.cuda_graphs: true`` or ``speed.compile_scope:
model`` rules out offload): an explicit choice is never overridden. When none fits the plan says so, and the run goes
on with the smallest (a smaller batch or shorter rows is the user's call). An estimate, not a measurement:
``fit_memory: false`` keeps the settings as given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["MODES", "ROWS_TOKENS", "MemoryEstimate", "choose_for_config", "choose_memory_mode", "device_free_bytes",
           "estimate_memory", "row_group_sizes"]

PER_HIDDEN, PER_INTERMEDIATE = 1.33, 3.05  # activation elements per token and layer (fitted, see above)
RECOMPUTE = 3.25  # one checkpointed layer's recompute and backward, in multiples of its activations (fitted)
# Share of the free device memory a mode may plan to use. On the H200 (docs/benchmarks.md) Llama-3.2-1B x 2048
# fitted 69 rows (estimated at 87% of the free memory) and failed at 73 (92%); Qwen2.5-0.5B x 1024 fitted 182 rows
# (97%) and failed at 201. 0.9 separates the Llama pair and switches Qwen from about 170 rows on: safe, not tight.
HEADROOM = 0.9
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one micro-batch needs on the device beyond the loaded base, per mode."""

    as_set: float
    checkpointing: float
    offload: float
    rows: float  # offload, each layer recomputed over groups of rows of ``rows_tokens`` tokens
    rows_tokens: int = 0  # the "rows" mode's group: tokens a layer recomputes at once (whole rows)

    def of(self, mode: str) -> float:
        return {"as set": self.as_set, "checkpointing": self.checkpointing, "offload": self.offload,
                "rows": self.rows}[mode]


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now (CUDA), or None where it cannot be asked."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def estimate_memory(model, tokens: int, *, chunk_tokens: int, checkpointing: bool, offload: bool,
                    recompute_share: float = 1.0, rows_share: float = 1.0) -> MemoryEstimate:
    """The estimate for ``model`` (PEFT-wrapped) at ``tokens`` tokens per micro-batch (rows x row length).
    ``checkpointing`` / ``offload``: what the config already turns on (a mode never goes below it).
    ``recompute_share``: the share of the rows an offloaded layer recomputes at once (``speed.recompute_tokens``);
    ``rows_share``: that share in the "rows" mode (groups of ``ROWS_TOKENS``)."""
    from nested_learning.model.loading import unwrap_model

    config = unwrap_model(model).config
    text = getattr(config, "text_config", None) or config
    hidden = int(text.hidden_size)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    layers = int(text.num_hidden_layers)
    vocab = int(text.vocab_size)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    act = max(2, frozen[0].element_size()) if frozen else 4  # half-precision bases run under autocast
    adapter = 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    loss = chunk_tokens * vocab * act if chunk_tokens > 0 else tokens * vocab * 10
    per_layer = tokens * act * (PER_HIDDEN * hidden + PER_INTERMEDIATE * intermediate)
    inputs = tokens * hidden * act  # one layer's input
    fixed = adapter + loss
    offloaded = fixed + RECOMPUTE * per_layer * recompute_share + 2 * inputs
    checkpointed = fixed + RECOMPUTE * per_layer + layers * inputs
    by_rows = fixed + RECOMPUTE * per_layer * min(recompute_share, rows_share) + 2 * inputs
    full = fixed + layers * per_layer
    if offload:
        return MemoryEstimate(offloaded, offloaded, offloaded, by_rows)
    if checkpointing:
        return MemoryEstimate(checkpointed, checkpointed, offloaded, by_rows)
    return MemoryEstimate(full, checkpointed, offloaded, by_rows)


MODES = ("as set", "checkpointing", "offload", "rows")
ROWS_TOKENS = 4096  # the "rows" mode's group when a caller names none
_TURNED = {"checkpointing": "gradient checkpointing",
           "offload": "gradient checkpointing + layer inputs in host memory",
           "rows": "gradient checkpointing + layer inputs in host memory, recomputed by rows of {tokens} tokens"}


def _turned(mode: str, estimate: MemoryEstimate) -> str:
    return _TURNED[mode].format(tokens=estimate.rows_tokens or ROWS_TOKENS)


def choose_memory_mode(estimate: MemoryEstimate, free: int, kept: dict[str, str] | None = None) -> tuple[str, str]:
    """``(mode, note)``: the first of ``MODES`` whose estimate fits ``HEADROOM`` of ``free`` bytes (the last allowed
    when none does, with a note saying so). ``kept``: a mode ruled out by a setting the user chose explicitly, with
    that setting's name (``{"offload": "speed.cuda_graphs"}``): an explicit choice is never overridden; the note
    names it instead."""
    kept = kept or {}
    ruled_out = {"checkpointing": {"checkpointing", "offload", "rows"}, "offload": {"offload", "rows"}}
    out = set().union(*(ruled_out.get(m, {m}) for m in kept))
    allowed = [m for m in MODES if m not in out]
    budget = HEADROOM * free
    for mode in allowed:
        if estimate.of(mode) <= budget:
            need = f"estimated {estimate.of(mode) / GIB:.1f} GiB of {free / GIB:.1f} GiB free"
            if mode == "as set":
                return mode, f"{need}: fits as set"
            return mode, f"{_turned(mode, estimate)} ({need}; as set: {estimate.as_set / GIB:.1f} GiB)"
    last = allowed[-1]
    why = next((f"; {name} set explicitly rules out {mode}" for mode, name in kept.items()), "")
    if last == "as set":
        return last, (f"estimated {estimate.as_set / GIB:.1f} GiB of {free / GIB:.1f} GiB free, kept as set{why}: "
                      "lower optim.batch_size or data.max_length")
    return last, (f"{_turned(last, estimate)}, still estimated {estimate.of(last) / GIB:.1f} GiB of {free / GIB:.1f} GiB "
                  f"free{why}: lower optim.batch_size or data.max_length")


def row_group_sizes(rows: int) -> list[int]:
    """Rows per recompute group the "rows" mode can take for a micro-batch of ``rows`` rows, largest first: every
    ``ceil(rows / groups)`` for 2 groups up to one row each (fewer, larger groups run faster)."""
    return sorted({-(-rows // groups) for groups in range(2, rows + 1)}, reverse=True)


def choose_for_config(cfg, model, free: int) -> tuple[str, str, int]:
    """``choose_memory_mode`` for a run of ``cfg`` (a ``TrainConfig``) on ``model`` with ``free`` bytes: the
    estimate at ``optim.batch_size`` rows of ``data.max_length`` tokens, and the modes explicit levers keep out.
    Returns ``(mode, note, tokens)``: ``tokens``, the "rows" mode's group (``speed.recompute_tokens`` when set,
    else the largest group of whole rows whose estimate fits, else one row)."""
    from nested_learning.speed.chunked_loss import head_blocker
    from nested_learning.speed.offload import has_dropout

    sp, rows, width = cfg.speed, cfg.optim.batch_size, cfg.data.max_length
    dropout = has_dropout(model)  # recompute by rows is off then (offload.use_host_checkpoint)

    def share(tokens: int) -> float:  # of the micro-batch, one offloaded layer recomputes at once
        return 1.0 if not tokens or dropout else min(rows, max(1, tokens // width)) / rows

    asked = cfg.model.gradient_checkpointing
    chunk = sp.loss_chunk_tokens if head_blocker(model) is None else 0

    def estimate_at(group_tokens: int) -> MemoryEstimate:
        est = estimate_memory(model, rows * width, chunk_tokens=chunk, checkpointing=asked,
                              offload=asked and sp.offload_activations, recompute_share=share(sp.recompute_tokens),
                              rows_share=share(group_tokens))
        return dataclasses.replace(est, rows_tokens=group_tokens)

    groups = [sp.recompute_tokens] if sp.recompute_tokens else [n * width for n in row_group_sizes(rows)] or [width]
    budget = HEADROOM * free
    estimate = next((e for e in map(estimate_at, groups) if e.rows <= budget), None) or estimate_at(groups[-1])
    chosen, kept = sp.model_fields_set, {}
    if "lora_fold" in chosen and sp.lora_fold:
        kept["checkpointing"] = "speed.lora_fold"
    for lever, value in (("cuda_graphs", True), ("compile_scope", "model")):
        if lever in chosen and getattr(sp, lever) == value and "offload" not in kept:
            kept["offload"] = f"speed.{lever}"
    return (*choose_memory_mode(estimate, free, kept), estimate.rows_tokens)
