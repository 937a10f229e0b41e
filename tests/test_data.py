"""data.py: formats, record errors, prompt masking, splits, batch plans, packing equivalence."""

from __future__ import annotations

import json
import logging
from itertools import islice

import pytest
import torch
import torch.nn.functional as F

from nested_learning.config import DataConfig
from nested_learning.data import (
    Batch,
    BatchPlan,
    DataError,
    Sample,
    collate,
    detect_format,
    encode_records,
    iterate_batches,
    load_splits,
    read_jsonl,
)
from nested_learning.model.embedded import CHAT_TEMPLATE, build_embedded, byte_tokenizer

BOS, EOS, PAD = 1, 2, 0  # ids in the embedded byte tokenizer
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_jsonl(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


def loss_text(tok, sample: Sample) -> str:
    return tok.decode([t for t, y in zip(sample.input_ids, sample.labels) if y != -100])


# ---------------------------------------------------------------------------------------- formats / errors


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"text": "hello"}, "text"),
        ({"prompt": "Q", "completion": "A", "id": 7}, "completion"),
        ({"messages": CHAT}, "chat"),
    ],
)
def test_detect_format(tmp_path, record, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    assert detect_format(read_jsonl(path), path) == fmt


def test_mixed_formats_rejected_naming_file_and_line(tmp_path):
    path = write_lines(tmp_path / "mix.jsonl", ['{"text": "a"}', "", '{"messages": []}'])
    with pytest.raises(DataError, match=r"^.*mix\.jsonl:3: a chat record in a text file \(format set by line 1\)"):
        detect_format(read_jsonl(path), path)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "a"}', '{"text": "b"'], r"bad\.jsonl:2: malformed JSON"),
        (['{"text": "a"}', "", "[1, 2]"], r"bad\.jsonl:3: expected a JSON object, got array"),
        ([], r"bad\.jsonl: the file holds no records"),
        (["", "  "], r"bad\.jsonl: the file holds no records"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"foo": 1}, r"no `text`, `prompt`/`completion` or `messages` field \(keys: foo\)"),
        ({"text": "a", "messages": CHAT}, r"ambiguous record"),
        ({"prompt": "Q"}, r"missing field `completion`"),
        ({"prompt": "Q", "completion": 3}, r"`completion` must be a string, got number"),
        ({"text": ""}, r"`text` is empty"),
        ({"messages": "hi"}, r"`messages` must be an array, got string"),
        ({"messages": []}, r"`messages` is empty"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role must be one of system, user, assist"),
        ({"messages": [{"role": "user"}]}, r"missing field messages\[0\]\.content"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"`messages` has no assistant turn"),
    ],
)
def test_bad_record_names_file_line_and_reason(tmp_path, tok, record, message):
    good = {"text": "ok"} if "text" in record or "foo" in record else (
        {"prompt": "Q", "completion": "A"} if "prompt" in record else {"messages": CHAT}
    )
    path = write_jsonl(tmp_path / "r.jsonl", [good, record])
    with pytest.raises(DataError, match=r"r\.jsonl:2: " + message):
        records = read_jsonl(path)
        encode_records(records, tok, detect_format(records, path), max_length=64, source=str(path))


def test_chat_needs_a_template(tmp_path, tok):
    bare = byte_tokenizer()
    bare.chat_template = None
    records = read_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    with pytest.raises(DataError, match=r"c\.jsonl: chat data .* set data\.chat_template"):
        encode_records(records, bare, "chat", max_length=256)
    # An explicit template makes it work and gives the same tokens as the tokenizer's own template.
    given, _ = encode_records(records, bare, "chat", max_length=256, chat_template=CHAT_TEMPLATE)
    own, _ = encode_records(records, tok, "chat", max_length=256)
    assert given == own


# ---------------------------------------------------------------------------------------- prompt masking


def test_text_every_token_carries_loss_and_eos_appended_once(tok):
    samples, cut = encode_records([{"text": "abc"}, {"text": "xy<|eos|>"}], tok, "text", max_length=64)
    assert cut == 0
    assert samples[0].input_ids == [BOS] + tok("abc", add_special_tokens=False)["input_ids"] + [EOS]
    assert samples[0].labels == samples[0].input_ids
    assert samples[1].input_ids[-2:] != [EOS, EOS] and samples[1].input_ids[-1] == EOS


def test_completion_loss_only_on_completion(tok):
    record = {"prompt": "What is 2+2? ", "completion": "Four."}
    (s,), _ = encode_records([record], tok, "completion", max_length=64)
    n_prompt = 1 + len(record["prompt"].encode())  # BOS + one token per byte
    assert s.labels[:n_prompt] == [-100] * n_prompt
    assert s.labels[n_prompt:] == s.input_ids[n_prompt:]
    assert len(s) == n_prompt + len("Four.") + 1
    assert loss_text(tok, s) == "Four.<|eos|>"

    (full,), _ = encode_records([record], tok, "completion", max_length=64, mask_prompt=False)
    assert full.input_ids == s.input_ids and full.labels == full.input_ids


def test_chat_loss_only_on_assistant_turns(tok):
    (s,), _ = encode_records([{"messages": CHAT}], tok, "chat", max_length=256)
    assert tok.decode(s.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert loss_text(tok, s) == "Hello!<|im_end|>4<|im_end|>"
    assert sum(y != -100 for y in s.labels) == len("Hello!") + 1 + len("4") + 1

    (full,), _ = encode_records([{"messages": CHAT}], tok, "chat", max_length=256, mask_prompt=False)
    assert full.input_ids == s.input_ids and full.labels == full.input_ids


def test_chat_template_without_generation_markers_masks_by_prefix(tok):
    plain = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (marked,), _ = encode_records([{"messages": CHAT}], tok, "chat", max_length=256)
    (diffed,), _ = encode_records([{"messages": CHAT}], tok, "chat", max_length=256, chat_template=plain)
    assert diffed.input_ids == marked.input_ids
    assert diffed.labels == marked.labels


# ---------------------------------------------------------------------------------------- files / splits


def test_truncation_counted_in_one_warning(tmp_path, tok, caplog):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x" * n} for n in (3, 30, 40, 5)])
    write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "p" * 25, "completion": "c"}, {"prompt": "p", "completion": "c"}])
    cfg = DataConfig(dir=str(tmp_path), max_length=16)
    with caplog.at_level(logging.WARNING, logger="nested_learning"):
        train, valid = load_splits(cfg, tok, seed=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "truncated 3 of 6 samples to data.max_length=16" in warnings[0].getMessage()
    assert [len(s) for s in train] == [5, 16, 16, 7]
    assert [len(s) for s in valid] == [16, 4]
    assert valid[0].labels == [-100] * 16  # the prompt filled the whole budget


def test_valid_split_sizes_determinism_disjointness(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"record {i}"} for i in range(20)])
    cfg = DataConfig(dir=str(tmp_path), valid_fraction=0.25)
    train, valid = load_splits(cfg, tok, seed=3)
    assert (len(train), len(valid)) == (15, 5)
    names = lambda ss: [tok.decode(s.input_ids, skip_special_tokens=True) for s in ss]  # noqa: E731
    assert sorted(names(train) + names(valid)) == sorted(f"record {i}" for i in range(20))
    assert not set(names(train)) & set(names(valid))
    again = load_splits(cfg, tok, seed=3)
    assert (names(again[0]), names(again[1])) == (names(train), names(valid))
    assert names(load_splits(cfg, tok, seed=4)[1]) != names(valid)


def test_valid_file_and_missing_data(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "t1"}, {"text": "t2"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "v"}])
    train, valid = load_splits(DataConfig(train=str(tmp_path / "a.jsonl"), valid=str(tmp_path / "b.jsonl")), tok, 0)
    assert (len(train), len(valid)) == (2, 1)
    with pytest.raises(DataError, match="no validation data"):
        load_splits(DataConfig(train=str(tmp_path / "a.jsonl"), valid_fraction=0.0), tok, 0)
    with pytest.raises(DataError, match="no training data"):
        load_splits(DataConfig(), tok, 0)
    with pytest.raises(DataError, match=r"train\.jsonl: file not found"):
        load_splits(DataConfig(dir=str(tmp_path / "empty")), tok, 0)


# ---------------------------------------------------------------------------------------- collate / plans


def test_collate_padded_and_packed_exact():
    a, b = Sample([1, 5, 6, 2], [-100, -100, 6, 2]), Sample([1, 7, 2], [1, 7, 2])
    padded = collate([a, b], PAD)
    assert padded.input_ids.tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    assert padded.labels.tolist() == [[-100, -100, 6, 2], [1, 7, 2, -100]]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert padded.position_ids.tolist() == [[0, 1, 2, 3]] * 2 and padded.one_sample_per_row
    assert (padded.num_tokens, padded.num_loss_tokens) == (7, 4)
    assert padded.model_inputs().keys() == {"input_ids", "attention_mask", "position_ids", "use_cache"}

    packed = collate([a, b, a], PAD, packing=True, max_length=8)
    # Rows: (a, b) and (a,), T = the longest row; the padding tail counts positions from 0 like a sample.
    assert packed.input_ids.tolist() == [[1, 5, 6, 2, 1, 7, 2], [1, 5, 6, 2, 0, 0, 0]]
    assert packed.labels.tolist() == [[-100, -100, 6, 2, -100, 7, 2], [-100, -100, 6, 2, -100, -100, -100]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2]]
    assert packed.attention_mask is None and not packed.one_sample_per_row
    assert (packed.num_tokens, packed.num_loss_tokens) == (11, 6)
    assert packed.model_inputs().keys() == {"input_ids", "position_ids", "use_cache"}
    assert packed.model_inputs()["use_cache"] is False

    moved = packed.to("cpu", non_blocking=True)
    assert isinstance(moved, Batch) and torch.equal(moved.position_ids, packed.position_ids)
    flat = packed.flattened()
    assert flat.input_ids.shape == (1, 14) and flat.labels.tolist()[0] == sum(packed.labels.tolist(), [])


def test_packed_rows_of_one_sample(micro_model):
    """One sample per packed row: the padded layout, marked as such (attention may then run as a plain causal
    kernel, with no mask tensor); the loss equals the padded layout's, and so does the flattened batch's."""
    a, b = Sample([1, 5, 6, 2, 9, 4], [1, 5, 6, 2, 9, 4]), Sample([1, 7, 2, 8], [1, 7, 2, 8])
    packed = collate([a, b], PAD, packing=True, max_length=6)  # neither fits beside the other
    assert packed.one_sample_per_row
    assert packed.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    assert packed.model_inputs().keys() == {"input_ids", "attention_mask", "position_ids", "use_cache"}
    assert packed.labels.tolist() == [[-100, 5, 6, 2, 9, 4], [-100, 7, 2, 8, -100, -100]]
    padded = collate([a, b], PAD)
    reference = summed_loss(micro_model, padded)
    assert summed_loss(micro_model, packed) == pytest.approx(reference, rel=1e-6)
    flat = packed.flattened()
    assert flat.position_ids.tolist() == [[0, 1, 2, 3, 4, 5] * 2] and flat.attention_mask is None
    assert not flat.one_sample_per_row  # one row, two samples
    assert summed_loss(micro_model, flat) == pytest.approx(reference, rel=1e-6)
    assert summed_loss(micro_model, padded.flattened()) == pytest.approx(reference, rel=1e-6)


def fake_samples(lengths):
    return [Sample([1] * n, [1] * n) for n in lengths]


LENGTHS = [1 + (i * 37) % 100 for i in range(300)]


@pytest.mark.parametrize("packing", [False, True])
def test_plan_deterministic_per_epoch_and_covers_every_sample(packing):
    samples = fake_samples(LENGTHS)
    plan = BatchPlan(samples, 8, seed=1, packing=packing, max_length=128)
    e0, e1 = plan.epoch(0), plan.epoch(1)
    assert e0 == BatchPlan(samples, 8, seed=1, packing=packing, max_length=128).epoch(0)
    assert e0 != e1
    assert e0 != BatchPlan(samples, 8, seed=2, packing=packing, max_length=128).epoch(0)
    for batches in (e0, e1):
        assert len(batches) == len(plan)
        assert sorted(i for b in batches for i in b) == list(range(300))
    if packing:
        # 15,150 tokens in 119 rows of <= 128 (99.5% full), 8 rows per micro-batch
        assert (len(plan.rows), len(plan)) == (119, 15)
        for indices in e0:
            batch = collate([samples[i] for i in indices], PAD, packing=True, max_length=128)
            assert batch.input_ids.shape[0] <= 8 and batch.input_ids.shape[1] <= 128
    else:
        assert len(plan) == 38 and sorted(len(b) for b in e0)[:2] == [4, 8]


def test_group_by_length_cuts_padding():
    samples = fake_samples(LENGTHS)

    def pad_tokens(group):
        plan = BatchPlan(samples, 8, seed=0, group_by_length=group, max_length=None)
        return sum(len(b) * max(LENGTHS[i] for i in b) - sum(LENGTHS[i] for i in b) for b in plan.epoch(0))

    real = sum(LENGTHS)  # 15,150
    ungrouped, grouped = pad_tokens(False), pad_tokens(True)
    assert (ungrouped, grouped) == (11462, 686)  # 76% vs 4.5% of the real tokens
    assert grouped < 0.05 * real < 0.1 * ungrouped


@pytest.mark.parametrize("packing", [False, True])
def test_iterate_batches_resume_equals_uninterrupted(packing):
    samples = fake_samples(LENGTHS[:40])
    plan = BatchPlan(samples, 4, seed=5, packing=packing, max_length=128)
    n = len(plan)
    full = list(islice(iterate_batches(samples, plan, PAD), 3 * n + 2))
    for start in (1, n - 1, n, 2 * n + 1):
        resumed = list(islice(iterate_batches(samples, plan, PAD, start=start), len(full) - start))
        for x, y in zip(full[start:], resumed, strict=True):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
            assert torch.equal(x.position_ids, y.position_ids) if x.position_ids is not None else y.position_ids is None
            assert x.attention_mask is None if packing else x.attention_mask is not None


# ---------------------------------------------------------------------------------------- packing == padding


@pytest.fixture(scope="module")
def micro_model():
    # A larger init spread sharpens attention, so attending across samples visibly changes the loss.
    model, _ = build_embedded("embedded:micro-llama", initializer_range=0.3)
    return model.eval()


def summed_loss(model, batch: Batch, **override) -> float:
    inputs = {**batch.model_inputs(), **override}
    labels = batch.labels
    with torch.no_grad():
        logits = model(**inputs).logits  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
        reduction="sum",
    ).item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss(tok, micro_model, attn):
    micro_model.set_attn_implementation(attn)
    records = [{"prompt": f"Q{i}: " + "x" * (i * 3 % 17), "completion": f"answer {i}" + "y" * (i * 5 % 11)}
               for i in range(12)]
    samples, _ = encode_records(records, tok, "completion", max_length=64)
    # Text samples carry loss from their first token on: packing must not score it from the previous sample.
    texts, _ = encode_records([{"text": "z" * (3 + i)} for i in range(6)], tok, "text", max_length=64)
    samples = [s for pair in zip(samples, texts + texts) for s in pair]
    padded = collate(samples, PAD)
    packed = collate(samples, PAD, packing=True, max_length=64)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # samples really share rows
    assert packed.num_loss_tokens == padded.num_loss_tokens == 165 + 2 * sum(3 + i + 1 for i in range(6))

    reference = summed_loss(micro_model, padded)
    assert summed_loss(micro_model, packed) == pytest.approx(reference, rel=1e-5)
    assert summed_loss(micro_model, packed.flattened()) == pytest.approx(reference, rel=1e-5)
    # Without the block-diagonal mask (an attention mask, or a KV cache, turns the packed detection off)
    # samples attend to their row neighbours and the loss moves far outside the tolerance.
    leaky = summed_loss(micro_model, packed, attention_mask=torch.ones_like(packed.input_ids))
    assert abs(leaky - reference) > 1e-3 * reference
    assert summed_loss(micro_model, packed, use_cache=True) == pytest.approx(leaky, rel=1e-5)


def test_fixed_width_plan_gives_one_batch_shape_and_the_same_loss_tokens():
    """``fixed_width`` (what CUDA graph replay needs): packed rows padded to max_length, so every full micro-batch
    has the shape (batch_size, max_length); the tokens and loss tokens are those of the unpadded batches."""
    samples = fake_samples(LENGTHS[:40])
    loose = BatchPlan(samples, 3, seed=5, packing=True, max_length=128)
    fixed = BatchPlan(samples, 3, seed=5, packing=True, max_length=128, fixed_width=True)
    n = len(loose)
    a, b = list(islice(iterate_batches(samples, loose, PAD), n)), list(islice(iterate_batches(samples, fixed, PAD), n))
    assert len({x.input_ids.shape[1] for x in a}) > 1  # without it widths vary
    assert {x.input_ids.shape for x in b[:-1]} == {(3, 128)}
    for x, y in zip(a, b, strict=True):
        t = x.input_ids.shape[1]
        assert torch.equal(y.input_ids[:, :t], x.input_ids) and (y.input_ids[:, t:] == PAD).all()
        assert (y.labels[:, t:] == -100).all()
        assert (x.num_tokens, x.num_loss_tokens) == (y.num_tokens, y.num_loss_tokens)
    assert not BatchPlan(samples, 3, seed=5, max_length=128, fixed_width=True).fixed_width  # padded mode: no effect
