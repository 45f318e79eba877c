"""The compatibility matrix on a held-out split, from cached embeddings only (no encoder).

Queries of each method are scored against the OLD gallery (old image embeddings for T2I, old
caption embeddings for I2T); `old->old` is the floor and `new->new` (gallery re-embedded, i.e. a
full backfill) the ceiling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xbt_ray.config import ConfigError, EvalConfig
from xbt_ray.data.cache import Embeddings
from xbt_ray.eval.report import build_report, make_row
from xbt_ray.eval.retrieval import evaluate_directions


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


    def rows_of(self, table: Embeddings, what: str) -> np.ndarray:
        """`table`'s embeddings in the order of this split's images or captions."""
        keys = (self.old_images if what == "image" else self.old_captions).keys
        order = {k: i for i, k in enumerate(table.keys)}
        missing = [k for k in keys if k not in order]
        if missing:
            raise ConfigError(f"{len(missing)} {what}s of the split have no embedding "
                              f"(e.g. {missing[0]})")
        return table.emb[[order[k] for k in keys]]


def compatibility_report(split: EvalSplit, projected: dict[str, tuple[np.ndarray, np.ndarray]],
                         cfg: EvalConfig, dataset: str, protocol: str) -> dict:
    """Report rows: old->old, new->new, then one `<method>` row per entry of `projected`.

    `projected[method] = (image queries, caption queries)` already mapped into the old space,
    row-aligned with the split's images and captions.
    """
    image_ids = split.old_images.keys
    caption_ids = split.old_captions.image_ids

    def cell(img_q, txt_q, img_g, txt_g):
        return evaluate_directions(img_q, txt_q, img_g, txt_g, image_ids, caption_ids,
                                   ks=cfg.ks, chunk_size=cfg.chunk_size)

    old_old = cell(split.old_images.emb, split.old_captions.emb,
                   split.old_images.emb, split.old_captions.emb)
    new_new = cell(split.new_images.emb, split.new_captions.emb,
                   split.new_images.emb, split.new_captions.emb)
    rows = [make_row("old->old", "old", "old", True, old_old),
            make_row("new->new", "new", "new", False, new_new)]
    for method, (img_q, txt_q) in projected.items():
        recalls = cell(img_q, txt_q, split.old_images.emb, split.old_captions.emb)
        rows.append(make_row(method, method.split("->")[0], "old", False, recalls,
                             old_old, new_new))
    return build_report(dataset, protocol, len(image_ids), len(caption_ids), rows)
