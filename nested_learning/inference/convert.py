"""LoRA adapters in two formats, converted both ways without loss: PEFT (ours) and mlx-lm's (the old app's).

=====================  ==========================================  ===========================================
                       PEFT                                        mlx-lm
=====================  ==========================================  ===========================================
weights file           ``adapter_model.safetensors``               ``adapters.safetensors``
tensor name            ``base_model.model.<module>.lora_A.weight``  ``<module>.lora_a``
down projection A      ``(r, in)``                                 ``(in, r)``: the transpose
up projection B        ``(out, r)``                                ``(r, out)``: the transpose
update                 ``(alpha / r) * B A x``                     ``scale * x a b``
config                 ``r``, ``lora_alpha``, ``target_modules``   ``lora_parameters.{rank, scale, dropout,
                                                                   keys}``, ``num_layers`` (the last N blocks)
=====================  ==========================================  ===========================================

So ``alpha = scale * r``. mlx-lm applies ``lora_parameters.scale`` and ignores any alpha: the old app wrote
``lora_alpha: 16`` next to ``scale: 10.0``, and what its models ran with was 10.0, so that is what converts.

A PEFT directory made from an MLX one keeps the original MLX config beside it (``mlx_adapter_config.json``), so
converting back gives the same files. Tensors keep their dtype; a transpose is exact.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["Adapter", "AdapterError", "adapter_format", "convert_adapter", "ensure_peft", "load_adapter_into",
           "read_adapter"]

CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
MLX_SIDECAR = "mlx_adapter_config.json"
_PEFT_PREFIX = "base_model.model."
# The old app's own keys next to mlx-lm's; its adapter list reads lora_rank / lora_alpha.
_OLD_APP_TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class AdapterError(ValueError):
    """An adapter directory that cannot be read or converted; the message names the file."""


@dataclass
class Adapter:
    """One LoRA adapter in PEFT terms: ``tensors`` maps ``<module>`` to its ``(A (r, in), B (out, r))``."""

    tensors: dict[str, tuple[Any, Any]]
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    base: str | None = None
    mlx_config: dict[str, Any] | None = None  # the MLX config this adapter came from (round trips)
    source: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def layers(self) -> list[int]:
        return sorted({_layer_index(m, self.source) for m in self.tensors})

    def leaf_names(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.tensors})

    def layer_relative(self) -> list[str]:
        return sorted({m.split(".", 3)[3] for m in self.tensors})


def _layer_index(module: str, source: str) -> int:
    parts = module.split(".")
    if len(parts) < 4 or parts[0] != "model" or parts[1] != "layers" or not parts[2].isdigit():
        raise AdapterError(f"{source}: tensor for {module!r} is not inside a transformer block "
                           "(model.layers.N.*); only block projections convert")
    return int(parts[2])


def write_json(path: Path, data: Any) -> None:
    """Atomic (temp + rename). Kept here rather than imported from train.checkpoint, which loads torch: the
    service reads adapter configs without a tensor library."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: Path, missing: str, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` names the file (and line) when it is missing (with ``missing`` as
    the hint), not JSON, or not an object."""
    if not path.is_file():
        raise error(f"{path}: not found ({missing})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, f"an adapter directory holds {CONFIG} and its weights", AdapterError)


def _load_tensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise AdapterError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from None


def adapter_format(path: str | Path) -> Literal["peft", "mlx"]:
    """``peft`` or ``mlx`` for an adapter directory; AdapterError naming the file otherwise."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise AdapterError(f"{d}: not an adapter directory")
    if (d / PEFT_WEIGHTS).is_file() and (d / CONFIG).is_file() and "peft_type" in _read_json(d / CONFIG):
        return "peft"
    if (d / MLX_WEIGHTS).is_file():
        return "mlx"
    cfg = d / CONFIG
    if cfg.is_file() and "peft_type" in _read_json(cfg):
        raise AdapterError(f"{d / PEFT_WEIGHTS}: not found (the PEFT config has no weights beside it)")
    raise AdapterError(f"{d}: neither a PEFT adapter ({CONFIG} + {PEFT_WEIGHTS}) nor an MLX one ({MLX_WEIGHTS})")


def _read_mlx(d: Path) -> Adapter:
    cfg_path = d / CONFIG
    cfg = _read_json(cfg_path)
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params or "rank" not in params:
        raise AdapterError(f"{cfg_path}: lora_parameters.rank and lora_parameters.scale are needed "
                           "(mlx-lm's LoRA config)")
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(f"{cfg_path}: fine_tune_type {kind!r} does not convert (only plain LoRA does)")
    raw = _load_tensors(d / MLX_WEIGHTS)
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in raw.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise AdapterError(f"{d / MLX_WEIGHTS}: tensor {key!r} is not a LoRA matrix (lora_a / lora_b)")
        pairs.setdefault(module, {})[leaf] = t
    rank = int(params["rank"])
    tensors = {}
    for module, p in sorted(pairs.items()):
        if set(p) != {"lora_a", "lora_b"}:
            raise AdapterError(f"{d / MLX_WEIGHTS}: {module} has only {', '.join(p)}")
        a, b = p["lora_a"], p["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise AdapterError(f"{d / MLX_WEIGHTS}: {module}: shapes {tuple(a.shape)} / {tuple(b.shape)} do not "
                               f"fit rank {rank} from {cfg_path}")
        tensors[module] = (a.t().contiguous(), b.t().contiguous())
    if not tensors:
        raise AdapterError(f"{d / MLX_WEIGHTS}: no LoRA tensors")
    adapter = Adapter(tensors, r=rank, alpha=float(params["scale"]) * rank, dropout=float(params.get("dropout", 0.0)),
                      base=cfg.get("model") or cfg.get("base_model"), mlx_config=cfg, source=str(d / MLX_WEIGHTS))
    adapter.layers()  # every tensor must sit in a block
    return adapter


def _read_peft(d: Path) -> Adapter:
    cfg_path = d / CONFIG
    cfg = _read_json(cfg_path)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}"
                           f"{' with DoRA' if cfg.get('use_dora') else ''} does not convert (only plain LoRA does)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"{cfg_path}: per-module rank_pattern / alpha_pattern do not convert")
    raw = _load_tensors(d / PEFT_WEIGHTS)
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in raw.items():
        stem = key.removesuffix(".weight")
        module, _, leaf = stem.rpartition(".")
        if not key.startswith(_PEFT_PREFIX) or leaf not in ("lora_A", "lora_B"):
            raise AdapterError(f"{d / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA matrix (lora_A / lora_B)")
        pairs.setdefault(module.removeprefix(_PEFT_PREFIX), {})[leaf] = t
    tensors = {}
    for module, p in sorted(pairs.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{d / PEFT_WEIGHTS}: {module} has only {', '.join(p)}")
        tensors[module] = (p["lora_A"], p["lora_B"])
    if not tensors:
        raise AdapterError(f"{d / PEFT_WEIGHTS}: no LoRA tensors")
    sidecar = d / MLX_SIDECAR
    return Adapter(tensors, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0)),
                   use_rslora=bool(cfg.get("use_rslora")), base=cfg.get("base_model_name_or_path"),
                   mlx_config=_read_json(sidecar) if sidecar.is_file() else None, source=str(d / PEFT_WEIGHTS))


def read_adapter(path: str | Path) -> Adapter:
    """Either format, as an ``Adapter`` in PEFT terms."""
    d = Path(path).expanduser()
    return _read_peft(d) if adapter_format(d) == "peft" else _read_mlx(d)


# ------------------------------------------------------------------------------------------------ writing
def _fresh_dir(dst: Path, overwrite: bool) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise AdapterError(f"{dst}: already exists and is not empty (pass --overwrite to replace its adapter files)")
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def _save_tensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    Path(tmp).unlink()
    try:
        save_file(tensors, tmp)
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_peft(adapter: Adapter, dst: str | Path, *, base: str | None = None, overwrite: bool = False) -> Path:
    from peft import LoraConfig

    dst = _fresh_dir(Path(dst).expanduser(), overwrite)
    tensors = {}
    for module, (a, b) in adapter.tensors.items():
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    cfg = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                     target_modules=adapter.leaf_names(), layers_to_transform=adapter.layers(),
                     use_rslora=adapter.use_rslora, task_type="CAUSAL_LM",
                     base_model_name_or_path=base or adapter.base)
    _save_tensors(tensors, dst / PEFT_WEIGHTS)
    write_json(dst / CONFIG, {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()})
    if adapter.mlx_config is not None:
        write_json(dst / MLX_SIDECAR, adapter.mlx_config)
    return dst


def _num_hidden_layers(base: str | None) -> int | None:
    """Blocks in the base model, from its config.json (a local directory) or the embedded model's config."""
    if not base:
        return None
    from nested_learning.model.embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX, is_embedded

    if is_embedded(base):
        spec = EMBEDDED_MODELS.get(base.removeprefix(EMBEDDED_PREFIX))
        return spec["num_hidden_layers"] if spec else None
    cfg = Path(base).expanduser() / "config.json"
    if cfg.is_file():
        data = _read_json(cfg)
        n = data.get("num_hidden_layers") or (data.get("text_config") or {}).get("num_hidden_layers")
        return int(n) if n else None
    return None


def _mlx_config(adapter: Adapter, base: str | None, total: int | None = None) -> dict[str, Any]:
    params = {"rank": adapter.r, "scale": adapter.scale, "dropout": adapter.dropout,
              "keys": adapter.layer_relative()}
    kept = adapter.mlx_config
    if kept is not None and kept.get("lora_parameters", {}).get("rank") == adapter.r \
            and math.isclose(float(kept["lora_parameters"]["scale"]), adapter.scale, rel_tol=1e-12):
        return kept  # converted from MLX and unchanged: the original config, key for key
    first = adapter.layers()[0]
    total = total or _num_hidden_layers(base or adapter.base)
    if total is not None:
        num_layers = total - first
    elif first == 0:
        num_layers = -1  # mlx-lm: -1 adapts every block
    else:
        raise AdapterError(f"{adapter.source}: the adapter starts at block {first}; mlx-lm counts adapted blocks "
                           "from the last one, so name the base model (--base MODEL) to count them")
    return {
        "fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params,
        # the old app's fields, so its adapter list and evaluation read the converted adapter too
        "adapter_type": "lora", "lora_rank": adapter.r, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
        "target_modules": adapter.leaf_names() or _OLD_APP_TARGETS, "model": base or adapter.base,
    }


def write_mlx(adapter: Adapter, dst: str | Path, *, base: str | None = None, overwrite: bool = False) -> Path:
    config = _mlx_config(adapter, base)
    dst = _fresh_dir(Path(dst).expanduser(), overwrite)
    tensors = {}
    for module, (a, b) in adapter.tensors.items():
        tensors[f"{module}.lora_a"] = a.t().contiguous()
        tensors[f"{module}.lora_b"] = b.t().contiguous()
    _save_tensors(tensors, dst / MLX_WEIGHTS)
    write_json(dst / CONFIG, config)
    return dst


def write_mlx_beside(peft_dir: str | Path, num_hidden_layers: int | None, base: str | None) -> None:
    """Add the mlx-lm layout to a PEFT adapter directory: ``adapters.safetensors`` and mlx-lm's keys merged into
    its ``adapter_config.json`` (PEFT's own keys win; PEFT ignores the others), so both tools load it."""
    d = Path(peft_dir)
    adapter = _read_peft(d)
    adapter.mlx_config = None  # a checkpoint's own adapter: describe it afresh
    mlx = _mlx_config(adapter, base, num_hidden_layers)
    _save_tensors({f"{m}.{leaf}": t.t().contiguous() for m, (a, b) in adapter.tensors.items()
                   for leaf, t in (("lora_a", a), ("lora_b", b))}, d / MLX_WEIGHTS)
    write_json(d / CONFIG, {**mlx, **_read_json(d / CONFIG)})


def convert_adapter(src: str | Path, dst: str | Path, to: Literal["peft", "mlx"], *, base: str | None = None,
                    overwrite: bool = False) -> Path:
    """Convert the adapter in ``src`` (either format) into ``dst`` in format ``to``."""
    adapter = read_adapter(src)
    if to == "peft":
        out = write_peft(adapter, dst, base=base, overwrite=overwrite)
        if base:  # a config.yaml naming the base: generate / eval / merge and /v1/generate need no --model
            from nested_learning.config import TrainConfig
            from nested_learning.train.checkpoint import CONFIG_FILE, write_atomic

            cfg = TrainConfig.model_validate({"model": {"name_or_path": base}, "lora": {
                "r": adapter.r, "alpha": adapter.alpha, "target_modules": adapter.leaf_names(),
                "use_rslora": adapter.use_rslora}})
            write_atomic(out / CONFIG_FILE, cfg.to_yaml())
        return out
    if to == "mlx":
        return write_mlx(adapter, dst, base=base, overwrite=overwrite)
    raise AdapterError(f"--to: expected peft or mlx, got {to!r}")


def ensure_peft(path: str | Path, base: str | None = None) -> tuple[Path, str | None]:
    """(a PEFT directory for ``path``, the base model it names). An MLX adapter is converted into a temporary
    directory (kept for the life of the process), so inference and merging take either format."""
    d = Path(path).expanduser()
    if adapter_format(d) == "peft":
        return d, base
    adapter = _read_mlx(d)
    tmp = Path(tempfile.mkdtemp(prefix="nl-mlx-adapter-"))
    write_peft(adapter, tmp, base=base, overwrite=True)
    return tmp, base or adapter.base


# ------------------------------------------------------------------------------------------ into a model
def load_adapter_into(model, path: str | Path, r: int, alpha: float, use_rslora: bool = False) -> int:
    """Copy an adapter's tensors (either format) into a freshly LoRA-wrapped PEFT model; returns how many
    modules were loaded. Rank and scale must equal the model's (``lora.r`` / ``lora.alpha``): a different
    scale would change what the adapter does. Modules the adapter has no tensors for keep their fresh init
    (B = 0: no effect until trained)."""
    from peft import set_peft_model_state_dict

    from nested_learning.config import ConfigError

    adapter = read_adapter(path)
    ours = alpha / (math.sqrt(r) if use_rslora else r)
    if adapter.r != r or not math.isclose(adapter.scale, ours, rel_tol=1e-9):
        raise ConfigError(f"lora.init_adapter: {adapter.source} has rank {adapter.r} and scale {adapter.scale:g} "
                          f"(alpha {adapter.alpha:g}), but lora.r={r} and lora.alpha={alpha:g} give scale {ours:g}; "
                          f"set lora.r={adapter.r} and lora.alpha={adapter.alpha:g}")
    state = {}
    for module, (a, b) in adapter.tensors.items():
        state[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a
        state[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # size mismatch
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"lora.init_adapter: {adapter.source} does not fit this model: {first}") from None
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        module = unexpected[0].removeprefix(_PEFT_PREFIX).rsplit(".lora_", 1)[0]
        raise ConfigError(f"lora.init_adapter: {adapter.source} has tensors for {module}, which this model does "
                          f"not adapt (check lora.target_modules and the base model)")
    return len(adapter.tensors)
