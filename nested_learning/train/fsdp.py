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
"""

from __future__ import annotations

import torch
from torch import nn

from nested_learning.config import ConfigError
from nested_learning.model.loading import unwrap_model
from nested_learning.train.distributed import DistContext

__all__ = ["decoder_layers", "local_frozen_bytes", "shard_frozen_base"]


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
