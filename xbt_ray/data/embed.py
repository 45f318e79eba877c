"""The embedding job: shards -> CPU stage -> encoder actors -> embedding cache.

Ray Data reads raw rows, a CPU stage decodes/validates (images) or validates/tokenises (text),
a pool of encoder actors runs the open_clip tower, and the driver streams the results into the
cache directory, counting skipped rows by reason. A complete cache directory for the same model
and data is reused instead of re-encoding.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xbt_ray.config import ConfigError, EmbedConfig, ModelConfig
from xbt_ray.data import cache, shards
from xbt_ray.models import clip
from xbt_ray.models.query_encoder import encoder_identity, load_encoder

log = logging.getLogger(__name__)
MODALITIES = ("image", "text")


class Encoder:
    """Ray Data class UDF: one open_clip tower per actor, normalised embeddings out."""

    def __init__(self, model: ModelConfig, modality: str, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.dim = load_encoder(model, device=self.device)
        self.modality = modality

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        valid = batch["skip_reason"] == ""
        if self.modality == "image":
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][valid]))
            x = clip.pixels_to_input(pixels.to(self.device), self.model.visual.preprocess_cfg)
            feats = self.model.encode_image(x, normalize=True)
        else:
            tokens = torch.from_numpy(np.ascontiguousarray(batch["tokens"][valid]))
            feats = self.model.encode_text(tokens.to(self.device), normalize=True)
        emb = np.zeros((len(valid), self.dim), dtype=np.float32)
        emb[valid] = feats.float().cpu().numpy()
        return {"key": batch["key"], "image_id": batch["image_id"], "emb": emb,
                "skip_reason": batch["skip_reason"]}


@dataclass
class EmbedResult:
    directory: Path
    counts: dict
    reused: bool


def encoder_threads(cfg: EmbedConfig) -> int:
    """torch threads of one encoder actor: `embed.encoder_threads`, else its CPUs rounded up."""
    return cfg.encoder_threads or max(1, math.ceil(cfg.actor_num_cpus))


def encoder_gpus(cfg: EmbedConfig) -> float:
    """GPUs per encoder actor: `embed.num_gpus`, or (-1, auto) one when the CLUSTER has GPUs.

    Decided from the cluster's resources, not the driver's: a job driver on a GPU-less head node
    must still put its encoders on the GPU workers.
    """
    import ray

    if cfg.num_gpus >= 0:
        return cfg.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def embed_shards(files: list[str], modality: str, model: ModelConfig, cache_root: str | Path,
                 cfg: EmbedConfig, rows_per_file: int = 50_000) -> EmbedResult:
    """Embed one modality of a set of shards with one model into the cache (or reuse it)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    dataset_fp = shards.dataset_fingerprint(files)
    directory = cache.cache_path(cache_root, clip.model_fingerprint(model), dataset_fp, modality)
    done = cache.completed_counts(directory)
    if done is not None:
        log.info("embedding cache hit: %s (%d rows, reused)", directory, done["rows_embedded"])
        return EmbedResult(directory, done, reused=True)
    for stale in directory.glob("part-*.parquet"):
        stale.unlink()

    deduplicated = 0
    if modality == "image":
        ds = shards.read_rows(files, ["key", "image_id", "jpg"])
        if has_image_ids(files):
            ds, deduplicated = one_row_per_image(ds, partitions(len(files)))
        ds = ds.map_batches(shards.decode_images, fn_kwargs={"size": clip.image_size(model.name)},
                            batch_size=cfg.batch_size, num_cpus=shards.CPU_STAGE_NUM_CPUS)
    else:
        ds = shards.read_rows(files, ["key", "image_id", "txt"])
        ds = ds.map_batches(shards.prepare_texts, fn_kwargs={"model_name": model.name},
                            batch_size=cfg.batch_size, num_cpus=shards.CPU_STAGE_NUM_CPUS)
    import ray.data

    ds = ds.map_batches(
        Encoder,
        fn_constructor_kwargs={"model": model, "modality": modality,
                               "threads": encoder_threads(cfg)},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        num_cpus=cfg.actor_num_cpus,
        num_gpus=encoder_gpus(cfg),
    )

    name, dim = encoder_identity(model)
    meta = cache.make_meta(name, clip.pretrained_id(model), dim, dataset_fp, modality)
    skipped: Counter = Counter()
    rows_in = rows_out = part = 0
    for batch in ds.iter_batches(batch_size=rows_per_file, batch_format="numpy"):
        reasons = batch["skip_reason"]
        valid = reasons == ""
        rows_in += len(reasons)
        skipped.update(r for r in reasons if r)
        if valid.any():
            cache.write_part(directory, part, batch["key"][valid], batch["image_id"][valid],
                             batch["emb"][valid], meta, cfg.dtype)
            part += 1
            rows_out += int(valid.sum())
    rows_in += deduplicated
    counts = {"rows_in": rows_in, "rows_embedded": rows_out, "deduplicated": deduplicated,
              "skipped": dict(skipped)}
    assert rows_in == rows_out + deduplicated + sum(skipped.values())
    refuse_duplicate_keys(directory, files)
    cache.mark_complete(directory, counts)
    log.info("embedded %s/%s with %s: rows in %d = embedded %d + deduplicated %d (rows of an "
             "image already embedded) + skipped %d %s", modality, dataset_fp, model.name,
             rows_in, rows_out, deduplicated, sum(skipped.values()), dict(skipped))
    return EmbedResult(directory, counts, reused=False)


def has_image_ids(files: list[str]) -> bool:
    """Whether the shards carry an `image_id` column (COCO / Flickr layout), read from the first
    parquet footer; webdataset tars and LAION-layout parquet have one image per row."""
    import pyarrow.parquet as pq

    return files[0].endswith(".parquet") and "image_id" in pq.read_schema(files[0]).names


def partitions(n_files: int) -> int:
    """Shuffle partitions of a group-by over `n_files` shards: one per shard, within [1, 256]
    (Ray Data's default of 200 hash-shuffle aggregators dwarfs small jobs on a small machine)."""
    return max(1, min(256, n_files))


def one_row_per_image(ds, num_partitions: int):
    """Image-text rows -> one row per image id, so each image is decoded and encoded once
    (COCO / Flickr layout: one row per caption, several rows per image). The row's key becomes
    the image id, which is what caption rows name in their `image_id`. Returns (dataset, rows
    deduplicated); the dataset is materialised (the count needs the grouping to have run)."""
    grouped = (ds.groupby("image_id", num_partitions=num_partitions)
               .map_groups(_first_image, batch_format="pyarrow").materialize())
    rows = grouped.sum("rows") or 0
    return grouped.drop_columns(["rows"]), int(rows) - grouped.count()


def _first_image(group):
    """map_groups UDF: the group's first row with image bytes (else its first row), keyed by
    the image id, with the group's row count."""
    import pyarrow as pa
    import pyarrow.compute as pc

    present = pc.is_valid(group.column("jpg")).to_numpy(zero_copy_only=False)
    first = int(present.argmax()) if present.any() else 0
    image_id = group.column("image_id")[first]
    return pa.table({"key": pa.array([image_id.as_py()], pa.string()),
                     "image_id": pa.array([image_id.as_py()], pa.string()),
                     "jpg": group.column("jpg").slice(first, 1),
                     "rows": pa.array([len(group)], pa.int64())})


def refuse_duplicate_keys(directory: Path, files: list[str]) -> None:
    """A cache with a repeated key (e.g. two download runs that reuse keys) is never marked
    complete: one-line ConfigError. Checked with Ray Data over the written key column."""
    import ray.data

    written = sorted(str(p) for p in directory.glob("part-*.parquet"))
    if not written:
        return
    repeated = (ray.data.read_parquet(written, columns=["key"])
                .groupby("key", num_partitions=partitions(len(written))).count()
                .filter(lambda row: row["count()"] > 1))
    sample = repeated.take(1)
    if sample:
        n = repeated.count()
        shown = ", ".join(Path(f).name for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise ConfigError(
            f"shards {shown} ({len(files)} files) hold {n} duplicate keys (e.g. "
            f"{sample[0]['key']!r}), e.g. two download runs that reuse keys; keys must be unique "
            f"across shards: deduplicate or re-key them. {directory} is left incomplete")
