"""The in-memory join: rows of embedding sets linked by `key` or `image_id`, in the driver.

For what the evaluation holds in the driver: the held-out evaluation split and a sweep's
validation split (thousands of items), and the closed-form baselines' support embeddings (read
whole: a known limit, see the README's "Scale" section). Training joins, which grow with the
corpus, run on the Ray Data workers with the same rules and counts (xbt_ray.data.paired).

Two kinds of link occur, and both go through `join`:
- the same items under two models (old vs new captions, old vs new images): `on="key"`;
- captions to the image they describe: a caption's `image_id` names the image row's `key`
  (`on="image_id"`). An image cache holds one row per image (the embedding job encodes each
  image once, however many caption rows share it), so this link is many captions to one image.

Real training pairs (COCO, Flickr30k) have several captions per image: caption keys are unique
per row and differ from image ids. LAION-style pairs have one caption per image and no
`image_id` column; readers then set `image_id = key` and both layouts join the same way.

Every join returns its counts (rows on each side, joined, unmatched) for the run's summary, the
report's `data` section and MLflow, and logs them. An empty join, or one that leaves more than
half of either side unmatched (`MIN_JOINED_FRACTION`), is a one-line ConfigError naming both
caches and a sample key of each: two caches that do not describe the same data fail early
instead of training on a handful of rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from xbt_ray.config import ConfigError
from xbt_ray.data.cache import Embeddings, as_ids

log = logging.getLogger(__name__)
MIN_JOINED_FRACTION = 0.5


@dataclass
class Joined:
    """Row indices of a join: `left[i]` links to `right[j]` for (i, j) in zip(left, right)."""

    left: np.ndarray    # (M,) int64 indices into the left cache, in the left cache's order
    right: np.ndarray   # (M,) int64 indices into the right cache
    counts: dict        # {"left_rows", "right_rows", "joined", "unmatched_left", "unmatched_right"}


def join(left: Embeddings, right: Embeddings, role: str, on: str = "key",
         min_fraction: float = MIN_JOINED_FRACTION) -> Joined:
    """Link each row of `left` to the row of `right` whose `key` equals the left row's `on`
    column (`"key"` or `"image_id"`). Right keys are unique (checked when caches are read), so a
    left row links to at most one right row; several left rows may share one right row when
    `on="image_id"` (captions of one image).

    Raises ConfigError (one line, both caches and a sample key of each) when nothing joins or
    when fewer than `min_fraction` of either side's rows are matched.
    """
    if on not in ("key", "image_id"):
        raise ValueError(f"join on 'key' or 'image_id', not {on!r}")
    values = as_ids(left.keys if on == "key" else left.image_ids)
    right_keys = as_ids(right.keys).astype(str)
    order = np.argsort(right_keys, kind="stable")
    sorted_keys = right_keys[order]
    _refuse_duplicates(sorted_keys, right, role)
    if on == "key":
        _refuse_duplicates(np.sort(values.astype(str)), left, role)
    wanted = values.astype(str)
    pos = np.searchsorted(sorted_keys, wanted).clip(max=max(0, len(sorted_keys) - 1))
    found = (sorted_keys[pos] == wanted) if len(sorted_keys) else np.zeros(len(wanted), bool)
    li = np.flatnonzero(found).astype(np.int64)
    ri = order[pos[found]].astype(np.int64)
    matched_right = len(np.unique(ri))
    counts = {"left_rows": len(left), "right_rows": len(right), "joined": int(len(li)),
              "unmatched_left": int(len(left) - len(li)),
              "unmatched_right": int(len(right) - matched_right)}
    log.info("join %s (%s -> key): %s", role, on, counts)
    left_ok = len(left) and len(li) >= min_fraction * len(left)
    right_ok = len(right) and matched_right >= min_fraction * len(right)
    if not len(li) or not (left_ok and right_ok):
        sample_left = values[0] if len(values) else None
        sample_right = right.keys[0] if len(right) else None
        what = "nothing joined" if not len(li) else "a lopsided join"
        raise ConfigError(
            f"{role}: {what}: {len(li)} of {len(left)} rows of {left.source or 'the left set'} "
            f"matched {matched_right} of {len(right)} rows of {right.source or 'the right set'} "
            f"by {on} -> key (e.g. {on} {sample_left!r} vs key {sample_right!r})")
    return Joined(li, ri, counts)


def _refuse_duplicates(sorted_keys: np.ndarray, table: Embeddings, role: str) -> None:
    repeated = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]]
    if len(repeated):
        raise ConfigError(f"{role}: {table.source or 'an embedding set'} has "
                          f"{len(np.unique(repeated))} duplicate keys (e.g. {repeated[0]!r}); "
                          "keys must be unique")


def same_items(old: Embeddings, new: Embeddings, role: str) -> tuple[Embeddings, Embeddings,
                                                                     dict]:
    """The rows both models embedded, row-aligned in `old`'s order: (old, new, counts)."""
    joined = join(old, new, role, on="key")
    return old.take(joined.left), new.take(joined.right), joined.counts
