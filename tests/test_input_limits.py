"""Hostile inputs at the CLI and in data files: each is one ``error:`` line naming the file (and line), exit 2,
never a traceback: non-finite numbers, absurd YAML nesting, duplicate keys, unusable paths, lone surrogates,
damaged or diverged adapters, ``merge --out FILE``. A huge JSONL line is cut before tokenising."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import micro_config, write_data

from nested_learning.cli import main
from nested_learning.config import ConfigError, TrainConfig, load_config
from nested_learning.data import records
from nested_learning.data.records import DataError, encode_records, read_jsonl
from nested_learning.model.embedded import byte_tokenizer


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def one_error(capsys, *args: str) -> str:
    code, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.fixture
def checkpoint(micro_checkpoint) -> Path:
    return micro_checkpoint


# ---- config files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expect", [
    ("optim:\n  lr: .inf\n", "f.yaml:2: optim.lr: Input should be a finite number"),
    ("optim:\n  betas: [0.9, .nan]\n", "f.yaml:2: optim.betas.1: Input should be a finite number"),
    ("optim:\n  lr: 0.1\nseed: 3\noptim:\n  eps: 0.1\n", "f.yaml:4: duplicate key 'optim' (first given at line 1)"),
    ("[" * 20000 + "]" * 20000, "f.yaml:1: nested more than 64 levels deep"),
    ("a:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(2000)), "f.yaml:65: nested more than 64"),
    ("data:\n  train: " + "d/" * 2500 + "\n", "f.yaml:2: data.train: the path is 5000 characters long"),
    ('data:\n  train: "a\\0b"\n', "f.yaml:2: data.train: the path contains a NUL byte"),
])
def test_a_bad_config_file_is_one_error_line_with_file_and_line(tmp_path, capsys, text, expect):
    f = tmp_path / "f.yaml"
    f.write_text(text)
    line = one_error(capsys, "train", str(f), "--quiet")
    assert line == f"error: {tmp_path}/{expect}" or line.startswith(f"error: {tmp_path}/{expect}"), line
    assert not (tmp_path / "runs").exists()


def test_non_finite_numbers_are_refused_in_every_float_field():
    for raw in ({"optim": {"lr": float("inf")}}, {"optim": {"eps": float("nan")}},
                {"tiers": {"periods": [1, 2], "lr_scales": [1.0, float("inf")]}},
                {"speed": {"activation_memory_budget": float("nan")}}):
        with pytest.raises(Exception, match="finite number"):
            TrainConfig.model_validate(raw)
    assert TrainConfig.model_validate_json('{"optim": {"lr": 0.5}}').optim.lr == 0.5


def test_a_set_override_is_named_instead_of_a_line(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^--set optim.lr: Input should be a finite number$"):
        load_config(f, ["optim.lr=.inf"])


# ---- data files --------------------------------------------------------------------------------------------------
def test_lone_surrogates_in_data_name_file_and_line_in_train_and_eval(tmp_path, capsys, checkpoint):
    d = write_data(tmp_path / "data")
    with open(d / "train.jsonl", "a") as f:
        f.write('{"prompt": "ok", "completion": "bad \\ud800 text"}\n')
    n = sum(1 for _ in open(d / "train.jsonl"))
    with pytest.raises(DataError, match=rf"train.jsonl:{n}: `completion` holds a lone surrogate \(U\+D800"):
        encode_records(read_jsonl(d / "train.jsonl"), byte_tokenizer(), "completion", max_length=64)
    line = one_error(capsys, "eval", "--adapter", str(checkpoint), "--data", str(d / "train.jsonl"))
    assert f"train.jsonl:{n}: `completion` holds a lone surrogate" in line
    cfg = micro_config(d, tmp_path / "run")
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    line = one_error(capsys, "train", str(tmp_path / "c.yaml"), "--quiet")
    assert f"train.jsonl:{n}: `completion` holds a lone surrogate" in line


class CountingTokenizer:
    """Wraps a tokenizer and records the longest text it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __call__(self, texts, **kwargs):
        batch = [texts] if isinstance(texts, str) else texts
        self.longest = max([self.longest, *map(len, batch)])
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def trained_bpe():
    """A BPE tokenizer with real merges (long whitespace and word tokens), so the cut is checked where a token
    covers many characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["alpha beta gamma " * 50, "    " * 40 + "indent", "delta" * 30] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.parametrize("make", [byte_tokenizer, trained_bpe])
def test_a_huge_line_is_cut_before_tokenising_with_the_same_samples(make, monkeypatch):
    tok = make()
    huge = "alpha beta gamma " * 6_000 + "    " * 5_000  # 122k characters
    text = [{"text": huge}]
    completion = [{"prompt": huge, "completion": "delta"}, {"prompt": "short", "completion": huge}]
    for fmt, batch in (("text", text), ("completion", completion)):
        counting = CountingTokenizer(tok)
        cut, _ = encode_records(batch, counting, fmt, max_length=128)
        assert counting.longest < 50_000
        monkeypatch.setattr(records, "_cut_long_texts", lambda r, *a: r)  # the reference: no cut at all
        full, n_cut = encode_records(batch, tok, fmt, max_length=128)
        monkeypatch.undo()
        assert n_cut == len(batch) and [(s.input_ids, s.labels) for s in cut] == [(s.input_ids, s.labels)
                                                                                for s in full]
    assert completion[1]["completion"] is huge  # the caller's records are left whole


# ---- adapters: damaged, diverged; merge --out ---------------------------------------------------------------------
def damaged(checkpoint: Path, dest: Path, how: str) -> Path:
    shutil.copytree(checkpoint, dest)
    f = dest / "adapter_model.safetensors"
    if how == "corrupt":
        f.write_bytes(f.read_bytes()[:200])
    else:
        tensors = load_file(str(f))
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("inf"))
        save_file(tensors, str(f))
    return dest


@pytest.mark.parametrize("how, words", [("corrupt", "not a readable safetensors file"),
                                        ("nonfinite", "holds non-finite values")])
def test_generate_and_merge_refuse_a_damaged_adapter_with_one_line(checkpoint, tmp_path, capsys, how, words):
    bad = damaged(checkpoint, tmp_path / "bad", how)
    line = one_error(capsys, "generate", "--adapter", str(bad), "--prompt", "add 1 and 2: ")
    assert f"{bad}/adapter_model.safetensors: " in line and words in line
    line = one_error(capsys, "merge", "--adapter", str(bad), "--out", str(tmp_path / "merged"))
    assert words in line and not (tmp_path / "merged").exists()


def test_merge_out_a_file_or_under_a_file_is_one_line(checkpoint, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    for args in ([], ["--overwrite"]):
        line = one_error(capsys, "merge", "--adapter", str(checkpoint), "--out", str(f), *args)
        assert line == f"error: --out: {f} is a file; the merged model is a directory (choose a new path)"
    line = one_error(capsys, "merge", "--adapter", str(checkpoint), "--out", str(f / "sub" / "m"))
    assert line == f"error: --out: cannot create {f}/sub/m: {f} is a file, not a directory"
    assert f.read_text() == "keep"


def test_train_into_an_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    cfg = micro_config(write_data(tmp_path / "data"), tmp_path / "file" / "run")
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    code, err = run_cli(capsys, "train", str(tmp_path / "c.yaml"), "--quiet")
    errors = [line for line in err if line.startswith("error: ")]  # progress log lines may come before it
    assert code == 2 and errors == [err[-1]] and "Not a directory" in err[-1] and str(tmp_path / "file") in err[-1]
    assert not any("Traceback" in line for line in err) and (tmp_path / "file").read_text() == "keep"


def test_a_30_mb_line_costs_megabytes_not_gigabytes(tmp_path):
    """In a fresh process, so the peak resident size is this encoding's own; a plain byte tokenizer (one id per
    UTF-8 byte, as the embedded one) keeps torch and transformers out of that process."""
    import subprocess
    import sys

    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"text": "alpha beta gamma " * (30_000_000 // 17)}) + "\n")
    script = f"""
import importlib.util, json, sys
# records.py alone (stdlib only): the package's __init__ would import torch for batching.
spec = importlib.util.spec_from_file_location("records", {str(Path(records.__file__))!r})
mod = sys.modules["records"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
encode_records, read_jsonl = mod.encode_records, mod.read_jsonl

class Bytes:
    eos_token_id = 256
    def get_vocab(self):
        return {{chr(i): i for i in range(256)}} | {{"<eos>": 256}}
    def __call__(self, texts, add_special_tokens=True):
        ids = lambda t: list(t.encode()) + ([256] if add_special_tokens else [])
        return {{"input_ids": ids(texts) if isinstance(texts, str) else [ids(t) for t in texts]}}

def peak_kb():  # VmHWM starts afresh at exec (ru_maxrss can carry the parent's peak across it)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

before = peak_kb()
samples, cut = encode_records(read_jsonl({str(huge)!r}), Bytes(), "text", max_length=1024)
grew_mb = (peak_kb() - before) / 1024
print(json.dumps({{"grew_mb": grew_mb, "ids": samples[0].input_ids[:3], "tokens": len(samples[0].input_ids),
                  "cut": cut}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 1024 and res["cut"] == 1 and res["ids"] == list(b"alp")
    # Reading the line costs ~90 MB (bytes, text, JSON); tokenised whole, this tokenizer alone took ~740 MB
    # (a fast HF tokenizer, with its offsets, over 5 GB).
    assert res["grew_mb"] < 300, res
