"""The largest-batch search of ``bench/peers.py --fit``, against a fake card whose limit is known."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from peers_fit import fit_table, is_oom, search_fit, seq_table  # noqa: E402


def card(limit):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit

    return fits, tried


@pytest.mark.parametrize("limit,start,tries,want,want_tried", [
    (70, 64, 3, (67, 71), [64, 71, 67]),       # estimate fits, +10% fails, then bisect
    (100, 64, 3, (79, None), [64, 71, 79]),    # never fails within the tries: keeps climbing by 10%
    (55, 64, 3, (52, 58), [64, 58, 52]),       # estimate fails: steps down by 10% until a fit
    (70, 70, 8, (70, 71), [70, 77, 73, 71]),   # stops once the bracket is one row wide
    (0, 1, 3, (None, 1), [1]),                 # nothing fits, not even one row
])
def test_search_brackets_the_limit(limit, start, tries, want, want_tried):
    fits, tried = card(limit)
    assert search_fit(fits, start, tries=tries) == want
    assert tried == want_tried


def test_known_fit_is_a_lower_bound_and_not_tried_again():
    fits, tried = card(12)
    assert search_fit(fits, 20, tries=2, known_fit=8) == (8, 14) and tried == [20, 14]
    fits, tried = card(12)
    assert search_fit(fits, 20, tries=4, known_fit=8) == (12, 14) and tried == [20, 14, 11, 12]


def test_oom_is_told_from_other_errors_and_the_table_names_the_bracket():
    assert is_oom("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_oom("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert not is_oom("RuntimeError: shape mismatch")
    row = fit_table([{"shape": "llama1b", "variant": "ours", "seq": 2048, "fit": 70, "oom": 77,
                      "tries": [{"batch": 64, "fits": True, "peak_gib": 120.0},
                                {"batch": 70, "fits": True, "peak_gib": 131.25}, {"batch": 77, "fits": False}]}])
    assert "| llama1b | ours | 70 x 2048 | 77 | 131.2 | 64, 70, 77 OOM |" in row


def fake_launch(limits, estimate=None, broken_at=None):
    """A stand-in for one worker process: fits up to ``limits[variant]`` rows, else runs out of memory;
    ``broken_at``: a batch that fails with another error (a timeout)."""
    calls = []

    def launch(shape, setting, variant, batch, warmup, steps, label):
        calls.append((variant, batch))
        if batch == broken_at:
            return {"error": "timeout after 400 s", "process_s": 400.0}
        if batch > limits[variant]:
            return {"error": "torch.OutOfMemoryError: CUDA out of memory.", "process_s": 1.0}
        return {"process_s": 1.0, "peak_gib": float(batch), "fit_batch": estimate or limits[variant]}

    return launch, calls


def run_search(tmp_path, variants, launch, tag="", batch=None, tries=3):
    import argparse

    import peers

    args = argparse.Namespace(shapes="smoke", variants=variants, tag=tag, batch=batch, fit_tries=tries,
                              json=str(tmp_path / "fit.json"))
    peers.search_all(args, [], launch, float("nan"))
    return {s["variant"]: s for s in json.loads((tmp_path / "fit.json").read_text())["fit_search"]}


def test_driver_probes_then_brackets_and_skips_the_same_math_variant(tmp_path):
    launch, calls = fake_launch({"peft_adamw": 11}, estimate=10)
    got = run_search(tmp_path, "peft_adamw,ours_check", launch)
    # The smoke shape's own batch (2) is the probe; its estimate (10) starts the search.
    assert calls == [("peft_adamw", 2), ("peft_adamw", 10), ("peft_adamw", 11)]
    assert list(got) == ["peft_adamw"] and (got["peft_adamw"]["fit"], got["peft_adamw"]["oom"]) == (11, None)


def test_driver_keeps_other_labels_and_the_bracket_found_before_an_error(tmp_path):
    launch, _ = fake_launch({"ours": 20})
    run_search(tmp_path, "ours", launch, batch=20)
    launch, calls = fake_launch({"ours": 30}, broken_at=33)
    got = run_search(tmp_path, "ours", launch, tag="nofuse", batch=30)
    assert calls == [("ours", 30), ("ours", 33)]
    assert (got["ours+nofuse"]["fit"], got["ours+nofuse"]["oom"]) == (30, None)  # the timeout is not an OOM
    assert (got["ours"]["fit"], got["ours"]["oom"]) == (20, 21)  # the untagged search is still in the file


def test_a_probe_that_runs_out_of_memory_is_an_upper_bound(tmp_path):
    launch, calls = fake_launch({"peft_adamw": 1})
    got = run_search(tmp_path, "peft_adamw", launch, tries=8)["peft_adamw"]
    assert calls == [("peft_adamw", 2), ("peft_adamw", 1)]  # 2 is never tried again
    assert (got["fit"], got["oom"]) == (1, 2)


@pytest.mark.parametrize("limit,start,tries,want,want_tried,grow", [
    (40000, 16384, 6, (36864, 40960), [16384, 32768, 65536, 49152, 40960, 36864], 2.0),  # double, then bisect
    (5000, 16384, 6, (4096, 5120), [16384, 8192, 4096, 6144, 5120], 2.0),                # halve, then bisect
    (100, 4096, 6, (None, 1024), [4096, 2048, 1024], 2.0),                               # not even one step fits
    (9000, 8192, 6, (8192, 9216), [8192, 16384, 12288, 10240, 9216], 2.0),               # stops one step wide
    (50000, 44032, 2, (44032, 51200), [44032, 51200], 1.15),         # from an estimate: +15% (to a step)
    (40000, 44032, 2, (37888, 44032), [44032, 37888], 1.15),         # ... or -15% brackets it
    (39000, 44032, 3, (37888, 40960), [44032, 37888, 40960], 1.15),  # ... then bisects
])
def test_longest_row_search_doubles_then_bisects_on_steps(limit, start, tries, want, want_tried, grow):
    from peers_fit import search_longest

    fits, tried = card(limit)
    assert search_longest(fits, start, tries=tries, step=1024, grow=grow) == want
    assert tried == want_tried


def test_seq_driver_tries_batch_one_rows_and_keeps_the_batch_search(tmp_path):
    import argparse

    import peers

    (tmp_path / "fit.json").write_text(json.dumps({"runs": [], "fit_search": [{"shape": "smoke", "variant": "x"}]}))
    calls = []

    def launch(shape, setting, variant, batch, warmup, steps, label, seq=None):
        calls.append((variant, batch, seq))
        if seq > 200:
            return {"error": "torch.OutOfMemoryError: CUDA out of memory.", "process_s": 1.0}
        return {"process_s": 1.0, "peak_gib": seq / 100, "real_tokens_per_s": 1000.0}

    args = argparse.Namespace(shapes="smoke", variants="ours,ours_check", tag="", seq_len=None, fit_tries=6,
                              seq_step=32, seq_grow=2.0, json=str(tmp_path / "fit.json"))
    peers.search_seq_all(args, launch, float("nan"))
    saved = json.loads((tmp_path / "fit.json").read_text())
    assert calls == [("ours", 1, 64), ("ours", 1, 128), ("ours", 1, 256), ("ours", 1, 192), ("ours", 1, 224)]
    got = saved["fit_seq_search"][0]
    assert (got["variant"], got["fit"], got["oom"]) == ("ours", 192, 224)
    assert saved["fit_search"] == [{"shape": "smoke", "variant": "x"}]
    assert "| smoke | ours | 192 | 224 | 1.9 | 1,000 |" in seq_table(saved["fit_seq_search"])


def test_packed_rows_are_exactly_full_and_keep_their_samples_apart():
    """Packed peers hand transformers rows with restarting position ids and no mask: every sample's logits must
    be those of the sample alone (so packing changes no number a peer computes)."""
    import torch
    from peers_setup import build_base, make_samples, pack_batch, packed_rows, pad_batch

    samples = make_samples("smoke", "packed", 3 * 64, seq=64)
    rows = packed_rows(samples, 64)
    assert len(rows) == 3 and all(sum(map(len, r)) == 64 and len(r) > 1 for r in rows)
    assert [s for r in rows for s in r] == samples
    model = build_base("smoke", torch.device("cpu"))
    packed = pack_batch(rows, "cpu")
    assert "attention_mask" not in packed and packed["position_ids"][0, 0] == 0
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        for r, row in enumerate(rows):
            at = 0
            for s in row:
                alone = model(**{k: v for k, v in pad_batch([s], "cpu").items() if k != "labels"}).logits[0]
                torch.testing.assert_close(logits[r, at : at + len(s)], alone, rtol=1e-4, atol=1e-4)
                at += len(s)
    # no loss on a sample's first token: it would be predicted from the sample before it
    starts = (packed["position_ids"] == 0)
    assert (packed["labels"][starts] == -100).all() and (packed["labels"][~starts] != -100).all()


@pytest.mark.parametrize("variant", ["peft_adamw", "ours"])
def test_a_worker_trains_packed_long_rows_on_the_cpu(variant):
    """``--data packed --batch 1 --seq-len 128`` in one worker: every step is one full row of several samples."""
    import peers

    spec = {"shape": "smoke", "data": "packed", "variant": variant, "warmup": 1, "steps": 2, "n_tokens": 9 * 128,
            "cpu": True, "profile": None, "overrides": [], "batch": 1, "seq": 128}
    res = peers.worker(spec)
    assert res["timed_steps"] == 2 and res["step_ms"] > 0
    assert 8 <= res["mean_len"] < 128  # several samples per row, none longer than the row
    if variant == "peft_adamw":  # a peer packs exactly one row per step: 128 real tokens
        assert len(res["losses"]) == 3 and all(5.5 < x < 7 for x in res["losses"])  # ~ln(512) on random weights
        assert round(res["real_tokens_per_s"] * sum(res["step_ms_all"]) / 1e3) == 2 * 128
