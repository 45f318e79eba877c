"""The compatibility matrix on an evaluation split, from embeddings only (no encoder loaded).

Queries of each method are scored against the OLD gallery (old image embeddings for T2I, old
caption embeddings for I2T); `old->old` is the floor and `new->new` (gallery re-embedded, i.e. a
full backfill) the ceiling. Beside the methods under test run the closed-form baselines (fitted
on a support set), flip rates against old->old, and partial-backfill curves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from xbt_ray.config import ConfigError, EvalConfig
from xbt_ray.data.cache import Embeddings
from xbt_ray.eval.backfill import backfill_report
from xbt_ray.eval.baselines import Support, fit_baselines
from xbt_ray.eval.report import build_report, make_row
from xbt_ray.eval.retrieval import cell_of, direction_ranks, flip_rates

log = logging.getLogger(__name__)


@dataclass
class EvalSplit:
    """Old and new embeddings of one split's images and captions, rows aligned by key."""

    old_images: Embeddings
    new_images: Embeddings
    old_captions: Embeddings
    new_captions: Embeddings

    def __post_init__(self):
        for old, new, what in ((self.old_images, self.new_images, "image"),
                               (self.old_captions, self.new_captions, "caption")):
            if not np.array_equal(old.keys, new.keys):
                order = {k: i for i, k in enumerate(new.keys)}
                missing = [k for k in old.keys if k not in order]
                if missing or len(new.keys) != len(old.keys):
                    raise ConfigError(f"old and new {what} embeddings cover different keys "
                                      f"({len(old.keys)} vs {len(new.keys)})")
                idx = np.array([order[k] for k in old.keys])
                new.keys, new.image_ids, new.emb = new.keys[idx], new.image_ids[idx], new.emb[idx]

    @property
    def image_ids(self) -> np.ndarray:
        return self.old_images.keys

    @property
    def caption_image_ids(self) -> np.ndarray:
        return self.old_captions.image_ids

    def rows_of(self, table: Embeddings, what: str) -> np.ndarray:
        """`table`'s embeddings in the order of this split's images or captions."""
        keys = (self.old_images if what == "image" else self.old_captions).keys
        order = {k: i for i, k in enumerate(table.keys)}
        missing = [k for k in keys if k not in order]
        if missing:
            raise ConfigError(f"{len(missing)} {what}s of the split have no embedding "
                              f"(e.g. {missing[0]})")
        return table.emb[[order[k] for k in keys]]


def backfill_methods(methods) -> list[str]:
    """The methods that get a partial-backfill curve: XBT rows and one Procrustes row."""
    chosen = [m for m in methods if m.startswith("xbt") and "stage1" not in m]
    procrustes = [m for m in ("procrustes-both->old", "procrustes-text->old") if m in methods]
    return chosen + procrustes[:1]


def compatibility_report(split: EvalSplit, queries: dict[str, tuple[np.ndarray, np.ndarray]],
                         cfg: EvalConfig, dataset: str, protocol: str,
                         support: Support | None = None, costs: dict | None = None,
                         seed: int = 0) -> dict:
    """Report rows: old->old, new->new, one row per entry of `queries` (methods that need no
    old encoder), then the baselines when `support` is given.

    `queries[method] = (image queries, caption queries)` already in the old space, row-aligned
    with the split's images and captions. `costs[method]` (old-model forward passes etc.) is
    copied into that method's row.
    """
    ids, cap_ids = split.image_ids, split.caption_image_ids
    old_img, old_cap = split.old_images.emb, split.old_captions.emb

    def ranks_of(img_q, cap_q, img_g=old_img, cap_g=old_cap):
        return direction_ranks(img_q, cap_q, img_g, cap_g, ids, cap_ids, cfg.max_chunk_mib)

    old_ranks = ranks_of(old_img, old_cap)
    old_old = cell_of(old_ranks, cfg.ks)
    new_new = cell_of(ranks_of(split.new_images.emb, split.new_captions.emb,
                               split.new_images.emb, split.new_captions.emb), cfg.ks)
    rows = [make_row("old->old", "old", "old", True, old_old),
            make_row("new->new", "new", "new", False, new_new)]
    candidates = {m: (img_q, cap_q, False, None) for m, (img_q, cap_q) in queries.items()}
    if support is not None and cfg.baselines:
        fitted = fit_baselines(support, old_img, split.new_images.emb, old_cap,
                               split.new_captions.emb, cfg.support_holdout, seed)
        candidates |= {m: (b.image, b.caption, b.needs_old_encoder, b.fit)
                       for m, b in fitted.items()}
    for method, (img_q, cap_q, needs_old, fit) in candidates.items():
        ranks = ranks_of(img_q, cap_q)
        row = make_row(method, method.split("->")[0], "old", needs_old, cell_of(ranks, cfg.ks),
                       old_old, new_new)
        row["flips"] = flip_rates(ranks, old_ranks)
        if fit:
            row["fit"] = fit
        if costs and method in costs:
            row["cost"] = costs[method]
        rows.append(row)
    report = build_report(dataset, protocol, len(ids), len(cap_ids), rows)
    if cfg.backfill_points > 1:
        report["backfill"] = {}
        for method in backfill_methods(list(candidates)):
            img_q, cap_q = candidates[method][:2]
            log.info("partial backfill curve for %s (%d points)", method, cfg.backfill_points)
            report["backfill"][method] = backfill_report(
                img_q, cap_q, old_img, old_cap, img_q, cap_q, ids, cap_ids,
                cfg.backfill_points, seed, cfg.max_chunk_mib)
    if costs and "full_backfill" in costs:
        report["full_backfill"] = costs["full_backfill"]
    return report
