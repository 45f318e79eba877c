"""Recipe: stage 2, cross-modal training on image-text pairs with the OLD MODEL ABSENT.

u = norm(psi(f_n^I(x; LoRA))), v = norm(psi(f_n^T(t))); loss = InfoNCE over the global batch
(all-gathered with gradient; rows sharing an image id are all positives), optionally + w *
stage-1 loss on cached text pairs. Only the new model is ever built here: `train_stage2` takes
no old-model config at all.

Objectives (`stage2.objective`): `faithful` (the paper) uses nothing of the old model;
`anchored` adds contrastive terms against CACHED old embeddings of the same training pairs
(written once by the embedding job), e.g. psi(new image) -> old caption, psi(new text) -> old
image: the exact targets of retrieval against an old gallery.

Modes (`stage2.mode`):
- `lora`: images stream through Ray Data (decode in a CPU stage) into the LoRA-adapted new image
  tower (and text tower with `lora.text_tower`); psi frozen unless `stage2.psi_lr > 0`.
- `psi-only` (ablation): psi alone on cached new image/text embeddings; no image forward passes.
Checkpoints hold only what was trained (adapters and/or psi), as safetensors.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from xbt_ray.config import LoraConfig, ModelConfig, Stage1Config, Stage2Config, TrainerConfig
from xbt_ray.data import paired, shards
from xbt_ray.models import clip, lora
from xbt_ray.models.projector import Projector
from xbt_ray.models.query_encoder import export_query_encoder
from xbt_ray.train import distributed
from xbt_ray.train.losses import add_noise, stage1_loss, stage2_loss
from xbt_ray.train.stage1 import NEW, OLD, caption_pairs, load_projector, save_projector

log = logging.getLogger(__name__)
ADAPTERS = "adapters.safetensors"
SUMMARY = "stage2.json"
QUERY_ENCODER = "query_encoder.safetensors"
# Roles (= paired-cache columns) of the cached pair embeddings stage 2 reads
NEW_IMAGES, NEW_TEXTS = "new_pair_images", "new_pair_texts"
OLD_IMAGES, OLD_TEXTS = "old_pair_images", "old_pair_texts"
# Text pairs each worker draws its regulariser batches from (read by the worker itself)
TEXT_REG_ROWS = 200_000


class AdaptedTowers(torch.nn.Module):
    """LoRA-adapted new model + psi: (images, tokens) -> (u, v), un-normalised, old space."""

    def __init__(self, clip_lora, psi: Projector, text_trainable: bool):
        super().__init__()
        self.clip = clip_lora
        self.psi = psi
        self.text_trainable = text_trainable

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        model = self.clip.base_model.model
        image_emb = model.encode_image(images, normalize=True)
        with torch.set_grad_enabled(self.text_trainable and torch.is_grad_enabled()):
            text_emb = model.encode_text(tokens, normalize=True)
        return self.psi(image_emb), self.psi(text_emb)


class ProjectorOnly(torch.nn.Module):
    """psi on cached new embeddings: (image emb, text emb) -> (u, v)."""

    def __init__(self, psi: Projector):
        super().__init__()
        self.psi = psi

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor):
        return self.psi(image_emb), self.psi(text_emb)


@dataclass(frozen=True)
class Stage2Job:
    """What every stage-2 worker gets (`stage2_loop`)."""

    trainer: TrainerConfig
    recipe: Stage2Config
    stage1: Stage1Config       # the text regulariser's noise, temperature and cosine weight
    lora: LoraConfig
    seed: int
    new_model: ModelConfig     # the only model stage 2 builds (mode lora)
    projector_shape: dict      # Projector(**projector_shape)
    projector_weights: dict    # stage 1's psi state dict (name -> tensor)
    text_pair_files: list[str] | None  # the regulariser's paired-cache files (text_weight > 0)
    rows: int                  # training rows per epoch


def _build_module(job: Stage2Job):
    recipe = job.recipe
    psi = Projector(**job.projector_shape)
    if not recipe.psi_from_scratch:
        psi.load_state_dict(job.projector_weights)
    psi.requires_grad_(recipe.psi_lr > 0)
    if recipe.mode == "psi-only":
        return ProjectorOnly(psi), None
    new_model, _ = clip.load_clip(job.new_model)  # the only model stage 2 ever builds
    new_model.logit_scale.requires_grad_(False)
    adapted = lora.add_lora(new_model, job.lora)
    return AdaptedTowers(adapted, psi, job.lora.text_tower), adapted


def anchor_targets(old_images: str | Path, old_texts: str | Path, out_dir: Path):
    """Cached old embeddings of each training caption, joined on the workers and written as a
    paired cache: its own old text embedding (by key) and its image's old embedding (by
    image_id)."""
    return paired.write_pairs({OLD_TEXTS: old_texts}, {OLD_IMAGES: old_images}, out_dir,
                              "anchored targets")


def stage2_loop(job: Stage2Job, reporting: distributed.Reporting) -> None:
    """Per-worker training loop."""
    import ray.train

    trainer, recipe = job.trainer, job.recipe
    rank, world = distributed.worker_setup(trainer, job.seed)
    module, adapted = _build_module(job)
    checksum_start = lora.base_checksum(adapted) if adapted is not None else None
    start_epoch, done_steps = distributed.restore(module)

    groups = [{"params": [p for n, p in module.named_parameters()
                          if p.requires_grad and not n.startswith("psi.")], "lr": recipe.lr},
              {"params": [p for p in module.psi.parameters() if p.requires_grad],
               "lr": recipe.psi_lr}]
    groups = [g for g in groups if g["params"]]
    trained_names = [n for n, p in module.named_parameters() if p.requires_grad]
    micro = recipe.batch_size // world
    steps_per_epoch = job.rows // recipe.batch_size
    engine = distributed.make_engine(
        module, groups, trainer, micro, recipe.lr, recipe.weight_decay,
        total_steps=steps_per_epoch * recipe.epochs, warmup_steps=max(1, steps_per_epoch // 4),
        start_step=steps_per_epoch * start_epoch)
    dtype = distributed.engine_dtype(engine)
    anchors = recipe.anchor_weights()
    text_pairs = None
    if job.text_pair_files:   # read by this worker, never through the driver
        text_pairs = paired.sample_rows(job.text_pair_files, [NEW, OLD], TEXT_REG_ROWS,
                                        job.seed * 1000 + rank)
    rng = torch.Generator().manual_seed(job.seed * 1000 + rank)
    preprocess = adapted.base_model.model.visual.preprocess_cfg if adapted is not None else None
    shard = ray.train.get_dataset_shard("train")
    progress = distributed.Progress(reporting, rank, steps_per_epoch, recipe.epochs, start_epoch,
                                    micro * world)
    for epoch in range(start_epoch, recipe.epochs):
        engine.train()
        for batch in distributed.epoch_batches(shard, micro, trainer, job.seed, epoch, rank):
            old_image = old_text = None
            if anchors:
                old_image, old_text = batch[OLD_IMAGES], batch[OLD_TEXTS]
            if recipe.mode == "psi-only":
                inputs = (batch[NEW_IMAGES], batch[NEW_TEXTS])
            else:
                images = clip.pixels_to_input(batch["pixels"].to(engine.device), preprocess)
                inputs = (images, batch["tokens"])
            u, v = engine(*(x.to(engine.device, dtype) if x.is_floating_point()
                            else x.to(engine.device) for x in inputs))
            loss, parts = stage2_loss(
                u.float(), v.float(), batch["image_code"].to(engine.device), recipe.temperature,
                recipe.pair_weight, anchors,
                *(None if t is None else t.to(engine.device, torch.float32)
                  for t in (old_image, old_text)))
            if recipe.text_weight > 0:
                idx = torch.randint(len(text_pairs[NEW]), (micro,), generator=rng).numpy()
                a = add_noise(torch.from_numpy(text_pairs[NEW][idx]), job.stage1.noise_sigma,
                              generator=rng)
                p = module.psi(a.to(engine.device, dtype)).float()
                parts["text_reg"], _ = stage1_loss(
                    p, torch.from_numpy(text_pairs[OLD][idx]).to(engine.device),
                    job.stage1.temperature, job.stage1.cosine_weight)
                loss = loss + recipe.text_weight * parts["text_reg"]
            distributed.check_finite(loss, epoch, progress.steps)
            engine.backward(loss)
            engine.step()
            progress.step(engine, loss=loss, **parts)
        metrics = progress.end_epoch(epoch)
        info = {"epoch": epoch, "optimizer_steps": done_steps + engine.global_steps,
                "resumed_from_step": done_steps,
                "models_built": job.new_model.name if adapted else None,
                "base_checksum_start": checksum_start,
                "base_checksum_end": lora.base_checksum(adapted) if adapted is not None else None}
        distributed.report_epoch(metrics, distributed.trained_state(engine, trained_names), info,
                                 rank)
    progress.close()


def train_stage2(new: ModelConfig, stage1_dir: Path, recipe: Stage2Config, lora_cfg: LoraConfig,
                 stage1: Stage1Config, trainer: TrainerConfig, run_name: str, storage_path: Path,
                 out_dir: Path, seed: int, pair_files: list[str] | None = None,
                 pair_embeddings: tuple[Path, Path] | None = None,
                 text_pairs: tuple[Path, Path] | None = None,
                 anchor_embeddings: tuple[Path, Path] | None = None,
                 export_encoder: bool = True) -> dict:
    """Run stage 2 and export the upgraded query encoder (unless `export_encoder` is off: a
    sweep trial keeps psi and the adapters only). Returns the summary.

    Inputs are files and cache directories, never rows: every join runs on the Ray Data
    workers (xbt_ray.data.paired) and is written once under out_dir before training starts.
    `pair_files`: image-text shards (mode lora). `pair_embeddings`: cache directories of the
    NEW image and text embeddings of the pairs (mode psi-only). `text_pairs`: (new text, old
    text) caches of the caption corpus, for the optional regulariser. `anchor_embeddings`: the
    CACHED old image and text embeddings of the pairs (objective anchored only): captions keyed
    like the pair rows, images by image id. There is deliberately no old-model argument: no old
    forward pass can happen here.
    """
    psi = load_projector(stage1_dir)
    shape = psi.config()
    anchored = bool(recipe.anchor_weights())
    if anchored and anchor_embeddings is None:
        raise ValueError("the anchored objective needs anchor_embeddings (cached old image and "
                         "text embeddings of the training pairs)")
    out_dir = Path(out_dir).absolute()
    joins: dict = {}
    text_pair_files = None
    if recipe.text_weight > 0:
        if text_pairs is None:
            raise ValueError("stage2.text_weight > 0 needs text_pairs (new and old text caches)")
        texts = caption_pairs(*text_pairs, out_dir / "text_pairs", "stage 2 text regulariser")
        joins["old_text~new_text"] = texts.counts["joins"][f"{OLD}~{NEW}"]
        text_pair_files = texts.files

    if recipe.mode == "psi-only":
        pairs = psi_only_pairs(pair_embeddings, anchor_embeddings if anchored else None, out_dir)
        joins |= pairs.counts["joins"]
        base = pairs.counts["read"][NEW_TEXTS]
        skipped = dict(base["skipped"])
        if base["rows_used"] > pairs.rows:
            skipped["unjoined"] = base["rows_used"] - pairs.rows
        counts = {"rows_in": base["rows_in"], "rows_used": pairs.rows, "skipped": skipped}
        columns = [NEW_IMAGES, NEW_TEXTS, "image_code"] + ([OLD_IMAGES, OLD_TEXTS]
                                                            if anchored else [])
        dataset = paired.training_dataset(pairs, columns, seed)
        rows = pairs.rows
    else:
        skip_log = out_dir / "skipped"
        shutil.rmtree(skip_log, ignore_errors=True)
        rows_in = shards.shard_rows(pair_files)
        files, not_anchored = pair_files, 0
        if anchored:  # each caption row carries its cached old targets from here on
            targets = anchor_targets(*anchor_embeddings, out_dir / "anchor_targets")
            joins |= targets.counts["joins"]
            files = paired.rows_with_targets(pair_files, targets, out_dir / "anchored_rows")
            not_anchored = rows_in - shards.shard_rows(files)
        carry = [OLD_IMAGES, OLD_TEXTS] if anchored else []
        dataset = shards.training_stream(
            files, shards.decode_training_pairs,
            {"size": clip.image_size(new.name), "model_name": new.name, "carry": carry},
            ["pixels", "tokens", "image_code"] + ([OLD_IMAGES, OLD_TEXTS] if anchored else []),
            skip_log, seed, carry=carry)
        rows = rows_in - not_anchored
    log.info("stage 2 (%s, %s%s): %d pairs, psi %s, LoRA %s", recipe.objective, recipe.mode,
             f", anchors {recipe.anchor_weights()}" if anchored else "", rows,
             "trained" if recipe.psi_lr > 0 else "frozen",
             "off" if recipe.mode == "psi-only" else lora.target_regex(lora_cfg))
    job = Stage2Job(trainer=trainer, recipe=recipe, stage1=stage1, lora=lora_cfg, seed=seed,
                    new_model=new, projector_shape=shape, projector_weights=psi.state_dict(),
                    text_pair_files=text_pair_files, rows=rows)
    result = distributed.fit(stage2_loop, job, trainer, run_name=run_name,
                             storage_path=storage_path, datasets={"train": dataset})
    if recipe.mode != "psi-only":
        skipped = shards.skip_counts(skip_log)
        if not_anchored:
            skipped["no_old_target"] = not_anchored
        counts = {"rows_in": rows_in, "rows_used": rows_in - sum(skipped.values()),
                  "skipped": skipped}
    counts["joins"] = joins
    weights, info = distributed.load_result_checkpoint(result)
    return _finish(weights, info, counts, psi, new, recipe, lora_cfg, out_dir, export_encoder)


def psi_only_pairs(pair_embeddings: tuple[Path, Path],
                   anchor_embeddings: tuple[Path, Path] | None, out_dir: Path):
    """The paired cache a psi-only stage 2 trains on (out_dir/pairs): the new image and text
    embeddings of each caption, and (anchored, `anchor_embeddings` given) its old targets."""
    images, captions = pair_embeddings
    text_caches, image_caches = {NEW_TEXTS: captions}, {NEW_IMAGES: images}
    if anchor_embeddings is not None:  # each caption's own old text, its image's old image
        image_caches[OLD_IMAGES], text_caches[OLD_TEXTS] = anchor_embeddings
    return paired.write_pairs(text_caches, image_caches, Path(out_dir).absolute() / "pairs",
                              "psi-only stage 2 pairs")


def _finish(weights, info, counts, psi, new, recipe, lora_cfg, out_dir: Path,
            export_encoder: bool) -> dict:
    """Write adapters + psi + summary, then merge and export the query encoder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    psi_weights = {k[4:]: v for k, v in weights.items() if k.startswith("psi.")}
    if psi_weights:
        psi.load_state_dict(psi_weights)
    save_projector(psi.state_dict(), psi.config(), out_dir)
    adapters = {k[5:]: v for k, v in weights.items() if k.startswith("clip.")}
    if adapters:
        save_file({k: v.contiguous() for k, v in adapters.items()}, str(out_dir / ADAPTERS))
    summary = {"objective": recipe.objective, "mode": recipe.mode, "new_model": asdict(new),
               "lora": asdict(lora_cfg),
               "stage2": asdict(recipe), "data": counts, "trained_tensors": sorted(weights),
               **{k: info.get(k) for k in ("models_built", "base_checksum_start",
                                           "base_checksum_end")}}
    if export_encoder:
        new_model, _ = clip.load_clip(new)
        if adapters:
            adapted = lora.add_lora(new_model, lora_cfg)
            result = adapted.load_state_dict(adapters, strict=False)
            if result.unexpected_keys or set(adapters) - set(lora.adapter_names(adapted)):
                raise RuntimeError("stage-2 adapters do not match the LoRA layout")
            new_model = lora.merged(adapted)
        export_query_encoder(new_model, new.name, psi.eval(), out_dir / QUERY_ENCODER,
                             info={"objective": recipe.objective, "mode": recipe.mode,
                                   "lora": asdict(lora_cfg)})
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    log.info("stage 2 done: %d trained tensors, query encoder %s", len(weights),
             out_dir / QUERY_ENCODER if export_encoder else "not exported")
    return summary
