"""Chart of bench/peers.py results: real tokens/s and peak memory per variant, one panel pair per shape/data, and
the largest batch that fit where the file holds a ``--fit`` search. Reads a ``--json`` file (``runs``) or a file of
several device calls (``calls``, each with its ``runs``); runs at a ``--batch`` size (``variant@bN``) are left out.

    python bench/plot_peers.py docs/peers.json docs/peers.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["ours", "ours_eager", "peft_adamw", "peft_compile", "peft_liger", "hf_trainer", "seed_style"]


def main(src: str, dst: str) -> None:
    def rank(r):  # tagged variants ("ours+amb08": a --set switch) sort after their base variant
        base, _, tag = r["variant"].partition("+")
        return ORDER.index(base), tag

    doc = json.load(open(src))
    runs = doc.get("runs") or [r for call in doc.get("calls", []) for r in call["runs"]]
    runs = [r for r in runs if "error" not in r and r["variant"].partition("+")[0] in ORDER]
    fits = doc.get("fit_search", [])
    groups = sorted({(r["shape"], r["data"]) for r in runs})
    n_rows = 3 if fits else 2
    fig, axes = plt.subplots(n_rows, len(groups), figsize=(4.2 * len(groups), 3.5 * n_rows), squeeze=False)
    for col, (shape, data) in enumerate(groups):
        rows = sorted([r for r in runs if (r["shape"], r["data"]) == (shape, data)], key=rank)
        names = [r["variant"] for r in rows]
        colors = ["tab:green" if n.startswith("ours") else "tab:gray" for n in names]
        ax = axes[0][col]
        ax.barh(names, [r["real_tokens_per_s"] / 1e3 for r in rows], color=colors)
        ax.set_title(f"{shape}, {data} (b{rows[0]['batch']}x{rows[0]['seq']})", fontsize=10)
        ax.set_xlabel("real tokens/s (thousands)")
        ax.invert_yaxis()
        ax = axes[1][col]
        ax.barh(names, [r.get("peak_gib") or 0 for r in rows], color=colors)
        ax.set_xlabel("peak GiB (max_memory_allocated)")
        ax.invert_yaxis()
        if fits:
            found = sorted([f for f in fits if f["shape"] == shape and f["fit"]], key=rank)
            ax = axes[2][col]
            ax.barh([f["variant"] for f in found], [f["fit"] for f in found],
                    color=["tab:green" if f["variant"].startswith("ours") else "tab:gray" for f in found])
            ax.set_xlabel(f"largest batch that fit (rows of {rows[0]['seq']}, searched)")
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
