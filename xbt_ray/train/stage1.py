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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xbt_ray.config import ConfigError, ProjectorConfig, Stage1Config, TrainerConfig
from xbt_ray.data.cache import Embeddings
from xbt_ray.data.join import same_items
from xbt_ray.models.projector import Projector, procrustes
from xbt_ray.train import distributed
from xbt_ray.train.losses import add_noise, stage1_loss

log = logging.getLogger(__name__)
PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"
SUMMARY = "stage1.json"


def stage1_loop(config: dict) -> None:
    """Per-worker training loop."""
    import ray.train

    trainer: TrainerConfig = config["trainer"]
    recipe: Stage1Config = config["recipe"]
    rank, world = distributed.worker_setup(trainer, config["seed"])
    psi = Projector(**config["projector"])
    if config["init_linear"] is not None:
        psi.init_linear(torch.tensor(config["init_linear"]))
    start_epoch, done_steps = distributed.restore(psi)

    micro = recipe.batch_size // world
    steps_per_epoch = config["rows"] // recipe.batch_size
    engine = distributed.make_engine(
        psi, None, trainer, micro, recipe.lr, recipe.weight_decay,
        total_steps=steps_per_epoch * recipe.epochs, warmup_steps=steps_per_epoch // 2,
        start_step=steps_per_epoch * start_epoch)
    dtype = distributed.engine_dtype(engine)
    noise = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, recipe.epochs):
        totals = {"loss": 0.0, "info_nce": 0.0, "cosine": 0.0}
        steps = 0
        for batch in shard.iter_torch_batches(batch_size=micro, drop_last=True):
            a = add_noise(batch["a"].float(), recipe.noise_sigma, generator=noise)
            p = engine(a.to(engine.device, dtype)).float()
            loss, parts = stage1_loss(p, batch["b"].float().to(engine.device), recipe.temperature,
                                      recipe.cosine_weight)
            distributed.check_finite(loss, epoch, steps)
            engine.backward(loss)
            engine.step()
            totals["loss"] += loss.item()
            for name, value in parts.items():
                totals[name] += value.item()
            steps += 1
        metrics = {k: v / max(1, steps) for k, v in totals.items()} | {"epoch": epoch,
                                                                        "steps": steps}
        distributed.report_epoch(metrics, distributed.trained_state(engine), {"epoch": epoch,
                                 "optimizer_steps": done_steps + engine.global_steps}, rank)


def train_stage1(new_text: Embeddings, old_text: Embeddings, projector: ProjectorConfig,
                 recipe: Stage1Config, trainer: TrainerConfig, run_name: str,
                 storage_path: Path, out_dir: Path, seed: int, callbacks=None) -> Path:
    """Fit psi: new text space -> old text space; writes projector weights + config and a
    summary (`stage1.json`: rows read, skipped and joined per cache) to out_dir.

    Caption rows are linked across the two caches by key (xbt_ray.data.join); raises
    ConfigError if the caches barely overlap or share less than one batch of rows.
    """
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    old, new, joined = same_items(old_text, new_text, "stage 1 captions: old ~ new")
    keys, a, b = old.keys, new.emb, old.emb
    if len(keys) < recipe.batch_size:
        raise ConfigError(f"stage 1 needs at least one batch ({recipe.batch_size}) of caption "
                          f"pairs, the caches share {len(keys)}")
    log.info("stage 1: %d caption pairs, new dim %d -> old dim %d", len(keys), a.shape[1],
             b.shape[1])
    init = procrustes(torch.from_numpy(a), torch.from_numpy(b)).numpy() \
        if projector.procrustes_init else None
    table = pa.table({"a": ArrowTensorArray.from_numpy(a.astype(np.float32)),
                      "b": ArrowTensorArray.from_numpy(b.astype(np.float32))})
    shape = {"d_in": a.shape[1], "d_out": b.shape[1], "depth": projector.depth,
             "width": projector.width}
    result = distributed.fit(
        stage1_loop,
        {"trainer": trainer, "recipe": recipe, "seed": seed, "projector": shape,
         "init_linear": init, "rows": len(keys)},
        trainer, run_name=run_name, storage_path=storage_path,
        datasets={"train": ray.data.from_arrow(table).random_shuffle()}, callbacks=callbacks)
    weights, _ = distributed.load_result_checkpoint(result)
    save_projector(weights, shape, out_dir)
    summary = {"data": {"read": {"new_text": new_text.counts, "old_text": old_text.counts},
                        "joins": {"old_text~new_text": joined}, "rows_used": len(keys)}}
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
