"""Partial backfill: upgrade gallery items a share at a time, and track R@1 along the way.

Two ways to do it, both reported per method (R@1 against the re-embedded fraction f, and the
curve's AUC over f in [0, 1], trapezoid rule, in percent):

- **In the old space** (`backfill_report`; method.md, "Partial backfill"). XBT queries live in
  the OLD space, and so do XBT (or Procrustes) embeddings of gallery items: at fraction f the
  first f of the items (in a chosen order) carry upgraded old-space embeddings and the rest their
  old ones; upgraded queries search the mixed gallery. Orders: `random` (seeded) and `distance`
  (items whose old and upgraded embeddings disagree most go first). This tops out at the
  method's own query-and-gallery cell, below new->new.
- **Migration to the new model** (`migration_report`; beyond the paper). What a service runs
  while it re-embeds its gallery with the native new model: items already re-embedded are
  searched with the native new query (new->new scores), the rest with the method's query
  against their old embeddings (method->old scores), and the two result lists are merged by
  calibrated score: each space's cosine turned into the log-odds of a genuine match by Platt
  scaling, fitted on the other half of the queries (`cross_fitted_calibration`). Random order.
  The curve runs from method->old at f = 0 to new->new at f = 1.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from xbt_ray.eval.retrieval import (
    DIRECTIONS,
    chunk_rows,
    id_codes,
    query_ranks,
    recalls,
    score_ranks,
    unit_rows,
)

log = logging.getLogger(__name__)
ORDERS = ("random", "distance")


class CalibrationError(ValueError):
    """A space's scores cannot be calibrated (no genuine or impostor pairs, fewer than two ids
    to cross-fit on, or genuine pairs not scoring above impostors)."""


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


# --- migration to the new model ----------------------------------------------------------------

SCORE_BINS = 2048  # histogram bins of cosine scores over [-1, 1] for score_calibration
# working memory per (query, gallery item): float32 score, int64 bin, bool same-id, and the
# int64 copy bincount makes of the selected bins
HISTOGRAM_BYTES_PER_SCORE = 4 + 8 + 1 + 8
# merged search: two float32 cosines, two float64 calibrated scores, the float64 merge, and
# exact search's comparison
MERGED_BYTES_PER_SCORE = 2 * 4 + 3 * 8 + 1


def score_histograms(queries, gallery, query_ids, gallery_ids,
                     max_chunk_mib: float = 256) -> tuple[np.ndarray, np.ndarray]:
    """Counts of genuine pairs (query and gallery item with the same id) and of impostor pairs
    per cosine-score bin: two int64 arrays of shape (SCORE_BINS,), bin i covering
    [-1 + 2i / SCORE_BINS, -1 + 2(i + 1) / SCORE_BINS). Every (query, gallery) pair is counted,
    a chunk of queries at a time (retrieval.chunk_rows); rows are L2-normalised first."""
    q, g = torch.from_numpy(unit_rows(queries)), torch.from_numpy(unit_rows(gallery))
    q_codes, g_codes = id_codes(query_ids, gallery_ids)
    genuine = torch.zeros(SCORE_BINS, dtype=torch.int64)
    total = torch.zeros(SCORE_BINS, dtype=torch.int64)
    step = chunk_rows(len(g), max_chunk_mib, HISTOGRAM_BYTES_PER_SCORE)
    for start in range(0, len(q), step):
        scores = q[start:start + step] @ g.T
        bins = ((scores + 1) * (SCORE_BINS / 2)).long().clamp(0, SCORE_BINS - 1)
        same = q_codes[start:start + step, None] == g_codes[None, :]
        genuine += torch.bincount(bins[same], minlength=SCORE_BINS)
        total += torch.bincount(bins.reshape(-1), minlength=SCORE_BINS)
    return genuine.numpy(), (total - genuine).numpy()


def fit_platt(scores: np.ndarray, genuine: np.ndarray, impostor: np.ndarray,
              iterations: int = 100) -> tuple[float, float]:
    """Platt scaling (Platt, 1999, "Probabilistic outputs for support vector machines"): the
    (slope, intercept) of the logistic regression P(genuine | score) = sigmoid(slope * score +
    intercept), fitted by maximum likelihood on `genuine[i]` genuine and `impostor[i]` impostor
    observations at `scores[i]`. Newton's method with step halving; an L2 penalty on the slope
    of 1e-6 times the smaller class's count keeps perfectly separated data finite without
    pulling the slope of a large gallery (impostors outnumber genuine pairs by the gallery's
    size). A CalibrationError without both kinds of observation."""
    x = np.asarray(scores, dtype=np.float64)
    pos, n = np.asarray(genuine, dtype=np.float64), np.asarray(genuine) + np.asarray(impostor)
    n = n.astype(np.float64)
    if pos.sum() == 0 or pos.sum() == n.sum():
        raise CalibrationError(f"score calibration needs genuine and impostor pairs, got "
                               f"{int(pos.sum())} genuine and {int(n.sum() - pos.sum())} "
                               "impostor")
    ridge = 1e-6 * min(pos.sum(), n.sum() - pos.sum())

    def loglik(theta):
        z = theta[0] * x + theta[1]
        return float(np.sum(pos * z - n * np.logaddexp(0, z)) - ridge * theta[0] ** 2)

    prior = pos.sum() / n.sum()
    theta = np.array([0.0, np.log(prior / (1 - prior))])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(theta[0] * x + theta[1])))
        resid, w = pos - n * p, n * p * (1 - p)
        grad = np.array([resid @ x - 2 * ridge * theta[0], resid.sum()])
        hess = np.array([[w @ (x * x) + 2 * ridge, w @ x], [w @ x, w.sum()]])
        step = np.linalg.solve(hess, grad)
        before, t = loglik(theta), 1.0
        while loglik(theta + t * step) < before and t > 1e-8:
            t /= 2
        theta = theta + t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def score_calibration(queries, gallery, query_ids, gallery_ids,
                      max_chunk_mib: float = 256) -> tuple[float, float]:
    """(slope, intercept) that put one embedding space's cosine scores on a shared scale, the
    log-odds that a (query, gallery item) pair is genuine (same id): Platt scaling (`fit_platt`)
    of every pair's score (`score_histograms`, bin centres). Scores of two spaces calibrated on
    the same queries and gallery are comparable as evidence of a match. A CalibrationError when
    genuine pairs do not score above impostors (slope <= 0: the space ranks nothing)."""
    genuine, impostor = score_histograms(queries, gallery, query_ids, gallery_ids, max_chunk_mib)
    centres = -1 + (np.arange(SCORE_BINS) + 0.5) * (2 / SCORE_BINS)
    slope, intercept = fit_platt(centres, genuine, impostor)
    if slope <= 0:
        raise CalibrationError(f"cannot calibrate scores: genuine pairs do not score above "
                               f"impostors (fitted slope {slope:.4f})")
    return slope, intercept


def calibration_folds(query_ids, seed: int) -> np.ndarray:
    """Fold 0 or 1 of each query: its id's, ids split in half by a seeded permutation (all
    queries of one image fall in one fold). The permutation is drawn from its own stream
    (seed, 1), not the one that orders the upgrade (`upgrade_order`), so that the ids upgraded
    first are not one fold. A CalibrationError with fewer than two distinct ids."""
    unique, inverse = np.unique(np.asarray(query_ids), return_inverse=True)
    if len(unique) < 2:
        raise CalibrationError(f"cross-fitted calibration needs queries of at least two ids, "
                               f"got {len(unique)}")
    fold_of_id = np.zeros(len(unique), dtype=np.int64)
    fold_of_id[np.random.default_rng([seed, 1]).permutation(len(unique))[len(unique) // 2:]] = 1
    return fold_of_id[inverse.reshape(-1)]


def cross_fitted_calibration(queries, gallery, query_ids, gallery_ids, folds: np.ndarray,
                             max_chunk_mib: float = 256):
    """Per-query (slope, intercept) arrays (float64, shape (n_queries,)): each query's from
    `score_calibration` fitted on the OTHER fold's queries, so that no query's own scores
    calibrate its ranking. Also returns the {"slope", "intercept"} used for each fold, for the
    report."""
    query_ids = np.asarray(query_ids)
    slope = np.empty(len(query_ids), dtype=np.float64)
    intercept = np.empty(len(query_ids), dtype=np.float64)
    fitted = []
    for fold in (0, 1):
        other = folds != fold
        a, b = score_calibration(np.asarray(queries)[other], gallery, query_ids[other],
                                 gallery_ids, max_chunk_mib)
        slope[folds == fold], intercept[folds == fold] = a, b
        fitted.append({"slope": a, "intercept": b})
    return (slope, intercept), fitted


def merged_ranks(new_queries, method_queries, new_gallery, old_gallery, upgraded: np.ndarray,
                 new_calibration, method_calibration, query_ids, gallery_ids,
                 max_chunk_mib: float = 256) -> np.ndarray:
    """Ranks (as retrieval.query_ranks) in a gallery whose items with `upgraded` True carry
    native new embeddings, scored against `new_queries`, and the rest old embeddings, scored
    against `method_queries` (already in the old space). Each score goes through its space's
    calibration, a (slope, intercept) pair of per-query arrays (`cross_fitted_calibration`),
    before the two lists are merged."""
    qn, qm = torch.from_numpy(unit_rows(new_queries)), torch.from_numpy(unit_rows(method_queries))
    gn, go = torch.from_numpy(unit_rows(new_gallery)), torch.from_numpy(unit_rows(old_gallery))
    (an, bn), (am, bm) = ([torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in cal]
                          for cal in (new_calibration, method_calibration))
    mask = torch.as_tensor(np.asarray(upgraded, dtype=bool))[None, :]

    def scores_of(rows):
        # in float64: distinct float32 cosines stay distinct after the map, so a space alone
        # (f = 0 or 1) ranks exactly as its own exact search does
        new = (qn[rows] @ gn.T).double() * an[rows, None] + bn[rows, None]
        old = (qm[rows] @ go.T).double() * am[rows, None] + bm[rows, None]
        return torch.where(mask, new, old)

    return score_ranks(scores_of, query_ids, gallery_ids, max_chunk_mib,
                       bytes_per_score=MERGED_BYTES_PER_SCORE)


def migration_curve(new_queries, method_queries, new_gallery, old_gallery, query_ids,
                    gallery_ids, fractions, new_calibration, method_calibration, seed: int = 0,
                    max_chunk_mib: float = 256) -> list[float]:
    """R@1 (percent) at each re-embedded fraction of the migration to the new model (module
    docstring), random order (backfill_curve's), with both spaces' per-query calibrations
    (`cross_fitted_calibration`)."""
    order = upgrade_order(old_gallery, old_gallery, "random", seed)
    upgraded = np.zeros(len(old_gallery), dtype=bool)
    curve = []
    for f in fractions:
        upgraded[order[:int(round(f * len(order)))]] = True
        ranks = merged_ranks(new_queries, method_queries, new_gallery, old_gallery, upgraded,
                             new_calibration, method_calibration, query_ids, gallery_ids,
                             max_chunk_mib)
        curve.append(recalls(ranks, (1,))[1])
    return curve


def migration_report(method_queries: dict, new_images, new_captions, old_images, old_captions,
                     image_ids, caption_image_ids, points: int, seed: int = 0,
                     max_chunk_mib: float = 256) -> dict[str, dict]:
    """Both directions of the migration to the new model, for each method: I2T re-embeds the
    caption gallery (native new image queries on it), T2I the image gallery.
    `method_queries[method] = (image queries, caption queries)` in the old space; `new_images` /
    `new_captions`: the split embedded by the native new model (queries and re-embedded gallery
    alike). The new space is calibrated once per direction and shared by every method.
    Returns, per method, {"fractions", "r1": {direction: curve}, "auc": {direction: AUC},
    "calibration": {direction: {"new": [fold 0, fold 1], "method": [...]}}, "skipped":
    {direction: reason}}: a direction whose scores cannot be calibrated (CalibrationError) has
    no curve; its reason is logged and kept in "skipped"."""
    fractions = [float(f) for f in np.linspace(0, 1, points)]
    out = {m: {"fractions": fractions, "r1": {}, "auc": {}, "calibration": {}, "skipped": {}}
           for m in method_queries}
    for direction in DIRECTIONS:
        i2t = direction == "i2t"
        new_q, new_g, old_g = ((new_images, new_captions, old_captions) if i2t
                               else (new_captions, new_images, old_images))
        q_ids, g_ids = (image_ids, caption_image_ids) if i2t else (caption_image_ids, image_ids)
        try:
            folds = calibration_folds(q_ids, seed)
            new_cal, new_fits = cross_fitted_calibration(new_q, new_g, q_ids, g_ids, folds,
                                                         max_chunk_mib)
        except CalibrationError as err:  # no curve for any method in this direction
            log.warning("migration curves %s skipped: %s", direction, err)
            for report in out.values():
                report["skipped"][direction] = str(err)
            continue
        for method, (image_queries, caption_queries) in method_queries.items():
            queries = image_queries if i2t else caption_queries
            try:
                method_cal, method_fits = cross_fitted_calibration(queries, old_g, q_ids, g_ids,
                                                                   folds, max_chunk_mib)
            except CalibrationError as err:
                log.warning("migration curve %s %s skipped: %s", method, direction, err)
                out[method]["skipped"][direction] = str(err)
                continue
            curve = migration_curve(new_q, queries, new_g, old_g, q_ids, g_ids, fractions,
                                    new_cal, method_cal, seed, max_chunk_mib)
            out[method]["r1"][direction] = curve
            out[method]["auc"][direction] = auc(fractions, curve)
            out[method]["calibration"][direction] = {"new": new_fits, "method": method_fits}
    return out
