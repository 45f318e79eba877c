"""Closed-form baselines: maps new -> old fitted on a support set, and SLERP query mixing.

A support set holds old AND new embeddings of the same items (captions, images, or both), e.g.
the caption corpus and the training images. A share of the support images (with their captions)
is held out as a small retrieval split on which SLERP's alpha and ridge's lambda are chosen
(mean R@1 of both directions against the old support gallery). Nothing here sees the eval split.

- `procrustes-{text,image,both}->old`: orthogonal Procrustes W, query = norm(new @ W).
- `ridge->old`: least squares with an L2 penalty on both modalities (weak cross-modally).
- `slerp->old`, `slerp-mid->old`: slerp(old query, Procrustes-both(new query), alpha); alpha
  chosen on the held-out split, or fixed 0.5. These need the OLD encoder at query time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from xbt_ray.config import ConfigError
from xbt_ray.data.cache import Embeddings, as_ids
from xbt_ray.data.join import join, same_items
from xbt_ray.eval import methods
from xbt_ray.eval.retrieval import evaluate_directions, unit_rows
from xbt_ray.models.projector import procrustes

ALPHAS = tuple(round(a, 2) for a in np.linspace(0, 1, 11))
LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the mean squared norm of the inputs


def procrustes_map(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """W (d_new x d_old) with orthonormal rows or columns maximising tr(W^T new^T old)."""
    return procrustes(torch.from_numpy(unit_rows(new)), torch.from_numpy(unit_rows(old))).numpy().T


def ridge_map(new: np.ndarray, old: np.ndarray, lam: float) -> np.ndarray:
    """argmin_W ||new W - old||^2 + lam * n * ||W||^2 (unit rows), in closed form."""
    x, y = unit_rows(new).astype(np.float64), unit_rows(old).astype(np.float64)
    gram = x.T @ x + lam * len(x) * np.eye(x.shape[1])
    return np.linalg.solve(gram, x.T @ y).astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical interpolation between unit rows a (alpha=0) and b (alpha=1)."""
    a, b = unit_rows(a), unit_rows(b)
    cos = np.clip(np.sum(a * b, axis=-1, keepdims=True), -1.0, 1.0)
    omega = np.arccos(cos)
    sin = np.sin(omega)
    small = sin < 1e-6  # (nearly) parallel rows: linear interpolation is exact enough
    safe = np.where(small, 1.0, sin)
    wa = np.where(small, 1 - alpha, np.sin((1 - alpha) * omega) / safe)
    wb = np.where(small, alpha, np.sin(alpha * omega) / safe)
    return unit_rows(wa * a + wb * b)


@dataclass
class Support:
    """Old and new embeddings of support captions and (optionally) support images.

    Captions whose image_id names a support image link the two into image-text pairs.
    """

    old_captions: Embeddings
    new_captions: Embeddings
    old_images: Embeddings | None = None
    new_images: Embeddings | None = None


@dataclass
class BaselineQueries:
    image: np.ndarray
    caption: np.ndarray
    needs_old_encoder: bool
    fit: dict = field(default_factory=dict)


def fit_baselines(support: Support, split_old_images: np.ndarray, split_new_images: np.ndarray,
                  split_old_captions: np.ndarray, split_new_captions: np.ndarray,
                  holdout: float, seed: int) -> dict[str, BaselineQueries]:
    """Fit every baseline on `support` and return its queries for the eval split.

    Old and new support rows are aligned through xbt_ray.data.join (`same_items`); captions
    link to support images by `image_id` (COCO layout: several captions per image, caption keys
    differ from image ids). Support captions may include a caption corpus that describes no
    support image, so that link accepts any share of unlinked captions (but not none). The
    join counts are recorded in every row's `fit["joins"]`.

    The split's old embeddings are used only by the SLERP rows (which need the old encoder at
    query time); every other row maps the split's new embeddings alone.
    """
    old_caps, new_caps, counts = same_items(support.old_captions, support.new_captions,
                                            "baselines: old ~ new support captions")
    joins = {"old_captions~new_captions": counts}
    cap_old, cap_new = old_caps.emb, new_caps.emb
    maps = {"text": (cap_new, cap_old)}
    out = {}
    if support.old_images is not None and support.new_images is not None:
        old_imgs, new_imgs, joins["old_images~new_images"] = same_items(
            support.old_images, support.new_images, "baselines: old ~ new support images")
        img_old, img_new = old_imgs.emb, new_imgs.emb
        linked = join(old_caps, old_imgs, "baselines: support captions -> support images",
                      on="image_id", min_fraction=0.0)
        joins["old_captions->old_images"] = linked.counts
        has_caption = np.zeros(len(old_imgs), bool)
        has_caption[linked.right] = True
        rng = np.random.default_rng(seed)
        held_images = has_caption & (rng.random(len(old_imgs)) < holdout)
        held_links = held_images[linked.right]           # links whose image is held out
        held_caps = np.zeros(len(old_caps), bool)
        held_caps[linked.left[held_links]] = True
        if held_images.sum() < 10:
            raise ConfigError(f"support images have only {int(held_images.sum())} held-out images "
                              f"linked to captions ({int(has_caption.sum())} of {len(old_imgs)} "
                              f"images have a caption); need >= 10 (eval.support_holdout, or "
                              f"captions whose image_id names a support image)")
        fit_img, fit_cap = ~held_images, ~held_caps
        maps = {"text": (cap_new[fit_cap], cap_old[fit_cap]),
                "image": (img_new[fit_img], img_old[fit_img]),
                "both": (np.concatenate([cap_new[fit_cap], img_new[fit_img]]),
                         np.concatenate([cap_old[fit_cap], img_old[fit_img]]))}
        held = (as_ids(old_imgs.keys[held_images]), img_old[held_images], img_new[held_images],
                as_ids(old_caps.image_ids[held_caps]), cap_old[held_caps], cap_new[held_caps])
    for name, (new, old) in tqdm(maps.items(), desc="baselines: Procrustes", unit="fit",
                                 disable=None):
        w = procrustes_map(new, old)
        out[methods.procrustes(name)] = BaselineQueries(
            unit_rows(split_new_images @ w), unit_rows(split_new_captions @ w), False,
            {"support": name, "n_support": len(new), "joins": joins})
    if "both" not in maps:
        return out

    ids, h_old_img, h_new_img, h_cap_ids, h_old_cap, h_new_cap = held

    def heldout_r1(img_q, cap_q) -> float:
        cell = evaluate_directions(img_q, cap_q, h_old_img, h_old_cap, ids, h_cap_ids, ks=(1,))
        return (cell["i2t"]["R1"] + cell["t2i"]["R1"]) / 2

    new, old = maps["both"]
    ridges = {lam: ridge_map(new, old, lam)
              for lam in tqdm(LAMBDAS, desc="baselines: ridge", unit="lambda", disable=None)}
    scores = {lam: heldout_r1(h_new_img @ w, h_new_cap @ w) for lam, w in ridges.items()}
    lam = max(scores, key=scores.get)
    w = ridges[lam]
    out[methods.RIDGE] = BaselineQueries(unit_rows(split_new_images @ w),
                                         unit_rows(split_new_captions @ w), False,
                                         {"support": "both", "n_support": len(new),
                                          "lambda": lam, "heldout_r1": scores[lam],
                                          "joins": joins})
    w = procrustes_map(new, old)
    scores = {a: heldout_r1(slerp(h_old_img, h_new_img @ w, a), slerp(h_old_cap, h_new_cap @ w, a))
              for a in ALPHAS}
    alpha = max(scores, key=scores.get)
    for name, a in ((methods.SLERP, alpha), (methods.SLERP_MID, 0.5)):
        out[name] = BaselineQueries(
            slerp(split_old_images, split_new_images @ w, a),
            slerp(split_old_captions, split_new_captions @ w, a), True,
            {"support": "both", "n_support": len(new), "alpha": a,
             "heldout_images": int(len(ids)), "heldout_captions": int(len(h_cap_ids)),
             "heldout_r1": scores.get(a), "joins": joins})
    return out
