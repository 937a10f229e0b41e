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


def _checkpointed(arch: str, host: bool, dropout: float = 0.0, compile_layers: bool = False):
    model = tiny(arch, dropout=dropout)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if host:
        assert use_host_checkpoint(model, compile_layers=compile_layers, backend="aot_eager") == 2
    return model.train()


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


def test_trainer_losses_are_unchanged_and_the_plan_says_so(tmp_path):
    data = write_data(tmp_path / "data")
    runs = {}
    for name, off in (("ref", False), ("host", True)):
        from nested_learning.train.loop import run_training

        cfg = micro_config(data, tmp_path / name, model={"device": "cpu", "gradient_checkpointing": True},
                           speed={"offload_activations": off}, schedule={"steps": 4, "warmup_steps": 0},
                           eval={"every": 0})
        rec = Recorder()
        run_training(cfg, callbacks=[rec])
        runs[name] = rec.steps
        plan = json.loads((tmp_path / name / "speed_plan.json").read_text())["levers"]["offload_activations"]
        assert plan == ({"on": True, "note": "2 checkpointed layer inputs kept in host memory"} if off
                        else {"on": False, "note": "speed.offload_activations is off"})
    assert [s for s, _ in runs["host"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(runs["host"], runs["ref"]):
        assert abs(a - b) <= 1e-6 * abs(b)


@pytest.mark.parametrize("sections, message", [
    ({"speed": {"offload_activations": True}}, "speed.offload_activations needs model.gradient_checkpointing"),
    ({"speed": {"offload_activations": True, "cuda_graphs": True}, "model": {"gradient_checkpointing": True},
      "data": {"packing": True}}, "speed.cuda_graphs cannot run with speed.offload_activations"),
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
