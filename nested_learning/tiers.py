"""Tier plans: which trainable parameter belongs to which update frequency.

Framework-neutral on purpose: this module imports no tensor library. The torch and MLX optimizers both build
on it, and everything here works on parameter *names* (flattened, dotted), plus an opaque parameter object
that is only asked for ``requires_grad`` (absent → trainable) and ``numel()``/``size`` for counting.

Strategies (all produce ``name -> tier index``):

- ``layer_depth``: transformer block index from the name (``layers.<i>.``), blocks split into
  ``num_tiers`` contiguous, equal groups; shallow blocks are fast unless ``reverse=True``.
- ``rules``: ordered ``(glob, tier)`` pairs, first match wins.
- ``manual``: an explicit ``{name: tier}`` map.
- ``gradient_norm``: parameters ranked by mean squared gradient (given, or from a ``probe`` callable);
  larger gradients → faster tiers.

Trainable parameters that no rule maps go to the slowest tier, with one warning that lists them.
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "UnmappedParametersWarning",
    "assign_tiers",
    "due_tiers",
    "format_plan",
    "is_due",
    "is_lora_name",
    "layer_index",
    "validate_periods",
    "validate_weight_averages",
]

STRATEGIES = ("layer_depth", "rules", "manual", "gradient_norm")

# LoRA/adapter tensors, matched case-insensitively on the dotted name.
_LORA_MARKERS = ("lora_a", "lora_b", "lora_magnitude", "lora_embedding_a", "lora_embedding_b", "adapter")
# `model.layers.3.`, `transformer.h.3.`, `blocks.3.`: the block index of a transformer layer.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


class UnmappedParametersWarning(UserWarning):
    """Trainable parameters no rule mapped; they were put in the slowest tier."""


def is_lora_name(name: str) -> bool:
    """True for LoRA/DoRA/adapter parameter names, whatever their case (``lora_A``, ``lora_a``, ``LORA_B``)."""
    lowered = name.lower()
    return any(marker in lowered for marker in _LORA_MARKERS)


def layer_index(name: str) -> int | None:
    """Transformer block index named in a parameter name, or None (embeddings, head, final norm)."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def validate_periods(periods: Sequence[Any], field: str = "periods") -> list[int]:
    if isinstance(periods, (str, bytes)) or not isinstance(periods, Sequence) or len(periods) == 0:
        raise ValueError(f"{field} must be a non-empty list of positive integers, got {periods!r}")
    for p in periods:
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"{field} must be positive integers, got {p!r} in {list(periods)!r}")
    return list(periods)


def validate_weight_averages(ema: Any, consolidate: Any) -> tuple[float | None, tuple[int, float] | None]:
    """``(ema, (every, alpha))`` checked for both optimizers' slow copies (``tiers.ema``, ``tiers.consolidate``):
    a decay in (0, 1), an integer ``every`` >= 1 and an ``alpha`` in (0, 1]; ``None`` turns either off."""
    if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 < ema < 1):
        raise ValueError(f"ema must be a decay in (0, 1) or None, got {ema!r}")
    if consolidate is not None:
        every, alpha = consolidate
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"consolidate: every must be an integer >= 1, got {every!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"consolidate: alpha must be a number in (0, 1], got {alpha!r}")
        consolidate = (every, float(alpha))
    return (None if ema is None else float(ema)), consolidate


def is_due(step: int, period: int) -> bool:
    """A tier of ``period`` is updated at optimizer step ``step`` (1-based) iff ``step % period == 0``."""
    return step % period == 0


def due_tiers(step: int, periods: Sequence[int]) -> list[bool]:
    return [is_due(step, p) for p in periods]


def slowest_tier(periods: Sequence[int]) -> int:
    """Index of the tier with the largest period (the last one among ties)."""
    longest = max(periods)
    return max(i for i, p in enumerate(periods) if p == longest)


def _numel(param: Any) -> int:
    n = getattr(param, "numel", None)
    if callable(n):
        return int(n())
    size = getattr(param, "size", None)
    if isinstance(size, int):  # mlx arrays: .size is the element count
        return size
    shape = getattr(param, "shape", ())
    return math.prod(shape) if shape else 1


def _map_layer_depth(names: Sequence[str], num_tiers: int, reverse: bool, num_layers: int | None) -> dict[str, int]:
    indices = {n: layer_index(n) for n in names}
    known = [i for i in indices.values() if i is not None]
    if not known:
        return {}
    blocks = num_layers if num_layers is not None else max(known) + 1
    mapping = {}
    for name, idx in indices.items():
        if idx is None:
            continue
        tier = min(idx * num_tiers // blocks, num_tiers - 1)  # contiguous, equal groups of blocks
        mapping[name] = num_tiers - 1 - tier if reverse else tier
    return mapping


def _map_rules(names: Sequence[str], rules: Sequence[Sequence[Any]], num_tiers: int) -> dict[str, int]:
    parsed = []
    for i, rule in enumerate(rules):
        if isinstance(rule, Mapping):
            rule = (rule.get("pattern"), rule.get("tier"))
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"rules[{i}] must be a (glob, tier) pair, got {rule!r}")
        pattern, tier = rule
        _check_tier(tier, num_tiers, f"rules[{i}] ({pattern!r})")
        parsed.append((pattern, tier))
    mapping = {}
    for name in names:
        for pattern, tier in parsed:
            if fnmatch.fnmatchcase(name, pattern):
                mapping[name] = tier
                break
    return mapping


def _map_manual(names: Sequence[str], manual: Mapping[str, int], num_tiers: int,
                frozen: set[str]) -> dict[str, int]:
    known = set(names)
    unknown = [n for n in manual if n not in known]
    if unknown:
        not_trainable = [n for n in unknown if n in frozen]
        reason = "is not trainable" if len(not_trainable) == len(unknown) else "is not a parameter of the model"
        raise ValueError(f"manual: {unknown[0]!r} {reason}"
                         + (f" (and {len(unknown) - 1} more unknown names)" if len(unknown) > 1 else ""))
    for name, tier in manual.items():
        _check_tier(tier, num_tiers, f"manual[{name!r}]")
    return dict(manual)


def _map_gradient_norm(names: Sequence[str], stats: Mapping[str, float], num_tiers: int) -> dict[str, int]:
    known = set(names)
    unknown = [n for n in stats if n not in known]
    if unknown:
        raise ValueError(f"grad_stats: {unknown[0]!r} is not a trainable parameter")
    ranked = sorted((n for n in names if n in stats), key=lambda n: (-float(stats[n]), n))
    count = len(ranked)
    # Largest mean squared gradient first; equal-sized contiguous groups, fastest tier first.
    return {name: min(rank * num_tiers // count, num_tiers - 1) for rank, name in enumerate(ranked)}


def _check_tier(tier: Any, num_tiers: int, field: str) -> None:
    if isinstance(tier, bool) or not isinstance(tier, int) or not 0 <= tier < num_tiers:
        raise ValueError(f"{field}: tier must be an integer in 0..{num_tiers - 1}, got {tier!r}")


def assign_tiers(
    named_parameters: Iterable[tuple[str, Any]],
    strategy: str = "layer_depth",
    periods: Sequence[int] = (1, 2, 4),
    *,
    lr_scales: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    reverse: bool = False,
    num_layers: int | None = None,
    rules: Sequence[Sequence[Any]] | None = None,
    manual: Mapping[str, int] | None = None,
    grad_stats: Mapping[str, float] | None = None,
    probe: Callable[[], Mapping[str, float]] | None = None,
    lora_only: bool = False,
) -> list[dict[str, Any]]:
    """Split trainable parameters into tiers; returns one param-group dict per tier, fastest first as given.

    Each dict has ``name``, ``period``, ``lr_scale``, ``params`` and ``param_names``; pass the list straight to
    ``NestedAdamW``. ``lora_only=True`` leaves trainable parameters that are not LoRA/adapter tensors out of
    every group (the caller optimises them some other way).
    """
    periods = validate_periods(periods)
    num_tiers = len(periods)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if lr_scales is None:
        lr_scales = [1.0] * num_tiers
    if len(lr_scales) != num_tiers:
        raise ValueError(f"lr_scales has {len(lr_scales)} entries but periods has {num_tiers} tiers")
    for s in lr_scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ValueError(f"lr_scales must be positive numbers, got {s!r}")
    tier_names = list(names) if names is not None else [f"tier{i}" for i in range(num_tiers)]
    if len(tier_names) != num_tiers:
        raise ValueError(f"names has {len(tier_names)} entries but periods has {num_tiers} tiers")

    trainable: dict[str, Any] = {}
    frozen: set[str] = set()
    seen_ids: dict[int, str] = {}
    for name, param in named_parameters:
        if not getattr(param, "requires_grad", True):
            frozen.add(name)
            continue
        if lora_only and not is_lora_name(name):
            continue
        if name in trainable:
            raise ValueError(f"parameter name {name!r} appears twice")
        if id(param) in seen_ids:  # tied weights: place the tensor once
            continue
        seen_ids[id(param)] = name
        trainable[name] = param
    order = list(trainable)

    if strategy == "layer_depth":
        mapping = _map_layer_depth(order, num_tiers, reverse, num_layers)
    elif strategy == "rules":
        if not rules:
            raise ValueError("rules: strategy 'rules' needs a non-empty list of (glob, tier) pairs")
        mapping = _map_rules(order, rules, num_tiers)
    elif strategy == "manual":
        if not manual:
            raise ValueError("manual: strategy 'manual' needs a non-empty {name: tier} map")
        mapping = _map_manual(order, manual, num_tiers, frozen)
    else:
        if grad_stats is None:
            if probe is None:
                raise ValueError("grad_stats: strategy 'gradient_norm' needs grad_stats or a probe callable")
            grad_stats = probe()
        mapping = _map_gradient_norm(order, grad_stats, num_tiers)

    unmapped = [n for n in order if n not in mapping]
    if unmapped:
        slow = slowest_tier(periods)
        shown = ", ".join(unmapped[:32]) + (f", ... ({len(unmapped) - 32} more)" if len(unmapped) > 32 else "")
        warnings.warn(
            f"{len(unmapped)} trainable parameter(s) matched no tier rule ({strategy}); "
            f"placed in the slowest tier {slow} (period {periods[slow]}): {shown}",
            UnmappedParametersWarning,
            stacklevel=2,
        )
        for n in unmapped:
            mapping[n] = slow

    groups = [
        {"name": tier_names[k], "period": periods[k], "lr_scale": float(lr_scales[k]), "params": [], "param_names": []}
        for k in range(num_tiers)
    ]
    for name in order:
        group = groups[mapping[name]]
        group["params"].append(trainable[name])
        group["param_names"].append(name)
    return groups


def format_plan(groups: Sequence[Mapping[str, Any]]) -> str:
    """The tier plan as a small table: tier, period, lr scale, tensors, parameters, LoRA share."""
    header = f"{'tier':<10} {'period':>6} {'lr_scale':>8} {'tensors':>8} {'params':>12} {'lora':>6}"
    lines = [header, "-" * len(header)]
    total_t = total_p = 0
    for g in groups:
        names_ = g.get("param_names") or []
        n_tensors = len(g["params"])
        n_params = sum(_numel(p) for p in g["params"])
        lora = sum(is_lora_name(n) for n in names_)
        total_t += n_tensors
        total_p += n_params
        lines.append(f"{g.get('name', '?'):<10} {g.get('period', 1):>6} {g.get('lr_scale', 1.0):>8g} "
                     f"{n_tensors:>8} {n_params:>12,} {lora:>6}")
    lines.append(f"{'total':<10} {'':>6} {'':>8} {total_t:>8} {total_p:>12,}")
    return "\n".join(lines)
