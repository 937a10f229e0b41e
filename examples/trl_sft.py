"""Supervised fine-tuning with TRL's ``SFTTrainer`` and nested tiers, on the embedded micro model (no download).

    pip install "nested-learning[trl]"
    python examples/trl_sft.py --out runs/trl-sft --steps 12

The LoRA tensors of the first layer update every step, those of the second every 4 steps
(``tiers={"periods": [1, 4]}``); the log lines show each tier's update count next to the loss. The adapter is
saved to ``--out/adapter`` after the slow tier's pending gradients were applied.
"""

from __future__ import annotations

import argparse
import json
import random


def prompt_completion_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"add {a} and {b}: ", "completion": f"{a + b}"})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trl-sft")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--periods", default="1,4", help="tier periods, fastest first")
    args = parser.parse_args(argv)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from nested_learning.config import LoraConfig, ModelConfig
    from nested_learning.integrations.hf_trainer import NestedTiersCallback, nested_optimizer, put_first
    from nested_learning.model.loading import load_model, load_tokenizer
    from nested_learning.model.lora import wrap_lora

    model_cfg = ModelConfig(name_or_path="embedded:micro-llama", device="cpu")
    tokenizer = load_tokenizer(model_cfg)
    model = wrap_lora(load_model(model_cfg), LoraConfig(r=4, alpha=8), seed=0)

    sft_args = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, warmup_steps=2, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, max_length=64, completion_only_loss=True, disable_tqdm=True,
    )
    periods = [int(p) for p in args.periods.split(",")]
    optimizer, scheduler = nested_optimizer(model, sft_args, tiers={"periods": periods})
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(prompt_completion_rows(64)),
                         processing_class=tokenizer, optimizers=(optimizer, scheduler))
    put_first(trainer, NestedTiersCallback(optimizer))
    trainer.train()
    trainer.save_model(f"{args.out}/adapter")
    summary = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "tiers": optimizer.tier_stats()}
    print(json.dumps({"first_loss": summary["losses"][0], "last_loss": summary["losses"][-1],
                      "tier_updates": [t["updates"] for t in summary["tiers"]]}))
    return summary


if __name__ == "__main__":
    main()
