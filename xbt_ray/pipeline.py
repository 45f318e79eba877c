"""The whole chain: (demo world) -> embed -> stage 1 -> stage 2 -> evaluate -> report + MLflow.

Every step reuses finished work: the demo world and demo models are cached by recipe, the
embedding cache by (model, data), stage 1 by run directory. Each step is also callable on its own
(the `xbt` subcommands and `jobs/` entrypoints call these functions).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xbt_ray import tracking
from xbt_ray.config import Config, ConfigError, ModelConfig, save_config
from xbt_ray.data import cache, embed, shards
from xbt_ray.models import clip

log = logging.getLogger(__name__)


@dataclass
class Sources:
    """Resolved inputs of a run: shard files and models with concrete weights."""

    image_text: list[str]
    text: list[str]
    eval_images: list[str]
    eval_captions: list[str]
    old: ModelConfig
    new: ModelConfig
    dataset: str


def init_ray(config: Config) -> None:
    """Connect to `ray_address` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # the dashboard's state API is what Ray Train V2 uses to clean up finished runs
        ray.init(dashboard_host="127.0.0.1", include_dashboard=True)
    ray.data.DataContext.get_current().enable_progress_bars = False


@contextmanager
def timed(timings: dict, step: str):
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 1)
    log.info("step %s took %.1f s", step, timings[step])


def _recipe_hash(*parts) -> str:
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p
                       for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_demo_world(config: Config) -> Path:
    """The demo world's shards under cache_dir/world/<fingerprint>, built once."""
    from xbt_ray.data.world import build_world, world_fingerprint

    out = Path(config.cache_dir).absolute() / "world" / world_fingerprint(config.world)
    if not (out / "manifest.json").is_file():
        log.info("building the demo world into %s", out)
        tmp = out.with_name(out.name + ".tmp")
        build_world(config.world, tmp)
        tmp.rename(out)
    return out


def demo_model(config: Config, which: str, world_dir: Path) -> ModelConfig:
    """Train (once) the demo world's old or new CLIP; returns it with `pretrained` = its file."""
    from xbt_ray.train.demo_clip import RECIPE_VERSION, train_demo_clip

    model: ModelConfig = getattr(config, which)
    recipe = getattr(config, f"train_{which}")
    digest = _recipe_hash(RECIPE_VERSION, world_dir.name, model.name, recipe, config.trainer.zero_stage,
                          config.trainer.precision, config.trainer.num_workers,
                          config.trainer.grad_clip, config.seed)
    path = Path(config.cache_dir).absolute() / "models" / f"{model.name}-{digest}.safetensors"
    if not path.is_file():
        log.info("training the demo %s model %s -> %s", which, model.name, path)
        train_demo_clip(model, recipe, shards.list_shards(str(world_dir / "image_text")),
                        config.trainer, path, Path(config.cache_dir).absolute() / "ray-train",
                        config.seed)
    return ModelConfig(name=model.name, pretrained=str(path))


def resolve_sources(config: Config, timings: dict) -> Sources:
    """Shard lists and model weights; builds the demo world and its models when not given."""
    data = config.data
    world_dir = None
    if not (data.image_text or data.text or data.eval):
        with timed(timings, "world"):
            world_dir = build_demo_world(config)
        data = dataclasses.replace(data, image_text=str(world_dir / "image_text"),
                                   text=str(world_dir / "text"), eval=str(world_dir / "eval"))
    elif not (data.text and data.eval):
        raise ConfigError("set data.text and data.eval (or leave all data.* empty for the demo)")
    models = {}
    for which in ("old", "new"):
        model: ModelConfig = getattr(config, which)
        if model.pretrained:
            models[which] = model
        elif world_dir is not None and clip.is_project_config(model.name):
            with timed(timings, f"train_{which}_clip"):
                models[which] = demo_model(config, which, world_dir)
        else:
            raise ConfigError(f"{which}.pretrained must be an open_clip tag or checkpoint path")
    eval_dir = Path(data.eval)
    return Sources(
        image_text=shards.list_shards(data.image_text) if data.image_text else [],
        text=shards.list_shards(data.text),
        eval_images=shards.list_shards(str(eval_dir / "images")),
        eval_captions=shards.list_shards(str(eval_dir / "captions.parquet")),
        old=models["old"], new=models["new"],
        dataset="demo-heldout" if world_dir is not None else eval_dir.name)


def embed_step(config: Config, sources: Sources, timings: dict) -> dict:
    """All embeddings the later steps read: caption corpus and eval split, old and new."""
    jobs = {
        "old_text": (sources.text, "text", sources.old),
        "new_text": (sources.text, "text", sources.new),
        "old_eval_images": (sources.eval_images, "image", sources.old),
        "new_eval_images": (sources.eval_images, "image", sources.new),
        "old_eval_captions": (sources.eval_captions, "text", sources.old),
        "new_eval_captions": (sources.eval_captions, "text", sources.new),
    }
    if config.stage2.mode == "psi-only":  # stage 2 on cached NEW embeddings of the pairs
        jobs["new_pair_images"] = (sources.image_text, "image", sources.new)
        jobs["new_pair_texts"] = (sources.image_text, "text", sources.new)
    results = {}
    with timed(timings, "embed"):
        for name, (files, modality, model) in jobs.items():
            results[name] = embed.embed_shards(files, modality, model, config.cache_dir,
                                               config.embed)
    return results


def stage1_step(config: Config, embedded: dict, timings: dict) -> Path:
    from xbt_ray.train.stage1 import PROJECTOR_WEIGHTS, train_stage1

    out_dir = config.run_dir / "stage1"
    if (out_dir / PROJECTOR_WEIGHTS).is_file():
        log.info("stage 1 already finished in %s (reused)", out_dir)
        return out_dir
    with timed(timings, "stage1"):
        train_stage1(cache.read_embeddings(embedded["new_text"].directory),
                     cache.read_embeddings(embedded["old_text"].directory),
                     config.projector, config.stage1, config.trainer, run_name="stage1",
                     storage_path=config.run_dir / "ray-train", out_dir=out_dir,
                     seed=config.seed)
    return out_dir


def stage2_step(config: Config, sources: Sources, embedded: dict, stage1_dir: Path,
                timings: dict) -> Path:
    """Stage 2 with the old model absent; exports the upgraded query encoder."""
    from xbt_ray.train.stage2 import SUMMARY, train_stage2

    out_dir = config.run_dir / "stage2"
    if (out_dir / SUMMARY).is_file():
        log.info("stage 2 already finished in %s (reused)", out_dir)
        return out_dir
    if config.stage2.mode == "lora" and not sources.image_text:
        raise ConfigError("stage 2 needs image-text pairs: set data.image_text")
    read = lambda name: cache.read_embeddings(embedded[name].directory)  # noqa: E731
    with timed(timings, "stage2"):
        summary = train_stage2(
            sources.new, stage1_dir, config.stage2, config.lora, config.stage1, config.trainer,
            run_name="stage2", storage_path=config.run_dir / "ray-train", out_dir=out_dir,
            seed=config.seed, pair_files=sources.image_text,
            pair_embeddings=((read("new_pair_images"), read("new_pair_texts"))
                             if config.stage2.mode == "psi-only" else None),
            text_pairs=((read("new_text"), read("old_text"))
                        if config.stage2.text_weight > 0 else None))
    tracking.log_counts("data.stage2_pairs", summary["data"])
    return out_dir


def evaluate_step(config: Config, sources: Sources, embedded: dict, stage1_dir: Path,
                  stage2_dir: Path, timings: dict) -> dict:
    """Compatibility report; the full method's queries come from the EXPORTED query encoder,
    run by the embedding job exactly as a user would serve it."""
    from xbt_ray.eval.compat import EvalSplit, compatibility_report
    from xbt_ray.train.stage1 import load_projector, project
    from xbt_ray.train.stage2 import QUERY_ENCODER

    encoder = ModelConfig(name=sources.new.name, pretrained=str(stage2_dir / QUERY_ENCODER))
    with timed(timings, "evaluate"):
        xbt = {modality: cache.read_embeddings(embed.embed_shards(
            files, modality, encoder, config.cache_dir, config.embed).directory)
            for modality, files in (("image", sources.eval_images),
                                    ("text", sources.eval_captions))}
        split = EvalSplit(*(cache.read_embeddings(embedded[k].directory) for k in (
            "old_eval_images", "new_eval_images", "old_eval_captions", "new_eval_captions")))
        psi = load_projector(stage1_dir)
        projected = {"xbt-stage1->old": (project(psi, split.new_images.emb),
                                         project(psi, split.new_captions.emb)),
                     "xbt->old": (split.rows_of(xbt["image"], "image"),
                                  split.rows_of(xbt["text"], "caption"))}
        return compatibility_report(split, projected, config.eval, sources.dataset,
                                    "held-out split")


STEPS = ("embed", "stage1", "stage2", "evaluate")


def run_pipeline(config: Config, until: str = "evaluate") -> dict | None:
    """Run the steps up to `until`, reusing finished ones; returns the report when evaluating.

    The report is also written to the run directory and logged to MLflow.
    """
    if until not in STEPS:
        raise ConfigError(f"unknown step '{until}', expected one of {STEPS}")
    import mlflow

    from xbt_ray.eval.report import format_table, write_report

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    init_ray(config)
    timings: dict = {}
    started = time.perf_counter()
    with tracking.start_run(config):
        mlflow.log_artifact(str(run_dir / "config.yaml"))
        sources = resolve_sources(config, timings)
        embedded = embed_step(config, sources, timings)
        for name, result in embedded.items():
            tracking.log_counts(f"data.{name}", result.counts)
        if until == "embed":
            return None
        stage1_dir = stage1_step(config, embedded, timings)
        if until == "stage1":
            return None
        stage2_dir = stage2_step(config, sources, embedded, stage1_dir, timings)
        if until == "stage2":
            return None
        report = evaluate_step(config, sources, embedded, stage1_dir, stage2_dir, timings)
        report["models"] = {"old": dataclasses.asdict(sources.old),
                            "new": dataclasses.asdict(sources.new)}
        report["data"] = {name: r.counts | {"reused": r.reused} for name, r in embedded.items()}
        timings["total"] = round(time.perf_counter() - started, 1)
        report["timings_s"] = timings
        json_path, md_path = write_report(report, run_dir)
        tracking.log_report(report)
        mlflow.log_metrics({tracking.metric_name("time", k): v for k, v in timings.items()})
        for path in (json_path, md_path):
            mlflow.log_artifact(str(path))
        run_id = mlflow.active_run().info.run_id
    print(format_table(report))
    print(f"\nreport: {json_path}\n        {md_path}")
    print(f"MLflow run {run_id} in {tracking.tracking_uri(config)}\n"
          f"  open it with: mlflow ui --backend-store-uri {tracking.tracking_uri(config)} "
          f"--host 127.0.0.1 --port 5000")
    return report
