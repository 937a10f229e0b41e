"""Speed levers, each the same math as the reference path, decided for a run by ``plan`` and printed with it.

``plan``: which levers take effect and why the others do not; ``apply_speed`` carries the plan out.
``lora_fold`` (+ ``lora_groups``): LoRA inside the frozen GEMM. ``chunked_loss`` (+ ``ce_kernel``): head and
cross-entropy without full logits. ``causal_mask``: SDPA's causal kernel with no mask tensor. ``rotary``: rotary
tables once per forward. ``compile`` (+ ``compile_cache``): torch.compile, CUDA graphs, activation budget.
``kernels``: SDPA kernel choice. ``docs/speed.md`` walks through a training step lever by lever."""
