"""The largest-batch search of ``bench/peers.py --fit``, against a fake card whose limit is known."""

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
