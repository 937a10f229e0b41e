"""The state tree of :class:`nested_learning.optim.mlx.NestedAdamW`: its layout and the helpers that build,
walk and check it.

Layout of ``NestedAdamW.state``::

    step            uint64 scalar   global step s (MLX's own counter)
    learning_rate   float32 scalar  base learning rate (schedule value of the last step)
    tiers           [{"period", "updates" (n_k), "pending" (gradients in the accumulator)}, ...]
    params          a tree mirroring the trainable parameters; each leaf is
                    {"tier": int32, "m": float32, "v": float32[, "acc": float32][, "ema"][, "slow"]}
                    (``ema`` / ``slow``: the slow copies of ``tiers.ema`` / ``tiers.consolidate``, float32;
                    a saved EMA state adds ``fast``, the training weights, which loading moves into the model)

Paths are ``mlx.utils.tree_flatten`` names: dict keys and list indices joined by ``"."`` (e.g.
``model.layers.3.self_attn.q_proj.lora_a``).

Like :mod:`nested_learning.optim.mlx`, this module imports ``mlx``; only that module imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

__all__ = [
    "check_state",
    "fresh_tier_state",
    "get_path",
    "has_path",
    "is_param_state",
    "numel",
    "recorded_tiers",
    "set_path",
]


# ---------------------------------------------------------------------------------------------------------
# tree paths


def get_path(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def has_path(tree: Any, path: str) -> bool:
    try:
        get_path(tree, path)
    except (KeyError, IndexError, ValueError, TypeError):
        return False
    return True


def set_path(tree: dict, path: str, value: Any) -> None:
    """Set ``tree[path] = value``, creating dicts (and lists for integer keys) on the way."""
    parts = path.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt_is_index = not last and parts[i + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            while len(node) <= idx:
                node.append({})
            if last:
                node[idx] = value
            else:
                if not isinstance(node[idx], (dict, list)) or (
                    nxt_is_index and isinstance(node[idx], dict) and not node[idx]
                ):
                    node[idx] = [] if nxt_is_index else {}
                node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                if part not in node or not isinstance(node[part], (dict, list)):
                    node[part] = [] if nxt_is_index else {}
                node = node[part]


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------------------------------------
# state layout


def is_param_state(x: Any) -> bool:
    """Whether ``x`` is one parameter's leaf of ``state["params"]`` (``m``, ``v``, ... all arrays)."""
    return (isinstance(x, dict) and "m" in x and "v" in x
            and all(isinstance(a, mx.array) for a in x.values()))


def fresh_tier_state(periods: Sequence[int]) -> list[dict]:
    """``state["tiers"]`` before the first step: the periods, no updates, nothing pending."""
    return [
        {
            "period": mx.array(p, mx.int32),
            "updates": mx.array(0, mx.int32),
            "pending": mx.array(0, mx.int32),
        }
        for p in periods
    ]


def check_state(state: Any, periods: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``state`` is a NestedAdamW state for tiers of these ``periods``."""
    if not isinstance(state, dict) or "tiers" not in state or "step" not in state:
        raise ValueError("not a NestedAdamW state: missing 'step' or 'tiers'")
    ts = state["tiers"]
    if len(ts) != len(periods):
        raise ValueError(f"optimizer state has {len(ts)} tiers, this optimizer {len(periods)}")
    for k, t in enumerate(ts):
        if "period" in t and int(t["period"].item()) != periods[k]:
            raise ValueError(f"optimizer state has period {int(t['period'].item())} for tier {k}, "
                             f"this optimizer {periods[k]}")


def recorded_tiers(params: Any) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Flattened name -> (tier, shape) of every leaf of ``state["params"]`` that records its tier."""
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for name, leaf in tree_flatten(params, is_leaf=is_param_state):
        if is_param_state(leaf) and "tier" in leaf:
            out[name] = (int(leaf["tier"].item()), tuple(leaf["m"].shape))
    return out
