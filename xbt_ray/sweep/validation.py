"""A sweep's validation split and its primary metric.

The validation split is a held-out share of the training-pair images (never the evaluation
split), removed from stage 2's training pairs. The primary metric, shared by Tune (ASHA) and
MLflow, is the mean of the R@1 update gains over I2T and T2I of the trial's latest method row on
that split.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from xbt_ray.config import ConfigError, EvalConfig
from xbt_ray.data.cache import Embeddings, as_ids
from xbt_ray.data.join import join, same_items
from xbt_ray.eval import methods
from xbt_ray.eval.report import cells_passed

PRIMARY = "primary"
PAIR_ROLES = ("old_pair_images", "new_pair_images", "old_pair_texts", "new_pair_texts")
DATASET = "train-pairs-holdout"
PROTOCOL = "validation: held-out training-pair images (not the evaluation split)"


def _subset(table: Embeddings, mask: np.ndarray) -> Embeddings:
    return table.take(np.flatnonzero(mask))


def pair_joins(pairs: dict[str, Embeddings]) -> tuple[Embeddings, Embeddings, dict]:
    """The training pairs through xbt_ray.data.join: images embedded by both models (by key =
    image id), captions embedded by both (by key), captions -> images (by image_id).
    Returns (old images in both, old captions in both that name one of them, join counts)."""
    old_img, _, img_counts = same_items(pairs["old_pair_images"], pairs["new_pair_images"],
                                        "sweep: old ~ new pair images")
    old_txt, _, txt_counts = same_items(pairs["old_pair_texts"], pairs["new_pair_texts"],
                                        "sweep: old ~ new pair captions")
    linked = join(old_txt, old_img, "sweep: pair captions -> pair images", on="image_id")
    counts = {"old_pair_images~new_pair_images": img_counts,
              "old_pair_texts~new_pair_texts": txt_counts,
              "old_pair_texts->old_pair_images": linked.counts}
    return old_img.take(np.unique(linked.right)), old_txt.take(linked.left), counts


def pair_image_keys(pairs: dict[str, Embeddings]) -> np.ndarray:
    """Sorted training-pair images embedded by both models that have a caption in both."""
    images, _, _ = pair_joins(pairs)
    return np.array(sorted(images.keys.astype(str)))


def choose_validation(pairs: dict[str, Embeddings], fraction: float, seed: int) -> np.ndarray:
    """A seeded share of the training-pair images (sorted keys): the validation split."""
    if not 0 < fraction < 1:
        raise ConfigError("sweep.val_fraction must be in (0, 1)")
    keys = pair_image_keys(pairs)
    n_val = int(round(fraction * len(keys)))
    if n_val < 10 or len(keys) - n_val < 10:
        raise ConfigError(f"sweep.val_fraction={fraction} of {len(keys)} training-pair images "
                          "leaves under 10 for validation or training")
    chosen = np.random.default_rng(seed).permutation(len(keys))[:n_val]
    return np.sort(keys[chosen])


@dataclass
class PairSplit:
    validation: object           # EvalSplit: the held-out images and their captions
    train: dict[str, Embeddings]  # the pair caches without the held-out images
    counts: dict = dataclasses.field(default_factory=dict)  # per role, its join to val_keys


def split_pairs(pairs: dict[str, Embeddings], val_keys: np.ndarray) -> PairSplit:
    """Validation = the pairs of `val_keys` (images by key, captions by image_id: COCO layout,
    several captions per image); training = the rest (what stage 2 may train on). Membership
    and the validation split's alignment both go through xbt_ray.data.join; the split's own
    join counts are in `validation.joins`."""
    from xbt_ray.eval.compat import EvalSplit

    keys = as_ids(val_keys)
    chosen = Embeddings(keys, keys, np.zeros((len(keys), 1), np.float32), {},
                        "the validation images")
    train, held, counts = {}, {}, {}
    for role, table in pairs.items():
        on = "key" if role.endswith("images") else "image_id"
        joined = join(table, chosen, f"sweep validation: {role}", on=on, min_fraction=0.0)
        counts[role] = joined.counts
        in_val = np.zeros(len(table), bool)
        in_val[joined.left] = True
        train[role], held[role] = _subset(table, ~in_val), _subset(table, in_val)
    validation = EvalSplit(held["old_pair_images"], held["new_pair_images"],
                           held["old_pair_texts"], held["new_pair_texts"], role="validation split")
    return PairSplit(validation, train, counts)


GAIN_FLOOR = 1.0  # points of R@1: the smallest update-gain denominator the primary metric uses


def primary_metric(report: dict, method: str) -> float:
    """Mean over I2T and T2I of `method`'s R@1 update gain, (M - M_old) / (M_new - M_old),
    with the denominator floored at GAIN_FLOOR points so the metric stays defined and increasing
    in M where the new model is not ahead of the old one on the validation split."""
    rows = {r["method"]: r for r in report["rows"]}
    old, new, row = rows[methods.OLD_OLD], rows[methods.NEW_NEW], rows[method]
    gains = [(row[d]["R1"] - old[d]["R1"]) / max(new[d]["R1"] - old[d]["R1"], GAIN_FLOOR)
             for d in ("i2t", "t2i")]
    return float(np.mean(gains))


class Validator:
    """Scores old-space queries (psi of the new validation embeddings) on the validation split.
    Baselines and backfill curves are off: the table holds old->old, new->new and the trial's
    methods."""

    def __init__(self, split, eval_cfg: EvalConfig):
        if 1 not in eval_cfg.ks:
            raise ConfigError("sweeps need R@1: add 1 to eval.ks")
        self.split = split
        self.cfg = dataclasses.replace(eval_cfg, baselines=False, backfill_points=0)

    def report(self, projectors: dict) -> dict:
        from xbt_ray.eval.compat import compatibility_report
        from xbt_ray.train.stage1 import project

        queries = {method: (project(psi, self.split.new_images.emb),
                            project(psi, self.split.new_captions.emb))
                   for method, psi in projectors.items()}
        return compatibility_report(self.split, queries, self.cfg, DATASET, PROTOCOL)

    def reference_gap(self) -> dict[str, float]:
        """new->new minus old->old R@1 per direction: the update gain's denominator."""
        rows = {r["method"]: r for r in self.report({})["rows"]}
        return {d: rows[methods.NEW_NEW][d]["R1"] - rows[methods.OLD_OLD][d]["R1"]
                for d in ("i2t", "t2i")}


def summarise(report: dict, method: str) -> dict:
    """What a Tune result carries: the primary metric, the method row's R@1s, gains, RSUM and
    the number of its cells (of 6) that pass the strict criterion against old->old, and the
    whole report (JSON text, so Tune's loggers keep it as one value)."""
    row = next(r for r in report["rows"] if r["method"] == method)
    gain = {d: row["update_gain"][d]["R1"] for d in ("i2t", "t2i")}
    return {PRIMARY: primary_metric(report, method), "method": method,
            "i2t_R1": row["i2t"]["R1"], "t2i_R1": row["t2i"]["R1"], "rsum": row["rsum"],
            "cells": cells_passed(row),
            **{f"gain_{d}_R1": float("nan") if g is None else g for d, g in gain.items()},
            "report": json.dumps(report)}
