"""The speed plan: which levers take effect for this model, device and config, and why the others do not.

``plan_speed`` decides every lever in one place and returns a frozen record; ``apply_speed`` carries it out and
returns the module the loss calls. The run prints the plan beside the tier plan and writes it to
``<output>/speed_plan.json``, so nothing about speed is decided silently. Three of its lines for a tiny
Gemma-2-style model (``docs/speed.md`` shows a whole plan):

    speed plan (cpu):
      lora_fold                 on   4 groups (gate_proj+up_proj, q_proj+k_proj+v_proj)
      chunked_loss              off  final_logit_softcapping in the model config
      compile                   off  CPU runs eager (exact float32)

A lever the user sets that another setting rules out is a config error (``TrainConfig``); a lever left at its
default simply turns itself off here, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from nested_learning.config import TrainConfig

__all__ = ["LEVERS", "Lever", "SpeedPlan", "apply_speed", "plan_speed"]

# In the order they act on a training step; docs/speed.md walks through them in this order.
LEVERS = (
    "fit_memory", "sdpa_kernels", "skip_causal_mask", "varlen_attention", "outer_rotary", "lora_fold",
    "chunked_loss", "loss_chunk_kernel", "compile", "activation_memory_budget", "offload_activations", "cuda_graphs",
    "data_parallel",
)


@dataclass(frozen=True)
class Lever:
    name: str
    on: bool
    note: str  # on: what it applies to; off: why not


@dataclass(frozen=True)
class SpeedPlan:
    device: str
    levers: tuple[Lever, ...]
    chunk_tokens: int = 0  # the chunked loss's rows per chunk when on
    chunk_kernel: str = "compile"  # the chunk kernel asked for when on CUDA
    compile_scope: str = "model"  # "layers": decoder layers compiled one by one, sharing their graph (compile on)
    checkpointing: bool = False  # gradient checkpointing on, asked by model.gradient_checkpointing or fit_memory
    recompute_tokens: int = 0  # offloaded layers recompute by groups of rows of this many tokens (0: whole)

    def __getitem__(self, name: str) -> Lever:
        for lever in self.levers:
            if lever.name == name:
                return lever
        raise KeyError(name)

    def on(self, name: str) -> bool:
        return self[name].on

    def format(self) -> str:
        lines = [f"speed plan ({self.device}):"]
        lines += [f"  {lv.name:<25} {'on ' if lv.on else 'off'}  {lv.note}".rstrip() for lv in self.levers]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "levers": {lv.name: {"on": lv.on, "note": lv.note} for lv in self.levers}}


def plan_speed(cfg: TrainConfig, model, device: torch.device, world: int = 1) -> SpeedPlan:
    """Decide every lever for ``model`` (the PEFT-wrapped training model, not yet changed by any lever) on
    ``device``, in a job of ``world`` data-parallel ranks. Inspects the model; changes nothing."""
    from nested_learning.speed.causal_mask import causal_sdpa_blocker
    from nested_learning.speed.chunked_loss import head_blocker
    from nested_learning.speed.compile import decoder_layers
    from nested_learning.speed.lora_groups import unfused_groups
    from nested_learning.speed.memory import choose_for_config, device_free_bytes
    from nested_learning.speed.offload import checkpointable_layers, checkpointed_layers, has_dropout
    from nested_learning.speed.rotary import rotary_modules
    from nested_learning.speed.varlen import varlen_blocker, varlen_kernel

    sp, cuda = cfg.speed, device.type == "cuda"
    levers: list[Lever] = []

    def add(name: str, on: bool, note: str) -> bool:
        levers.append(Lever(name, on, note))
        return on

    def first(*reasons: tuple[bool, str]) -> str | None:
        return next((why for hit, why in reasons if hit), None)

    # Memory first: checkpointing and offload change which other levers can run.
    fsdp = world > 1 and cfg.distributed.strategy == "fsdp"
    asked_ckpt = cfg.model.gradient_checkpointing
    free = device_free_bytes(device) if cuda else None
    why = first((not sp.fit_memory, "speed.fit_memory is off"), (not cuda, "CPU"), (fsdp, "distributed.strategy fsdp"),
                (free is None, "free device memory unknown"),
                (not checkpointable_layers(model), "no decoder layers that can be checkpointed"))
    mode, rows_tokens = "as set", 0
    if why is None:
        mode, why, rows_tokens = choose_for_config(cfg, model, free)
    add("fit_memory", mode != "as set", why)
    ckpt = asked_ckpt or mode != "as set"
    ckpt_name = "model.gradient_checkpointing" if asked_ckpt else "gradient checkpointing (fit_memory)"

    # Attention kernels (process-wide).
    why = first((sp.sdpa_kernels is None, "torch's own set"), (not cuda, "CPU"))
    add("sdpa_kernels", why is None, why or ", ".join(sp.sdpa_kernels))

    why = first((not sp.skip_causal_mask, "speed.skip_causal_mask is off"), (True, causal_sdpa_blocker(model)))
    skip = add("skip_causal_mask", why is None, why or "one-sample rows run SDPA's causal kernel, no mask tensor")

    forced = "varlen_attention" in sp.model_fields_set
    kernel_ok = varlen_kernel() is not None
    why = first((not sp.varlen_attention, "speed.varlen_attention is off"), (not skip, "skip_causal_mask is off"),
                (not cfg.data.packing, "data.packing is off (no row holds several samples)"),
                (not cuda and not forced, "CPU keeps transformers' mask (true runs a loop over samples)"),
                (cuda and not kernel_ok and not forced, "this torch has no varlen_attn kernel"),
                (True, varlen_blocker(model)))
    how = "torch's flash varlen kernel" if cuda and kernel_ok else "SDPA on each sample in turn"
    add("varlen_attention", why is None, why or f"packed rows attend sample by sample ({how}), no T x T mask")

    why = first((not sp.outer_rotary, "speed.outer_rotary is off"))
    count = 0 if why else len(rotary_modules(model))
    why = why or (None if count else "no standard rotary module with identical tables")
    add("outer_rotary", why is None, why or f"{count} rotary module{'s' * (count != 1)}")

    found = [names for names, _ in unfused_groups(model)]
    groups = sorted({"+".join(names) for names in found})
    why = first((not sp.lora_fold, "speed.lora_fold is off"), (cfg.lora.dropout > 0, "lora.dropout > 0"),
                (cfg.lora.use_dora, "lora.use_dora"),
                (ckpt, f"{ckpt_name} (checkpointed layers cannot trace it)"),
                (fsdp,
                 "distributed.strategy fsdp (the fold's [W | S] buffer holds whole frozen weights)"),
                (not groups, "no sibling LoRA projections (q/k/v, gate/up) in this model"))
    add("lora_fold", why is None, why or f"{len(found)} groups ({', '.join(groups)})")

    why = first((sp.loss_chunk_tokens == 0, "speed.loss_chunk_tokens is 0"), (True, head_blocker(model)))
    chunked = add("chunked_loss", why is None, why or f"{sp.loss_chunk_tokens} tokens per chunk")

    kernel = sp.loss_chunk_kernel
    if kernel == "triton" and cuda:
        from nested_learning.speed.ce_kernel import _triton_importable

        if not _triton_importable():
            kernel = "compile"
    why = first((not chunked, "chunked_loss is off"), (not cuda, "CPU runs the eager chunk"))
    note = why or (kernel if kernel == sp.loss_chunk_kernel else f"{kernel} (Triton cannot run here)")
    add("loss_chunk_kernel", why is None, note)

    # Decided before compile: offloaded layers are compiled one by one inside the host checkpoint.
    layers = checkpointed_layers(model) if asked_ckpt else checkpointable_layers(model) if ckpt else 0
    recompute = rows_tokens if mode == "rows" else sp.recompute_tokens
    offload_why = first((not (sp.offload_activations or mode in ("offload", "rows")),
                         "speed.offload_activations is off"),
                        (not ckpt, "model.gradient_checkpointing is off"),
                        (fsdp, "distributed.strategy fsdp"),
                        (not layers, "no checkpointed layers in this model"))
    offload = offload_why is None
    why = first((not sp.compile, "speed.compile is off"), (not cuda, "CPU runs eager (exact float32)"))
    n_layers = len(decoder_layers(model)) if sp.compile_scope == "layers" and not offload else 0
    if offload:
        whole = "each decoder layer, inside the host checkpoint"
    elif n_layers:
        whole = f"{n_layers} decoder layers, compiled once and reused; the code between them runs eager"
    else:
        whole = "the decoder; head + loss run chunked outside the graph" if chunked else "the whole model"
        if sp.compile_scope == "layers":
            whole += " (speed.compile_scope layers: no decoder layers found)"
    compiled = add("compile", why is None, why or whole)
    by_layer = compiled and bool(n_layers)

    why = first((not compiled, "compile is off"), (sp.activation_memory_budget >= 1.0, "1.0 keeps every activation"))
    add("activation_memory_budget", why is None, why or f"{sp.activation_memory_budget:g} of the activations kept")

    groups = ""
    if recompute and offload:
        groups = ("; recomputed whole (dropout in the model)" if has_dropout(model)
                  else f"; recomputed by rows, {recompute} tokens at most")
    add("offload_activations", offload,
        offload_why or f"{layers} checkpointed layer inputs kept in host memory{groups}")

    why = first((not compiled, "compile is off"), (not sp.cuda_graphs, "speed.cuda_graphs is off"),
                (offload, "speed.offload_activations (replayed graphs keep their inputs on the device)"),
                # Each layer's weights are static graph inputs: the layer graph would be recorded once per layer,
                # between eager code, instead of one replay of the step (not measured).
                (by_layer, "speed.compile_scope layers (a layer graph per layer's weights, not one step)"),
                (not cfg.data.packing, "data.packing is off (padded batches vary in shape)"),
                (cfg.optim.grad_accum > 1, "optim.grad_accum > 1 (a replay could overwrite an accumulated gradient)"))
    add("cuda_graphs", why is None, why or "packed rows padded to data.max_length, one shape")

    # Gradients are summed across ranks after backward, outside every graph, so each lever above acts per rank.
    tier_sync = ("every tier every step" if cfg.distributed.tier_sync == "every_step"
                 else "each tier at its due steps")
    sharded = ", frozen base sharded (fsdp)" if cfg.distributed.strategy == "fsdp" else ""
    add("data_parallel", world > 1,
        f"{world} ranks{sharded}; gradients summed {tier_sync}" if world > 1 else "one process")

    order = {name: i for i, name in enumerate(LEVERS)}
    return SpeedPlan(str(device.type), tuple(sorted(levers, key=lambda lv: order[lv.name])),
                     chunk_tokens=sp.loss_chunk_tokens if chunked else 0, chunk_kernel=kernel,
                     compile_scope="layers" if by_layer or (compiled and offload) else "model", checkpointing=ckpt,
                     recompute_tokens=recompute if offload else 0)


def apply_speed(plan: SpeedPlan, model, cfg: TrainConfig, device: torch.device,
                before_compile: Callable[[Any], None] | None = None):
    """Carry out ``plan`` on ``model`` (in place) and return the module the training loss calls (compiled or not).
    Call after adapter weights are loaded and before the optimizer is built. ``before_compile(model)`` runs
    after the in-place levers, before compiling (FSDP sharding)."""
    from nested_learning.speed.kernels import apply_kernel_choices

    apply_kernel_choices(cfg.speed.sdpa_kernels, device)  # also restores torch's set after an earlier run
    if plan.on("fit_memory"):  # checkpointing turned on by the plan, as model.gradient_checkpointing would
        from nested_learning.model.loading import enable_checkpointing, unwrap_model

        enable_checkpointing(unwrap_model(model))
    if plan.on("skip_causal_mask"):
        from nested_learning.speed.causal_mask import use_causal_sdpa

        use_causal_sdpa(model)
    if plan.on("varlen_attention"):
        from nested_learning.speed.varlen import use_varlen_sdpa

        use_varlen_sdpa(model)
    if plan.on("outer_rotary"):
        from nested_learning.speed.rotary import use_outer_rotary

        use_outer_rotary(model)
    if plan.on("lora_fold"):
        from nested_learning.speed.lora_fold import fold_lora_groups

        fold_lora_groups(model)
    if before_compile is not None:
        before_compile(model)
    if plan.on("offload_activations"):
        from nested_learning.speed.offload import use_host_checkpoint

        if plan.on("compile"):  # the layers compile inside the host checkpoint, not the decoder as a whole
            from nested_learning.speed.compile import set_activation_memory_budget
            from nested_learning.speed.compile_cache import tag_compile_caches

            tag_compile_caches()
            set_activation_memory_budget(cfg.speed.activation_memory_budget)
        use_host_checkpoint(model, compile_layers=plan.on("compile"), recompute_tokens=plan.recompute_tokens)
        return model
    if not plan.on("compile"):
        return model
    if plan.compile_scope == "layers":
        from nested_learning.speed.compile import compile_layers

        compile_layers(model, memory_budget=cfg.speed.activation_memory_budget)
        return model
    from nested_learning.speed.compile import compile_model

    return compile_model(model, cuda_graphs=plan.on("cuda_graphs"), memory_budget=cfg.speed.activation_memory_budget,
                         decoder_only=plan.on("chunked_loss"))

