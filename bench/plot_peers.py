"""Chart of bench/peers.py results: real tokens/s and peak memory per variant, one panel pair per shape/data, and
the largest batch that fit where the file holds a ``--fit`` search. Reads a ``--json`` file (``runs``) or a file of
several device calls (``calls``, each with its ``runs``); runs at a ``--batch`` size (``variant@bN``) are left out.
Several files are read as the calls of one: each named by its file name. ``--floor FILE`` (``bench/step_floor.py
--json``) draws each shape's floor as a dashed line on its tokens/s panel: the rate of its products and attention
alone, which no trainer computing the same numbers can pass.

    python bench/plot_peers.py docs/peers.json docs/peers.png
    python bench/plot_peers.py --floor docs/step-floor.json docs/peers-unsloth-qwen.json docs/peers-unsloth.json \
        docs/peers-offload.json docs/peers-unsloth.png
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["ours", "ours_eager", "peer_unsloth", "peer_unsloth_gc", "peft_adamw", "peft_compile", "peft_liger",
         "hf_trainer", "seed_style"]


def known(variant: str) -> bool:
    return "@b" not in variant and variant.partition("+")[0] in ORDER


def rank(r):  # tagged variants ("ours+amb08": a --set switch) sort after their base variant
    base, _, tag = r["variant"].partition("+")
    return ORDER.index(base), tag


def load(src: str | list[str]) -> tuple[list, list]:
    """(speed runs, fit searches) of a file or several. Runs at a ``--batch`` size and unknown variants are left
    out; in a file of several calls, a shape / data / variant measured in more than one call is named with its
    call."""
    if isinstance(src, list):
        docs = {Path(f).stem: json.load(open(f)) for f in src}
        doc = {"calls": [{"name": name, "runs": d.get("runs", [])} for name, d in docs.items()],
               "fit_search": [f for d in docs.values() for f in d.get("fit_search", [])]}
    else:
        doc = json.load(open(src))
    if "calls" in doc:
        runs = [dict(r, call=call["name"]) for call in doc["calls"] for r in call["runs"]]
    else:
        runs = doc.get("runs", [])
    runs = [r for r in runs if "error" not in r and known(r["variant"])]
    seen = Counter((r["shape"], r["data"], r["variant"]) for r in runs)
    for r in runs:
        if seen[(r["shape"], r["data"], r["variant"])] > 1:
            r["label"] = f"{r['variant']} ({r['call']})"
    fits = [f for f in doc.get("fit_search", []) if f["fit"] and known(f["variant"])]
    return runs, fits


def bars(ax, rows, values, xlabel):
    names = [r.get("label", r["variant"]) for r in rows]
    ax.barh(names, values, color=["tab:green" if n.startswith("ours") else "tab:gray" for n in names])
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()


def floor_rate(floors: list[dict], shape: str, batch: int, seq: int) -> float | None:
    """Tokens/s at the floor ``bench/step_floor.py`` measured for this shape at this batch and row length."""
    for f in floors:
        if (f["shape"], f["batch"], f["seq"]) == (shape, batch, seq):
            return batch * seq / (f["floor_ms"] / 1e3)
    return None


def main(src: str | list[str], dst: str, floors: list[dict] | None = None):
    """Draw the chart of ``src`` into ``dst``; returns the figure."""
    runs, fits = load(src)
    groups = sorted({(r["shape"], r["data"]) for r in runs})
    groups += [(shape, "fixed") for shape in sorted({f["shape"] for f in fits}) if (shape, "fixed") not in groups]
    if not groups:
        raise SystemExit(f"{src}: no runs or fit searches to plot")
    n_rows = 3 if fits else 2
    fig, axes = plt.subplots(n_rows, len(groups), figsize=(4.2 * len(groups), 3.5 * n_rows), squeeze=False)
    fit_drawn = set()
    for col, (shape, data) in enumerate(groups):
        rows = sorted([r for r in runs if (r["shape"], r["data"]) == (shape, data)], key=rank)
        if rows:
            axes[0][col].set_title(f"{shape}, {data} (b{rows[0]['batch']}x{rows[0]['seq']})", fontsize=10)
            bars(axes[0][col], rows, [r["real_tokens_per_s"] / 1e3 for r in rows], "real tokens/s (thousands)")
            rate = floor_rate(floors or [], shape, rows[0]["batch"], rows[0]["seq"]) if data == "fixed" else None
            if rate:
                axes[0][col].axvline(rate / 1e3, color="black", linestyle="--", linewidth=1)
                axes[0][col].annotate("floor ", (rate / 1e3, 0.01), xycoords=("data", "axes fraction"),
                                      ha="right", va="bottom", fontsize=8)
            bars(axes[1][col], rows, [r.get("peak_gib") or 0 for r in rows], "peak GiB (max_memory_allocated)")
        else:
            axes[0][col].set_title(shape, fontsize=10)
            axes[0][col].axis("off")
            axes[1][col].axis("off")
        if fits:
            found = sorted([f for f in fits if f["shape"] == shape], key=rank)
            if found and shape not in fit_drawn:  # once per shape: the search is at the shape's length
                fit_drawn.add(shape)
                bars(axes[2][col], found, [f["fit"] for f in found],
                     f"largest batch that fit (rows of {found[0]['seq']}, searched)")
            else:
                axes[2][col].axis("off")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    return fig


if __name__ == "__main__":
    argv, floor_file = sys.argv[1:], None
    if argv[:1] == ["--floor"]:
        floor_file, argv = argv[1], argv[2:]
    sources = argv[:-1]
    main(sources[0] if len(sources) == 1 else sources, argv[-1],
         json.loads(Path(floor_file).read_text()) if floor_file else None)
