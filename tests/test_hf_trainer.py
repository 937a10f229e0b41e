"""NestedAdamW inside ``transformers.Trainer`` (nested_learning.integrations.hf_trainer).

The same micro-llama run through ``nested_learning.train`` and through a ``Trainer`` fed our collated
micro-batches in our order (a list dataset, a pass-through collator, the sequential sampler) follows the same
losses and ends with the same adapter; a Trainer stopped at a checkpoint where the slow tiers hold pending
gradients and resumed from it ends exactly where an uninterrupted Trainer does.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import adapter_tensors, micro_config, write_data

transformers = pytest.importorskip("transformers")

from nested_learning.config import TiersConfig  # noqa: E402
from nested_learning.data import BatchPlan, iterate_batches, load_splits  # noqa: E402
from nested_learning.integrations.hf_trainer import (  # noqa: E402
    NestedTiersCallback, nested_optimizer, put_first, schedule_from_args,
)
from nested_learning.model.loading import load_model, load_tokenizer  # noqa: E402
from nested_learning.model.lora import wrap_lora  # noqa: E402
from nested_learning.optim.adamw import NestedAdamW  # noqa: E402
from nested_learning.train.loop import train_loop  # noqa: E402
from nested_learning.train.metrics import read_metrics  # noqa: E402
from nested_learning.train.setup import build_run, seed_everything  # noqa: E402

STEPS, ACCUM, PERIODS, CLIP = 7, 2, [1, 2, 4], 0.3
# Both runs do the same float32 arithmetic, summed in a different order (micro-batch losses, attention mask
# handling): measured differences are ~1e-6 in the losses and ~1e-6 in the adapter after 10 steps.
LOSS_ATOL, WEIGHT_ATOL = 1e-6, 1e-6


def _config(tmp_path):
    data = write_data(tmp_path / "data")
    return micro_config(data, tmp_path / "ours", tiers={"periods": PERIODS},
                        optim={"grad_accum": ACCUM, "max_grad_norm": CLIP},
                        schedule={"steps": STEPS, "warmup_steps": 2, "kind": "cosine"},
                        eval={"every": 0}, checkpoint={"save_best": False})


class BatchList(torch.utils.data.Dataset):
    """Our micro-batches, one per item, as the keyword arguments of the model (labels included)."""

    def __init__(self, batches):
        self.items = []
        for b in batches:
            item = {"input_ids": b.input_ids, "labels": b.labels, "use_cache": False}
            if b.attention_mask is not None:
                item["attention_mask"] = b.attention_mask
            if b.position_ids is not None:
                item["position_ids"] = b.position_ids
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _first(features):
    return features[0]  # one already collated micro-batch per item


def _base(cfg):
    # float64: the two paths sum the same terms in different orders; in float32 Adam turns those rounding
    # differences into visible weight differences (~3e-4 after 10 steps), in float64 they stay ~1e-12.
    return load_model(cfg.model).to(torch.float64)


def _hf_setup(cfg):
    """(LoRA model, micro-batches) built as ``build_run`` builds them: same seeds, same data order."""
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train, _ = load_splits(cfg.data, tokenizer, cfg.seed)
    plan = BatchPlan(train, cfg.optim.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                     group_by_length=cfg.data.group_by_length, packing=cfg.data.packing,
                     max_length=cfg.data.max_length)
    model = wrap_lora(_base(cfg), cfg.lora, seed=cfg.seed)
    it = iterate_batches(train, plan, tokenizer.pad_token_id)
    return model, [next(it) for _ in range(STEPS * ACCUM)]


def _args(out, cfg, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=1, gradient_accumulation_steps=ACCUM,
        learning_rate=cfg.optim.lr, warmup_steps=cfg.schedule.warmup_steps, lr_scheduler_type="cosine",
        max_grad_norm=CLIP, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps, logging_steps=1, report_to="none",
        use_cpu=True, seed=cfg.seed, train_sampling_strategy="sequential", remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True, **{"save_strategy": "no", **extra})


def _trainer(cfg, out, callbacks=(), **extra):
    from transformers import Trainer

    model, batches = _hf_setup(cfg)
    args = _args(out, cfg, **extra)
    optimizer, scheduler = nested_optimizer(model, args, tiers={"periods": PERIODS})
    trainer = Trainer(model=model, args=args, train_dataset=BatchList(batches), data_collator=_first,
                      optimizers=(optimizer, scheduler), callbacks=[NestedTiersCallback(optimizer), *callbacks])
    return trainer, model, optimizer


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


SAVE = dict(save_strategy="steps", save_steps=3)


@pytest.fixture(scope="module")
def hf_full(tmp_path_factory):
    """One uninterrupted Trainer run (checkpoints every 3 steps), shared by the two tests below."""
    tmp_path = tmp_path_factory.mktemp("hf_full")
    cfg = _config(tmp_path)
    trainer, model, optimizer = _trainer(cfg, tmp_path / "hf", **SAVE)
    trainer.train()
    return cfg, trainer, model, optimizer


def test_hf_trainer_matches_our_trainer(tmp_path, hf_full):
    cfg, trainer, model, optimizer = hf_full
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(tmp_path / "ours")})})
    train_loop(build_run(cfg, base_model=_base(cfg)))
    ours = [r for r in read_metrics(tmp_path / "ours") if "loss" in r]
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert max(r["grad_norm"] for r in ours) > CLIP  # clipping is exercised, not a no-op

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    hf_losses = torch.tensor([h["loss"] for h in logs], dtype=torch.float64)
    our_losses = torch.tensor([r["loss"] for r in ours], dtype=torch.float64)
    assert torch.allclose(hf_losses, our_losses, rtol=0, atol=LOSS_ATOL), (hf_losses - our_losses).abs().max()
    # The learning rates agree exactly: the same schedule function, read at the same steps.
    assert [h["learning_rate"] for h in logs] == pytest.approx([r["lr"] for r in ours], rel=1e-12)

    # Tier counts reach the Trainer's logs and match ours, step by step.
    assert [[h[f"tier{k}_updates"] for k in range(3)] for h in logs] == [r["tier_updates"] for r in ours]
    # Seven steps: tier1 (period 2) and tier2 (period 4) ended with 1 and 3 pending steps, flushed at the end as
    # our trainer flushes them; the last log shows the counts before the flush.
    assert logs[-1]["tier1_updates"] == 3 and logs[-1]["tier2_updates"] == 1
    assert [g["updates"] for g in optimizer.param_groups] == [7, 4, 2]
    assert [g["pending"] for g in optimizer.param_groups] == [0, 0, 0]

    final = adapter_tensors(tmp_path / "ours" / "checkpoints" / "last")
    got = _adapter(model)
    peft_names = {n.replace(".default", ""): n for n in got}
    assert set(peft_names) == set(final)
    for name, ref in final.items():
        assert torch.allclose(got[peft_names[name]], ref, rtol=0, atol=WEIGHT_ATOL), name
    drift = max((got[peft_names[n]] - ref).abs().max().item() for n, ref in final.items())
    moved = max((got[n] - p).abs().max().item() for n, p in _adapter(_hf_setup(cfg)[0]).items())
    assert moved > 100 * drift  # training moved the adapter far more than the two paths differ


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_hf_trainer_resume_from_its_checkpoint_is_exact(tmp_path, hf_full):
    cfg, full, full_model, full_opt = hf_full

    # Stopped at step 3: tier1 (period 2) and tier2 (period 4) hold pending gradients in the checkpoint.
    first, _, first_opt = _trainer(cfg, tmp_path / "split", callbacks=[StopAt(3)], **SAVE)
    first.train()
    assert [g["pending"] for g in first_opt.param_groups] == [0, 1, 3]  # not flushed: the run stopped early
    ckpt = tmp_path / "split" / "checkpoint-3"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["global_step"] == 3
    assert sum("acc" in s for s in saved["state"].values()) > 0

    resumed, model, opt = _trainer(cfg, tmp_path / "split", **SAVE)
    resumed.train(resume_from_checkpoint=str(ckpt))
    # The optimizer still drives the model's parameters after the Trainer loaded the checkpoint's adapter.
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}

    assert opt.global_step == full_opt.global_step == STEPS
    assert opt.tier_stats() == full_opt.tier_stats()
    a, b = _adapter(model), _adapter(full_model)
    for name in b:
        assert torch.equal(a[name], b[name]), name
    for p, q in zip((p for g in opt.param_groups for p in g["params"]),
                    (q for g in full_opt.param_groups for q in g["params"])):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], full_opt.state[q][key]), key
    loss = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    full_loss = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert loss == full_loss  # the history of the checkpoint plus the resumed steps


def test_callback_goes_first_for_report_integrations(tmp_path):
    cfg = _config(tmp_path)
    trainer, _, optimizer = _trainer(cfg, tmp_path / "hf")
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NestedTiersCallback))
    assert put_first(trainer, cb) is cb
    assert trainer.callback_handler.callbacks[0] is cb
    assert sum(c is cb for c in trainer.callback_handler.callbacks) == 1


def test_schedule_and_tier_errors(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=-1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="max_steps"):
        schedule_from_args(args)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, warmup_steps=0.1, report_to="none",
                             use_cpu=True, lr_scheduler_type="polynomial")
    with pytest.raises(ValueError, match="lr_scheduler_type: 'polynomial'"):
        schedule_from_args(args)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, warmup_steps=0.1, report_to="none",
                             use_cpu=True, lr_scheduler_type="linear")
    s = schedule_from_args(args)
    assert (s.steps, s.warmup_steps, s.kind) == (20, 2, "linear")
    model, _ = _hf_setup(_config(tmp_path))
    with pytest.raises(ValueError, match="periods"):
        nested_optimizer(model, args, tiers={"periods": [0]})
    with pytest.raises(ValueError, match="gradient_norm"):
        nested_optimizer(model, args, tiers=TiersConfig(strategy="gradient_norm"))
    opt, _ = nested_optimizer(model, args, tiers={"periods": [1, 3]})
    assert isinstance(opt, NestedAdamW) and [g["period"] for g in opt.param_groups] == [1, 3]
    json.dumps(opt.tier_stats())  # plain data


def test_trl_sft_example(tmp_path):
    try:
        import trl  # noqa: F401
    except ImportError:
        print("skipping: trl is not installed (pip install 'nested-learning[trl]')", file=sys.stderr)
        pytest.skip("trl is not installed (pip install 'nested-learning[trl]')")
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "trl_sft.py"
    spec = importlib.util.spec_from_file_location("trl_sft_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--out", str(tmp_path / "sft"), "--steps", "3", "--periods", "1,2"])
    assert len(summary["losses"]) == 3 and all(math.isfinite(x) for x in summary["losses"])
    # Three steps, periods [1, 2]: the slow tier was due at step 2 and flushed its one pending step at the end.
    assert [(t["updates"], t["pending"]) for t in summary["tiers"]] == [(3, 0), (2, 0)]
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").is_file()
