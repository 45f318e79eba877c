"""Recipe: stage 1, the projector psi fitted on text only.

Inputs are two embedding caches of the same caption corpus: new-model text embeddings `a` and
old-model text embeddings `b` (any cache following the contract, e.g. exported from a vector
store). psi's linear path optionally starts at the orthogonal Procrustes solution; training adds
Gaussian noise to `a` (the modality gap: psi must later accept image embeddings) and minimises
InfoNCE + w * (1 - cos) over the global batch, in Ray Train with a DeepSpeed engine.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xbt_ray.config import ConfigError, ProjectorConfig, Stage1Config, TrainerConfig
from xbt_ray.data import cache
from xbt_ray.data.paired import (
    PairedCache,
    cache_files,
    column_matrix,
    training_dataset,
    write_pairs,
)
from xbt_ray.models.projector import Projector, procrustes_from_covariance
from xbt_ray.train import distributed
from xbt_ray.train.losses import add_noise, stage1_loss

log = logging.getLogger(__name__)
PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"
SUMMARY = "stage1.json"
NEW, OLD = "new_text", "old_text"   # the paired cache's embedding columns


@dataclass(frozen=True)
class Stage1Job:
    """What every stage-1 worker gets (`stage1_loop`)."""

    trainer: TrainerConfig
    recipe: Stage1Config
    seed: int
    projector: dict                 # Projector(**projector): d_in, d_out, depth, width
    init_linear: np.ndarray | None  # (d_out, d_in) float32 start of psi's linear path, or None
    rows: int                       # caption pairs per epoch (the paired cache's footers)


def stage1_loop(job: Stage1Job, reporting: distributed.Reporting) -> None:
    """Per-worker training loop."""
    import ray.train

    trainer, recipe = job.trainer, job.recipe
    rank, world = distributed.worker_setup(trainer, job.seed)
    psi = Projector(**job.projector)
    if job.init_linear is not None:
        psi.init_linear(torch.tensor(job.init_linear))
    start_epoch, done_steps = distributed.restore(psi)

    micro = recipe.batch_size // world
    steps_per_epoch = job.rows // recipe.batch_size
    engine = distributed.make_engine(
        psi, None, trainer, micro, recipe.lr, recipe.weight_decay,
        total_steps=steps_per_epoch * recipe.epochs, warmup_steps=steps_per_epoch // 2,
        start_step=steps_per_epoch * start_epoch)
    dtype = distributed.engine_dtype(engine)
    noise = torch.Generator().manual_seed(job.seed * 1000 + rank)
    shard = ray.train.get_dataset_shard("train")
    progress = distributed.Progress(reporting, rank, steps_per_epoch, recipe.epochs, start_epoch,
                                    micro * world)
    for epoch in range(start_epoch, recipe.epochs):
        for batch in distributed.epoch_batches(shard, micro, trainer, job.seed, epoch, rank):
            a = add_noise(batch[NEW].float(), recipe.noise_sigma, generator=noise)
            p = engine(a.to(engine.device, dtype)).float()
            loss, parts = stage1_loss(p, batch[OLD].float().to(engine.device), recipe.temperature,
                                      recipe.cosine_weight)
            distributed.check_finite(loss, epoch, progress.steps)
            engine.backward(loss)
            engine.step()
            progress.step(engine, loss=loss, **parts)
        metrics = progress.end_epoch(epoch)
        distributed.report_epoch(metrics, distributed.trained_state(engine), {"epoch": epoch,
                                 "optimizer_steps": done_steps + engine.global_steps,
                                 "resumed_from_step": done_steps}, rank)
    progress.close()


def caption_pairs(new_text: str | Path, old_text: str | Path, out_dir: Path,
               role: str) -> PairedCache:
    """The caption pairs of a caption corpus embedded by both models (columns `new_text`,
    `old_text`), joined by key on the Ray Data workers and written under `out_dir`."""
    return write_pairs({OLD: old_text, NEW: new_text}, {}, out_dir, role)


def cross_covariance(paired: PairedCache) -> np.ndarray:
    """old^T new over every pair, (d_old, d_new) float64, summed block by block on the workers
    (only one d_old x d_new matrix per block reaches the driver): what Procrustes needs."""
    import ray.data

    def block_sum(table) -> dict:
        a = column_matrix(table, NEW).astype(np.float64)
        b = column_matrix(table, OLD).astype(np.float64)
        return {"sum": (b.T @ a)[None]}

    saved = paired.directory / "cross_covariance.npy"   # computed once per paired cache
    if saved.is_file():
        return np.load(saved)
    total = None
    stream = (ray.data.read_parquet(paired.files).select_columns([NEW, OLD])
              .map_batches(block_sum, batch_format="pyarrow", batch_size=None))
    stream.context.execution_options.preserve_order = True   # the same sum order every run
    for batch in stream.iter_batches(batch_size=1, batch_format="numpy"):
        total = batch["sum"][0] if total is None else total + batch["sum"][0]
    np.save(saved, total)
    return total


def train_stage1(new_text: str | Path, old_text: str | Path, projector: ProjectorConfig,
                 recipe: Stage1Config, trainer: TrainerConfig, run_name: str,
                 storage_path: Path, out_dir: Path, seed: int, callbacks=None) -> Path:
    """Fit psi: new text space -> old text space; writes projector weights + config and a
    summary (`stage1.json`: rows read, skipped and joined per cache) to out_dir.

    `new_text` / `old_text`: embedding cache directories of the same caption corpus (any cache
    following the contract). Captions are linked by key on the Ray Data workers and written once
    as the stage's paired cache (out_dir/pairs, `xbt_ray.data.paired`); training streams it with
    per-epoch file/block order and a local shuffle buffer. The driver holds no rows. Raises
    ConfigError if the caches barely overlap or share less than one batch of rows.
    """
    paired = caption_pairs(new_text, old_text, out_dir / "pairs", "stage 1 captions: old ~ new")
    if paired.rows < recipe.batch_size:
        raise ConfigError(f"stage 1 needs at least one batch ({recipe.batch_size}) of caption "
                          f"pairs, the caches share {paired.rows}")
    meta_new = cache.read_meta(Path(cache_files(new_text)[0]))
    meta_old = cache.read_meta(Path(cache_files(old_text)[0]))
    log.info("stage 1: %d caption pairs, new dim %d -> old dim %d", paired.rows, meta_new["dim"],
             meta_old["dim"])
    init = None
    if projector.procrustes_init:
        cov = torch.from_numpy(cross_covariance(paired))
        init = procrustes_from_covariance(cov).float().numpy()
    shape = {"d_in": meta_new["dim"], "d_out": meta_old["dim"], "depth": projector.depth,
             "width": projector.width}
    result = distributed.fit(
        stage1_loop,
        Stage1Job(trainer=trainer, recipe=recipe, seed=seed, projector=shape, init_linear=init,
                  rows=paired.rows),
        trainer, run_name=run_name, storage_path=storage_path,
        datasets={"train": training_dataset(paired, [NEW, OLD], seed)}, callbacks=callbacks)
    weights, _ = distributed.load_result_checkpoint(result)
    save_projector(weights, shape, out_dir)
    counts = paired.counts
    summary = {"data": {"read": {"new_text": counts["read"][NEW],
                                 "old_text": counts["read"][OLD]},
                        "joins": {"old_text~new_text": counts["joins"][f"{OLD}~{NEW}"]},
                        "rows_used": paired.rows}}
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return out_dir


def save_projector(weights: dict, shape: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / PROJECTOR_WEIGHTS))
    (out_dir / PROJECTOR_CONFIG).write_text(json.dumps(shape))


def load_projector(out_dir: Path) -> Projector:
    shape = json.loads((out_dir / PROJECTOR_CONFIG).read_text())
    psi = Projector(**shape)
    psi.load_state_dict(load_file(str(out_dir / PROJECTOR_WEIGHTS)))
    return psi.eval()


@torch.no_grad()
def project(psi: Projector, emb: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """norm(psi(emb)) in chunks: new-space embeddings -> old space."""
    out = []
    for start in range(0, len(emb), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(emb[start:start + batch_size], np.float32))
        out.append(torch.nn.functional.normalize(psi(x), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, psi.d_out), np.float32)
