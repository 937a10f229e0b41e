"""``distributed.strategy: fsdp``: the frozen base sharded over ranks with FSDP2, the LoRA adapter replicated.

Each rank keeps 1/world of every frozen decoder weight (``fully_shard`` per decoder layer, then the decoder
itself for the embeddings and final norm); a layer's weights are all-gathered just before it runs and freed after
it. The trainable LoRA tensors are left out of FSDP (``ignored_params``): every rank holds all of them as plain
tensors, so ``train.grad_sync`` sums their gradients per tier exactly as under ``ddp``, and the optimizer,
checkpoints (PEFT adapters, written by rank 0) and resume are unchanged. The frozen base has no gradients, so
FSDP never reduce-scatters anything.

The output head stays whole on every rank: the chunked loss reads its weight directly, outside any FSDP forward
(and a head tied to the input embeddings is the same tensor, so that one stays whole too). On CUDA the layers are
all-gathered in bfloat16, the dtype autocast computes them in.

Loading (``load_sharded``) never puts the whole base on ranks other than 0: every rank builds the model's skeleton
on the meta device (``nested_learning.model.skeleton``) and wraps it with LoRA, ``fully_shard`` turns its frozen
weights into meta shards, ``to_empty`` allocates each rank's shards (and the whole adapter and head) on its device,
and ``set_model_state_dict(full_state_dict, broadcast_from_rank0)`` fills them from the weights rank 0 alone read
on the CPU, one tensor at a time. Rank 0 wraps its CPU model with LoRA under the run seed (and loads a resumed or
initial adapter into it), so the adapter every rank receives is the one a single process would start from. The
non-persistent buffers (rotary ``inv_freq``), which no state dict carries, are sent from rank 0 too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from nested_learning.config import ConfigError, TrainConfig
from nested_learning.model.loading import ModelError, load_model, resolve_dtype, unwrap_model
from nested_learning.model.lora import wrap_lora
from nested_learning.model.skeleton import build_skeleton
from nested_learning.train.distributed import DistContext

__all__ = ["check_against_skeleton", "decoder_layers", "load_sharded", "local_frozen_bytes", "shard_frozen_base"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM: the modules of the classes it names as never split."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    return [m for m in lm.modules() if type(m).__name__ in names]


def shard_frozen_base(model: nn.Module, ctx: DistContext, device: torch.device) -> int:
    """Shard ``model``'s frozen weights over the ranks of ``ctx`` (in place); returns the number of layers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    lm = unwrap_model(model)
    get_decoder = getattr(lm, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = decoder_layers(lm)
    if decoder is None or decoder is lm or not layers:
        raise ConfigError(f"distributed.strategy: fsdp needs a transformers causal LM with a separate decoder and "
                          f"named decoder layers; {type(lm).__name__} has none")
    keep = {p for p in model.parameters() if p.requires_grad}  # the adapter: replicated, synced by grad_sync
    head = lm.get_output_embeddings() if callable(getattr(lm, "get_output_embeddings", None)) else None
    if head is not None:
        keep |= set(head.parameters())  # read directly by the chunked loss; may be tied to the embeddings
    mesh = init_device_mesh(device.type, (ctx.world,))
    # Autocast computes the frozen GEMMs in bfloat16 on CUDA: gathering them in it halves the traffic.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else None,
                                  cast_forward_inputs=False)
    # Every unit reshards after its forward, the decoder (FSDP's root) too: left to itself FSDP keeps the root
    # gathered after a forward, and an evaluation (no backward) would leave it so until rank 0's checkpoint
    # save re-registers the shards (state_dict), after which the ranks' next forwards issue different
    # all-gathers and the job fails.
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=keep, reshard_after_forward=True)
    fully_shard(decoder, mesh=mesh, mp_policy=policy, ignored_params=keep, reshard_after_forward=True)
    return len(layers)


def local_frozen_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(bytes of frozen weights this rank stores, bytes of the whole frozen base, bytes of frozen weights kept
    whole on every rank)."""
    local = whole = kept = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        sharded = hasattr(p, "to_local")
        shard = p.to_local() if sharded else p
        local += shard.numel() * shard.element_size()
        whole += p.numel() * p.element_size()
        kept += 0 if sharded else p.numel() * p.element_size()
    return local, whole, kept


def _read_full(cfg: TrainConfig, dtype: torch.dtype, prepare_adapter: Callable[[Any], None]):
    """Rank 0: the base read on the CPU in the run's dtype, wrapped with the run's adapter; returns (state dict,
    non-persistent buffers, bytes of base tensors read)."""
    base = load_model(cfg.model.model_copy(update={"device": "cpu", "dtype": _DTYPE_NAMES[dtype]}))
    read = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers()))
    model = wrap_lora(base, cfg.lora, seed=cfg.seed)
    prepare_adapter(model)
    state = model.state_dict()
    buffers = {name: b for name, b in model.named_buffers() if name not in state}
    return state, buffers, read


def check_against_skeleton(got: dict[str, tuple[int, ...]], skeleton: nn.Module, source: str) -> None:
    """ModelError naming the tensors when the weights read (``got``: name -> shape) do not have exactly the names
    and shapes of the model built from the config (``skeleton``, on the meta device)."""
    want = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    problems = [f"missing {n}" for n in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {n}" for n in sorted(got.keys() - want.keys())]
    problems += [f"{n}: shape {got[n]} in the weights, {want[n]} in the config"
                 for n in sorted(want.keys() & got.keys()) if want[n] != got[n]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelError(f"model.name_or_path: the weights of {source!r} do not match its config: "
                         f"{'; '.join(problems[:3])}{more}")


def _agree_on_shapes(ctx: DistContext, state: dict[str, torch.Tensor], skeleton: nn.Module, source: str) -> None:
    """Every rank checks its skeleton against the names and shapes of the weights rank 0 read, before any
    broadcast of tensors: a mismatch there would fail on some ranks and leave the others waiting until the
    timeout. Every rank raises: the ones that found a mismatch name the tensors."""
    shapes = [{name: tuple(t.shape) for name, t in state.items()}]
    try:
        dist.broadcast_object_list(shapes, src=0, group=ctx.control)
    except RuntimeError as exc:
        raise ctx._failed("sending the base weights' shapes from rank 0", exc) from None
    error = None
    try:
        check_against_skeleton(shapes[0], skeleton, source)
    except ModelError as exc:
        error = exc
    if ctx.agree_any(error is not None, "checking the base weights against the model config"):
        raise error or ModelError(f"model.name_or_path: on another rank the model config of {source!r} does not "
                                  "match the weights rank 0 read (that rank's error names the tensors)")


def load_sharded(cfg: TrainConfig, ctx: DistContext, device: torch.device,
                 prepare_adapter: Callable[[Any], None]) -> tuple[Any, int]:
    """The LoRA-wrapped model of ``cfg`` with its frozen base sharded over the ranks of ``ctx``, loaded without
    the whole base on any rank but 0 (see the module doc). ``prepare_adapter(model)`` loads a resumed or initial
    adapter (rank 0, into its CPU copy). Returns (model, bytes of base tensors this rank read whole: the whole
    base on rank 0, 0 elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    dtype = resolve_dtype(cfg.model.dtype, device)
    full = ctx.on_main(lambda: _read_full(cfg, dtype, prepare_adapter), "reading the base weights")
    state, buffers, read = full if full is not None else ({}, {}, 0)
    # The same wrap as rank 0's, from the same seed: every rank leaves it with the same RNG state.
    model = wrap_lora(build_skeleton(cfg.model, dtype), cfg.lora, seed=cfg.seed)
    _agree_on_shapes(ctx, state, model, cfg.model.name_or_path)
    shard_frozen_base(model, ctx, device)
    model.to_empty(device=device)
    try:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                    strict=True))
        message = [{name: b.cpu() for name, b in buffers.items()}]
        dist.broadcast_object_list(message, src=0, group=ctx.control)
    except RuntimeError as exc:
        raise ctx._failed("sending the base weights from rank 0", exc) from None
    del state, full
    for name, value in message[0].items():  # rank 0's tensors, dtype included (a bfloat16 load casts them)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value.to(device)
    lm = unwrap_model(model)
    if getattr(lm.config, "tie_word_embeddings", False):
        lm.tie_weights()  # to_empty gives tied weights one tensor each: tie them again
    return model, read
