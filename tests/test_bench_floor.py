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
