"""Table, learning–forgetting front and verdict for ``natural.py``'s results (benchmark 2, natural text).

    python experiments/forgetting/natural_report.py runs/forgetting/natural \
        --figure docs/forgetting-natural.png --doc docs/science.md

Reads ``results.jsonl`` (and ``base.json``, ``runs.jsonl``) of each directory; only arms with a result for every
seed found are reported. The verdict is benchmark 1's (``report.py``) in the loss plane: per seed, the control
points span a front (the lowest retain loss a control reaches at each target loss, linear between neighbouring
Pareto points); an arm's margin is the front's retain loss minus its own at its target loss, so a positive margin
means it forgets less than any control that learns as much. Mean and 95% interval (Student t) over seeds.
Prints the markdown and, with ``--doc``, writes it between the ``<!-- forgetting-natural-results -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import fill_doc, fmt, load, margins, mean_ci  # noqa: E402

MARK_START, MARK_END = "<!-- forgetting-natural-results -->", "<!-- /forgetting-natural-results -->"
PLANES = {"loss": ("target_loss", "retain_loss", -1.0)}  # both lower-is-better: negated, the front's convention


def base_info(dirs: list[Path]) -> dict:
    for d in dirs:
        if (d / "base.json").is_file():
            return json.loads((d / "base.json").read_text())
    return {}


def run_walls(dirs: list[Path]) -> list[dict]:
    return [json.loads(line) for d in dirs if (d / "runs.jsonl").is_file()
            for line in (d / "runs.jsonl").read_text().splitlines() if line]


def table(arms: dict[str, list[dict]]) -> str:
    lines = ["| arm | target loss (held-out C) | retain loss (held-out P) | learnt: base − target | "
             "forgotten: retain − base | s per run |", "|---|---|---|---|---|---|"]
    for arm, rs in arms.items():
        cells = [fmt(*mean_ci([r["target_loss"] for r in rs]), 4), fmt(*mean_ci([r["retain_loss"] for r in rs]), 4),
                 fmt(*mean_ci([r["base_target_loss"] - r["target_loss"] for r in rs]), 4),
                 fmt(*mean_ci([r["retain_loss"] - r["base_retain_loss"] for r in rs]), 4)]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {sum(r['seconds'] for r in rs) / len(rs):.0f} |")
    return "\n".join(lines)


def verdict(arms: dict[str, list[dict]], seeds: list[int]) -> str:
    tier = margins(arms, seeds, "loss", "tier", PLANES)
    loo = margins(arms, seeds, "loss", "control", PLANES)
    # The same against the learning-rate sweep alone: is a tier schedule more than a smaller learning rate?
    lr_only = margins({a: rs for a, rs in arms.items() if rs[0]["kind"] == "tier" or rs[0]["family"] == "lr"},
                      seeds, "loss", "tier", PLANES)
    lines = ["| tier arm | margin over the control front (retain loss, nats; > 0: forgets less) | "
             "margin over the flat learning-rate sweep alone |", "|---|---|---|"]
    lines += [f"| {a} | {fmt(*tier[a], 4)} | {fmt(*lr_only[a], 4)} |" for a in tier]
    lines += ["", "The same margin for each control against the other controls (leave one out):", "",
              "| control arm | margin (nats) |", "|---|---|"]
    lines += [f"| {a} | {fmt(*loo[a], 4)} |" for a in loo]
    if tier:
        wins = [a for a in tier if tier[a][0] - tier[a][1] > 0]
        best = max(tier, key=lambda a: tier[a][0])
        over_lr = [a for a in lr_only if lr_only[a][0] - lr_only[a][1] > 0]
        lines += ["", f"Tier arms whose margin's 95% interval lies above zero: {', '.join(wins) if wins else 'none'}. "
                      f"Largest mean margin: {best} ({fmt(*tier[best], 4)}). Above the learning-rate sweep alone: "
                      f"{', '.join(over_lr) if over_lr else 'none'}."]
    return "\n".join(lines)


def figure(arms: dict[str, list[dict]], path: Path, base: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    controls = {"lr": "#000000", "rank": "#1f77b4", "interp": "#2ca02c"}
    tier_colors = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
                   "#aec7e8", "#98df8a"]
    tiers = list(dict.fromkeys(rs[0]["family"] for rs in arms.values() if rs[0]["kind"] == "tier"))
    colors = {**controls, **{f: tier_colors[i % len(tier_colors)] for i, f in enumerate(tiers)}}

    def mean_point(rs: list[dict]) -> tuple[float, float]:
        return (sum(r["target_loss"] for r in rs) / len(rs), sum(r["retain_loss"] for r in rs) / len(rs))

    by_family: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for arm, rs in arms.items():
        fam, kind = rs[0]["family"], rs[0]["kind"]
        ax.scatter([r["target_loss"] for r in rs], [r["retain_loss"] for r in rs], s=12, alpha=0.35,
                   color=colors.get(fam, "#333333"), marker="o" if kind == "control" else "^")
        order = rs[0]["alpha"] if fam == "interp" else rs[0]["lr"] * (rs[0]["r"] if fam == "rank" else 1)
        by_family[fam].append((*mean_point(rs), order))
    # Each control curve ends where it meets the flat learning-rate sweep: interpolation at alpha = 1 is the flat
    # arm at its learning rate, and the rank sweep's r = 8 is the flat arm at the rank learning rate.
    for fam in ("interp", "rank"):
        lr = next((rs[0]["lr"] for rs in arms.values() if rs[0]["family"] == fam), None)
        flat = next((rs for rs in arms.values() if rs[0]["family"] == "lr" and rs[0]["lr"] == lr), None)
        if flat is not None:
            by_family[fam].append((*mean_point(flat), 1.0 if fam == "interp" else flat[0]["lr"] * flat[0]["r"]))
    for fam, pts in by_family.items():
        pts.sort(key=lambda p: p[2])
        control = fam in controls
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if control else "--", marker="o" if control else "^",
                lw=2.2 if control else 1.2, ms=7, color=colors.get(fam, "#333333"),
                label=f"{'control' if control else 'tiers'}: {fam}")
    if base:
        ax.scatter([base["target_loss"]], [base["retain_loss"]], marker="*", s=160, color="#000000", zorder=5,
                   label="pretrained model (no tuning)")
    ax.set_xlabel("target loss: held-out code (C)  ← better")
    ax.set_ylabel("retain loss: held-out prose (P)  ← better")
    ax.set_title("natural text: one small mark per seed, lines join means over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--figure", type=Path)
    p.add_argument("--doc", type=Path, help="markdown file whose natural-text results section is rewritten")
    args = p.parse_args(argv)
    arms, seeds = load(args.dirs)
    if not arms:
        p.error("no arm has results for every seed")
    base = base_info(args.dirs)
    walls = run_walls(args.dirs)
    lora_s = sum(r["seconds"] for rs in arms.values() for r in rs if r["family"] != "interp")
    head = [f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)}); arms complete for every seed: {len(arms)}."]
    if base:
        head.append(f"Pretrained model: {base['params'] / 1e6:.1f} M parameters, {base['steps']} steps of "
                    f"{base['batch_size']} × ≤512 tokens (~{base['tokens_approx'] / 1e6:.0f} M tokens) in "
                    f"{base['seconds']:.0f} s on {base['device']}; held-out losses: prose (P) "
                    f"{base['retain_loss']:.4f}, code (C) {base['target_loss']:.4f} nats per token "
                    "(a token is a byte).")
    head.append(f"LoRA runs: {lora_s / 60:.1f} min of process time summed over arms and seeds"
                + ("; wall time of each `natural.py` call: "
                   + ", ".join(f"{w['wall_s']:.0f} s ({w['workers']} workers on {w['device']})" for w in walls)
                   if walls else "") + ".")
    text = "\n".join([" ".join(head), "",
                      "Means over seeds ± 95% interval (Student t); losses in nats per token (byte).", "",
                      table(arms), "",
                      "Margin of each tier arm over the controls' front (same seed), mean ± 95% interval:", "",
                      verdict(arms, seeds)])
    if args.figure:
        figure(arms, args.figure, base)
    if args.doc:
        fill_doc(args.doc, text, MARK_START, MARK_END)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
