"""The compatibility matrix on an evaluation split, from embeddings only (no encoder loaded).

Queries of each method are scored against the OLD gallery (old image embeddings for T2I, old
caption embeddings for I2T); `old->old` is the floor and `new->new` (gallery re-embedded, i.e. a
full backfill) the ceiling. Beside the methods under test run the closed-form baselines (fitted
on a support set), flip rates against old->old, and partial-backfill curves: in the old space,
and the migration to the new model (xbt_ray.eval.backfill).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from xbt_ray.config import ConfigError, EvalConfig
from xbt_ray.data.cache import Embeddings, as_ids
from xbt_ray.data.join import join, same_items
from xbt_ray.eval import methods
from xbt_ray.eval.backfill import backfill_report, migration_report
from xbt_ray.eval.baselines import Support, fit_baselines
from xbt_ray.eval.report import build_report, make_row
from xbt_ray.eval.retrieval import cell_of, direction_ranks, flip_rates

log = logging.getLogger(__name__)
SPLIT_ROLES = ("old_images", "new_images", "old_captions", "new_captions")


@dataclass
class EvalSplit:
    """Old and new embeddings of one split's images and captions, joined through
    xbt_ray.data.join: old and new rows aligned by key (`same_items`), then captions linked to
    the split's images by `image_id`. Captions whose image is not in the split and images
    without a caption cannot be scored (a query needs a correct gallery item): they are
    dropped and counted in `joins`, not an error. A lopsided or empty join is a ConfigError.

    After construction the four tables are row-aligned (old and new) and every caption's
    image_id names one of `image_ids`. `joins` holds each join's counts, `dropped` the rows the
    caption -> image link left out, `reads` each role's read counts (rows skipped as zero/NaN
    vectors when the cache was read). `data()` is the report's `data` section."""

    old_images: Embeddings
    new_images: Embeddings
    old_captions: Embeddings
    new_captions: Embeddings
    joins: dict = field(init=False, default_factory=dict)
    dropped: dict = field(init=False, default_factory=dict)
    reads: dict = field(init=False, default_factory=dict)
    role: str = "eval split"

    def __post_init__(self):
        self.reads = {name: dict(getattr(self, name).counts) for name in SPLIT_ROLES}
        for name in SPLIT_ROLES:   # ids as str, whatever their stored type (int64 image keys)
            table = getattr(self, name)
            setattr(self, name, Embeddings(as_ids(table.keys), as_ids(table.image_ids),
                                           table.emb, table.meta, table.source, table.counts))
        old_img, new_img, self.joins["old_images~new_images"] = same_items(
            self.old_images, self.new_images, f"{self.role}: old ~ new images")
        old_cap, new_cap, self.joins["old_captions~new_captions"] = same_items(
            self.old_captions, self.new_captions, f"{self.role}: old ~ new captions")
        linked = join(old_cap, old_img, f"{self.role}: captions -> images", on="image_id")
        self.joins["old_captions->old_images"] = linked.counts
        images = np.unique(linked.right)              # images with a caption, in split order
        self.old_images, self.new_images = old_img.take(images), new_img.take(images)
        self.old_captions, self.new_captions = old_cap.take(linked.left), new_cap.take(linked.left)
        self.dropped = {"images_without_caption": linked.counts["unmatched_right"],
                        "captions_without_image": linked.counts["unmatched_left"]}
        if any(self.dropped.values()):
            log.warning("%s: dropped %s (not scorable); %d images and %d captions remain",
                        self.role, self.dropped, len(images), len(linked.left))

    def data(self) -> dict:
        """The report's `data` section: join counts, dropped rows, read counts per role."""
        return {"joins": dict(self.joins), "dropped": dict(self.dropped),
                "read": dict(self.reads)}

    @property
    def image_ids(self) -> np.ndarray:
        return self.old_images.keys

    @property
    def caption_image_ids(self) -> np.ndarray:
        return self.old_captions.image_ids

    def rows_of(self, table: Embeddings, what: str, name: str | None = None) -> np.ndarray:
        """`table`'s embeddings in the order of this split's images or captions (joined by key;
        rows of `table` outside the split are ignored). Every split row needs one: a missing
        row is a one-line ConfigError naming a sample key. With `name`, the join's counts are
        recorded in `joins` as `<name>:<what>s`."""
        base = self.old_images if what == "image" else self.old_captions
        joined = join(base, table, f"{self.role}: {name or 'queries'} {what}s", on="key",
                      min_fraction=0.0)
        if name:
            self.joins[f"{name}:{what}s"] = joined.counts
        if joined.counts["unmatched_left"]:
            missing = np.setdiff1d(np.arange(len(base)), joined.left)
            raise ConfigError(f"{joined.counts['unmatched_left']} of {len(base)} {what}s of the "
                              f"split have no embedding in {table.source or name or 'the queries'} "
                              f"(e.g. key {base.keys[missing[0]]!r})")
        return table.emb[joined.right]


def backfill_methods(candidates: list[str]) -> list[str]:
    """The methods that get a partial-backfill curve: XBT rows and one Procrustes row."""
    chosen = [m for m in candidates if m.startswith("xbt") and m != methods.XBT_STAGE1]
    procrustes = [m for m in (methods.procrustes("both"), methods.procrustes("text"))
                  if m in candidates]
    return chosen + procrustes[:1]


def compatibility_report(split: EvalSplit, queries: dict[str, tuple[np.ndarray, np.ndarray]],
                         cfg: EvalConfig, dataset: str, protocol: str,
                         support: Support | None = None, costs: dict | None = None,
                         seed: int = 0) -> dict:
    """Report rows: old->old, new->new, one row per entry of `queries` (methods that need no
    old encoder), then the baselines when `support` is given.

    `queries[method] = (image queries, caption queries)` already in the old space, row-aligned
    with the split's images and captions. `costs[method]` (old-model forward passes etc.) is
    copied into that method's row. The report's `data` section holds the split's join counts,
    the rows the split dropped and each role's read counts (EvalSplit.data), plus the support
    set's join counts (`support:<join>`) when baselines were fitted.
    """
    ids, cap_ids = split.image_ids, split.caption_image_ids
    old_img, old_cap = split.old_images.emb, split.old_captions.emb

    def ranks_of(img_q, cap_q, img_g=old_img, cap_g=old_cap):
        return direction_ranks(img_q, cap_q, img_g, cap_g, ids, cap_ids, cfg.max_chunk_mib,
                               split.old_captions.keys)

    old_ranks = ranks_of(old_img, old_cap)
    old_old = cell_of(old_ranks, cfg.ks)
    new_new = cell_of(ranks_of(split.new_images.emb, split.new_captions.emb,
                               split.new_images.emb, split.new_captions.emb), cfg.ks)
    rows = [make_row(methods.OLD_OLD, "old", "old", True, old_old),
            make_row(methods.NEW_NEW, "new", "new", False, new_new)]
    candidates = {m: (img_q, cap_q, False, None) for m, (img_q, cap_q) in queries.items()}
    support_joins = {}
    if support is not None and cfg.baselines:
        fitted = fit_baselines(support, old_img, split.new_images.emb, old_cap,
                               split.new_captions.emb, cfg.support_holdout, seed)
        candidates |= {m: (b.image, b.caption, b.needs_old_encoder, b.fit)
                       for m, b in fitted.items()}
        support_joins = next(iter(fitted.values())).fit.get("joins", {})
    for method, (img_q, cap_q, needs_old, fit) in tqdm(candidates.items(), desc="evaluate",
                                                        unit="method", disable=None):
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
    report["data"] = split.data()
    if support_joins:
        report["data"]["joins"] |= {f"support:{k}": v for k, v in support_joins.items()}
    if cfg.backfill_points > 1:
        report["backfill"] = {}
        chosen = backfill_methods(list(candidates))
        migrations = migration_report({m: candidates[m][:2] for m in chosen},
                                      split.new_images.emb, split.new_captions.emb, old_img,
                                      old_cap, ids, cap_ids, cfg.backfill_points, seed,
                                      cfg.max_chunk_mib)
        for method in tqdm(chosen, desc="backfill curves", unit="method", disable=None):
            img_q, cap_q = candidates[method][:2]
            log.info("partial backfill curve for %s (%d points)", method, cfg.backfill_points)
            report["backfill"][method] = backfill_report(
                img_q, cap_q, old_img, old_cap, img_q, cap_q, ids, cap_ids,
                cfg.backfill_points, seed, cfg.max_chunk_mib)
            report["backfill"][method]["migration"] = migrations[method]
    if costs and "full_backfill" in costs:
        report["full_backfill"] = costs["full_backfill"]
    return report
