"""The whole chain: (demo world) -> embed -> stage 1 -> stage 2 -> evaluate -> report + MLflow.

Every step reuses finished work: the demo world and demo models are cached by recipe, the
embedding cache by (model, precision, data), stage 1 by run directory. Each step is also callable
on its own (the `xbt` subcommands and `jobs/` entrypoints call these functions).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xbt_ray import tracking
from xbt_ray.config import Config, ConfigError, ModelConfig, Stage2Config, save_config
from xbt_ray.data import cache, embed, shards
from xbt_ray.eval import methods
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
    protocol: str


def init_ray(config: Config) -> None:
    """Connect to `ray_address` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1. Ray's
    console output is routed by `xbt_ray.console`; Ray Data's progress bars are on when stderr
    is a terminal."""
    import ray

    from xbt_ray import console

    if ray.is_initialized():
        return
    console.quiet_ray()
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # the dashboard's state API is what Ray Train V2 uses to clean up finished runs
        ray.init(dashboard_host="127.0.0.1", include_dashboard=True)
    console.quiet_ray()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


@contextmanager
def timed(timings: dict, step: str):
    start = time.perf_counter()
    log.info("step %s ...", step)
    yield
    timings[step] = round(time.perf_counter() - start, 1)
    log.info("step %s done in %.1f s", step, timings[step])


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


def demo_model_path(config: Config, which: str, world_dir: Path) -> Path:
    """Where the demo world's old or new CLIP is cached: cache_dir/models/<name>-<recipe hash>.
    The hash covers the architecture (the open_clip config behind the name, as the project
    ships it: a pretrained text tower by layer count, not by local path), the training
    recipe, the trainer settings that change the weights, the world and the seed."""
    from xbt_ray.train.demo_clip import RECIPE_VERSION

    model: ModelConfig = getattr(config, which)
    digest = _recipe_hash(RECIPE_VERSION, world_dir.name, model.name,
                          clip.project_config(model.name) or clip.model_config(model.name),
                          getattr(config, f"train_{which}"),
                          config.trainer.zero_stage, config.trainer.precision,
                          config.trainer.num_workers, config.trainer.grad_clip, config.seed)
    return Path(config.cache_dir).absolute() / "models" / f"{model.name}-{digest}.safetensors"


def demo_model(config: Config, which: str, world_dir: Path) -> ModelConfig:
    """Train (once) the demo world's old or new CLIP; returns it with `pretrained` = its file."""
    from xbt_ray.train.demo_clip import train_demo_clip

    model: ModelConfig = getattr(config, which)
    recipe = getattr(config, f"train_{which}")
    path = demo_model_path(config, which, world_dir)
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
        from xbt_ray.data.eval_sets import demo_eval_split

        with timed(timings, "world"):
            world_dir = build_demo_world(config)
            # the held-out split ships as a Karpathy JSON + JPEGs, like Flickr30k: the split is
            # built by the same code `xbt eval-data` runs on a public benchmark
            eval_dir = demo_eval_split(world_dir)
        data = dataclasses.replace(data, image_text=str(world_dir / "image_text"),
                                   text=str(world_dir / "text"), eval=str(eval_dir))
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
        old=models["old"], new=models["new"], **_split_name(eval_dir))


def _split_name(eval_dir: Path) -> dict:
    """Dataset and protocol of an eval split: from the split's manifest.json (written by
    `xbt eval-data`, and for the demo world), or the directory name."""
    manifest = eval_dir / "manifest.json"
    if manifest.is_file():
        doc = json.loads(manifest.read_text())
        return {"dataset": doc.get("dataset", eval_dir.name),
                "protocol": doc.get("protocol", "custom")}
    return {"dataset": eval_dir.name, "protocol": "custom"}


def embed_step(config: Config, sources: Sources, timings: dict,
               roles: tuple[str, ...] | None = None) -> dict:
    """All embeddings the later steps read (or only `roles`): caption corpus and eval split, old
    and new, and the training pairs (old and new: support of the baselines, targets of the
    anchored objective, inputs of psi-only stage 2). The gallery is never embedded by anything
    but its own model."""
    jobs = {
        "old_text": (sources.text, "text", sources.old),
        "new_text": (sources.text, "text", sources.new),
        "old_eval_images": (sources.eval_images, "image", sources.old),
        "new_eval_images": (sources.eval_images, "image", sources.new),
        "old_eval_captions": (sources.eval_captions, "text", sources.old),
        "new_eval_captions": (sources.eval_captions, "text", sources.new),
    }
    if sources.image_text:
        for which, model in (("old", sources.old), ("new", sources.new)):
            jobs[f"{which}_pair_images"] = (sources.image_text, "image", model)
            jobs[f"{which}_pair_texts"] = (sources.image_text, "text", model)
    if roles is not None:
        jobs = {name: jobs[name] for name in roles}
    results = {}
    with timed(timings, "embed"):
        for name, (files, modality, model) in jobs.items():
            results[name] = embed.embed_shards(files, modality, model, config.cache_dir,
                                               config.embed)
    return results


def byo_sources(config: Config, timings: dict) -> tuple[Sources, dict]:
    """Bring-your-own embeddings (`data.embeddings`, a manifest): every role imported into the
    cache contract (no encoder, no model loaded); returns (sources without shards, the caches
    by role)."""
    from xbt_ray.data.byo import import_manifest, load_manifest

    manifest = load_manifest(config.data.embeddings)
    with timed(timings, "import"):
        embedded = import_manifest(config.data.embeddings, config.cache_dir)
    sources = Sources([], [], [], [], config.old, config.new,
                      manifest.dataset or Path(config.data.embeddings).stem,
                      manifest.protocol or "custom")
    return sources, embedded


def inputs_step(config: Config, timings: dict,
                roles: tuple[str, ...] | None = None) -> tuple[Sources, dict]:
    """The embedding caches every later step reads, by role: imported from a manifest
    (`data.embeddings`), or embedded from shards (demo world and models built when needed)."""
    if config.data.embeddings:
        return byo_sources(config, timings)
    sources = resolve_sources(config, timings)
    return sources, embed_step(config, sources, timings, roles)


def need(embedded: dict, roles, step: str) -> None:
    """One line when a step's input roles are missing (a manifest that names too few)."""
    missing = [r for r in roles if r not in embedded]
    if missing:
        raise ConfigError(f"{step} needs the embedding roles {missing}: add them to the "
                          "data.embeddings manifest (or give the shards they come from)")


def stage1_step(config: Config, embedded: dict, timings: dict) -> Path:
    from xbt_ray.train.stage1 import PROJECTOR_WEIGHTS, train_stage1

    out_dir = config.run_dir / "stage1"
    if (out_dir / PROJECTOR_WEIGHTS).is_file():
        log.info("stage 1 already finished in %s (reused)", out_dir)
        return out_dir
    need(embedded, ("new_text", "old_text"), "stage 1")
    with timed(timings, "stage1"):
        train_stage1(embedded["new_text"].directory, embedded["old_text"].directory,
                     config.projector, config.stage1, config.trainer, run_name="stage1",
                     storage_path=config.run_dir / "ray-train", out_dir=out_dir,
                     seed=config.seed)
    return out_dir


def stage2_runs(config: Config) -> list[tuple[str, Stage2Config, str]]:
    """(config section, recipe, report method) of each stage 2 to run: `stage2`, plus
    `stage2_anchored` beside a faithful `stage2` when `compare_anchored` is on."""
    runs = [("stage2", config.stage2, methods.xbt(config.stage2.objective))]
    if config.compare_anchored and config.stage2.objective == "faithful":
        runs.append(("stage2_anchored", config.stage2_anchored, methods.XBT_ANCHORED))
    return runs


def stage2_step(config: Config, sources: Sources, embedded: dict, stage1_dir: Path,
                timings: dict, section: str, recipe: Stage2Config) -> Path:
    """One stage 2 (old model absent; the anchored objective reads CACHED old embeddings of the
    training pairs); exports the upgraded query encoder into run_dir/<section>."""
    from xbt_ray.train.stage2 import SUMMARY, train_stage2

    out_dir = config.run_dir / section
    if (out_dir / SUMMARY).is_file():
        log.info("%s already finished in %s (reused)", section, out_dir)
        return out_dir
    byo = bool(config.data.embeddings)
    if byo and recipe.mode != "psi-only":
        raise ConfigError(f"{section}.mode={recipe.mode} needs images and the new model; with "
                          f"data.embeddings set {section}.mode=psi-only")
    if recipe.mode == "psi-only":
        need(embedded, ("new_pair_images", "new_pair_texts"), section)
    elif not sources.image_text:
        raise ConfigError("stage 2 needs image-text pairs: set data.image_text")
    if recipe.objective == "anchored":
        need(embedded, ("old_pair_images", "old_pair_texts"), f"{section} (anchored)")
    read = lambda name: embedded[name].directory  # noqa: E731
    with timed(timings, section):
        summary = train_stage2(
            sources.new, stage1_dir, recipe, config.lora, config.stage1, config.trainer,
            run_name=section, storage_path=config.run_dir / "ray-train", out_dir=out_dir,
            seed=config.seed, pair_files=sources.image_text,
            pair_embeddings=((read("new_pair_images"), read("new_pair_texts"))
                             if recipe.mode == "psi-only" else None),
            text_pairs=((read("new_text"), read("old_text")) if recipe.text_weight > 0 else None),
            anchor_embeddings=((read("old_pair_images"), read("old_pair_texts"))
                               if recipe.objective == "anchored" else None),
            export_encoder=not byo)  # bring-your-own: no model to merge psi into
    tracking.log_counts(f"data.{section}_pairs", summary["data"])
    return out_dir


def old_forward_passes(embedded: dict) -> dict:
    """Old-model forward passes behind each method (training and support items only)."""
    n = {name: r.counts["rows_embedded"] for name, r in embedded.items()}
    text = n["old_text"]
    pairs = n.get("old_pair_images", 0) + n.get("old_pair_texts", 0)
    costs = {methods.XBT_STAGE1: text, methods.XBT: text, methods.XBT_ANCHORED: text + pairs,
             methods.procrustes("text"): text + n.get("old_pair_texts", 0),
             methods.procrustes("image"): n.get("old_pair_images", 0)}
    for method in (methods.procrustes("both"), methods.RIDGE, methods.SLERP, methods.SLERP_MID):
        costs[method] = text + pairs
    return {m: {"old_forward_passes": v} for m, v in costs.items()}


def evaluate_step(config: Config, sources: Sources, embedded: dict, stage1_dir: Path,
                  stage2_dirs: dict[str, Path], timings: dict) -> dict:
    """The evaluation suite on the held-out split. Each stage 2's queries come from its
    EXPORTED query encoder, run by the embedding job exactly as a user would serve it. Every
    input is recorded in run_dir/eval_inputs.json, so `xbt report` can recompute the report."""
    from xbt_ray.eval.suite import evaluate, load_inputs, write_manifest

    with timed(timings, "evaluate"):
        split = {role: embedded[f"{role.split('_')[0]}_eval_{role.split('_')[1]}"].directory
                 for role in ("old_images", "new_images", "old_captions", "new_captions")}
        need(embedded, ("old_eval_images", "new_eval_images", "old_eval_captions",
                        "new_eval_captions"), "evaluation")
        queries = {"xbt-stage1": _projected_queries(config, embedded, stage1_dir, "xbt-stage1")}
        for method, out_dir in stage2_dirs.items():
            name = method.split("->")[0]
            if not (out_dir / "query_encoder.safetensors").is_file():   # psi-only, no model
                queries[name] = _projected_queries(config, embedded, out_dir, name)
                continue
            encoder = ModelConfig(name=sources.new.name,
                                  pretrained=str(out_dir / "query_encoder.safetensors"))
            queries[name] = {
                kind: embed.embed_shards(files, modality, encoder, config.cache_dir,
                                         config.embed).directory
                for kind, modality, files in (("images", "image", sources.eval_images),
                                              ("captions", "text", sources.eval_captions))}
        support = None
        if {"old_pair_images", "new_pair_images", "old_pair_texts", "new_pair_texts"} <= set(
                embedded):
            support = {"old_captions": [embedded["old_text"].directory,
                                        embedded["old_pair_texts"].directory],
                       "new_captions": [embedded["new_text"].directory,
                                        embedded["new_pair_texts"].directory],
                       "old_images": embedded["old_pair_images"].directory,
                       "new_images": embedded["new_pair_images"].directory}
        n_images = embedded["new_eval_images"].counts["rows_embedded"]
        n_captions = embedded["new_eval_captions"].counts["rows_embedded"]
        costs = old_forward_passes(embedded) | {"full_backfill": {
            "items": n_images + n_captions, "images": n_images, "captions": n_captions}}
        manifest = write_manifest(config.run_dir / "eval_inputs.json", split, queries, support,
                                  sources.dataset, sources.protocol, costs)
        return evaluate(load_inputs(manifest), config.eval, config.seed)


def precision_step(config: Config, sources: Sources, embedded: dict, stage1_dir: Path,
                   stage2_dirs: dict[str, Path], report: dict, timings: dict) -> dict:
    """The report's `precision` section (`eval.precision_check`): the evaluation again with
    the held-out split's four sets and each stage 2's exported query encoder embedded at the
    other precision (bf16 when the run's encoders ran fp32, else fp32), cell by cell beside
    `report` (eval.report.precision_section). The support set (caption corpus, training pairs)
    is not re-embedded: the baselines apply the maps they fitted on it. Its inputs are recorded
    in run_dir/precision/<precision>/eval_inputs.json; no backfill curves."""
    from xbt_ray.eval.report import precision_section

    ran = embed.encoder_precision(config.embed)
    other = "bf16" if ran == "fp32" else "fp32"
    check = dataclasses.replace(
        config, output_dir=str(config.run_dir / "precision"), run_name=other,
        embed=dataclasses.replace(config.embed, precision=other),
        eval=dataclasses.replace(config.eval, backfill_points=0, precision_check=False))
    check.run_dir.mkdir(parents=True, exist_ok=True)
    split_roles = ("old_eval_images", "new_eval_images", "old_eval_captions", "new_eval_captions")
    with timed(timings, f"precision_check_{other}"):
        scratch: dict = {}
        embedded = embedded | embed_step(check, sources, scratch, split_roles)
        checked = evaluate_step(check, sources, embedded, stage1_dir, stage2_dirs, scratch)
    return precision_section(report, checked, ran, other)


def _projected_queries(config: Config, embedded: dict, projector_dir: Path,
                       method: str) -> dict[str, Path]:
    """psi(new eval embeddings), psi from `projector_dir`, written as caches under
    run_dir/eval/queries/<method>: the queries of a method whose psi is all it changes."""
    from xbt_ray.train.stage1 import load_projector, project

    psi = load_projector(projector_dir)
    out = {}
    for kind, name in (("images", "new_eval_images"), ("captions", "new_eval_captions")):
        table = cache.read_embeddings(embedded[name].directory)
        directory = config.run_dir / "eval" / "queries" / method / kind
        meta = cache.make_meta(method, str(projector_dir), psi.d_out,
                               table.meta["dataset"], table.meta["modality"])
        cache.write_embeddings(directory, table.keys, table.image_ids,
                               project(psi, table.emb), meta, dtype="float32")
        out[kind] = directory
    return out


def training_data_counts(config: Config) -> dict:
    """What each finished training stage of the run read, skipped and joined (from its
    summary JSON), for the report's `data` section."""
    from xbt_ray.train.stage1 import SUMMARY as STAGE1_SUMMARY
    from xbt_ray.train.stage2 import SUMMARY as STAGE2_SUMMARY

    out = {}
    for section, summary in [("stage1", STAGE1_SUMMARY)] + [
            (section, STAGE2_SUMMARY) for section, _, _ in stage2_runs(config)]:
        path = config.run_dir / section / summary
        if path.is_file():
            out[section] = json.loads(path.read_text()).get("data", {})
    return out


def data_summary(data: dict) -> str:
    """The run's row accounting for the console: a line per embedding set, and a line per join
    that left rows unmatched (every join's counts are in report.json's `data`)."""
    lines = ["data: rows in = embedded + deduplicated + skipped"]
    for name, c in data.items():
        if isinstance(c, dict) and "rows_embedded" in c:
            lines.append(f"  {name:<20} {c['rows_in']:>8} = {c['rows_embedded']} + "
                         f"{c.get('deduplicated', 0)} + {sum(c['skipped'].values())} "
                         f"{c['skipped'] or ''}")
    joins = dict(data.get("joins") or {})
    for section in ("stage1", "stage2", "stage2_anchored"):
        joins |= {f"{section}: {k}": v for k, v in (data.get(section) or {}).get("joins",
                                                                               {}).items()}
    partial = {name: c for name, c in joins.items() if c["unmatched_left"] or c["unmatched_right"]}
    if joins:
        lines.append(f"joins: {len(joins) - len(partial)} of {len(joins)} matched every row"
                     + ("; the others: joined (unmatched left / right)" if partial else ""))
        lines += [f"  {name:<48} {c['joined']:>8} ({c['unmatched_left']} / "
                  f"{c['unmatched_right']})" for name, c in partial.items()]
    return "\n".join(lines)


STEPS = ("embed", "stage1", "stage2", "evaluate")


def run_pipeline(config: Config, until: str = "evaluate", train: bool = True) -> dict | None:
    """Run the steps up to `until`, reusing finished ones; returns the report when evaluating.
    With `train` off (`xbt report --embeddings`) nothing is trained: the report covers the
    baselines and whichever stages the run directory already holds.

    The report is also written to the run directory and logged to MLflow.
    """
    if until not in STEPS:
        raise ConfigError(f"unknown step '{until}', expected one of {STEPS}")
    import mlflow

    from xbt_ray.eval.report import console_summary, write_report

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    init_ray(config)
    timings: dict = {}
    started = time.perf_counter()
    with tracking.start_run(config):
        mlflow.log_artifact(str(run_dir / "config.yaml"))
        sources, embedded = inputs_step(config, timings)
        for name, result in embedded.items():
            tracking.log_counts(f"data.{name}", result.counts)
        if until == "embed":
            return None
        if train:
            stage1_dir = stage1_step(config, embedded, timings)
        else:
            stage1_dir = config.run_dir / "stage1"
            if not (stage1_dir / "projector.safetensors").is_file():
                raise ConfigError(f"no finished stage 1 in {stage1_dir}: run `xbt stage1` (or "
                                  "`xbt stage2`) with the same run name first")
        if until == "stage1":
            return None
        stage2_dirs = {}
        for section, recipe, method in stage2_runs(config):
            if train:
                stage2_dirs[method] = stage2_step(config, sources, embedded, stage1_dir, timings,
                                                  section, recipe)
            elif (config.run_dir / section / "stage2.json").is_file():
                stage2_dirs[method] = config.run_dir / section
        if until == "stage2":
            return None
        report = evaluate_step(config, sources, embedded, stage1_dir, stage2_dirs, timings)
        if config.eval.precision_check and not config.data.embeddings:  # BYO: no encoders
            report["precision"] = precision_step(config, sources, embedded, stage1_dir,
                                                 stage2_dirs, report, timings)
        report["models"] = {"old": dataclasses.asdict(sources.old),
                            "new": dataclasses.asdict(sources.new)}
        report["data"] = report.get("data", {}) | {
            name: r.counts | {"reused": r.reused} for name, r in embedded.items()}
        report["data"] |= training_data_counts(config)
        timings["total"] = round(time.perf_counter() - started, 1)
        report["timings_s"] = timings
        paths = write_report(report, run_dir)
        tracking.log_report(report)
        mlflow.log_metrics({tracking.metric_name("time", k): v for k, v in timings.items()})
        for path in list(paths.values()) + [run_dir / "eval_inputs.json"]:
            mlflow.log_artifact(str(path))
        run_id = mlflow.active_run().info.run_id
    print(data_summary(report["data"]))
    print(console_summary(report, paths))
    print(f"MLflow run {run_id} in {tracking.tracking_uri(config)}\n"
          f"  open it with: mlflow ui --backend-store-uri {tracking.tracking_uri(config)} "
          f"--host 127.0.0.1 --port 5000")
    return report
