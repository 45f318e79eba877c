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

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from xbt_ray.config import LoraConfig, ModelConfig, Stage1Config, Stage2Config, TrainerConfig
from xbt_ray.data import shards
from xbt_ray.data.cache import Embeddings
from xbt_ray.data.join import pairs, same_items
from xbt_ray.models import clip, lora
from xbt_ray.models.projector import Projector
from xbt_ray.models.query_encoder import export_query_encoder
from xbt_ray.train import distributed
from xbt_ray.train.losses import add_noise, stage1_loss, stage2_loss
from xbt_ray.train.stage1 import load_projector, save_projector

log = logging.getLogger(__name__)
ADAPTERS = "adapters.safetensors"
SUMMARY = "stage2.json"
QUERY_ENCODER = "query_encoder.safetensors"


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


def _build_module(config: dict):
    recipe: Stage2Config = config["recipe"]
    psi = Projector(**config["projector_shape"])
    if not recipe.psi_from_scratch:
        psi.load_state_dict(config["projector_weights"])
    psi.requires_grad_(recipe.psi_lr > 0)
    if recipe.mode == "psi-only":
        return ProjectorOnly(psi), None
    new_model, _ = clip.load_clip(config["new_model"])  # the only model stage 2 ever builds
    new_model.logit_scale.requires_grad_(False)
    adapted = lora.add_lora(new_model, config["lora"])
    return AdaptedTowers(adapted, psi, config["lora"].text_tower), adapted


def image_codes(image_ids) -> np.ndarray:
    """Stable int64 codes of image ids (equal ids -> equal codes), for multi-positive losses."""
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(),
                                    "little", signed=True) for i in image_ids], dtype=np.int64)


def decode_training_pairs(batch: dict, size: int, model_name: str,
                          target_keys: np.ndarray | None) -> dict:
    """Ray Data UDF: decode pairs, add `image_code`, and (anchored) `target`, the row of the
    pair's cached old embeddings in `target_keys` (sorted); a pair without one is skipped."""
    out = shards.decode_pairs(batch, size, model_name)
    out["image_code"] = image_codes(batch["image_id"])
    if target_keys is not None:
        keys = np.asarray(batch["key"]).astype(str)
        pos = np.searchsorted(target_keys, keys).clip(max=max(0, len(target_keys) - 1))
        found = target_keys[pos] == keys
        out["target"] = np.where(found, pos, -1).astype(np.int64)
        out["skip_reason"] = np.where((out["skip_reason"] == "") & ~found, "no_old_target",
                                      out["skip_reason"])
    return out


def anchor_targets(old_images: Embeddings, old_texts: Embeddings) -> tuple[dict, dict]:
    """Cached old embeddings of each training caption, sorted by caption key: its own old text
    embedding (by key) and its image's old embedding (by image_id). Returns (targets, join
    counts)."""
    joined = pairs({"old_pair_texts": old_texts}, {"old_pair_images": old_images},
                   "anchored targets")
    keys = joined.keys.astype(str)
    order = np.argsort(keys)
    return ({"keys": keys[order], "image": joined.images[0][order],
             "text": joined.texts[0][order]}, joined.counts)


def stage2_loop(config: dict) -> None:
    """Per-worker training loop."""
    import ray.train

    trainer: TrainerConfig = config["trainer"]
    recipe: Stage2Config = config["recipe"]
    rank, world = distributed.worker_setup(trainer, config["seed"])
    module, adapted = _build_module(config)
    checksum_start = lora.base_checksum(adapted) if adapted is not None else None
    start_epoch, done_steps = distributed.restore(module)

    groups = [{"params": [p for n, p in module.named_parameters()
                          if p.requires_grad and not n.startswith("psi.")], "lr": recipe.lr},
              {"params": [p for p in module.psi.parameters() if p.requires_grad],
               "lr": recipe.psi_lr}]
    groups = [g for g in groups if g["params"]]
    trained_names = [n for n, p in module.named_parameters() if p.requires_grad]
    micro = recipe.batch_size // world
    steps_per_epoch = config["rows"] // recipe.batch_size
    engine = distributed.make_engine(
        module, groups, trainer, micro, recipe.lr, recipe.weight_decay,
        total_steps=steps_per_epoch * recipe.epochs, warmup_steps=max(1, steps_per_epoch // 4),
        start_step=steps_per_epoch * start_epoch)
    dtype = distributed.engine_dtype(engine)
    anchors = recipe.anchor_weights()
    targets = config["anchor_targets"]
    if targets is not None and not isinstance(targets, dict):
        targets = ray.get(targets)  # an ObjectRef: shared by the workers of one node
    text_pairs = config["text_pairs"]
    rng = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    preprocess = adapted.base_model.model.visual.preprocess_cfg if adapted is not None else None
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, recipe.epochs):
        engine.train()
        totals: dict[str, float] = {}
        steps = 0
        for batch in shard.iter_torch_batches(batch_size=micro, drop_last=True):
            old_image = old_text = None
            if recipe.mode == "psi-only":
                inputs = (batch["image_emb"], batch["text_emb"])
                if anchors:
                    old_image, old_text = batch["old_image_emb"], batch["old_text_emb"]
            else:
                images = clip.pixels_to_input(batch["pixels"].to(engine.device), preprocess)
                inputs = (images, batch["tokens"])
                if anchors:
                    rows = batch["target"].numpy()
                    old_image = torch.from_numpy(targets["image"][rows])
                    old_text = torch.from_numpy(targets["text"][rows])
            u, v = engine(*(x.to(engine.device, dtype) if x.is_floating_point()
                            else x.to(engine.device) for x in inputs))
            loss, parts = stage2_loss(
                u.float(), v.float(), batch["image_code"].to(engine.device), recipe.temperature,
                recipe.pair_weight, anchors,
                *(None if t is None else t.to(engine.device, torch.float32)
                  for t in (old_image, old_text)))
            text_reg = torch.zeros(())
            if recipe.text_weight > 0:
                idx = torch.randint(len(text_pairs["a"]), (micro,), generator=rng)
                a = add_noise(torch.from_numpy(text_pairs["a"][idx.numpy()]),
                              config["stage1"].noise_sigma, generator=rng)
                p = module.psi(a.to(engine.device, dtype)).float()
                text_reg, _ = stage1_loss(p, torch.from_numpy(text_pairs["b"][idx.numpy()]),
                                          config["stage1"].temperature,
                                          config["stage1"].cosine_weight)
                loss = loss + recipe.text_weight * text_reg
            distributed.check_finite(loss, epoch, steps)
            engine.backward(loss)
            engine.step()
            for name, value in {"loss": loss, "text_reg": text_reg, **parts}.items():
                totals[name] = totals.get(name, 0.0) + value.item()
            steps += 1
        metrics = {k: v / max(1, steps) for k, v in totals.items()} | {"epoch": epoch,
                                                                        "steps": steps}
        info = {"epoch": epoch, "optimizer_steps": done_steps + engine.global_steps,
                "models_built": config["new_model"].name if adapted else None,
                "base_checksum_start": checksum_start,
                "base_checksum_end": lora.base_checksum(adapted) if adapted is not None else None}
        distributed.report_epoch(metrics, distributed.trained_state(engine, trained_names), info,
                                 rank)


def train_stage2(new: ModelConfig, stage1_dir: Path, recipe: Stage2Config, lora_cfg: LoraConfig,
                 stage1: Stage1Config, trainer: TrainerConfig, run_name: str, storage_path: Path,
                 out_dir: Path, seed: int, pair_files: list[str] | None = None,
                 pair_embeddings: tuple[Embeddings, Embeddings] | None = None,
                 text_pairs: tuple[Embeddings, Embeddings] | None = None,
                 anchor_embeddings: tuple[Embeddings, Embeddings] | None = None,
                 export_encoder: bool = True) -> dict:
    """Run stage 2 and export the upgraded query encoder (unless `export_encoder` is off: a
    sweep trial keeps psi and the adapters only). Returns the summary.

    `pair_files`: image-text shards (mode lora). `pair_embeddings`: cached NEW image and text
    embeddings of the pairs (mode psi-only). `text_pairs`: cached (new text, old text) from
    stage 1, for the optional regulariser. `anchor_embeddings`: the CACHED old image and text
    embeddings of the pairs (objective anchored only): captions keyed like the pair rows, images
    by image id, linked through xbt_ray.data.join. There is
    deliberately no old-model argument: no old forward pass can happen here.
    """
    import ray
    import ray.data

    psi = load_projector(stage1_dir)
    shape = psi.config()
    anchored = bool(recipe.anchor_weights())
    if anchored and anchor_embeddings is None:
        raise ValueError("the anchored objective needs anchor_embeddings (cached old image and "
                         "text embeddings of the training pairs)")
    joins: dict = {}
    targets = None
    if anchored and recipe.mode != "psi-only":
        targets, joins = anchor_targets(*anchor_embeddings)
    loop_config = {"trainer": trainer, "recipe": recipe, "stage1": stage1, "lora": lora_cfg,
                   "seed": seed, "new_model": new, "projector_shape": shape,
                   "projector_weights": psi.state_dict(), "text_pairs": None,
                   "anchor_targets": None}
    if recipe.text_weight > 0:
        new_text, old_text = text_pairs
        old_rows, new_rows, joins["old_text~new_text"] = same_items(
            old_text, new_text, "stage 2 text regulariser")
        a, b = new_rows.emb, old_rows.emb
        keep = np.random.default_rng(seed).permutation(len(a))[:200_000]
        loop_config["text_pairs"] = {"a": a[keep], "b": b[keep]}

    counts: dict
    if recipe.mode == "psi-only":
        from ray.data.extensions import ArrowTensorArray
        import pyarrow as pa

        images, texts = pair_embeddings
        text_caches = {"new_pair_texts": texts}
        image_caches = {"new_pair_images": images}
        if anchored:  # the old targets of each caption: its own old text, its image's old image
            old_images, old_texts = anchor_embeddings
            text_caches["old_pair_texts"] = old_texts
            image_caches["old_pair_images"] = old_images
        joined = pairs(text_caches, image_caches, "psi-only stage 2 pairs")
        joins |= joined.counts
        columns = {"image_emb": joined.images[0], "text_emb": joined.texts[0],
                   "image_code": joined.image_codes}
        if anchored:
            columns |= {"old_image_emb": joined.images[1], "old_text_emb": joined.texts[1]}
        table = pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else v
                          for k, v in columns.items()})
        dataset = ray.data.from_arrow(table).random_shuffle()
        unjoined = len(texts) - len(joined)
        counts = {"rows_in": len(texts), "rows_used": len(joined),
                  "skipped": {"unjoined": unjoined} if unjoined else {}}
        loop_config["rows"] = len(joined)
    else:
        skip_log = Path(storage_path).absolute() / run_name / "skipped"
        dataset, rows_in = shards.training_stream(
            pair_files, decode_training_pairs,
            {"size": clip.image_size(new.name), "model_name": new.name,
             "target_keys": targets["keys"] if anchored else None},
            ["pixels", "tokens", "image_code"] + (["target"] if anchored else []), skip_log)
        loop_config["rows"] = rows_in
        if anchored:
            loop_config["anchor_targets"] = ray.put({"image": targets["image"],
                                                     "text": targets["text"]})
    log.info("stage 2 (%s, %s%s): %d pairs, psi %s, LoRA %s", recipe.objective, recipe.mode,
             f", anchors {recipe.anchor_weights()}" if anchored else "", loop_config["rows"],
             "trained" if recipe.psi_lr > 0 else "frozen",
             "off" if recipe.mode == "psi-only" else lora.target_regex(lora_cfg))
    result = distributed.fit(stage2_loop, loop_config, trainer, run_name=run_name,
                             storage_path=storage_path, datasets={"train": dataset})
    if recipe.mode != "psi-only":
        skipped = shards.skip_counts(skip_log)
        counts = {"rows_in": rows_in, "rows_used": rows_in - sum(skipped.values()),
                  "skipped": skipped}
    counts["joins"] = joins
    weights, info = distributed.load_result_checkpoint(result)
    return _finish(weights, info, counts, psi, new, recipe, lora_cfg, out_dir, export_encoder)


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
               "lora": asdict(lora_cfg), "old_forward_passes": 0,
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
