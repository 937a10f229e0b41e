"""``speed.offload_activations``: checkpointed layers keep their input on the host and recompute from it. Same loss
and gradients as torch's checkpoint and as no checkpointing (float64 tiny models, LoRA dropout included: the
recompute replays the random state); the trainer's losses are unchanged; the plan and config rules."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import Recorder, assert_same, micro_config, tiny, write_data
from nested_learning.config import TrainConfig
from nested_learning.speed import offload
from nested_learning.speed.offload import use_host_checkpoint


def _checkpointed(arch: str, host: bool, dropout: float = 0.0, compile_layers: bool = False,
                  recompute_tokens: int = 0):
    model = tiny(arch, dropout=dropout)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if host:
        assert use_host_checkpoint(model, compile_layers=compile_layers, backend="aot_eager",
                                   recompute_tokens=recompute_tokens) == 2
    return model.train()


class RecordGroups:
    def __init__(self, monkeypatch):
        self.seen = []
        real = offload.row_groups

        def recorded(*args):
            self.seen.append(real(*args))
            return self.seen[-1]

        monkeypatch.setattr(offload, "row_groups", recorded)


def _masked_loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("compile_layers", [False, True])
def test_recompute_by_groups_of_rows_keeps_loss_and_gradients(arch, compile_layers, monkeypatch):
    """speed.recompute_tokens: 5 padded rows of 9 tokens, groups of at most 18 tokens: rows [0, 2), [2, 4), [4, 5)
    recomputed and back-propagated one group at a time (the (B, 1, T, T) mask sliced with them), in both layers;
    loss and gradients equal torch's checkpoint."""
    ids = torch.randint(0, 211, (5, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    groups = RecordGroups(monkeypatch)
    torch._dynamo.reset()
    got = _masked_loss_and_grads(_checkpointed(arch, True, compile_layers=compile_layers, recompute_tokens=18),
                                 ids, mask)
    want = _masked_loss_and_grads(_checkpointed(arch, False), ids, mask)
    assert groups.seen == [[slice(0, 2), slice(2, 4), slice(4, 5)]] * 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_rows_are_grouped_only_where_they_can_be():
    hidden = torch.zeros(4, 8, 3)
    rope = (torch.zeros(1, 8, 2), torch.zeros(1, 8, 2))  # broadcast over rows: passed whole
    assert offload.row_groups(hidden, {"position_embeddings": rope, "attention_mask": torch.zeros(4, 1, 8, 8)}, 17) \
        == [slice(0, 2), slice(2, 4)]
    assert offload.row_groups(hidden, {}, 4) == [slice(i, i + 1) for i in range(4)]  # one row at least
    assert offload.row_groups(hidden, {}, 32) is None  # one group: the whole batch
    assert offload.row_groups(hidden, {}, 0) is None
    assert offload.row_groups(hidden, {"cu_seq_lens_q": torch.zeros(4, dtype=torch.int32)}, 8) is None  # packed
    assert offload.row_groups(hidden, {"odd": torch.zeros(3, 8)}, 8) is None  # neither batch-sized nor broadcast


def test_models_with_dropout_recompute_whole(monkeypatch):
    """A group's recompute would draw other dropout masks than the forward did: such models never group."""
    groups = RecordGroups(monkeypatch)
    ids = torch.randint(0, 211, (4, 9), generator=torch.Generator().manual_seed(7))
    model = _checkpointed("llama", True, dropout=0.3, recompute_tokens=9)
    model(input_ids=ids, labels=ids).loss.backward()
    assert groups.seen == []
    assert offload.has_dropout(model) and not offload.has_dropout(tiny("llama"))


class CountHostCopies:
    def __init__(self, monkeypatch):
        self.shapes = []
        to_host = offload._to_host

        def counted(x):
            self.shapes.append(tuple(x.shape))
            return to_host(x)

        monkeypatch.setattr(offload, "_to_host", counted)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_host_checkpoint_matches_torch_checkpoint_and_no_checkpointing(arch, monkeypatch):
    ids = torch.randint(0, 211, (2, 17), generator=torch.Generator().manual_seed(0))
    copies = CountHostCopies(monkeypatch)
    host = _checkpointed(arch, host=True)
    assert_same(host, _checkpointed(arch, host=False), ids, loss_rtol=1e-12, grad_rtol=1e-10)
    assert copies.shapes == [(2, 17, 48)] * 2  # each layer's input went to the host, nothing else
    assert_same(host, tiny(arch).train(), ids, loss_rtol=1e-12, grad_rtol=1e-10)


def test_each_backward_starts_the_copy_back_of_the_layer_backward_reaches_next(monkeypatch):
    """The slots chain the layers in forward order; each layer's backward prefetches the one before it, takes its
    own input from the prefetch, and the last layer's slot is let go when backward is done."""
    started = []
    monkeypatch.setattr(offload._Slot, "prefetch", lambda slot, device: started.append(id(slot)))
    model = _checkpointed("llama", host=True)
    ids = torch.randint(0, 211, (2, 9), generator=torch.Generator().manual_seed(4))
    loss = model(input_ids=ids, labels=ids).loss
    last = offload._last_slot[torch.device("cpu")]
    first = last.prev
    assert first is not None and first.prev is None and first.host is not None
    order = [id(last), id(first)]
    loss.backward()
    assert started == [id(first), id(last), id(first)]  # layer 2 prefetches layer 1, then each takes its own
    assert order == started[1:] and last.host is None and first.host is None
    assert torch.device("cpu") not in offload._last_slot


def test_recompute_replays_the_random_state_of_lora_dropout():
    """A recompute with other dropout masks than the forward's would give other gradients than torch's checkpoint."""
    ids = torch.randint(0, 211, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for host in (True, False):
        model = _checkpointed("llama", host=host, dropout=0.3)
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        assert torch.allclose(grads[0][name], g, rtol=1e-10, atol=1e-12), name


def test_compiled_layers_inside_the_host_checkpoint_keep_loss_and_gradients():
    """Both layers share two graphs (the forward without gradients, the recompute with them), no graph break."""
    from torch._dynamo.utils import counters

    ids = torch.randint(0, 211, (2, 9), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    counters.clear()
    assert_same(_checkpointed("llama", host=True, compile_layers=True), _checkpointed("llama", host=False), ids,
                loss_rtol=1e-12, grad_rtol=1e-10)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_trainer_losses_are_unchanged_and_the_plan_says_so(tmp_path, monkeypatch):
    from nested_learning.train.loop import run_training

    groups = RecordGroups(monkeypatch)
    data = write_data(tmp_path / "data")
    runs, notes = {}, {}
    cases = (("ref", {"offload_activations": False}), ("host", {"offload_activations": True}),
             ("rows", {"offload_activations": True, "recompute_tokens": 64}))
    for name, speed in cases:
        cfg = micro_config(data, tmp_path / name, model={"device": "cpu", "gradient_checkpointing": True},
                           speed=speed, schedule={"steps": 4, "warmup_steps": 0}, eval={"every": 0})
        rec = Recorder()
        run_training(cfg, callbacks=[rec])
        runs[name] = rec.steps
        notes[name] = json.loads((tmp_path / name / "speed_plan.json").read_text())["levers"]["offload_activations"]
    assert notes == {"ref": {"on": False, "note": "speed.offload_activations is off"},
                     "host": {"on": True, "note": "2 checkpointed layer inputs kept in host memory"},
                     "rows": {"on": True, "note": "2 checkpointed layer inputs kept in host memory; recomputed by "
                                                  "rows, 64 tokens at most"}}
    assert any(g is not None and len(g) > 1 for g in groups.seen)  # some micro-batches were recomputed by rows
    for name in ("host", "rows"):
        assert [s for s, _ in runs[name]] == [1, 2, 3, 4]
        for (_, a), (_, b) in zip(runs[name], runs["ref"]):
            assert abs(a - b) <= 1e-6 * abs(b)


@pytest.mark.parametrize("sections, message", [
    ({"speed": {"offload_activations": True}}, "speed.offload_activations needs model.gradient_checkpointing"),
    ({"speed": {"offload_activations": True, "cuda_graphs": True}, "model": {"gradient_checkpointing": True},
      "data": {"packing": True}}, "speed.cuda_graphs cannot run with speed.offload_activations"),
    ({"speed": {"recompute_tokens": 4096}}, "speed.recompute_tokens needs speed.offload_activations"),
])
def test_contradictions_are_config_errors(sections, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        TrainConfig.model_validate(sections)


def test_cuda_plan_compiles_layers_and_drops_graphs_under_offload():
    from nested_learning.speed.plan import plan_speed

    model = _checkpointed("llama", host=False)
    cfg = TrainConfig.model_validate({"speed": {"offload_activations": True}, "data": {"packing": True},
                                      "model": {"gradient_checkpointing": True}})
    plan = plan_speed(cfg, model, torch.device("cuda"))
    assert plan.on("offload_activations") and plan.on("compile") and not plan.on("cuda_graphs")
    assert plan["compile"].note == "each decoder layer, inside the host checkpoint"
    assert plan["cuda_graphs"].note.startswith("speed.offload_activations")
    unset = plan_speed(cfg, tiny("llama"), torch.device("cuda"))  # checkpointing asked, but the model has none on
    assert unset["offload_activations"].note == "no checkpointed layers in this model"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: pinned host copies on a side stream")
def test_cuda_device_memory_after_the_forward_does_not_grow_with_depth():
    """Under bf16 autocast: with torch's checkpoint the device holds one more layer input per layer after the
    forward; with the host checkpoint it holds none, so 6 layers hold what 2 do. Loss and gradients equal torch's
    checkpoint and the gradients agree to bf16 rounding (the copies back are prefetched on the side stream)."""
    ids = torch.randint(0, 211, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    input_bytes = 4 * 512 * 48 * 4  # float32 hidden states of one layer's input (the embedding's output dtype)
    held = {}
    for host in (True, False):
        for layers in (2, 6):
            model = tiny("llama", dtype=torch.float32, device="cuda", layers=layers)
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if host:
                assert use_host_checkpoint(model) == layers
            model.train()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # processes the copy stream's events, so freed inputs stop counting
            held[host, layers] = torch.cuda.memory_allocated() - before
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            held[host, layers, "result"] = (loss.detach(), grads)
            del model, loss
    assert held[False, 6] - held[False, 2] >= 4 * input_bytes * 0.9, held  # torch's checkpoint: an input a layer
    assert held[True, 6] - held[True, 2] < input_bytes / 2, held
    for layers in (2, 6):
        (l_host, g_host), (l_ref, g_ref) = held[True, layers, "result"], held[False, layers, "result"]
        assert torch.equal(l_host, l_ref)
        for name, g in g_ref.items():  # bf16 GEMMs in another order or workspace: ~0.5% on single elements
            torch.testing.assert_close(g_host[name], g, rtol=2e-2, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: pinned host copies on a side stream")
def test_cuda_recompute_by_groups_of_rows_agrees_with_the_whole_batch(monkeypatch):
    """bf16 autocast on CUDA, 6 layers, rows of 512 tokens recomputed two at a time: the groups ran, and loss and
    gradients agree with the host checkpoint recomputing the whole batch (same kernels on fewer rows)."""
    groups = RecordGroups(monkeypatch)
    ids = torch.randint(0, 211, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(8))
    results = []
    for tokens in (1024, 0):
        model = tiny("llama", dtype=torch.float32, device="cuda", layers=6)
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert use_host_checkpoint(model, recompute_tokens=tokens) == 6
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert [g for g in groups.seen if g is not None] == [[slice(0, 2), slice(2, 4)]] * 6
    (l_rows, g_rows), (l_whole, g_whole) = results
    assert torch.equal(l_rows, l_whole)
    for name, g in g_whole.items():
        # Each group's bf16 GEMM rounds its own partial sum (the whole batch rounds one): single elements near zero
        # move by more than any elementwise bound, so the tensor is compared as a whole. A group left out or counted
        # twice moves it by tens of percent.
        assert (g_rows[name] - g).norm() <= 1e-2 * g.norm(), name
