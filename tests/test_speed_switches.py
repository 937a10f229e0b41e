"""Every speed lever leaves the numbers unchanged: chunked head + cross-entropy, folded LoRA, flat optimizer
buffers, packing, loss read-back interval, the mask-free causal attention and rotary tables; each case checks
from the run's speed plan that its lever really took effect. Tiny models, float32, CPU (compile and CUDA graphs
run on the GPU: tests/test_cuda_paths.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nested_learning.data import Sample, collate
from conftest import micro_config, tiny, write_data
from nested_learning.model.loading import load_model
from nested_learning.model.lora import wrap_lora
from nested_learning.speed.chunked_loss import chunked_token_loss_sum, linear_cross_entropy_sum
from nested_learning.speed.compile import set_activation_memory_budget
from nested_learning.speed.kernels import apply_kernel_choices
from nested_learning.speed.plan import plan_speed
from nested_learning.train.loop import train_loop
from nested_learning.train.loss import make_loss_fn, token_loss_sum
from nested_learning.train.setup import build_run


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_full(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk)
    n, h, v = 37, 12, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.5, [hidden, weight] + ([bias] if with_bias else []))
    out = linear_cross_entropy_sum(hidden, weight, targets, bias=bias, chunk=chunk)
    grads = torch.autograd.grad(out * 0.5, [hidden, weight] + ([bias] if with_bias else []))
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_linear_cross_entropy_frozen_head_and_no_grad():
    hidden = torch.randn(9, 4, requires_grad=True)
    weight = torch.randn(7, 4)  # frozen: no weight gradient is computed
    targets = torch.randint(0, 7, (9,))
    out = linear_cross_entropy_sum(hidden, weight, targets, chunk=4)
    out.backward()
    ref_h = hidden.detach().clone().requires_grad_(True)
    F.cross_entropy(ref_h @ weight.t(), targets, reduction="sum").backward()
    assert torch.allclose(hidden.grad, ref_h.grad, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy_sum(hidden, weight, targets, chunk=2), out, atol=1e-5)


def _lora_model():
    cfg = micro_config("unused", "unused")
    model = wrap_lora(load_model(cfg.model, seed=0), cfg.lora, seed=0)
    for name, p in model.named_parameters():  # non-zero lora_B so LoRA contributes to the loss
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("packing", [False, True])
def test_chunked_loss_on_a_lora_model(packing):
    model = _lora_model()
    rng = torch.Generator().manual_seed(1)
    samples = []
    for n in (5, 17, 9, 30):
        ids = torch.randint(3, 200, (n,), generator=rng).tolist()
        samples.append(Sample(ids, [-100] * 2 + ids[2:]))
    batch = collate(samples, 0, packing=packing, max_length=40)
    trainable = [p for p in model.parameters() if p.requires_grad]

    full, n_full = token_loss_sum(model, batch)
    g_full = torch.autograd.grad(full, trainable)
    chunked, n_chunk = chunked_token_loss_sum(model, batch, chunk=7)
    g_chunk = torch.autograd.grad(chunked, trainable)
    assert n_full == n_chunk
    assert torch.allclose(full, chunked, rtol=1e-5)
    for a, b in zip(g_full, g_chunk):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert make_loss_fn(0) is token_loss_sum


def test_cuda_graphs_only_with_compile_on_cuda_packed_batches_and_no_accumulation():
    model, cuda, cpu = _lora_model(), torch.device("cuda"), torch.device("cpu")

    def graphs(device=cuda, **sections):
        return plan_speed(micro_config("unused", "unused", **sections), model, device)["cuda_graphs"]

    assert graphs(data={"packing": True}).on
    assert graphs(data={"packing": False}).note.startswith("data.packing is off")  # padded batches change shape
    assert graphs(cpu, data={"packing": True}).note == "compile is off"
    assert graphs(data={"packing": True}, speed={"compile": False}).note == "compile is off"
    assert graphs(data={"packing": True}, speed={"cuda_graphs": False}).note == "speed.cuda_graphs is off"
    assert graphs(data={"packing": True}, optim={"grad_accum": 2}).note.startswith("optim.grad_accum > 1")


def test_sdpa_kernels_are_set_and_restored_by_a_later_null_config():
    backends, cuda = torch.backends.cuda, torch.device("cuda")
    before = [backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(), backends.cudnn_sdp_enabled(),
              backends.math_sdp_enabled()]
    try:
        apply_kernel_choices(["math", "efficient"], cuda)
        assert not backends.flash_sdp_enabled() and not backends.cudnn_sdp_enabled()
        assert backends.math_sdp_enabled() and backends.mem_efficient_sdp_enabled()
        apply_kernel_choices(None, cuda)  # null: torch's own set again, not the previous run's
        assert [backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(), backends.cudnn_sdp_enabled(),
                backends.math_sdp_enabled()] == before
    finally:
        for flag, enable in zip(before, ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp",
                                         "enable_math_sdp")):
            getattr(backends, enable)(flag)


def _losses(tmp_path, name, **sections):
    """(per-step train losses, final state, speed plan) of a micro run on the CPU."""
    data = write_data(tmp_path / "data")
    sections.setdefault("model", {"device": "cpu"})
    run = build_run(micro_config(data, tmp_path / name, eval={"every": 0}, **sections))
    seen = []

    class Rec:
        def __getattr__(self, hook):
            return lambda state, *a: seen.append(state.train_loss) if hook == "on_step" else None

    state = train_loop(run, callbacks=[Rec()])
    return seen, state, run.speed_plan


def test_every_switch_leaves_the_training_loss_unchanged(tmp_path):
    plain = {"loss_chunk_tokens": 0, "lora_fold": False, "outer_rotary": False, "skip_causal_mask": False}
    base, base_state, plan = _losses(tmp_path, "base", speed=plain,
                                     optim={"lr": 1e-2, "batch_size": 4, "flat_buffers": False})
    assert not any(plan.on(name) for name in ("chunked_loss", "lora_fold", "outer_rotary", "skip_causal_mask"))
    switches = {  # name: (speed section on top of the plain one, other sections, the levers that must be on)
        "chunked": ({"loss_chunk_tokens": 16}, {}, ["chunked_loss"]),
        "lora_fold": ({"lora_fold": True}, {}, ["lora_fold"]),
        "flat": ({}, {"optim": {"lr": 1e-2, "batch_size": 4, "flat_buffers": True}}, []),
        "outer_rotary": ({"outer_rotary": True}, {}, ["outer_rotary"]),
        "causal_sdpa": ({"skip_causal_mask": True}, {}, ["skip_causal_mask"]),
        "all": ({}, {}, ["chunked_loss", "lora_fold", "outer_rotary", "skip_causal_mask"]),  # the defaults
    }
    for name, (speed, sections, levers) in switches.items():
        losses, state, plan = _losses(tmp_path, name, speed={**plain, **speed} if name != "all" else {}, **sections)
        assert [lv for lv in levers if not plan.on(lv)] == [], (name, plan.format())
        assert losses == pytest.approx(base, rel=1e-4), name
        assert state.val_loss == pytest.approx(base_state.val_loss, rel=1e-4), name

    # log_every only changes when the loss is read back: the window means agree with the per-step losses.
    every2, _, _ = _losses(tmp_path, "log2", speed=plain,
                           output={"log_every": 2, "dir": str(tmp_path / "log2"), "tensorboard": False})
    read = every2[1::2]  # the state keeps the last read value between read-backs
    pairs = [(base[i] + base[i + 1]) / 2 for i in range(0, len(base) - 1, 2)]
    assert read[: len(pairs)] == pytest.approx(pairs, rel=1e-4)


def test_packing_keeps_the_first_step_loss(tmp_path):
    """Packing changes which samples share a step, so only the first step's loss on the same samples is
    comparable; here batch_size covers the whole (tiny) data set in both layouts."""
    data = write_data(tmp_path / "data", n_train=8, n_valid=2)
    losses = {}
    for packing in (False, True):
        cfg = micro_config(data, tmp_path / f"p{packing}", data={"dir": str(data), "max_length": 512, "packing": packing,
                                                                 "shuffle": False, "valid_fraction": 0.0},
                           optim={"lr": 1e-2, "batch_size": 8}, schedule={"steps": 1, "warmup_steps": 0},
                           eval={"every": 0})
        seen = []

        class Rec:
            def __getattr__(self, hook):
                return lambda state, *a: seen.append(state.train_loss) if hook == "on_step" else None

        train_loop(build_run(cfg), callbacks=[Rec()])
        losses[packing] = seen[0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def _saved_bytes_and_grads(budget: float):
    """Compile a tiny LoRA decoder under ``budget`` (AOT autograd with the min-cut partitioner inductor uses, no
    C++ codegen); bytes saved for backward and the grads."""
    torch._dynamo.reset()
    set_activation_memory_budget(budget)
    model = tiny("llama", dtype=torch.float32, layers=1)  # the partitioner's choice is per layer
    decoder = model.get_base_model().model
    decoder.compile(backend="aot_eager_decomp_partition")  # the min-cut partitioner, no C++ codegen
    ids = torch.randint(0, 211, (2, 64), generator=torch.Generator().manual_seed(0))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = decoder(input_ids=ids).last_hidden_state
    hidden.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sum(saved.values()), grads


def test_activation_memory_budget_recomputes_instead_of_saving():
    try:
        full, g_full = _saved_bytes_and_grads(1.0)
        lean, g_lean = _saved_bytes_and_grads(0.5)
    finally:
        set_activation_memory_budget(1.0)
        torch._dynamo.reset()
    assert lean < 0.8 * full, (lean, full)
    for name in g_full:
        assert torch.allclose(g_lean[name], g_full[name], rtol=1e-4, atol=1e-7), name
