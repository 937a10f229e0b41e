"""Table, learning–forgetting front and the verdict for ``bench.py``'s results.

    python experiments/forgetting/report.py runs/forgetting/s012 runs/forgetting/s34 \
        --figure docs/figures/forgetting-front.png --doc docs/science.md

Reads ``results.jsonl`` of each directory; only arms with a result for every seed found are reported. Prints the
markdown (table + verdict) and, with ``--doc``, writes it between the ``<!-- forgetting-results -->`` markers.

The verdict: per seed, the control points (flat LoRA over learning rates and ranks, and adapter interpolation)
span a front — for each learning level, the best retention a control reaches, linear between neighbouring
Pareto points. A tier arm's margin is its retention minus that front at its own learning level; mean and 95%
interval over seeds. A positive interval means the tier arm reaches a point no control reaches.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

# Two-sided 95% Student-t quantiles by degrees of freedom (the seeds are few; a normal quantile would be too narrow).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
MARK_START, MARK_END = "<!-- forgetting-results -->", "<!-- /forgetting-results -->"
PLANES = {  # name: (x key, y key, higher-is-better sign for both axes)
    "exact match": ("learning", "retain_A", 1.0),
    "loss": ("target_loss", "retain_loss_A", -1.0),
}


def mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def load(dirs: list[Path]) -> tuple[dict[str, list[dict]], list[int]]:
    rows = [json.loads(line) for d in dirs for line in (d / "results.jsonl").read_text().splitlines() if line]
    seeds = sorted({r["seed"] for r in rows})
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_arm[r["arm"]].append(r)
    complete = {a: sorted(rs, key=lambda r: r["seed"]) for a, rs in by_arm.items()
                if sorted(r["seed"] for r in rs) == seeds}
    # Controls first, then tier families in order of first appearance; within a family by lr, rank, alpha.
    families = list(dict.fromkeys(r["family"] for r in rows))

    def key(arm: str) -> tuple:
        r = complete[arm][0]
        return r["kind"] != "control", families.index(r["family"]), r["lr"], r["r"], r["alpha"]

    order = sorted(complete, key=key)
    return {a: complete[a] for a in order}, seeds


def front_value(points: list[tuple[float, float]], x: float) -> float:
    """The best y the points reach at a level >= x (both axes higher-is-better), linear between Pareto points;
    beyond the points' largest x, the y of the point with the largest x."""
    pareto = sorted((p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)))
    if x > pareto[-1][0]:
        return pareto[-1][1]  # learns more than any control: compared with the control that learns most
    for (x0, y0), (x1, y1) in zip(pareto, pareto[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return pareto[0][1]  # left of every Pareto point: the control that retains most


def margins(arms: dict[str, list[dict]], seeds: list[int], plane: str, kind: str = "tier",
            planes: dict[str, tuple[str, str, float]] = PLANES) -> dict[str, tuple[float, float]]:
    """Per arm of ``kind``: mean and 95% half-width over seeds of (its y) - (the controls' front at its x).
    A control is measured against the other controls (leave one out): how far a point can sit off the front
    drawn through its neighbours, the yardstick for a tier arm's margin."""
    xk, yk, sign = planes[plane]
    controls = [a for a, rs in arms.items() if rs[0]["kind"] == "control"]
    out = {}
    for arm, rs in arms.items():
        if rs[0]["kind"] != kind:
            continue
        per_seed = []
        for i, _ in enumerate(seeds):
            pts = [(sign * arms[c][i][xk], sign * arms[c][i][yk]) for c in controls if c != arm]
            x, y = sign * rs[i][xk], sign * rs[i][yk]
            per_seed.append(y - front_value(pts, x))
        out[arm] = mean_ci(per_seed)
    return out


def fmt(m: float, h: float, digits: int = 3) -> str:
    return f"{m:.{digits}f} ± {h:.{digits}f}" if math.isfinite(h) else f"{m:.{digits}f}"


def table(arms: dict[str, list[dict]]) -> str:
    cols = [("learning", "learn (EM)"), ("retain_A", "retain A (EM)"), ("forgetting", "avg forgetting"),
            ("bwt", "BWT"), ("final_avg", "final avg (EM)"), ("target_loss", "target loss"),
            ("retain_loss_A", "retain loss A")]
    lines = ["| arm | " + " | ".join(c for _, c in cols) + " | s per run |", "|---" * (len(cols) + 2) + "|"]
    for arm, rs in arms.items():
        cells = [fmt(*mean_ci([r[k] for r in rs])) for k, _ in cols]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {sum(r['seconds'] for r in rs) / len(rs):.0f} |")
    return "\n".join(lines)


def verdict(arms: dict[str, list[dict]], seeds: list[int]) -> str:
    lines = ["| tier or slow-weight arm | margin over the control front, exact match (retain A) | margin, loss "
             "(retain loss A) |",
             "|---|---|---|"]
    em, loss = margins(arms, seeds, "exact match"), margins(arms, seeds, "loss")
    for arm in em:
        lines.append(f"| {arm} | {fmt(*em[arm])} | {fmt(*loss[arm])} |")
    loo_em, loo_loss = margins(arms, seeds, "exact match", "control"), margins(arms, seeds, "loss", "control")
    lines += ["", "The same margin for each control against the other controls (leave one out):", "",
              "| control arm | margin, exact match | margin, loss |", "|---|---|---|"]
    lines += [f"| {arm} | {fmt(*loo_em[arm])} | {fmt(*loo_loss[arm])} |" for arm in loo_em]
    wins = [a for a in em if em[a][0] - em[a][1] > 0 or loss[a][0] - loss[a][1] > 0]
    best = max(em, key=lambda a: em[a][0])
    lines += ["", f"Tier and slow-weight arms whose margin's 95% interval lies above zero in either plane: "
              f"{', '.join(wins) if wins else 'none'}. Largest mean exact-match margin: {best} "
              f"({fmt(*em[best])})."]
    return "\n".join(lines)


def figure(arms: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    controls = {"lr": "#000000", "rank": "#1f77b4", "interp": "#2ca02c", "interp lr=0.002": "#98df8a",
                "interp lr=0.003": "#006400"}
    tier_colors = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
                   "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0"]
    tiers = sorted({rs[0]["family"] for rs in arms.values()} - set(controls))
    colors = {**controls, **{f: tier_colors[i % len(tier_colors)] for i, f in enumerate(tiers)}}
    for ax, (plane, (xk, yk, _)) in zip(axes, PLANES.items()):
        by_family: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for arm, rs in arms.items():
            fam, kind = rs[0]["family"], rs[0]["kind"]
            ax.scatter([r[xk] for r in rs], [r[yk] for r in rs], s=12, alpha=0.35, color=colors[fam],
                       marker="o" if kind == "control" else marker(fam))
            order = rs[0]["alpha"] if fam.startswith("interp") else rs[0]["lr"] * (rs[0]["r"] if fam == "rank" else 1)
            by_family[fam].append((sum(r[xk] for r in rs) / len(rs), sum(r[yk] for r in rs) / len(rs), order))
        # An interpolation curve ends at alpha = 1, which is the flat arm at the same learning rate.
        for fam in [f for f in by_family if f.startswith("interp")]:
            lr = next(rs[0]["lr"] for rs in arms.values() if rs[0]["family"] == fam)
            if (rs := arms.get(f"flat lr={lr:g}")) is not None:
                by_family[fam].append((sum(r[xk] for r in rs) / len(rs), sum(r[yk] for r in rs) / len(rs), 1.0))
        if "rank" in by_family and "flat lr=0.003" in arms:
            rs = arms["flat lr=0.003"]
            by_family["rank"].append((sum(r[xk] for r in rs) / len(rs), sum(r[yk] for r in rs) / len(rs), 0.024))
        for fam, pts in by_family.items():
            pts.sort(key=lambda p: p[2])
            control = arms_kind(arms, fam) == "control"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if control else "--",
                    marker="o" if control else marker(fam), lw=2.2 if control else 1.2, ms=7, color=colors[fam],
                    label=f"control: {fam}" if control else fam if marker(fam) == "s" else f"tiers: {fam}")
        ax.set_xlabel({"learning": "learning: exact match on B, C right after their stage  →",
                       "target_loss": "target loss (B, C right after their stage)  ← better"}[xk])
        ax.set_ylabel({"retain_A": "retained: exact match on A after stage C  →",
                       "retain_loss_A": "retain loss on A after stage C  ← better"}[yk])
        ax.set_title(f"{plane}: one small mark per seed, lines join means over seeds", fontsize=10)
        ax.grid(alpha=0.3)
        if plane == "loss":
            ax.invert_xaxis()
            ax.invert_yaxis()
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def marker(family: str) -> str:
    """Triangles for tier schedules, squares for slow weights fed by fast ones (consolidation, EMA)."""
    return "s" if "consolidate" in family or family.startswith("ema") else "^"


def arms_kind(arms: dict[str, list[dict]], family: str) -> str:
    return next(rs[0]["kind"] for rs in arms.values() if rs[0]["family"] == family)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--figure", type=Path)
    p.add_argument("--doc", type=Path, help="markdown file whose results section is rewritten")
    args = p.parse_args(argv)
    arms, seeds = load(args.dirs)
    if not arms:
        p.error("no arm has results for every seed")
    wall = sum(r["seconds"] for rs in arms.values() for r in rs)
    text = "\n".join([
        f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)}); arms complete for every seed: {len(arms)}; "
        f"LoRA-stage time summed over arms and seeds: {wall / 60:.1f} min (CPU, 1 thread per process).", "",
        "Means over seeds ± 95% interval (Student t). EM = exact match.", "", table(arms), "",
        "Margin of each tier or slow-weight arm over the controls' front (same seed), mean ± 95% interval:", "",
        verdict(arms, seeds)])
    if args.figure:
        figure(arms, args.figure)
    if args.doc:
        fill_doc(args.doc, text, MARK_START, MARK_END)
    print(text)
    return 0


def fill_doc(path: Path, text: str, start: str, end: str) -> None:
    """Replace what stands between the markers ``start`` and ``end`` in ``path`` by ``text`` (temp file + rename)."""
    doc = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{path}: no {start} ... {end} section to fill")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", doc))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
