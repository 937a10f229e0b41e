"""``speed.outer_rotary``: rotary tables as an outer product, bit-identical to the module's own, and only for
modules whose forward gives exactly those tables."""

from __future__ import annotations

import pytest
import torch

from nested_learning.speed.rotary import use_outer_rotary
from conftest import tiny


class TransposedRotaryEmbedding(torch.nn.Module):
    """The batched-matrix-product form some transformers releases use (angles built (batch, dim/2, T), then
    transposed)."""

    def __init__(self, dim=16, base=10000.0, scaling=1.0, rope_type="default"):
        super().__init__()
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.attention_scaling, self.rope_type = scaling, rope_type

    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class Float32TablesRotaryEmbedding(TransposedRotaryEmbedding):
    def forward(self, x, position_ids):  # float32 tables whatever the input dtype (as some models do)
        return super().forward(x.float(), position_ids)


class LearnedScaleRotaryEmbedding(TransposedRotaryEmbedding):
    def __init__(self):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, position_ids):
        cos, sin = super().forward(x, position_ids)
        return cos * self.alpha.exp(), sin * self.alpha.exp()


class ShiftedRotaryEmbedding(TransposedRotaryEmbedding):
    def forward(self, x, position_ids):  # another formula: must keep it
        return super().forward(x, position_ids + 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_logits_and_grads(arch):
    ref, ours = tiny(arch, dtype=torch.float32), tiny(arch, dtype=torch.float32)
    assert use_outer_rotary(ours) == 1
    assert use_outer_rotary(ours) == 0  # already switched
    ids = torch.randint(3, 200, (3, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.stack([torch.arange(40), torch.arange(40), torch.arange(7, 47)])
    outs = []
    for model in (ref, ours):
        loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        outs.append((loss, grads))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_transposed_product_form_is_switched_with_identical_tables():
    holder = torch.nn.Module()
    holder.rotary_emb = TransposedRotaryEmbedding(dim=64, base=500000.0, scaling=0.75)
    x = torch.zeros(1, dtype=torch.bfloat16)
    positions = torch.stack([torch.arange(2048), torch.arange(2048) + 3])
    before = holder.rotary_emb(x, positions)
    assert use_outer_rotary(holder) == 1
    assert "forward" in vars(holder.rotary_emb)
    after = holder.rotary_emb(x, positions)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert after[0].is_contiguous() and after[0].shape == (2, 2048, 64)


@pytest.mark.parametrize("module", [ShiftedRotaryEmbedding(), TransposedRotaryEmbedding(rope_type="dynamic"),
                                    TransposedRotaryEmbedding(rope_type="longrope"), Float32TablesRotaryEmbedding(),
                                    LearnedScaleRotaryEmbedding()])
def test_other_forms_keep_their_forward(module):
    holder = torch.nn.Module()
    holder.rotary_emb = module
    assert use_outer_rotary(holder) == 0
    assert "forward" not in vars(module)


def test_a_copy_uses_its_own_frequencies():
    import copy

    holder = torch.nn.Module()
    holder.rotary_emb = TransposedRotaryEmbedding()
    use_outer_rotary(holder)
    twin = copy.deepcopy(holder)
    x, positions = torch.zeros(1), torch.arange(8)[None]
    before = twin.rotary_emb(x, positions)[0].clone()
    holder.rotary_emb.inv_freq.mul_(2.0)  # the original changes; the copy must not follow
    assert torch.equal(twin.rotary_emb(x, positions)[0], before)
    assert not torch.equal(holder.rotary_emb(x, positions)[0], before)


def test_switch_is_on_by_default_and_leaves_training_unchanged(tmp_path):
    from conftest import micro_config, write_data
    from nested_learning.config import SpeedConfig
    from nested_learning.speed.rotary import _outer_forward
    from nested_learning.train.loop import train_loop
    from nested_learning.train.setup import build_run

    assert SpeedConfig().outer_rotary
    data = write_data(tmp_path / "data")
    losses = {}
    for on in (True, False):
        cfg = micro_config(data, tmp_path / str(on), speed={"outer_rotary": on}, eval={"every": 0})
        run = build_run(cfg)
        rotary = run.model.get_base_model().model.rotary_emb
        assert ("forward" in vars(rotary) and rotary.forward.__func__ is _outer_forward) is on
        assert run.speed_plan["outer_rotary"].note == ("1 rotary module" if on else "speed.outer_rotary is off")
        seen = []

        class Rec:
            def __getattr__(self, hook):
                return lambda state, *a: seen.append(state.train_loss) if hook == "on_step" else None

        train_loop(run, callbacks=[Rec()])
        losses[on] = seen
    assert losses[True] == losses[False]


def test_tables_stay_one_opaque_op_under_compile():
    """Compiled, the tables are one ``rotary_tables`` call per forward (shared by every layer), and the loss and
    gradients are eager's."""
    model = tiny("llama", dtype=torch.float32)
    use_outer_rotary(model)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = model(input_ids=ids, labels=ids).loss
    compiled = torch.compile(model, backend=backend, fullgraph=False)(input_ids=ids, labels=ids).loss
    calls = [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and "rotary_tables" in str(n.target)]
    assert len(calls) == 1
    assert torch.allclose(eager, compiled, rtol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(eager, params), torch.autograd.grad(compiled, params)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_under_compile_keeps_loss_and_grads():
    """``model.gradient_checkpointing`` with the compiled decoder (what 8B runs use to save memory): same loss
    and gradients as without, with the rotary and causal-attention switches on."""
    from nested_learning.speed.causal_mask import use_causal_sdpa
    from nested_learning.config import ModelConfig
    from nested_learning.model.loading import prepare_base

    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(2))
    results = []
    for ckpt in (False, True):  # one layer: compiling a checkpointed second layer only doubled the time
        model = tiny("llama", dtype=torch.float32, layers=1)
        prepare_base(model.get_base_model(), ModelConfig(device="cpu", gradient_checkpointing=ckpt))
        for name, p in model.named_parameters():  # prepare_base froze everything; the adapters train
            p.requires_grad_("lora_" in name)
        assert model.get_base_model().is_gradient_checkpointing == ckpt
        use_causal_sdpa(model)
        use_outer_rotary(model)
        model.train()
        loss = torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids).loss
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, params)))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
