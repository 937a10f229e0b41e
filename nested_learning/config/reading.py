"""Reading a config: YAML text (strict: duplicate keys, depth, syntax named by line), ``--set KEY=VALUE``
overrides, and validation errors located at the file and line of the field at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nested_learning.config.sections import ConfigError
from nested_learning.config.train import TrainConfig


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """One line per problem, each naming the dotted field: ``optim.lr: Input should be greater than 0``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    head = f"invalid config{f' in {source}' if source else ''}:"
    return "\n".join([head, *("  " + line for line in lines)])


def _parse_scalar(text: str) -> Any:
    """``--set`` values are YAML scalars/flow collections: ``3``, ``1e-4``, ``true``, ``[1,4,16]``."""
    try:
        return load_yaml(text, "--set")
    except ConfigError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides onto a raw config dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return data


MAX_YAML_DEPTH = 64  # a config is 3 levels deep; PyYAML's composer recurses once per level


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    source = "<yaml>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # an unhashable key: construct_mapping below reports it
                    continue
                if first != line:
                    raise ConfigError(f"{self.source}:{line}: duplicate key {key!r} (first given at line {first})")
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """Parse YAML text safely: a syntax error, nesting deeper than ``MAX_YAML_DEPTH`` or a duplicate key is a
    ``ConfigError`` whose message starts with ``source:line:``.

    The depth is checked on PyYAML's event stream first (its parser is iterative), so a hostile 20,000-deep
    document is refused with its line instead of exhausting the recursion of the composer."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ConfigError(f"{source}:{event.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} "
                                      "levels deep; a config needs three")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        loader = _StrictLoader(text)
        loader.source = source
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:  # anchors and aliases can still nest deeply; never a traceback
        raise ConfigError(f"{source}: nested too deeply to read") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (optional), apply overrides, validate. Errors name the file and the field."""
    data: dict[str, Any] = {}
    source = text = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        loaded = load_yaml(text, str(p))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        if text is None:
            raise ConfigError(format_validation_error(err, source)) from None
        set_keys = {o.partition("=")[0].strip() for o in overrides or []}
        lines = [_located(e, text, source, set_keys) for e in err.errors()]
        head = [] if len(lines) == 1 else [f"invalid config in {source} ({len(lines)} problems):"]
        raise ConfigError("\n".join(head + lines)) from None


def _located(error: dict[str, Any], text: str, source: str, set_keys: set[str]) -> str:
    """``file:line: field: message`` for one validation error, the line found in the YAML node tree
    (``--set KEY`` instead of a line when an override gave the value)."""
    loc = [str(p) for p in error["loc"]]
    field = ".".join(loc) or "(root)"
    msg = error["msg"].removeprefix("Value error, ")
    if any(field == k or field.startswith(k + ".") for k in set_keys):
        return f"--set {field}: {msg}"
    node, line = yaml.compose(text, Loader=yaml.SafeLoader), None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if str(getattr(k, "value", "")) == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return f"{source}:{line}: {field}: {msg}" if line else f"{source}: {field}: {msg}"
