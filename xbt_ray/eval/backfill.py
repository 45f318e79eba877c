"""Partial backfill: upgrade gallery items one by one, and track R@1 along the way.

XBT queries live in the OLD space, and so do XBT (or Procrustes) embeddings of gallery items.
A gallery can therefore be re-embedded gradually: at fraction f, the first f of the items (in a
chosen order) carry upgraded embeddings and the rest their old ones; upgraded queries search the
mixed gallery. Orders: `random` (seeded) and `distance` (items whose old and upgraded embeddings
disagree most go first). AUC = the area under R@1 over f in [0, 1] (trapezoid rule), in percent.
"""
from __future__ import annotations

import numpy as np

from xbt_ray.eval.retrieval import query_ranks, recalls, unit_rows

ORDERS = ("random", "distance")


def upgrade_order(old_gallery: np.ndarray, upgraded_gallery: np.ndarray, order: str,
                  seed: int) -> np.ndarray:
    """Gallery indices in the order they are re-embedded."""
    if order == "random":
        return np.random.default_rng(seed).permutation(len(old_gallery))
    if order == "distance":
        cos = np.sum(unit_rows(old_gallery) * unit_rows(upgraded_gallery), axis=-1)
        return np.argsort(cos, kind="stable")  # least similar (largest distance) first
    raise ValueError(f"unknown backfill order '{order}', expected one of {ORDERS}")


def backfill_curve(queries, old_gallery, upgraded_gallery, query_ids, gallery_ids,
                   fractions, order: str, seed: int = 0, max_chunk_mib: float = 256) -> list[float]:
    """R@1 (percent) of `queries` against the gallery upgraded to each fraction."""
    order_idx = upgrade_order(old_gallery, upgraded_gallery, order, seed)
    gallery = unit_rows(old_gallery).copy()
    upgraded = unit_rows(upgraded_gallery)
    curve, done = [], 0
    for f in fractions:
        n = int(round(f * len(gallery)))
        gallery[order_idx[done:n]] = upgraded[order_idx[done:n]]
        done = n
        ranks = query_ranks(queries, gallery, query_ids, gallery_ids, max_chunk_mib)
        curve.append(recalls(ranks, (1,))[1])
    return curve


def auc(fractions, curve) -> float:
    """Area under the curve over [0, 1] (trapezoid rule)."""
    return float(np.trapezoid(curve, fractions))


def backfill_report(image_queries, caption_queries, old_images, old_captions, new_images_up,
                    new_captions_up, image_ids, caption_image_ids, points: int, seed: int = 0,
                    max_chunk_mib: float = 256) -> dict:
    """Both directions, both orders. I2T upgrades the caption gallery, T2I the image gallery.

    `new_images_up` / `new_captions_up`: the gallery items' upgraded (old-space) embeddings.
    """
    fractions = [float(f) for f in np.linspace(0, 1, points)]
    setups = {"i2t": (image_queries, old_captions, new_captions_up, image_ids, caption_image_ids),
              "t2i": (caption_queries, old_images, new_images_up, caption_image_ids, image_ids)}
    out = {"fractions": fractions, "r1": {}, "auc": {}}
    for direction, (q, old_g, up_g, q_ids, g_ids) in setups.items():
        out["r1"][direction], out["auc"][direction] = {}, {}
        for order in ORDERS:
            curve = backfill_curve(q, old_g, up_g, q_ids, g_ids, fractions, order, seed,
                                   max_chunk_mib)
            out["r1"][direction][order] = curve
            out["auc"][direction][order] = auc(fractions, curve)
    return out
