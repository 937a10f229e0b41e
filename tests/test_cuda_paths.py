"""CUDA only (skipped on CPU): the compiled bf16 paths against float32 ground truth.

bf16 autocast makes every path differ from float32 by a few percent, so each fast path is held to the error
of eager PEFT under the same autocast (the reference every user trusts), not to a fixed tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import loss_and_grads, micro_config, tiny, write_data
from nested_learning.speed.lora_fold import fold_lora_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: compiled bf16 paths on a GPU")


def rel_errors(grads: dict, truth: dict) -> dict:
    return {n: float((grads[n].float() - truth[n]).norm() / truth[n].norm()) for n in truth}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_folded_lora_gradients(arch, compiled):
    torch._dynamo.reset()  # every compiled model here shares LlamaModel.forward: keep the recompile limit for each
    truth_model = tiny(arch, dtype=torch.float32, device="cuda")
    peft_bf16 = tiny(arch, dtype=torch.bfloat16, device="cuda")
    fused = copy.deepcopy(peft_bf16)
    assert len(fold_lora_groups(fused)) == 4
    if compiled:
        fused.get_base_model().model.compile()
    ids = torch.randint(0, 211, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    l_truth, g_truth = loss_and_grads(truth_model, ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l_peft, g_peft = loss_and_grads(peft_bf16, ids)
        l_fused, g_fused = loss_and_grads(fused, ids)
    e_peft, e_fused = rel_errors(g_peft, g_truth), rel_errors(g_fused, g_truth)
    worst = sorted(((e_fused[n], e_peft[n], n) for n in e_fused), reverse=True)[:5]
    assert max(e_fused.values()) <= 2 * max(e_peft.values()) + 0.02, worst
    for n in e_fused:  # every LoRA tensor (q/k/v ones included) gets its gradient
        assert e_fused[n] <= max(0.15, 3 * e_peft[n]), (n, e_fused[n], e_peft[n])
    assert abs(float(l_fused) - float(l_truth)) <= 2 * abs(float(l_peft) - float(l_truth)) + 1e-2


def test_compiled_trainer_follows_the_eager_trainer(tmp_path, caplog, capfd):
    from nested_learning.train.loop import run_training

    data = write_data(tmp_path / "data")
    torch._dynamo.reset()  # earlier tests' compiled models must not use up this test's recompile limit
    runs = {}
    # All pack their batches: "graphs" pads the rows to max_length (one shape, as graph replay needs), the
    # others keep varying widths (so recompiles must not run out). Padding carries no loss: same steps.
    for name, speed in {"eager": {"compile": False, "lora_fold": False},
                        "fast": {"compile": True, "cuda_graphs": False, "lora_fold": False},
                        "graphs": {"compile": True, "cuda_graphs": True, "activation_memory_budget": 0.8,
                                   "lora_fold": True}}.items():
        cfg = micro_config(data, tmp_path / name, model={"device": "cuda"}, speed=speed, eval={"every": 0},
                           data={"packing": True},
                           output={"dir": str(tmp_path / name), "tensorboard": False, "log_every": 1})
        seen = []

        class Rec:
            def __getattr__(self, hook):
                return lambda state, *a: seen.append(state.train_loss) if hook == "on_step" else None

        run_training(cfg, callbacks=[Rec()])
        runs[name] = seen
    eager, fast, graphs = runs["eager"], runs["fast"], runs["graphs"]
    assert "recompile_limit" not in caplog.text + capfd.readouterr().err  # varying chunk / batch shapes must not exhaust recompiles
    assert eager[-1] < eager[0] - 0.1, eager  # the run learns, so a broken backward would show
    assert fast == pytest.approx(eager, rel=3e-2), (fast, eager)
    assert graphs == pytest.approx(eager, rel=3e-2), (graphs, eager)  # replayed graphs: same updates


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [1000, 128256])
def test_triton_loss_chunk_matches_float64(dtype, vocab):
    """``ce_kernel.ce_chunk`` (the default chunk kernel on CUDA) against the float64 chunk: loss and gradient,
    ignored rows without loss or gradient, and logits untouched without ``want_grad``."""
    from nested_learning.speed import ce_kernel
    from nested_learning.speed.chunked_loss import _ce_chunk

    g = torch.Generator("cuda").manual_seed(0)
    logits = (torch.randn(67, vocab, device="cuda", generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, (67,), device="cuda", generator=g)
    targets[::5] = -100
    assert ce_kernel.available(logits)
    # Out-of-range targets (their input ids fail the embedding lookup first) read nothing and add nothing.
    odd = logits[:2].clone()
    assert ce_kernel.ce_chunk(odd, torch.tensor([-1, vocab], device="cuda"), True).item() == 0.0
    assert not odd.any()
    ref = logits.double()
    ref_loss = _ce_chunk(ref, targets, True)
    got = logits.clone()
    loss = ce_kernel.ce_chunk(got, targets, True)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    step = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-6  # the gradient is stored in the logits' dtype
    assert (got.double() - ref).abs().max().item() <= step
    assert not got[::5].any()
    untouched = logits.clone()
    assert ce_kernel.ce_chunk(untouched, targets, False).item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert torch.equal(untouched, logits)
