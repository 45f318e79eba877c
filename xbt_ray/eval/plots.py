"""Report figures (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xbt_ray.eval import methods
from xbt_ray.eval.retrieval import DIRECTIONS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def compatibility_heatmap(report: dict, path: Path) -> None:
    """Methods x metrics, coloured by the difference to old->old (recall points), annotated
    with the recall and ✓/✗ for the strict criterion."""
    plt = _pyplot()
    rows = report["rows"]
    old = next(r for r in rows if r["method"] == methods.OLD_OLD)
    metrics = [(d, m) for d in DIRECTIONS for m in rows[0][d]]
    delta = np.array([[r[d][m] - old[d][m] for d, m in metrics] for r in rows])
    bound = max(1.0, float(np.abs(delta).max()))
    fig, ax = plt.subplots(figsize=(1.3 * len(metrics) + 2.5, 0.5 * len(rows) + 1.5))
    image = ax.imshow(delta, cmap="RdYlGn", vmin=-bound, vmax=bound, aspect="auto")
    for i, r in enumerate(rows):
        for j, (d, m) in enumerate(metrics):
            mark = ""
            if "compatible" in r:
                mark = " ✓" if r["compatible"][d][m] else " ✗"
            ax.text(j, i, f"{r[d][m]:.1f}{mark}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(metrics)), [f"{d.upper()} {m}" for d, m in metrics])
    ax.set_yticks(range(len(rows)), [r["method"] + (" *" if r["needs_old_encoder"]
                                                    and r["method"] != methods.OLD_OLD else "")
                                     for r in rows])
    ax.set_title(f"{report['dataset']}: recall minus old->old (* needs the old encoder)")
    fig.colorbar(image, ax=ax, label="points vs old->old")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def backfill_curves(report: dict, path: Path) -> None:
    """R@1 against the re-embedded gallery fraction, per direction, method and order, and
    each method's migration to the new model (markers)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    rows = {r["method"]: r for r in report["rows"]}
    for ax, d in zip(axes, DIRECTIONS):
        for method, bf in report["backfill"].items():
            for order, style in (("random", "-"), ("distance", "--")):
                ax.plot(bf["fractions"], bf["r1"][d][order], style,
                        label=f"{method} ({order}, AUC {bf['auc'][d][order]:.1f})")
            to_new = bf.get("migration", {})
            if d in to_new.get("r1", {}):
                ax.plot(to_new["fractions"], to_new["r1"][d], "-o", markersize=3,
                        label=f"{method} -> new->new (AUC {to_new['auc'][d]:.1f})")
        for ref in methods.REFERENCES:
            if ref in rows:
                ax.axhline(rows[ref][d]["R1"], color="grey", linestyle=":", linewidth=1)
                ax.text(0.01, rows[ref][d]["R1"], ref, fontsize=7, va="bottom")
        ax.set_title(f"{d.upper()} R@1 during partial backfill")
        ax.set_xlabel("fraction of the gallery re-embedded")
        ax.set_ylabel("R@1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
