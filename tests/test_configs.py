"""Every shipped config validates through the schema; the demo config is the one the demo runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from nested_learning.config import TrainConfig, load_config
from nested_learning.demo import demo_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.tiers.periods and cfg.schedule.steps > 0


def test_demo_yaml_is_the_demo_config():
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml") == demo_config()


def test_cms_rules_put_attention_fast_and_mlp_slow():
    from nested_learning.tiers import assign_tiers

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama-3.2-1b-cms.yaml")

    class P:
        requires_grad = True

        def numel(self):
            return 1

    names = [f"base_model.model.model.layers.{i}.{m}.lora_A.default.weight"
             for i in range(16) for m in ("self_attn.q_proj", "mlp.up_proj")]
    groups = assign_tiers([(n, P()) for n in names], strategy="rules", periods=cfg.tiers.periods,
                          rules=cfg.tiers.rules)
    tier_of = {n: k for k, g in enumerate(groups) for n in g["param_names"]}
    assert tier_of[names[0]] == 0  # layer 0 attention
    assert tier_of["base_model.model.model.layers.3.mlp.up_proj.lora_A.default.weight"] == 1
    assert tier_of["base_model.model.model.layers.12.mlp.up_proj.lora_A.default.weight"] == 2
