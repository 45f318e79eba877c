"""The embedding job's stages that need no model, run by Ray Data on the workers: the CPU stage
(decode / tokenise, keeping the shard bookkeeping columns), the write stage, and the image
group-by's reducer. Kept apart from xbt_ray.data.embed, which imports torch and open_clip: a Ray
worker imports the module of every function it runs, and those imports cost seconds per worker
process (`import xbt_ray.data.embed`: 9.7 s on a 2-core machine, 2026-12-01).
"""
from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from xbt_ray.data import cache, shards


def write_embedded(batch: dict, directory: str, meta: dict, dtype: str) -> dict:
    """Ray Data write stage: the block's valid rows go to one cache part per input shard
    (`part-<shard:05d>-<random>.parquet`); out come counts per shard: items (rows of this
    stage), rows_in (input rows they stand for: a deduplicated image stands for its captions'
    rows), rows_embedded and skipped (JSON {reason: n})."""
    reasons = np.asarray(batch["skip_reason"])
    shard = np.asarray(batch["shard"])
    rows = np.asarray(batch["rows"]) if "rows" in batch else np.ones(len(shard), np.int64)
    out = {"shard": [], "items": [], "rows_in": [], "rows_embedded": [], "skipped": []}
    for i in np.unique(shard):
        mine = shard == i
        valid = mine & (reasons == "")
        if valid.any():
            cache.write_part(Path(directory), f"{int(i):05d}-{uuid.uuid4().hex[:12]}",
                             batch["key"][valid], batch["image_id"][valid], batch["emb"][valid],
                             meta, dtype)
        out["shard"].append(int(i))
        out["items"].append(int(mine.sum()))
        out["rows_in"].append(int(rows[mine].sum()))
        out["rows_embedded"].append(int(valid.sum()))
        out["skipped"].append(json.dumps(Counter(r for r in reasons[mine] if r)))
    return {k: np.array(v) for k, v in out.items()}


def drop_shards(table, done: list[int]):
    """Ray Data UDF: the rows of shards not in `done`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return table.filter(pc.invert(pc.is_in(table.column("shard"), pa.array(done, pa.int64()))))


def passthrough(batch: dict) -> dict:
    """The columns the write stage needs that the CPU stage does not produce."""
    return {k: batch[k] for k in ("shard", "rows") if k in batch}


def decode_images(batch: dict, size: int) -> dict:
    """The CPU stage for images (shards.decode_images), keeping `passthrough` columns."""
    return shards.decode_images(batch, size) | passthrough(batch)


def prepare_texts(batch: dict, model_name: str) -> dict:
    """The CPU stage for texts (shards.prepare_texts), keeping `passthrough` columns."""
    return shards.prepare_texts(batch, model_name) | passthrough(batch)


def first_image(group):
    """map_groups UDF: of the group's rows with image bytes (else all of them), the one with
    the lowest (shard, key), keyed by the image id, with the group's row count."""
    import pyarrow as pa
    import pyarrow.compute as pc

    present = pc.is_valid(group.column("jpg")).to_numpy(zero_copy_only=False)
    shard = group.column("shard").to_numpy()
    keys = np.array(group.column("key").to_pylist(), dtype=object)
    candidates = np.flatnonzero(present) if present.any() else np.arange(len(group))
    first = min(candidates, key=lambda i: (shard[i], keys[i]))
    image_id = group.column("image_id")[int(first)].as_py()
    return pa.table({"key": pa.array([image_id], pa.string()),
                     "image_id": pa.array([image_id], pa.string()),
                     "jpg": group.column("jpg").slice(int(first), 1),
                     "shard": pa.array([int(shard[first])], pa.int64()),
                     "rows": pa.array([len(group)], pa.int64())})
