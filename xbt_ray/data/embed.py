"""The embedding job: shards -> CPU stage -> encoder actors -> write stage -> embedding cache.

Ray Data reads raw rows (each tagged with its input shard), a CPU stage decodes/validates
(images) or validates/tokenises (text), a pool of encoder actors runs the open_clip tower, and a
write stage on the workers writes the cache parts and returns counts by shard and skip reason:
no embedding passes through the job driver. Progress is kept per input shard, so a job that
dies part-way resumes where it stopped; a complete cache directory for the same model and data
is reused instead of re-encoding.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xbt_ray.config import EmbedConfig, ModelConfig
from xbt_ray.data import cache, paired, shards
from xbt_ray.data.embed_stages import (
    decode_images,
    drop_shards,
    first_image,
    passthrough,
    prepare_texts,
    write_embedded,
)
from xbt_ray.models import clip
from xbt_ray.models.query_encoder import encoder_identity, load_encoder

log = logging.getLogger(__name__)
MODALITIES = ("image", "text")


class Encoder:
    """Ray Data class UDF: one open_clip tower per actor, normalised float32 embeddings out.

    The tower runs at `precision` (`embed.precision`: auto | fp32 | bf16 | fp16, resolved on
    the actor's device by clip.resolve_precision; fp16 on a CPU actor is a ConfigError) under
    torch.autocast; its output is normalised again in float32. A batch holds `key`,
    `image_id`, `skip_reason` (str; "" = valid) and `pixels` (B, H, W, 3) uint8 or `tokens`
    (B, context) int64; out come `key`, `image_id`, `skip_reason`, `emb` (B, dim) float32 with
    zero rows where a row was skipped, and the columns `passthrough` keeps.
    """

    def __init__(self, model: ModelConfig, modality: str, threads: int, precision: str = "auto"):
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = clip.resolve_precision(precision, self.device)
        self.model, self.dim = load_encoder(model, device=self.device)
        self.modality = modality

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        valid = batch["skip_reason"] == ""
        with clip.encoder_autocast(self.precision, self.device):
            if self.modality == "image":
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][valid]))
                x = clip.pixels_to_input(pixels.to(self.device), self.model.visual.preprocess_cfg)
                feats = self.model.encode_image(x, normalize=True)
            else:
                tokens = torch.from_numpy(np.ascontiguousarray(batch["tokens"][valid]))
                feats = self.model.encode_text(tokens.to(self.device), normalize=True)
        emb = np.zeros((len(valid), self.dim), dtype=np.float32)
        emb[valid] = F.normalize(feats.float(), dim=-1).cpu().numpy()
        return {"key": batch["key"], "image_id": batch["image_id"], "emb": emb,
                "skip_reason": batch["skip_reason"], **passthrough(batch)}


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


def encoder_precision(cfg: EmbedConfig) -> str:
    """The precision the encoder actors run at (fp32 | bf16 | fp16): `embed.precision`, or
    (auto) fp32 on CPU actors and, on GPU actors, what clip.resolve_precision says on one GPU of
    the cluster (asked once per driver process: the driver may have no GPU)."""
    gpus = encoder_gpus(cfg)
    if cfg.precision != "auto" or gpus == 0:
        return clip.resolve_precision(cfg.precision, "cuda" if gpus > 0 else "cpu")
    return _gpu_auto_precision(gpus)


@functools.cache
def _gpu_auto_precision(num_gpus: float) -> str:
    import ray

    return ray.get(ray.remote(num_gpus=num_gpus)(clip.resolve_precision).remote("auto", "cuda"))


def encoder_fingerprint(model: ModelConfig, cfg: EmbedConfig) -> str:
    """Names the encoder's embedding cache directory: the model's fingerprint and the precision
    its towers ran at, so that caches are never reused across precisions."""
    return f"{clip.model_fingerprint(model)}-{encoder_precision(cfg)}"


def embed_shards(files: list[str], modality: str, model: ModelConfig, cache_root: str | Path,
                 cfg: EmbedConfig) -> EmbedResult:
    """Embed one modality of a set of shards with one model into the cache (or reuse it).

    The workers write the cache: a write stage after the encoder actors writes each block's
    rows as `part-<shard>-<id>.parquet` (the contract's schema and metadata) and returns only
    counts, which the driver sums per input shard. When every row of a shard is written, its
    counts go to `_shards/<shard>.json`; a re-submitted job keeps those shards' parts and embeds
    only the shards without one (parts of an interrupted shard are deleted first). Rows in =
    embedded + deduplicated + skipped, per shard and over the corpus; `_SUCCESS.json` is written
    once every shard is done and the keys are checked unique (ConfigError otherwise; images
    grouped by `image_id` are unique by construction and not checked again).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    dataset_fp = shards.dataset_fingerprint(files)
    directory = cache.cache_path(cache_root, encoder_fingerprint(model, cfg), dataset_fp, modality)
    done = cache.completed_counts(directory)
    if done is not None:
        log.info("embedding cache hit: %s (%d rows, reused)", directory, done["rows_embedded"])
        return EmbedResult(directory, done, reused=True)
    finished = finished_shards(directory)
    for part in directory.glob("part-*.parquet"):   # parts of shards that did not finish
        if shard_of_part(part) not in finished:
            part.unlink()
    dedup = modality == "image" and has_image_ids(files)
    columns = ["key", "image_id", "jpg" if modality == "image" else "txt"]
    pending = [i for i in range(len(files)) if i not in finished]
    if dedup:   # captions of one image may sit in any shard: group over all of them
        ds = one_row_per_image(shards.read_rows(files, columns, shard_of=files))
        expected = shard_sizes(ds)
        if finished:
            ds = ds.map_batches(drop_shards, fn_kwargs={"done": sorted(finished)},
                                batch_format="pyarrow", batch_size=None)
    else:
        # every shard done (a job stopped after its last shard, before the key check): no read
        ds = (shards.read_rows([files[i] for i in pending], columns, shard_of=files)
              if pending else None)
        expected = {i: (n, n) for i, n in enumerate(shards.rows_per_shard(files))}
    log.info("embedding %s/%s with %s: %d shards, %d already done, %d to embed", modality,
             dataset_fp, model.name, len(files), len(finished), len(pending))
    name, dim = encoder_identity(model)
    meta = cache.make_meta(name, clip.pretrained_id(model), dim, dataset_fp, modality)
    for i in pending:   # shards with nothing to embed (empty, or every image grouped elsewhere)
        if expected.get(i, (0, 0))[0] == 0:
            finished[i] = _mark_shard(directory, i, {"rows_in": expected.get(i, (0, 0))[1],
                                                     "rows_embedded": 0, "skipped": {}})
    if any(i not in finished for i in pending):
        _embed_pending(ds, modality, model, cfg, directory, meta, expected, finished)
    missing = [files[i] for i in range(len(files)) if i not in finished]
    if missing:
        raise RuntimeError(f"embedding job ended with {len(missing)} shards incomplete (e.g. "
                           f"{missing[0]}); re-submit it to embed them")
    counts = _total(list(finished.values()))
    if not dedup:   # one row per image id (the group-by's key) is unique by construction
        refuse_duplicate_keys(directory, files)
    cache.mark_complete(directory, counts)
    log.info("embedded %s/%s with %s: rows in %d = embedded %d + deduplicated %d (rows of an "
             "image already embedded) + skipped %d %s", modality, dataset_fp, model.name,
             counts["rows_in"], counts["rows_embedded"], counts["deduplicated"],
             sum(counts["skipped"].values()), counts["skipped"])
    return EmbedResult(directory, counts, reused=False)


def _embed_pending(ds, modality, model, cfg, directory, meta, expected, finished) -> None:
    """Run the CPU stage, the encoder actors and the write stage; sum the write stage's counts
    per shard and mark each shard done as its last rows are written."""
    import ray.data

    if modality == "image":
        ds = ds.map_batches(decode_images, fn_kwargs={"size": clip.image_size(model.name)},
                            batch_size=cfg.batch_size, num_cpus=shards.CPU_STAGE_NUM_CPUS)
    else:
        ds = ds.map_batches(prepare_texts, fn_kwargs={"model_name": model.name},
                            batch_size=cfg.batch_size, num_cpus=shards.CPU_STAGE_NUM_CPUS)
    ds = ds.map_batches(
        Encoder,
        fn_constructor_kwargs={"model": model, "modality": modality,
                               "threads": encoder_threads(cfg),
                               "precision": encoder_precision(cfg)},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        num_cpus=cfg.actor_num_cpus,
        num_gpus=encoder_gpus(cfg),
    )
    ds = ds.map_batches(write_embedded, fn_kwargs={"directory": str(directory), "meta": meta,
                                                   "dtype": cfg.dtype},
                        batch_size=cfg.rows_per_part, num_cpus=shards.CPU_STAGE_NUM_CPUS)
    progress: dict[int, dict] = {}
    for row in ds.iter_rows():   # one small row per (block, shard): counts only
        i = int(row["shard"])
        got = progress.setdefault(i, {"items": 0, "rows_in": 0, "rows_embedded": 0,
                                      "skipped": Counter()})
        got["items"] += int(row["items"])
        got["rows_in"] += int(row["rows_in"])
        got["rows_embedded"] += int(row["rows_embedded"])
        got["skipped"].update(json.loads(row["skipped"]))
        if got["items"] == expected[i][0]:
            finished[i] = _mark_shard(directory, i, {
                "rows_in": got["rows_in"], "rows_embedded": got["rows_embedded"],
                "skipped": dict(got["skipped"])})


SHARDS_DIR = "_shards"


def finished_shards(directory: Path) -> dict[int, dict]:
    """{shard index: its counts} of the shards an earlier run of this job finished."""
    return {int(p.stem): json.loads(p.read_text())
            for p in sorted((Path(directory) / SHARDS_DIR).glob("*.json"))}


def shard_of_part(path: Path) -> int | None:
    """The input shard a cache part was written for (`part-<shard>-<id>.parquet`), or None."""
    fields = path.stem.split("-")
    return int(fields[1]) if len(fields) == 3 and fields[1].isdigit() else None


def _mark_shard(directory: Path, index: int, counts: dict) -> dict:
    counts = {"rows_in": counts["rows_in"], "rows_embedded": counts["rows_embedded"],
              "deduplicated": counts["rows_in"] - counts["rows_embedded"]
              - sum(counts["skipped"].values()), "skipped": counts["skipped"]}
    marker = Path(directory) / SHARDS_DIR / f"{index:05d}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(counts))
    tmp.rename(marker)   # atomic: a marker is whole or absent
    return counts


def _total(per_shard: list[dict]) -> dict:
    """The corpus's counts: the sum of its shards'."""
    total = {"rows_in": 0, "rows_embedded": 0, "deduplicated": 0, "skipped": Counter()}
    for c in per_shard:
        for k in ("rows_in", "rows_embedded", "deduplicated"):
            total[k] += c[k]
        total["skipped"].update(c["skipped"])
    total["skipped"] = dict(total["skipped"])
    assert total["rows_in"] == (total["rows_embedded"] + total["deduplicated"]
                                + sum(total["skipped"].values()))
    return total


def has_image_ids(files: list[str]) -> bool:
    """Whether the shards carry an `image_id` column (COCO / Flickr layout), read from the first
    parquet footer; webdataset tars and LAION-layout parquet have one image per row."""
    import pyarrow.parquet as pq

    return files[0].endswith(".parquet") and "image_id" in pq.read_schema(files[0]).names


def one_row_per_image(ds):
    """Image-text rows -> one row per image id, so each image is decoded and encoded once
    (COCO / Flickr layout: one row per caption, several rows per image). The row's key becomes
    the image id, which is what caption rows name in their `image_id`; `rows` is the group's
    row count and `shard` the lowest shard index holding one of its rows with image bytes (so
    a rerun assigns every image to the same shard). Materialised: the per-shard sizes need the
    grouping to have run; the blocks stay in the object store (spilled to disk when large)."""
    return (ds.groupby("image_id", num_partitions=paired.shuffle_partitions())
            .map_groups(first_image, batch_format="pyarrow").materialize())


def shard_sizes(grouped) -> dict[int, tuple[int, int]]:
    """{shard: (images, rows they stand for)} of a `one_row_per_image` dataset, aggregated on
    the workers (one small row per shard reaches the driver)."""
    from ray.data.aggregate import Count, Sum

    table = (grouped.groupby("shard", num_partitions=paired.shuffle_partitions())
             .aggregate(Count(), Sum("rows")).take_all())
    return {int(r["shard"]): (int(r["count()"]), int(r["sum(rows)"])) for r in table}


def refuse_duplicate_keys(directory: Path, files: list[str]) -> None:
    """A cache with a repeated key (e.g. two download runs that reuse keys) is never marked
    complete: one-line ConfigError. Checked with Ray Data over the written key column."""
    written = sorted(str(p) for p in directory.glob("part-*.parquet"))
    if not written:
        return
    shown = ", ".join(Path(f).name for f in files[:3]) + (" ..." if len(files) > 3 else "")
    paired.refuse_duplicate_keys(
        written, f"shards {shown} ({len(files)} files), e.g. two download runs that reuse keys "
        f"({directory} is left incomplete),")
