"""Recipe: train a demo CLIP model from scratch on the demo world's image-text shards.

open_clip model + CLIP's contrastive loss (global batch, gathered with gradient), run by
Ray Train with a DeepSpeed engine. The demo world needs an "old" and a "new" model that differ
in strength the way real CLIP generations do; `configs/demo.yaml` sets their recipes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from xbt_ray.config import ClipTrainConfig, ModelConfig, TrainerConfig
from xbt_ray.data import shards
from xbt_ray.models import clip
from xbt_ray.train import distributed
from xbt_ray.train.losses import contrastive_loss

log = logging.getLogger(__name__)
# Part of the cached demo models' recipe: bump it when this file changes how models train.
RECIPE_VERSION = 6


@dataclass(frozen=True)
class ClipJob:
    """What every demo-CLIP worker gets (`clip_loop`)."""

    trainer: TrainerConfig
    recipe: ClipTrainConfig
    seed: int
    model_name: str   # a project-registered open_clip config (clip.register)
    rows: int         # image-text rows per epoch (shard footers / tar headers)


def steps_per_epoch(rows: int, recipe: ClipTrainConfig) -> int:
    """Optimizer steps per epoch in the learning-rate schedule and the progress lines: rows in
    (broken ones included: counted from shard footers, not from a pass over the data) // the
    global batch. An epoch takes usable rows // batch steps (`drop_last`), up to the broken
    share fewer."""
    return rows // recipe.batch_size


def clip_loop(job: ClipJob, reporting: distributed.Reporting) -> None:
    """Per-worker training loop: CLIP's symmetric InfoNCE over the global batch with the
    model's learned temperature (1 / logit_scale, clamped to <= 100 as in CLIP)."""
    import ray.train

    trainer, recipe = job.trainer, job.recipe
    rank, world = distributed.worker_setup(trainer, job.seed)
    clip.register(job.model_name)
    model = open_clip.create_model(job.model_name)  # a pretrained text tower loads its weights
    if recipe.lock_text_tower:
        model.lock_text_tower()
    start_epoch, done_steps = distributed.restore(model)

    micro = recipe.batch_size // world
    epoch_steps = steps_per_epoch(job.rows, recipe)
    engine = distributed.make_engine(
        model, None, trainer, micro, recipe.lr, recipe.weight_decay,
        total_steps=epoch_steps * recipe.epochs, warmup_steps=recipe.warmup_steps,
        start_step=epoch_steps * start_epoch)
    dtype = distributed.engine_dtype(engine)
    preprocess = model.visual.preprocess_cfg
    shard = ray.train.get_dataset_shard("train")
    progress = distributed.Progress(reporting, rank, epoch_steps, recipe.epochs, start_epoch,
                                    micro * world)
    for epoch in range(start_epoch, recipe.epochs):
        engine.train()
        for batch in distributed.epoch_batches(shard, micro, trainer, job.seed, epoch, rank):
            images = clip.pixels_to_input(batch["pixels"].to(engine.device), preprocess)
            image_f, text_f, scale = engine(images.to(dtype), batch["tokens"].to(engine.device))
            loss = contrastive_loss(image_f.float(), text_f.float(), 1 / scale.float())
            distributed.check_finite(loss, epoch, progress.steps)
            engine.backward(loss)
            engine.step()
            with torch.no_grad():
                engine.module.logit_scale.clamp_(0, math.log(100))
            progress.step(engine, loss=loss)
        metrics = progress.end_epoch(epoch)
        distributed.report_epoch(metrics, distributed.trained_state(engine), {"epoch": epoch,
                                 "optimizer_steps": done_steps + engine.global_steps,
                                 "resumed_from_step": done_steps}, rank)
    progress.close()


def train_demo_clip(model: ModelConfig, recipe: ClipTrainConfig, files: list[str],
                    trainer: TrainerConfig, out_path: Path, storage_path: Path, seed: int) -> dict:
    """Train `model.name` from scratch on image-text shards and save it to `out_path`.

    Returns the data counts (rows in / used / skipped by reason).
    """
    run_name = f"demo-clip-{out_path.stem}"
    skip_log = storage_path / run_name / "skipped"
    rows_in = shards.shard_rows(files)
    train_ds = shards.training_stream(
        files, shards.decode_pairs,
        {"size": clip.image_size(model.name), "model_name": model.name},
        ["pixels", "tokens"], skip_log, seed)
    if rows_in < recipe.batch_size:
        raise ValueError(f"only {rows_in} image-text rows, fewer than one batch of "
                         f"{recipe.batch_size}")
    result = distributed.fit(
        clip_loop,
        ClipJob(trainer=trainer, recipe=recipe, seed=seed, model_name=model.name, rows=rows_in),
        trainer, run_name=run_name, storage_path=storage_path, datasets={"train": train_ds},
        label=f"demo-clip-{model.name}")
    skipped = shards.skip_counts(skip_log)
    counts = {"rows_in": rows_in, "rows_used": rows_in - sum(skipped.values()),
              "skipped": skipped}
    log.info("demo CLIP %s data: rows in %d = used %d + skipped %s", model.name, rows_in,
             counts["rows_used"], skipped)
    weights, _ = distributed.load_result_checkpoint(result)
    # the architecture only: every weight comes from the checkpoint (no pretrained text load)
    trained = open_clip.create_model(model.name, pretrained_text=False)
    weights["logit_scale"] = weights["logit_scale"].reshape(trained.logit_scale.shape)
    trained.load_state_dict(weights)
    clip.save_clip(trained, out_path)
    return counts
