"""The ``--fit`` and ``--fit-seq`` searches of ``bench/peers.py``: per shape and variant, fresh worker processes at
candidate sizes (``launch``, the caller's), bracketed by ``peers_fit``'s search rules and kept in the ``--json``
file beside the runs (``fit_search``, ``fit_seq_search``)."""

from __future__ import annotations

import json
from pathlib import Path

from peers_fit import fit_table, is_oom, search_fit, search_longest, seq_table
from peers_report import read_runs, write_json
from peers_setup import SHAPES

__all__ = ["search_all", "search_seq_all"]


def searched_before(args, key: str) -> tuple[list[str], list[str], dict[str, str], list[dict]]:
    """(shapes, variants, result label per variant, the searches under ``key`` in the ``--json`` file that this
    invocation does not search again)."""
    variants = [v for v in args.variants.split(",") if v != "ours_check"]  # ours_check: a same-math run only
    labels = {v: f"{v}+{args.tag}" if v.startswith("ours") and args.tag else v for v in variants}
    shapes = args.shapes.split(",")
    searches = []
    if args.json and Path(args.json).exists():
        redo = {(sh, labels[v]) for sh in shapes for v in variants}
        searches = [s for s in json.loads(Path(args.json).read_text()).get(key, [])
                    if (s["shape"], s["variant"]) not in redo]
    return shapes, variants, labels, searches


def attempt(launch, shape: str, variant: str, tries: list, key: str, size: int, keep: tuple[str, ...],
            **how) -> bool:
    """One try: ``launch(shape, "fixed", variant, **how)``, recorded in ``tries`` as ``{key: size, fits, ...}``.
    True when it ran; out of memory is False; any other error raises (the search cannot go on from it)."""
    res = launch(shape, "fixed", variant, **how)
    if "error" in res and not is_oom(res["error"]):
        raise RuntimeError(f"{shape} {variant} at {key} {size}: {res['error'].strip()[-300:]}")
    tries.append({key: size, "fits": "error" not in res, "process_s": round(res["process_s"], 1),
                  **{k: res[k] for k in keep if k in res}})
    return "error" not in res


def bracket(tries: list, key: str) -> dict:
    """The largest size that ran and the smallest that did not (None where no try did)."""
    return dict(fit=max((t[key] for t in tries if t["fits"]), default=None),
                oom=min((t[key] for t in tries if not t["fits"]), default=None), tries=tries)


def search_all(args, results: list, launch, peak: float) -> None:
    """``--fit``: per shape and variant, bracket the largest batch at the shape's length (fixed-length rows).
    Searches already in the ``--json`` file are kept, except for the shapes and labels searched again."""
    shapes, variants, labels, searches = searched_before(args, "fit_search")
    for shape in shapes:
        for variant in variants:
            tries = []

            def fits(b: int, shape=shape, variant=variant, tries=tries) -> bool:
                return attempt(launch, shape, variant, tries, "batch", b, ("peak_gib", "fit_batch"),
                               batch=b, warmup=1, steps=3, label=True)

            known = [r.get("fit_batch") for r in results
                     if (r["shape"], r["data"], r["variant"]) == (shape, "fixed", labels[variant])
                     and r.get("fit_batch")]
            try:
                if args.batch or known:
                    start = args.batch or known[-1]
                else:  # no estimate yet: a short run at the shape's own batch gives one, and is the first try
                    own = SHAPES[shape][2]
                    start = max(own + 1, tries[0].get("fit_batch") or 0) if fits(own) else max(1, own // 2)
                if args.fit_tries > len(tries):
                    search_fit(fits, start, tries=args.fit_tries - len(tries),
                               known_fit=next((t["batch"] for t in tries if t["fits"]), None),
                               known_oom=next((t["batch"] for t in tries if not t["fits"]), None))
            except RuntimeError as e:  # not out of memory: the tries so far still bracket what they can
                print("   ", e, flush=True)
            searches.append(dict(shape=shape, variant=labels[variant], seq=SHAPES[shape][3],
                                 **bracket(tries, "batch")))
            if args.json:
                write_json(args.json, read_runs(args.json), peak, fit_search=searches)
    print()
    print(fit_table(searches))


def search_seq_all(args, launch, peak: float) -> None:
    """``--fit-seq``: per shape and variant, the longest row that fits at batch 1 (fixed rows, 2 + 2 steps per
    try, each a fresh process; two warm-up steps, so ours' timed steps replay its CUDA graphs rather than record
    them): growing by ``--seq-grow`` (2: doubling) from ``--seq-len`` (or the shape's length) until a row runs out
    of memory, then bisecting to ``--seq-step`` tokens. Kept in the ``--json`` file under ``fit_seq_search``;
    searches of other shapes and labels already there stay."""
    shapes, variants, labels, searches = searched_before(args, "fit_seq_search")
    for shape in shapes:
        for variant in variants:
            tries = []

            def fits(seq: int, shape=shape, variant=variant, tries=tries) -> bool:
                return attempt(launch, shape, variant, tries, "seq", seq, ("peak_gib", "real_tokens_per_s"),
                               batch=1, warmup=2, steps=2, label=True, seq=seq)

            try:
                search_longest(fits, args.seq_len or SHAPES[shape][3], tries=args.fit_tries, step=args.seq_step,
                               grow=args.seq_grow)
            except RuntimeError as e:  # not out of memory: the tries so far still bracket what they can
                print("   ", e, flush=True)
            searches.append(dict(shape=shape, variant=labels[variant], **bracket(tries, "seq")))
            if args.json:
                write_json(args.json, read_runs(args.json), peak, fit_seq_search=searches)
    print()
    print(seq_table(searches))
