"""bench/step_floor.py times the products a LoRA step cannot skip; its FLOPs must be exactly the linear part of
the useful FLOPs that bench/peers.py's MFU counts, or its "MFU at the floor" would not be a ceiling."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import step_floor  # noqa: E402
from peers_report import useful_flops_per_step  # noqa: E402
from peers_setup import SHAPES, model_config  # noqa: E402


@pytest.mark.parametrize("shape", ["qwen0.5b", "llama1b", "llama8b"])
def test_floor_products_are_the_linear_flops_mfu_counts(shape):
    cfg = model_config(shape)
    _, _, batch, seq = SHAPES[shape]
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * batch * seq * seq
    assert step_floor.linear_flops(cfg, batch * seq) == useful_flops_per_step(cfg, [seq] * batch, 0) - attention
    # every product's inner dimension matches the one before it in a layer (shapes are real, not just counts)
    names = [p[0] for p in step_floor.linear_products(cfg, 7)]
    assert names[::2] == ["qkv forward", "o forward", "gate_up forward", "down forward"]
    for (_, m, k, n), (_, m2, k2, n2) in zip(step_floor.linear_products(cfg, 7)[::2],
                                             step_floor.linear_products(cfg, 7)[1::2]):
        assert (m, k, n) == (m2, n2, k2) and m == 7


def test_floor_refuses_to_run_without_cuda(monkeypatch):
    monkeypatch.setattr(step_floor.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        step_floor.main(["--shapes", "llama1b"])


def test_chart_draws_the_floor_where_batch_and_length_match(tmp_path):
    import json

    import plot_peers

    run = dict(shape="llama1b", data="fixed", variant="ours", batch=8, seq=2048, real_tokens_per_s=85_000.0,
               peak_gib=16.5)
    (tmp_path / "d.json").write_text(json.dumps({"runs": [run, dict(run, variant="peer_unsloth")]}))
    floors = [dict(shape="llama1b", batch=8, seq=2048, floor_ms=128.0), dict(shape="llama1b", batch=1, seq=2048,
                                                                             floor_ms=1.0)]
    assert plot_peers.floor_rate(floors, "llama1b", 8, 2048) == 8 * 2048 / 0.128
    assert plot_peers.floor_rate(floors, "llama8b", 8, 2048) is None
    fig = plot_peers.main(str(tmp_path / "d.json"), str(tmp_path / "c.png"), floors)
    assert [line.get_xdata()[0] for line in fig.axes[0].lines] == [8 * 2048 / 0.128 / 1e3]
    assert not fig.axes[1].lines  # the memory panel has no floor
    assert (tmp_path / "c.png").stat().st_size > 0
