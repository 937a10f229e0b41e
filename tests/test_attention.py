"""``model.skip_causal_mask``: rows of one sample from position 0 reach SDPA with no mask tensor, also under
``torch.compile`` (where transformers would build one), and the attention is the same as with the mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nested_learning.attention import CAUSAL_SDPA, causal_rows, use_causal_sdpa
from nested_learning.data import Sample, collate
from nested_learning.loss import chunked_token_loss_sum, token_loss_sum
from tests.test_fused_lora import tiny


@pytest.fixture
def sdpa_masks(monkeypatch):
    """Records, per SDPA call, whether it got a mask tensor (True) or none (False)."""
    seen: list[bool] = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask is not None)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


def _samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=g).tolist()
        out.append(Sample(ids, [-100] + ids[1:]))
    return out


def _pair(arch="llama"):
    """The same LoRA model twice: transformers' sdpa, and switched to CAUSAL_SDPA."""
    ref, ours = tiny(arch, dtype=torch.float32), tiny(arch, dtype=torch.float32)
    ours.load_state_dict(ref.state_dict())
    assert use_causal_sdpa(ours)
    assert ours.get_base_model().config._attn_implementation == CAUSAL_SDPA
    return ref, ours


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["padded", "packed_single", "packed_shared"])
def test_same_loss_and_grads_as_transformers_sdpa(arch, layout, sdpa_masks):
    ref, ours = _pair(arch)
    lengths = {"padded": (5, 17, 9, 30), "packed_single": (20, 31, 7), "packed_shared": (5, 17, 9, 30, 3)}[layout]
    batch = collate(_samples(lengths), 0, packing=layout != "padded", max_length=32)
    assert batch.one_sample_per_row == (layout != "packed_shared")
    results = []
    for model in (ref, ours):
        sdpa_masks.clear()
        for loss_fn in (token_loss_sum, lambda m, b: chunked_token_loss_sum(m, b, chunk=13)):
            loss, _ = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
            results.append((loss, grads))
        if model is ours:  # no mask where one sample fills each row (padding after it carries no loss)
            assert sdpa_masks and all(sdpa_masks) == (layout == "packed_shared") and len(set(sdpa_masks)) == 1
    (l_ref, g_ref), (l_ref_c, _), (l_ours, g_ours), (l_ours_c, _) = results
    assert l_ours.item() == pytest.approx(l_ref.item(), rel=1e-6)
    assert l_ours_c.item() == pytest.approx(l_ref_c.item(), rel=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_no_mask_under_compile_and_one_graph_each_way(sdpa_masks):
    """Compiled (dynamo + AOT autograd, no codegen): transformers' sdpa gets a mask for single-sample rows;
    CAUSAL_SDPA inside ``causal_rows`` gets none, and outside it gets transformers' mask again."""
    ref, ours = _pair()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    eager = ref(input_ids=ids).logits
    assert sdpa_masks == [False, False]  # eagerly, transformers itself passes no mask here
    sdpa_masks.clear()
    torch._dynamo.reset()
    compiled_ref = torch.compile(ref, backend="aot_eager")
    out = compiled_ref(input_ids=ids).logits
    assert sdpa_masks and all(sdpa_masks), "transformers builds a mask while compiling (what the switch avoids)"
    torch.testing.assert_close(out, eager)
    compiled = torch.compile(ours, backend="aot_eager")
    for inside, masked in ((True, False), (False, True), (True, False)):
        sdpa_masks.clear()
        with causal_rows(inside):
            out = compiled(input_ids=ids).logits
        assert sdpa_masks and set(sdpa_masks) == {masked}
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


def test_windows_and_caches_keep_their_mask():
    from nested_learning.attention import _causal_mask_or_none

    common = dict(batch_size=1, q_length=6, kv_length=6, kv_offset=0, attention_mask=None, allow_is_causal_skip=False)
    with causal_rows():
        assert _causal_mask_or_none(**common) is None
        assert _causal_mask_or_none(**{**common, "local_size": 3}) is not None  # sliding window
        assert _causal_mask_or_none(**{**common, "q_length": 1}) is not None  # decoding with a cache
    assert _causal_mask_or_none(**common) is not None  # outside causal_rows: transformers' own mask


def test_other_implementations_are_left_alone():
    model = tiny("llama", dtype=torch.float32)
    model.get_base_model().set_attn_implementation("eager")
    assert not use_causal_sdpa(model)
    assert model.get_base_model().config._attn_implementation == "eager"


def test_causal_rows_is_per_thread():
    """Two trainings in one process: one thread's single-sample batches never drop another thread's mask."""
    import threading

    from nested_learning.attention import _causal_mask_or_none

    args = dict(batch_size=1, q_length=6, kv_length=6, kv_offset=0, attention_mask=None, allow_is_causal_skip=False)
    inside, seen = threading.Event(), {}

    def other_thread():
        inside.wait(timeout=10)
        seen["other"] = _causal_mask_or_none(**args)

    t = threading.Thread(target=other_thread)
    t.start()
    with causal_rows():
        inside.set()
        t.join(timeout=10)
        seen["this"] = _causal_mask_or_none(**args)
    assert seen["this"] is None
    assert seen["other"] is not None and seen["other"].shape == (1, 1, 6, 6)
