"""JSONL records -> token samples (with loss labels) -> train/valid splits.

Record formats, detected per file from its first record (a file mixing formats is rejected):

- ``{"text": ...}``: every token carries loss.
- ``{"prompt": ..., "completion": ...}``: under prompt masking only the completion (and EOS) carries loss.
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``: rendered with the
  tokenizer's chat template (or ``chat_template``); under prompt masking only assistant turns carry loss.

EOS is appended to text and completions when the tokenizer has one. Every problem with a record is a
``DataError`` whose message starts with ``path:line:``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["IGNORE_INDEX", "DataError", "Sample", "detect_format", "encode_records", "load_splits", "read_jsonl"]

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

logger = logging.getLogger("nested_learning")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DataError(ValueError):
    """Data that cannot be used; starts with ``path:line:`` when one record is at fault."""


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token carries no loss; same length as input_ids

    def __len__(self) -> int:
        return len(self.input_ids)


class _Records(list):
    """A list of records that remembers the file and line each came from (for error messages)."""

    path: str = "<records>"
    lines: list[int]


def _line_of(records: Sequence[dict], i: int) -> int:
    lines = getattr(records, "lines", None)
    return lines[i] if lines is not None else i + 1


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> list[dict]:
    """One dict per non-blank line. Malformed JSON, non-objects and empty files raise ``DataError``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    records = _Records()
    records.path, records.lines = str(p), []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not valid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {_json_type(record)}")
            records.append(record)
            records.lines.append(lineno)
    if not records:
        raise DataError(f"{p}: the file holds no records (it is empty)")
    return records


def _record_format(record: dict, where: str) -> str:
    found = []
    if "text" in record:
        found.append("text")
    if "prompt" in record or "completion" in record:
        found.append("completion")
    if "messages" in record:
        found.append("chat")
    if not found:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: no `text`, `prompt`/`completion` or `messages` field (keys: {keys})")
    if len(found) > 1:
        raise DataError(f"{where}: ambiguous record: it has fields of the {' and '.join(found)} formats")
    return found[0]


def detect_format(records: Sequence[dict], path: str | Path) -> str:
    """``text``, ``completion`` or ``chat``; every record must share the first record's format."""
    if not records:
        raise DataError(f"{path}: the file holds no records (it is empty)")
    fmt = _record_format(records[0], f"{path}:{_line_of(records, 0)}")
    for i in range(1, len(records)):
        where = f"{path}:{_line_of(records, i)}"
        other = _record_format(records[i], where)
        if other != fmt:
            raise DataError(
                f"{where}: a {other} record in a {fmt} file (format set by line {_line_of(records, 0)}); "
                "one file must use one format"
            )
    return fmt


def _check_unicode(text: str, where: str, label: str) -> None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer can encode: name the spot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: {label} holds a lone surrogate (U+{ord(text[exc.start]):04X} at character "
                        f"{exc.start}), which is not valid Unicode text") from None


def _check_record(record: dict, fmt: str, where: str) -> None:
    def need_string(key: str, obj: dict = record, label: str | None = None) -> None:
        label = label or f"`{key}`"
        if key not in obj:
            raise DataError(f"{where}: missing field {label}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {label} must be a string, got {_json_type(obj[key])}")
        if not obj[key]:
            raise DataError(f"{where}: {label} is empty")
        _check_unicode(obj[key], where, label)

    if fmt == "text":
        need_string("text")
    elif fmt == "completion":
        need_string("prompt")
        need_string("completion")
    else:
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise DataError(f"{where}: `messages` must be an array, got {_json_type(messages)}")
        if not messages:
            raise DataError(f"{where}: `messages` is empty")
        for j, m in enumerate(messages):
            label = f"messages[{j}]"
            if not isinstance(m, dict):
                raise DataError(f"{where}: {label} must be an object, got {_json_type(m)}")
            if m.get("role") not in ROLES:
                raise DataError(f"{where}: {label}.role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
            need_string("content", m, f"{label}.content")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: `messages` has no assistant turn, so nothing to learn from")


# --------------------------------------------------------------------------------------------- encoding


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer puts before / after a text when adding special tokens (BOS, sometimes EOS)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare) :])
    return [], []


def _chat_loss_spans(messages, tokenizer, template, where) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans of assistant turns, for templates without generation markers.

    Each span runs from the end of the conversation rendered up to that turn with ``add_generation_prompt``
    to the end of the conversation rendered through that turn (content plus end marker, trailing whitespace
    dropped). Templates that render earlier turns differently fall back to locating the content itself.
    """

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(messages, False)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            head, through = render(messages[:i], True), render(messages[: i + 1], False)
        except Exception:  # a template may refuse a partial conversation
            head = through = ""
        end = len(through.rstrip())
        if head and text.startswith(head) and text.startswith(through) and end > len(head) >= cursor:
            spans.append((len(head), end))
            cursor = end
            continue
        start = text.find(m["content"], cursor)
        if start < 0:
            raise DataError(f"{where}: cannot locate assistant turn messages[{i}] in the rendered chat template")
        cursor = start + len(m["content"])
        spans.append((start, cursor))
    return text, spans


def _encode_chat(messages, tokenizer, template, mask_prompt, where) -> tuple[list[int], list[int]]:
    if not mask_prompt:
        ids = list(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True)[
            "input_ids"
        ])
        return ids, list(ids)
    if _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), out["assistant_masks"]
        if any(mask):
            return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask)]
    text, spans = _chat_loss_spans(messages, tokenizer, template, where)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: prompt masking for chat data needs a fast tokenizer or {{% generation %}} markers")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), []
    for t, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = any(s < span_end and e > span_start for span_start, span_end in spans)
        labels.append(t if inside else IGNORE_INDEX)
    return ids, labels


_CUT_MARGIN = 64  # tokens kept past max_length, so a cut never changes the tokens that survive truncation


def _longest_token(tokenizer) -> int:
    """Characters the longest vocabulary entry can stand for (its spelling is never shorter than its text)."""
    try:
        return max(1, max(len(t) for t in tokenizer.get_vocab()))
    except Exception:  # a tokenizer without a vocabulary listing: assume a generous bound
        return 256


def _cut_long_texts(records: Sequence[dict], fmt: str, tokenizer, max_length: int) -> Sequence[dict]:
    """Records whose texts are cut to what can matter after truncation to ``max_length`` tokens.

    A token never covers more characters than its vocabulary spelling, so the first ``max_length`` tokens of a
    text lie within its first ``(max_length + margin) * longest`` characters; the margin keeps the cut's
    boundary effects past the truncation point. Without the cut, one 30 MB line costs gigabytes of token ids
    and offsets that truncation then throws away. The records themselves are never modified."""
    floor = max_length + _CUT_MARGIN
    keys = {"text": ("text",), "completion": ("prompt", "completion")}.get(fmt, ())

    def texts(r: dict) -> list[str]:
        if fmt == "chat":
            return [m["content"] for m in r["messages"]]
        return [r[k] for k in keys]

    if not any(len(t) > floor for r in records for t in texts(r)):
        return records
    limit = floor * _longest_token(tokenizer)
    out = list(records)
    for i, r in enumerate(records):
        if not any(len(t) > limit for t in texts(r)):
            continue
        if fmt == "chat":
            out[i] = {**r, "messages": [{**m, "content": m["content"][:limit]} for m in r["messages"]]}
        else:
            out[i] = {**r, **{k: r[k][:limit] for k in keys}}
    return out


def encode_records(
    records: Sequence[dict],
    tokenizer,
    fmt: str,
    *,
    max_length: int,
    mask_prompt: bool = True,
    chat_template: str | None = None,
    source: str = "",
) -> tuple[list[Sample], int]:
    """Tokenize records of one format into samples; returns (samples, number truncated to ``max_length``)."""
    source = source or getattr(records, "path", "<records>")
    wheres = [f"{source}:{_line_of(records, i)}" for i in range(len(records))]
    for record, where in zip(records, wheres):
        _check_record(record, fmt, where)

    records = _cut_long_texts(records, fmt, tokenizer, max_length)
    pairs: list[tuple[list[int], list[int]]] = []
    if fmt == "chat":
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise DataError(
                f"{source}: chat data (`messages`) needs a chat template, but the tokenizer has none; "
                "set data.chat_template"
            )
        for record, where in zip(records, wheres):
            pairs.append(_encode_chat(record["messages"], tokenizer, template, mask_prompt, where))
    elif fmt in ("text", "completion"):
        prefix, suffix = _special_affixes(tokenizer)
        eos = tokenizer.eos_token_id

        def ending(body) -> list[int]:  # the body, the tokenizer's own suffix, then EOS unless already last
            ids = list(body) + suffix
            return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids

        key = "text" if fmt == "text" else "completion"
        bodies = tokenizer([r[key] for r in records], add_special_tokens=False)["input_ids"]
        if fmt == "text":
            for body in bodies:
                ids = prefix + ending(body)
                pairs.append((ids, list(ids)))
        else:
            prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
            for prompt, body in zip(prompts, bodies):
                head, tail = prefix + list(prompt), ending(body)
                head_labels = [IGNORE_INDEX] * len(head) if mask_prompt else list(head)
                pairs.append((head + tail, head_labels + tail))
    else:
        raise ValueError(f"unknown data format {fmt!r} (expected text, completion or chat)")

    samples, truncated = [], 0
    for ids, labels in pairs:
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        samples.append(Sample(ids, labels))
    return samples, truncated


# ----------------------------------------------------------------------------------------------- splits


def _load_file(path: Path, cfg, tokenizer) -> tuple[list[Sample], int]:
    records = read_jsonl(path)
    fmt = detect_format(records, path)
    return encode_records(
        records, tokenizer, fmt, max_length=cfg.max_length, mask_prompt=cfg.mask_prompt,
        chat_template=cfg.chat_template, source=str(path),
    )


def load_splits(cfg, tokenizer, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, valid) samples for a ``DataConfig``.

    Paths: ``cfg.train`` / ``cfg.valid`` if set, else ``train.jsonl`` / ``valid.jsonl`` in ``cfg.dir``. Without
    a validation file, ``valid_fraction`` of the train samples (at least one) is held out, chosen from ``seed``;
    both splits keep file order. Truncations of both files are reported in one warning.
    """
    root = Path(cfg.dir) if cfg.dir else None
    if cfg.train:
        train_path = Path(cfg.train)
    elif root is not None:
        train_path = root / "train.jsonl"
    else:
        raise DataError("data: no training data; set data.dir (a directory with train.jsonl) or data.train")
    if cfg.valid:
        valid_path = Path(cfg.valid)
    elif root is not None and (root / "valid.jsonl").is_file():
        valid_path = root / "valid.jsonl"
    else:
        valid_path = None
    if valid_path is None and cfg.valid_fraction <= 0:
        raise DataError(
            "data: no validation data; add valid.jsonl to data.dir, set data.valid, or set data.valid_fraction > 0"
        )

    train, n_train_cut = _load_file(train_path, cfg, tokenizer)
    if valid_path is not None:
        valid, n_valid_cut = _load_file(valid_path, cfg, tokenizer)
    else:
        n_valid = max(1, round(len(train) * cfg.valid_fraction))
        if len(train) - n_valid < 1:
            raise DataError(
                f"{train_path}: {len(train)} record(s) are too few to hold out valid_fraction={cfg.valid_fraction}; "
                "add a valid.jsonl or more records"
            )
        order = list(range(len(train)))
        random.Random(f"nested-learning/valid-split/{seed}").shuffle(order)
        held = set(order[:n_valid])
        valid = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
        n_valid_cut = 0
    cut = n_train_cut + n_valid_cut
    if cut:
        logger.warning(
            "truncated %d of %d samples to data.max_length=%d tokens (%s: %d, %s: %d)",
            cut, len(train) + len(valid), cfg.max_length,
            train_path.name, n_train_cut, valid_path.name if valid_path else "valid split", n_valid_cut,
        )
    return train, valid
