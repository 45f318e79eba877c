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

from xbt_ray.config import EmbedConfig, ModelConfig
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

    if modality == "image":
        ds = shards.read_rows(files, ["key", "image_id", "jpg"])
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
    counts = {"rows_in": rows_in, "rows_embedded": rows_out, "skipped": dict(skipped)}
    assert rows_in == rows_out + sum(skipped.values())
    cache.mark_complete(directory, counts)
    log.info("embedded %s/%s with %s: rows in %d = embedded %d + skipped %d %s", modality,
             dataset_fp, model.name, rows_in, rows_out, sum(skipped.values()), dict(skipped))
    return EmbedResult(directory, counts, reused=False)
