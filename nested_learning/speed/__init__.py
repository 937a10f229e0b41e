"""Speed levers, each the same math as the reference path, decided for a run by ``plan`` and printed with it.

``plan``: which levers take effect and why the others do not; ``apply_speed`` carries the plan out.
``memory``: a micro-batch's peak estimated, checkpointing and offload turned on when it would not fit.
``lora_fold`` (+ ``lora_groups``): LoRA inside the frozen GEMM. ``chunked_loss`` (+ ``ce_kernel``): head and
cross-entropy without full logits. ``causal_mask``: SDPA's causal kernel with no mask tensor; ``varlen``: packed
rows attended sample by sample, no mask. ``rotary``: rotary tables once per forward. ``compile`` (+
``compile_cache``): torch.compile, CUDA graphs, activation budget. ``offload``: checkpointed layer inputs in host
memory. ``kernels``: SDPA kernel choice. ``docs/speed.md`` walks through a training step lever by lever."""
