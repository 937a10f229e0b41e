"""``speed.skip_causal_mask``: rows of one sample from position 0 reach SDPA with no mask tensor, also under
``torch.compile`` (where transformers would build one), and the attention is the same as with the mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nested_learning.speed.causal_mask import CAUSAL_SDPA, causal_rows, use_causal_sdpa
from nested_learning.data import Sample, collate
from nested_learning.speed.chunked_loss import chunked_token_loss_sum
from nested_learning.train.loss import token_loss_sum
from conftest import tiny


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


def _pair(arch="llama", layers: int = 2):
    """The same LoRA model twice: transformers' sdpa, and switched to CAUSAL_SDPA."""
    ref, ours = tiny(arch, dtype=torch.float32, layers=layers), tiny(arch, dtype=torch.float32, layers=layers)
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
    """Compiled (dynamo + AOT autograd, no codegen), on the inputs the trainer passes for rows of one sample:
    transformers' sdpa gets a mask (it cannot read the padding mask while tracing); CAUSAL_SDPA inside
    ``causal_rows`` gets none, and outside it gets transformers' mask again. Same logits on real tokens."""
    ref, ours = _pair()
    batch = collate(_samples((24, 19)), 0, packing=True, max_length=24)  # one row with 5 tokens of padding
    assert batch.one_sample_per_row
    real = batch.attention_mask.bool()
    eager = ref(**batch.model_inputs()).logits[real]
    sdpa_masks.clear()
    torch._dynamo.reset()
    out = torch.compile(ref, backend="aot_eager")(**batch.model_inputs()).logits[real]
    assert sdpa_masks and all(sdpa_masks), "transformers builds a mask while compiling (what the switch avoids)"
    torch.testing.assert_close(out, eager)
    compiled = torch.compile(ours, backend="aot_eager")
    for inside, masked in ((True, False), (False, True), (True, False)):
        sdpa_masks.clear()
        with causal_rows(inside):
            out = compiled(**batch.model_inputs()).logits[real]
        assert sdpa_masks and set(sdpa_masks) == {masked}
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


def test_windows_and_caches_keep_their_mask():
    from nested_learning.speed.causal_mask import _causal_mask_or_none

    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    pad = torch.tensor([[1, 1, 1, 1, 0, 0]])

    common = dict(batch_size=1, q_length=6, kv_length=6, kv_offset=0, attention_mask=None,
                  mask_function=causal_mask_function, allow_is_causal_skip=True)
    def as_transformers(**kw):  # what transformers' own builder returns, mask or None
        got, want = _causal_mask_or_none(**kw), sdpa_mask(**kw)
        return (got is None and want is None) or (got is not None and want is not None and torch.equal(got, want))

    with causal_rows():
        assert _causal_mask_or_none(**common) is None and _causal_mask_or_none(**{**common, "attention_mask": pad}) is None
        assert _causal_mask_or_none(**{**common, "allow_is_causal_skip": False}) is not None  # e.g. packed rows
        assert as_transformers(**{**common, "allow_is_causal_skip": False})
        assert _causal_mask_or_none(**{**common, "mask_function": bidirectional_mask_function, "attention_mask": pad}) is not None
        assert as_transformers(**{**common, "local_size": 3})  # sliding window: a mask
        assert _causal_mask_or_none(**{**common, "local_size": 3}) is not None
        assert as_transformers(**{**common, "q_length": 1})  # decoding with a cache: transformers decides
    assert _causal_mask_or_none(**{**common, "attention_mask": pad}) is not None  # outside: transformers' mask
    assert as_transformers(**{**common, "attention_mask": pad})


def test_other_implementations_are_left_alone():
    model = tiny("llama", dtype=torch.float32)
    model.get_base_model().set_attn_implementation("eager")
    assert not use_causal_sdpa(model)
    assert model.get_base_model().config._attn_implementation == "eager"


def test_causal_rows_is_per_thread():
    """Two trainings in one process: one thread's single-sample batches never drop another thread's mask."""
    import threading

    from nested_learning.speed.causal_mask import _causal_mask_or_none

    args = dict(batch_size=1, q_length=6, kv_length=6, kv_offset=0, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                allow_is_causal_skip=True)
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


def test_non_causal_models_keep_their_attention():
    """A model configured for bidirectional attention keeps it (and its padding mask) inside ``causal_rows``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, use_cache=False, is_causal=False)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    ours.load_state_dict(ref.state_dict())
    assert use_causal_sdpa(ours)
    batch = collate(_samples((5, 17, 9, 30)), 0, max_length=32)
    with causal_rows(batch.one_sample_per_row):
        got = ours(**batch.model_inputs()).logits
    want = ref(**batch.model_inputs()).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real])
