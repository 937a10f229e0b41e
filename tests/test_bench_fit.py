"""The largest-batch search of ``bench/peers.py --fit``, against a fake card whose limit is known."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from peers_fit import fit_table, is_oom, search_fit  # noqa: E402


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
