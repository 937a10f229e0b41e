"""``speed.varlen_attention``: rows packed with several samples attend sample by sample from boundaries the batch
carries, with no (B, 1, T, T) mask; the loss and gradients equal transformers' block-diagonal mask (float64, Llama
and Qwen2, both loss paths), also compiled; the trainer's losses are unchanged; plan and config rules."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import Recorder, micro_config, tiny, write_data
from nested_learning.config import TrainConfig
from nested_learning.data import Sample, collate
from nested_learning.speed.chunked_loss import chunked_token_loss_sum
from nested_learning.speed.varlen import (VARLEN_SDPA, batch_attention, sample_offsets, segment_attention,
                                          use_varlen_sdpa)
from nested_learning.train.loss import token_loss_sum


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Per SDPA call: (query length, whether it got a mask tensor)."""
    seen: list[tuple[int, bool]] = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


def _samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Sample(ids, [-100] + ids[1:]) for ids in
            (torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths)]


def test_offsets_mark_every_sample_and_the_padding_tail():
    batch = collate(_samples((5, 17, 9, 30, 3)), 0, packing=True, max_length=32)
    assert not batch.one_sample_per_row and batch.input_ids.shape == (3, 31)  # rows [5, 17, 9], [30], [3]
    assert batch.sample_offsets.dtype == torch.int32
    # 5 samples and the padding tails of rows 2 and 3, then the end, repeated up to 8 offsets
    assert batch.sample_offsets.tolist() == [0, 5, 22, 31, 61, 62, 65, 93]
    wide = sample_offsets(torch.zeros(1, 9, dtype=torch.long))  # nine one-token samples: 10 offsets, padded to 16
    assert wide.tolist() == list(range(10)) + [9] * 6
    assert collate(_samples((5, 17)), 0).sample_offsets is None  # one sample per row: no boundaries needed
    with pytest.raises(ValueError, match="start every row at 0"):
        sample_offsets(torch.tensor([[1, 2, 0]]))


def test_fixed_width_batches_share_one_offsets_length():
    """With CUDA graphs (fixed-width rows) every micro-batch's offsets take the plan's one length: the fullest
    rows' samples, a padding tail per row and the end, rounded up to a power of two; a replayed step keeps one
    shape. Without fixed width each batch rounds its own count."""
    from itertools import islice

    from nested_learning.data import BatchPlan, iterate_batches

    g = torch.Generator().manual_seed(5)
    samples = _samples(torch.randint(2, 40, (60,), generator=g).tolist(), seed=5)
    plan = BatchPlan(samples, 3, seed=0, packing=True, max_length=64, fixed_width=True)
    fullest = sorted((len(r) for r in plan.rows), reverse=True)[:3]
    assert plan.offsets_len == max(8, 1 << (sum(fullest) + 3).bit_length())
    batches = list(islice(iterate_batches(samples, plan, 0), 2 * len(plan)))  # two epochs, rows reshuffled
    packed = [b for b in batches if b.sample_offsets is not None]
    assert packed and {b.sample_offsets.numel() for b in packed} == {plan.offsets_len}
    for b in packed:  # the real offsets, then the end repeated
        starts = (b.position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
        assert b.sample_offsets.tolist() == starts + [b.input_ids.numel()] * (plan.offsets_len - len(starts))
    assert BatchPlan(samples, 3, seed=0, packing=True, max_length=64).offsets_len is None
    with pytest.raises(ValueError, match="do not fit size=4"):
        sample_offsets(torch.zeros(1, 5, dtype=torch.long), size=4)


def test_segment_attention_equals_a_block_diagonal_mask():
    g = torch.Generator().manual_seed(1)
    lengths, heads, kv_heads, dim = (4, 1, 7, 5, 3), 6, 2, 8
    n = sum(lengths)
    q = torch.randn(n, heads, dim, dtype=torch.float64, generator=g)
    k, v = (torch.randn(n, kv_heads, dim, dtype=torch.float64, generator=g) for _ in range(2))
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (ids[:, None] == ids[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed,
                                          enable_gqa=True, scale=0.3).transpose(0, 1)
    offsets = sample_offsets(torch.cat([torch.arange(m) for m in lengths])[None])
    got = segment_attention(q, k, v, offsets, max(lengths), scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _pair(arch, layers: int = 2):
    ref, ours = tiny(arch, dtype=torch.float64, layers=layers), tiny(arch, dtype=torch.float64, layers=layers)
    ours.load_state_dict(ref.state_dict())
    assert use_varlen_sdpa(ours) and ours.get_base_model().config._attn_implementation == VARLEN_SDPA
    return ref, ours


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_train_as_with_transformers_mask_and_build_none(arch, sdpa_calls):
    ref, ours = _pair(arch)
    batch = collate(_samples((5, 17, 9, 30, 3), seed=2), 0, packing=True, max_length=32)
    results = []
    for model in (ref, ours):
        for loss_fn in (token_loss_sum, lambda m, b: chunked_token_loss_sum(m, b, chunk=13)):
            sdpa_calls.clear()
            loss, _ = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
            results.append((loss, grads))
            if model is ours:  # per layer, one causal call per non-empty sample, never a mask or a whole row
                assert len(sdpa_calls) == 2 * 7 and not any(masked for _, masked in sdpa_calls)
                assert max(length for length, _ in sdpa_calls) == 30
            else:
                assert sdpa_calls == [(31, True)] * 2
    for (l_ref, g_ref), (l_got, g_got) in ((results[0], results[2]), (results[1], results[3])):
        torch.testing.assert_close(l_got, l_ref, rtol=1e-12, atol=0)
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_one_sample_rows_and_other_models_are_unchanged(sdpa_calls):
    ref, ours = _pair("llama")
    batch = collate(_samples((20, 31, 7)), 0, packing=True, max_length=32)
    assert batch.one_sample_per_row
    with batch_attention(ours, batch) as inputs:
        assert "cu_seq_lens_q" not in inputs
        out = ours(**inputs).logits
    assert sdpa_calls == [(31, False)] * 2  # CAUSAL_SDPA's causal kernel, as before
    with batch_attention(ref, collate(_samples((5, 17, 9)), 0, packing=True, max_length=32)) as inputs:
        assert "cu_seq_lens_q" not in inputs  # a model on plain sdpa gets no boundaries (and keeps its mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(out[real], ref(**batch.model_inputs()).logits[real], rtol=1e-12, atol=1e-12)
    windowed = tiny("qwen2")
    windowed.get_base_model().config.layer_types = ["sliding_attention", "full_attention"]
    assert not use_varlen_sdpa(windowed)


def test_compiled_packed_rows_keep_the_loss():
    """Compiled (dynamo + AOT autograd): the boundaries are graph inputs, the loop breaks the graph only where the
    CPU's per-sample path needs Python; same loss as eager on two batches with different sample counts. One layer:
    every graph break is per layer, and two layers only doubled the compile time (96 s on 2 cores)."""
    ref, ours = _pair("llama", layers=1)
    compiled = torch.compile(ours, backend="aot_eager")
    torch._dynamo.reset()
    for lengths in ((5, 17, 9), (12, 12, 4, 4)):  # 3 samples, then 4: a new count recompiles
        batch = collate(_samples(lengths, seed=3), 0, packing=True, max_length=32)
        want, _ = token_loss_sum(ref, batch)
        got, _ = token_loss_sum(compiled, batch)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_trainer_losses_are_unchanged_and_the_plan_says_so(tmp_path, monkeypatch):
    from nested_learning.speed import varlen
    from nested_learning.train.loop import run_training

    packed_calls = []
    real = varlen.segment_attention
    monkeypatch.setattr(varlen, "segment_attention", lambda *a, **k: packed_calls.append(1) or real(*a, **k))
    data = write_data(tmp_path / "data")
    runs = {}
    for name, speed in (("ref", {"varlen_attention": False}), ("varlen", {"varlen_attention": True})):
        cfg = micro_config(data, tmp_path / name, data={"packing": True, "max_length": 64}, speed=speed,
                           schedule={"steps": 6, "warmup_steps": 0}, eval={"every": 3})
        recorder = Recorder()
        run_training(cfg, callbacks=[recorder])
        runs[name] = recorder.steps + recorder.evals
        plan = json.loads((tmp_path / name / "speed_plan.json").read_text())["levers"]["varlen_attention"]
        assert plan["on"] == (name == "varlen"), plan
        assert bool(packed_calls) == (name == "varlen")  # training and evaluation batches held packed rows
    assert plan["note"] == "packed rows attend sample by sample (SDPA on each sample in turn), no T x T mask"
    assert len(runs["varlen"]) == 6 + 2
    for (step, got), (ref_step, want) in zip(runs["varlen"], runs["ref"]):
        assert step == ref_step and got == pytest.approx(want, rel=1e-6)


def test_plan_on_cuda_and_the_reasons_it_is_off():
    from nested_learning.speed.plan import plan_speed
    from nested_learning.speed.varlen import varlen_kernel

    packed = TrainConfig.model_validate({"data": {"packing": True}})
    cuda = plan_speed(packed, tiny("llama"), torch.device("cuda"))["varlen_attention"]
    assert cuda.on == (varlen_kernel() is not None)
    cpu = plan_speed(packed, tiny("llama"), torch.device("cpu"))["varlen_attention"]
    assert not cpu.on and cpu.note.startswith("CPU keeps transformers' mask")
    assert plan_speed(TrainConfig(), tiny("llama"), torch.device("cuda"))["varlen_attention"].note == \
        "data.packing is off (no row holds several samples)"
    windowed = tiny("qwen2")
    windowed.get_base_model().config.layer_types = ["sliding_attention", "full_attention"]
    assert plan_speed(packed, windowed, torch.device("cuda"))["varlen_attention"].note == \
        "layers with sliding_attention"


@pytest.mark.parametrize("sections, message", [
    ({"speed": {"varlen_attention": True, "skip_causal_mask": False}},
     "speed.varlen_attention needs speed.skip_causal_mask"),
    ({"speed": {"varlen_attention": True}, "model": {"attn_implementation": "eager"}},
     "speed.varlen_attention needs model.attn_implementation sdpa, not eager"),
])
def test_contradictions_are_config_errors(sections, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        TrainConfig.model_validate(sections)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: torch's flash varlen kernel")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_kernel_matches_the_per_sample_path(arch, monkeypatch):
    """bf16 on CUDA: the kernel (with the power-of-two padding's empty samples) against the per-sample SDPA loop
    the CPU tests pin, on the same model and batch."""
    from nested_learning.speed import varlen

    model = tiny(arch, dtype=torch.bfloat16, device="cuda")
    assert use_varlen_sdpa(model)
    batch = collate(_samples((40, 170, 90, 300, 30, 7), seed=4), 0, packing=True, max_length=320).to("cuda")
    assert varlen._kernel_fits(torch.empty(1, 4, 16, dtype=torch.bfloat16, device="cuda"))
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(varlen, "_kernel_fits", lambda query: False)
        loss, n = token_loss_sum(model, batch)
        grads = torch.autograd.grad(loss / n, [p for p in model.parameters() if p.requires_grad])
        results.append((loss / n, grads))
    (l_k, g_k), (l_ref, g_ref) = results
    torch.testing.assert_close(l_k, l_ref, rtol=2e-3, atol=0)
    for a, b in zip(g_k, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=2e-3)
