"""NestedAdamW against torch.optim.AdamW and against the tier semantics, on synthetic and real gradients."""

from __future__ import annotations


import pytest
import torch

from nested_learning import NestedAdamW, assign_tiers


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tiny_lora_lm(num_layers=2, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(base, lcfg)


# -- 1. all periods 1 == torch.optim.AdamW ---------------------------------------------------------------

def test_all_period_one_equals_adamw_on_mlp():
    model, ref = _mlp(), _mlp()
    opt = NestedAdamW([{"params": list(model.parameters()), "period": 1}], lr=3e-3, betas=(0.8, 0.99), eps=1e-7,
                      weight_decay=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 8, generator=g) for _ in range(30)]

    def run(m, o):
        s = torch.optim.lr_scheduler.LambdaLR(o, lambda k: min(1.0, (k + 1) / 5) * 0.97**k)
        for x in xs:
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
            s.step()

    run(model, opt)
    run(ref, ref_opt)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert _rel_err(a, b) <= 1e-6
    # The run really moved the weights (so the comparison is not vacuous).
    assert _rel_err(next(model.parameters()), next(_mlp().parameters())) > 1e-2


def test_all_period_one_equals_adamw_on_lora_params_of_causal_lm():
    model, ref = _tiny_lora_lm(), _tiny_lora_lm()
    groups = assign_tiers(model.named_parameters(), periods=[1, 1])
    opt = NestedAdamW(groups, lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 64, (2, 12), generator=g) for _ in range(30)]
    for m, o in ((model, opt), (ref, ref_opt)):
        s = torch.optim.lr_scheduler.LambdaLR(o, lambda k: min(1.0, (k + 1) / 5) * 0.97**k)
        for ids in batches:
            o.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            s.step()
    trained = dict(ref.named_parameters())
    n_lora = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            n_lora += 1
            assert _rel_err(p, trained[name]) <= 1e-6, name
    assert n_lora == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)


# -- 2. period-p tiers: exact update steps and the accumulated gradient -------------------------------

def _synthetic_run(accumulate, periods, steps, wd=0.0, lr=1e-2, scales=None, eps=1e-8):
    """Drive NestedAdamW with fixed gradients; return (params per step, grads) for checking."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(5, 3, generator=g).requires_grad_() for _ in periods]
    groups = [{"params": [p], "period": per, "lr_scale": (scales or [1.0] * len(periods))[i], "name": f"t{i}"}
              for i, (p, per) in enumerate(zip(params, periods))]
    opt = NestedAdamW(groups, lr=lr, weight_decay=wd, accumulate=accumulate, eps=eps)
    grads = [[torch.randn(5, 3, generator=g) for _ in periods] for _ in range(steps)]
    history = [[p.detach().clone() for p in params]]
    for s in range(steps):
        for p, gr in zip(params, grads[s]):
            p.grad = gr.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return params, grads, history, opt


@pytest.mark.parametrize("accumulate", ["mean", "sum", "last"])
def test_slow_tier_updates_exactly_at_multiples_of_its_period(accumulate):
    periods = [1, 3, 4]
    _, _, history, opt = _synthetic_run(accumulate, periods, steps=12)
    for k, period in enumerate(periods):
        changed = [s for s in range(1, 13) if not torch.equal(history[s][k], history[s - 1][k])]
        assert changed == [s for s in range(1, 13) if s % period == 0]
    assert [t["updates"] for t in opt.tier_stats()] == [12, 4, 3]


@pytest.mark.parametrize("accumulate", ["mean", "sum", "last"])
def test_slow_tier_update_is_adamw_on_the_chunk_gradient(accumulate):
    period, steps = 4, 12
    # A large eps makes Adam sensitive to the gradient's scale, so mean and sum give different updates.
    params, grads, history, _ = _synthetic_run(accumulate, [1, period], steps=steps, wd=0.1, lr=5e-3, eps=0.5)
    # Reference: torch.optim.AdamW taking one step per chunk on the chunk's mean / sum / last gradient.
    ref = history[0][1].clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref], lr=5e-3, weight_decay=0.1, eps=0.5)
    for chunk in range(steps // period):
        gs = [grads[s][1] for s in range(chunk * period, (chunk + 1) * period)]
        if accumulate == "mean":
            G = torch.stack(gs).sum(0) / period
        elif accumulate == "sum":
            G = torch.stack(gs).sum(0)
        else:
            G = gs[-1]
        ref.grad = G
        ref_opt.step()  # bias correction by the tier's own count: 1, 2, 3
        assert _rel_err(history[(chunk + 1) * period][1], ref.detach()) <= 1e-6


def test_lr_scale_multiplies_the_scheduled_lr():
    _, _, hist_a, _ = _synthetic_run("mean", [1, 2], steps=4, lr=1e-2, scales=[1.0, 0.5])
    _, _, hist_b, _ = _synthetic_run("mean", [1, 2], steps=4, lr=5e-3)
    assert torch.equal(hist_a[4][1], hist_b[4][1])
    assert not torch.equal(hist_a[4][0], hist_b[4][0])


def test_flush_applies_a_partial_chunk_as_its_mean():
    params, grads, history, opt = _synthetic_run("mean", [1, 4], steps=6)
    # Reproduce the tier's Adam state: one update at step 4 on mean(g1..g4), then flush on mean(g5, g6).
    ref = history[0][1].clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    ref.grad = torch.stack([grads[s][1] for s in range(4)]).mean(0)
    ref_opt.step()
    ref.grad = torch.stack([grads[s][1] for s in (4, 5)]).mean(0)
    ref_opt.step()
    opt.flush()
    assert _rel_err(params[1].detach(), ref.detach()) <= 1e-6
    assert opt.tier_stats()[1]["updates"] == 2 and opt.tier_stats()[1]["pending"] == 0
    opt.flush()  # nothing pending: no change
    assert _rel_err(params[1].detach(), ref.detach()) <= 1e-6


# -- 3. decoupled weight decay ----------------------------------------------------------------------------

def test_zero_gradient_decays_by_exactly_lr_times_wd_per_due_step():
    lr, wd, period = 0.01, 0.1, 3
    p = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = NestedAdamW([{"params": [p], "period": period}], lr=lr, weight_decay=wd)
    values = []
    for _ in range(9):
        p.grad = torch.zeros_like(p)
        opt.step()
        values.append(p.detach()[0].item())
    expected = [2.0 * (1 - lr * wd) ** (s // period) for s in range(1, 10)]
    assert values == pytest.approx(expected, rel=1e-12, abs=0)


# -- 4. exact resume mid-chunk ----------------------------------------------------------------------------

def _train_lm(model, opt, batches):
    losses = []
    for ids in batches:
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("accumulate", ["mean", "last"])
def test_state_dict_mid_chunk_resumes_bit_for_bit(accumulate, tmp_path):
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 64, (2, 10), generator=g) for _ in range(40)]

    def build():
        model = _tiny_lora_lm(num_layers=3)
        groups = assign_tiers(model.named_parameters(), periods=[1, 3, 7])
        return model, NestedAdamW(groups, lr=1e-2, weight_decay=0.01, accumulate=accumulate)

    model, opt = build()
    full = _train_lm(model, opt, batches)

    model_a, opt_a = build()
    first = _train_lm(model_a, opt_a, batches[:20])
    trainable = {n: p.detach().clone() for n, p in model_a.named_parameters() if p.requires_grad}
    torch.save({"opt": opt_a.state_dict(), "params": trainable}, tmp_path / "state.pt")

    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    state = saved["opt"]["state"]
    slow_ids = range(len(opt_a.param_groups[0]["params"]), sum(len(gr["params"]) for gr in opt_a.param_groups))
    fast_ids = range(len(opt_a.param_groups[0]["params"]))
    assert all("acc" not in state[i] for i in fast_ids)  # no accumulator for period-1 tiers
    if accumulate == "last":
        assert all("acc" not in st for st in state.values())
    else:
        assert all("acc" in state[i] and state[i]["acc"].abs().sum() > 0 for i in slow_ids)  # mid-chunk: 20 % 3, 20 % 7

    model_b, opt_b = build()
    with torch.no_grad():
        for n, p in model_b.named_parameters():
            if p.requires_grad:
                p.copy_(saved["params"][n])
    opt_b.load_state_dict(saved["opt"])
    second = _train_lm(model_b, opt_b, batches[20:])
    assert first + second == full
    for (n, a), (_, b) in zip(model.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), n
    assert opt_b.tier_stats() == opt.tier_stats()


# -- 6. bad input -----------------------------------------------------------------------------------------

def test_bad_input_names_the_field():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="accumulate"):
        NestedAdamW([p], accumulate="median")
    with pytest.raises(ValueError, match="period"):
        NestedAdamW([{"params": [p], "period": 0}])
    with pytest.raises(ValueError, match="period"):
        NestedAdamW([{"params": [p], "period": 1.5}])
    with pytest.raises(ValueError, match="lr_scale"):
        NestedAdamW([{"params": [p], "lr_scale": -1.0}])
    with pytest.raises(ValueError, match=r"params: parameter 'a' appears in param group 0 and param group 1"):
        NestedAdamW([{"params": [p, q], "param_names": ["a", "b"]}, {"params": [p], "param_names": ["a"]}])
    with pytest.raises(ValueError, match="lr"):
        NestedAdamW([p], lr=-1.0)


def test_load_state_dict_refuses_other_periods():
    p = torch.nn.Parameter(torch.zeros(2))
    a = NestedAdamW([{"params": [p], "period": 2}])
    b = NestedAdamW([{"params": [p], "period": 4}])
    with pytest.raises(ValueError, match="periods"):
        b.load_state_dict(a.state_dict())


def test_works_with_torch_lr_scheduler_per_group():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = NestedAdamW([{"params": [p], "period": 1}, {"params": [q], "period": 2, "lr_scale": 0.5}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad, q.grad = torch.ones(2), torch.ones(2)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    p.grad, q.grad = torch.ones(2), torch.ones(2)
    opt.step()
    # Adam's first step moves by lr (|m_hat / sqrt(v_hat)| = 1): q's one update at step 2 used 0.05 * 0.5.
    assert q.detach().tolist() == pytest.approx([1 - 0.025] * 2, rel=1e-6)
    assert p.detach().tolist() == pytest.approx([1 - 0.1 - 0.05] * 2, rel=1e-6)


# -- flat layout: same numbers, fewer kernels -------------------------------------------------------------

@pytest.mark.parametrize("accumulate", ["mean", "sum", "last"])
def test_flat_layout_matches_per_tensor_path_and_resumes(accumulate, tmp_path):
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 64, (2, 10), generator=g) for _ in range(14)]

    def build(flat):
        model = _tiny_lora_lm(num_layers=3)
        groups = assign_tiers(model.named_parameters(), periods=[1, 2, 4])
        return model, NestedAdamW(groups, lr=1e-2, weight_decay=0.01, accumulate=accumulate, flat=flat)

    model, opt = build(False)
    ref_losses = _train_lm(model, opt, batches)
    opt.finish()

    flat_model, flat_opt = build(True)
    losses = _train_lm(flat_model, flat_opt, batches[:7])
    # Someone else zeroing gradients to None must not matter.
    flat_model.zero_grad(set_to_none=True)
    sd = flat_opt.state_dict()
    torch.save(sd, tmp_path / "opt.pt")
    # Rebuild: a new model with the trained weights, a new flat optimizer from the saved state.
    resumed_model, resumed_opt = build(True)
    with torch.no_grad():
        for (_, a), (_, b) in zip(resumed_model.named_parameters(), flat_model.named_parameters()):
            a.copy_(b)
    resumed_opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    losses += _train_lm(resumed_model, resumed_opt, batches[7:])
    resumed_opt.finish()
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for (n, a), (_, b) in zip(model.named_parameters(), resumed_model.named_parameters()):
        assert _rel_err(b, a) <= 1e-6, n
    # The tier really is one buffer: every parameter of tier 0 shares one storage.
    ft = resumed_opt._flat[0]
    assert ft is not None and len({p.untyped_storage().data_ptr() for p in ft.params}) == 1


def test_flat_parameters_still_save_through_peft(tmp_path):
    from peft import PeftModel

    model = _tiny_lora_lm()
    opt = NestedAdamW(assign_tiers(model.named_parameters(), periods=[1, 2]), lr=1e-2, flat=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    _train_lm(model, opt, [ids, ids])
    model.save_pretrained(tmp_path / "adapter")
    base = _tiny_lora_lm().get_base_model()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)
