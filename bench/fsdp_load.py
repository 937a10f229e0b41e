"""``distributed.strategy: fsdp`` loading on a GPU: the model built sharded from a meta skeleton computes what the
plainly loaded one computes.

    torchrun --nproc-per-node 1 bench/fsdp_load.py --json out.json               # embedded:tiny-llama on cuda
    torchrun --nproc-per-node 2 bench/fsdp_load.py                               # the same on 2 GPUs
    torchrun --nproc-per-node 2 bench/fsdp_load.py --device cpu                  # gloo on the CPU

Each rank joins an NCCL group (gloo with ``--device cpu``) even at one rank, so that every collective of
``train.fsdp.load_sharded`` runs: rank 0 reads the base on the CPU, every rank builds the skeleton on the meta
device, shards it with ``fully_shard``, receives its shards and the adapter from rank 0. Rank 0 then also loads
the model plainly (``load_model`` + ``wrap_lora``, as a single process does) and compares on one batch: the
adapter's initial values (exact), the loss (bfloat16 autocast on CUDA, as in training) and the adapter's
gradients. Printed: both losses, the largest gradient difference relative to the gradient's largest value, the
bytes of base weights each rank stores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nested_learning.config import TrainConfig  # noqa: E402
from nested_learning.model.loading import autocast_context, load_model, unwrap_model  # noqa: E402
from nested_learning.model.lora import wrap_lora  # noqa: E402
from nested_learning.train.distributed import DistContext  # noqa: E402
from nested_learning.train.fsdp import load_sharded, local_frozen_bytes  # noqa: E402


def loss_and_grads(model, ids: torch.Tensor, device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with autocast_context(device):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:tiny-llama")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=timedelta(seconds=120), device_id=device)
        control = dist.new_group(backend="gloo")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        control = None
    ctx = DistContext(rank, world, local, 120.0, control)
    cfg = TrainConfig.model_validate({"seed": 0, "model": {"name_or_path": args.model, "device": args.device},
                                      "lora": {"r": 8, "alpha": 16}, "distributed": {"strategy": "fsdp"}})

    sharded, read = load_sharded(cfg, ctx, device, lambda model: None)
    g = torch.Generator().manual_seed(0)
    vocab = unwrap_model(sharded).config.vocab_size
    ids = torch.randint(5, vocab, (4, 128), generator=g).to(device)
    loss, grads = loss_and_grads(sharded, ids, device)
    init = {n: p.detach().cpu().clone() for n, p in sharded.named_parameters() if p.requires_grad}
    local_bytes, whole, kept = local_frozen_bytes(sharded)
    stored = [None] * world
    dist.all_gather_object(stored, {"rank": rank, "read": read, "stored": local_bytes}, group=control)
    if rank == 0:
        plain = wrap_lora(load_model(cfg.model), cfg.lora, seed=cfg.seed)
        same_init = all(torch.equal(init[n], p.detach().cpu()) for n, p in plain.named_parameters() if p.requires_grad)
        plain_loss, plain_grads = loss_and_grads(plain, ids, device)
        top = max(g.abs().max().item() for g in plain_grads.values())
        diff = max((grads[n] - plain_grads[n]).abs().max().item() for n in plain_grads)
        out = {"model": args.model, "device": str(device), "world": world, "dtype": str(next(
               unwrap_model(plain).parameters()).dtype), "sharded_loss": loss, "plain_loss": plain_loss,
               "loss_diff": abs(loss - plain_loss), "grad_max_diff_rel": diff / top, "same_initial_adapter": same_init,
               "base_bytes": whole, "head_bytes_kept_whole": kept, "ranks": stored}
        print(json.dumps(out, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
