"""Sweeps with Ray Tune, and side-by-side comparison of MLflow runs.

A sweep (`xbt sweep`, `run_sweep`) reads a search space (tune/space.yaml: dotted config keys ->
distributions), embeds ONCE through the pipeline's embed step (every cache reused when present),
and runs one Tune trial per sampled config. A trial is a Tune FUNCTION trainable (`run_trial`):
stage 1 through the ordinary `train_stage1` (a TorchTrainer with DeepSpeed) whose epochs reach
Tune through `ValidationReport`, a `TuneReportCallback` that also scores the epoch's psi on the
validation split; then, optionally, a psi-only stage 2 through `train_stage2` on the cached pair
embeddings, scored once at its end. Trials only read embedding caches: no encoder runs in them.

The primary metric, shared by Tune (ASHA) and MLflow, is the mean of the R@1 update gains over
I2T and T2I of the trial's latest method row on the VALIDATION split: a held-out share of the
training-pair images (never the evaluation split), removed from stage 2's training pairs.

MLflow: one parent run per sweep (config, search space, leaderboard, best config), one nested run
per trial (its params, the per-report metrics, the compatibility table of its last report).
`compare_runs` lines the report tables of several runs up side by side.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from xbt_ray import tracking
from xbt_ray.config import (Config, ConfigError, EvalConfig, _merge, nest, read_yaml,
                            save_config)
from xbt_ray.data import cache
from xbt_ray.data.cache import Embeddings, as_ids
from xbt_ray.data.paired import cache_files
from xbt_ray.data.join import join, same_items
from xbt_ray.eval.report import markdown_table

log = logging.getLogger(__name__)

PRIMARY = "primary"
STAGE1_METHOD = "xbt-stage1->old"
PAIR_ROLES = ("old_pair_images", "new_pair_images", "old_pair_texts", "new_pair_texts")
TEXT_ROLES = ("old_text", "new_text")
DATASET = "train-pairs-holdout"
PROTOCOL = "validation: held-out training-pair images (not the evaluation split)"
# per-report values worth a time series in MLflow (besides every numeric training metric)
SERIES = ("primary", "i2t_R1", "t2i_R1", "gain_i2t_R1", "gain_t2i_R1", "rsum")


# --- search space --------------------------------------------------------------------------

DISTRIBUTIONS = {
    "choice": lambda args: tune.choice(list(args)),
    "grid": lambda args: tune.grid_search(list(args)),
    "uniform": lambda args: tune.uniform(*args),
    "loguniform": lambda args: tune.loguniform(*args),
    "randint": lambda args: tune.randint(*args),
}


def load_space(path: str | Path, base: Config | None = None) -> dict:
    """Read a search space: `dotted.config.key: {choice|grid: [..]}` or `{uniform|loguniform|
    randint: [low, high]}` or a plain value (fixed for every trial). Every key and each bound or
    option is checked against the config schema, so a typo fails before any trial starts."""
    doc = read_yaml(path, "search space file") or {}
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"search space {path} must map config keys to distributions")
    base = base or Config()
    for key, spec in doc.items():
        for value in _sample_values(key, spec):
            _merge(base, _nested({key: value}))
    return doc


def _sample_values(key: str, spec) -> list:
    """Values a spec can produce (options, or bounds), for checking them against the schema."""
    if not isinstance(spec, dict):
        return [spec]
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"search space key '{key}': expected one of {sorted(DISTRIBUTIONS)}, "
                          f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search space key '{key}': {kind} needs a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not args[0] < args[1]:
            raise ConfigError(f"search space key '{key}': {kind} needs [low, high] with low < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"search space key '{key}': loguniform needs low > 0")
        return [args[0]]
    return args


def param_space(space: dict) -> dict:
    """The Tune param_space of a search space (flat dotted keys)."""
    return {key: DISTRIBUTIONS[next(iter(spec))](next(iter(spec.values())))
            if isinstance(spec, dict) else spec for key, spec in space.items()}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _nested(flat: dict) -> dict:
    return nest({key: _plain(value) for key, value in flat.items()})


def trial_config(base: Config, params: dict) -> Config:
    """The base config with a trial's sampled values applied (dotted keys), validated."""
    config = _merge(base, _nested(params))
    config.validate()
    return config


def stage2_recipe(config: Config):
    """The trial's stage 2: `config.stage2` (objective and weights as sampled) run psi-only on
    cached embeddings; psi's lr from `sweep.stage2_psi_lr` where stage2.psi_lr is 0."""
    recipe = config.stage2
    return dataclasses.replace(recipe, mode="psi-only",
                               psi_lr=recipe.psi_lr or config.sweep.stage2_psi_lr)


def stage2_method(config: Config) -> str:
    return ("xbt-anchored-psi->old" if config.stage2.objective == "anchored"
            else "xbt-psi->old")


# --- validation split and the primary metric ----------------------------------------------

def _subset(table: Embeddings, mask: np.ndarray) -> Embeddings:
    return table.take(np.flatnonzero(mask))


def pair_joins(pairs: dict[str, Embeddings]) -> tuple[Embeddings, Embeddings, dict]:
    """The training pairs through xbt_ray.data.join: images embedded by both models (by key =
    image id), captions embedded by both (by key), captions -> images (by image_id).
    Returns (old images in both, old captions in both that name one of them, join counts)."""
    old_img, _, img_counts = same_items(pairs["old_pair_images"], pairs["new_pair_images"],
                                        "sweep: old ~ new pair images")
    old_txt, _, txt_counts = same_items(pairs["old_pair_texts"], pairs["new_pair_texts"],
                                        "sweep: old ~ new pair captions")
    linked = join(old_txt, old_img, "sweep: pair captions -> pair images", on="image_id")
    counts = {"old_pair_images~new_pair_images": img_counts,
              "old_pair_texts~new_pair_texts": txt_counts,
              "old_pair_texts->old_pair_images": linked.counts}
    return old_img.take(np.unique(linked.right)), old_txt.take(linked.left), counts


def pair_image_keys(pairs: dict[str, Embeddings]) -> np.ndarray:
    """Sorted training-pair images embedded by both models that have a caption in both."""
    images, _, _ = pair_joins(pairs)
    return np.array(sorted(images.keys.astype(str)))


def choose_validation(pairs: dict[str, Embeddings], fraction: float, seed: int) -> np.ndarray:
    """A seeded share of the training-pair images (sorted keys): the validation split."""
    if not 0 < fraction < 1:
        raise ConfigError("sweep.val_fraction must be in (0, 1)")
    keys = pair_image_keys(pairs)
    n_val = int(round(fraction * len(keys)))
    if n_val < 10 or len(keys) - n_val < 10:
        raise ConfigError(f"sweep.val_fraction={fraction} of {len(keys)} training-pair images "
                          "leaves under 10 for validation or training")
    chosen = np.random.default_rng(seed).permutation(len(keys))[:n_val]
    return np.sort(keys[chosen])


@dataclass
class PairSplit:
    validation: object           # EvalSplit: the held-out images and their captions
    train: dict[str, Embeddings]  # the pair caches without the held-out images
    counts: dict = dataclasses.field(default_factory=dict)  # per role, its join to val_keys


def split_pairs(pairs: dict[str, Embeddings], val_keys: np.ndarray) -> PairSplit:
    """Validation = the pairs of `val_keys` (images by key, captions by image_id: COCO layout,
    several captions per image); training = the rest (what stage 2 may train on). Membership
    and the validation split's alignment both go through xbt_ray.data.join; the split's own
    join counts are in `validation.joins`."""
    from xbt_ray.eval.compat import EvalSplit

    keys = as_ids(val_keys)
    chosen = Embeddings(keys, keys, np.zeros((len(keys), 1), np.float32), {},
                        "the validation images")
    train, held, counts = {}, {}, {}
    for role, table in pairs.items():
        on = "key" if role.endswith("images") else "image_id"
        joined = join(table, chosen, f"sweep validation: {role}", on=on, min_fraction=0.0)
        counts[role] = joined.counts
        in_val = np.zeros(len(table), bool)
        in_val[joined.left] = True
        train[role], held[role] = _subset(table, ~in_val), _subset(table, in_val)
    validation = EvalSplit(held["old_pair_images"], held["new_pair_images"],
                           held["old_pair_texts"], held["new_pair_texts"], role="validation split")
    return PairSplit(validation, train, counts)


GAIN_FLOOR = 1.0  # points of R@1: the smallest update-gain denominator the primary metric uses


def primary_metric(report: dict, method: str) -> float:
    """Mean over I2T and T2I of `method`'s R@1 update gain, (M - M_old) / (M_new - M_old),
    with the denominator floored at GAIN_FLOOR points so the metric stays defined and increasing
    in M where the new model is not ahead of the old one on the validation split."""
    rows = {r["method"]: r for r in report["rows"]}
    old, new, row = rows["old->old"], rows["new->new"], rows[method]
    gains = [(row[d]["R1"] - old[d]["R1"]) / max(new[d]["R1"] - old[d]["R1"], GAIN_FLOOR)
             for d in ("i2t", "t2i")]
    return float(np.mean(gains))


class Validator:
    """Scores old-space queries (psi of the new validation embeddings) on the validation split.
    Baselines and backfill curves are off: the table holds old->old, new->new and the trial's
    methods."""

    def __init__(self, split, eval_cfg: EvalConfig):
        if 1 not in eval_cfg.ks:
            raise ConfigError("sweeps need R@1: add 1 to eval.ks")
        self.split = split
        self.cfg = dataclasses.replace(eval_cfg, baselines=False, backfill_points=0)

    def report(self, projectors: dict) -> dict:
        from xbt_ray.eval.compat import compatibility_report
        from xbt_ray.train.stage1 import project

        queries = {method: (project(psi, self.split.new_images.emb),
                            project(psi, self.split.new_captions.emb))
                   for method, psi in projectors.items()}
        return compatibility_report(self.split, queries, self.cfg, DATASET, PROTOCOL)

    def reference_gap(self) -> dict[str, float]:
        """new->new minus old->old R@1 per direction: the update gain's denominator."""
        rows = {r["method"]: r for r in self.report({})["rows"]}
        return {d: rows["new->new"][d]["R1"] - rows["old->old"][d]["R1"] for d in ("i2t", "t2i")}


def summarise(report: dict, method: str) -> dict:
    """What a Tune result carries: the primary metric, the method row's R@1s, gains and RSUM,
    and the whole report (JSON text, so Tune's loggers keep it as one value)."""
    row = next(r for r in report["rows"] if r["method"] == method)
    gain = {d: row["update_gain"][d]["R1"] for d in ("i2t", "t2i")}
    return {PRIMARY: primary_metric(report, method), "method": method,
            "i2t_R1": row["i2t"]["R1"], "t2i_R1": row["t2i"]["R1"], "rsum": row["rsum"],
            **{f"gain_{d}_R1": float("nan") if g is None else g for d, g in gain.items()},
            "report": json.dumps(report)}


def load_psi_weights(path: str | Path, shape: dict):
    """psi from a checkpoint's weights file: stage 1 saves psi's tensors, psi-only stage 2 the
    same under `psi.`."""
    import torch
    from safetensors.torch import load_file

    from xbt_ray.models.projector import Projector

    psi = Projector(**shape)
    weights = {k.removeprefix("psi."): v for k, v in load_file(str(path)).items()}
    params = psi.state_dict()
    psi.load_state_dict({k: v.reshape(params[k].shape) for k, v in weights.items()})
    torch.set_num_threads(1)
    return psi.eval()


class ValidationReport(TuneReportCallback):
    """Train V2 -> Tune: each epoch's metrics, plus the epoch checkpoint's psi scored on the
    validation split (primary metric and report), so ASHA can stop a trial between epochs.
    Runs on the Train controller; the scoring is a few exact searches on cached embeddings."""

    def __init__(self, validator: Validator, method: str, shape: dict, extra: dict | None = None):
        super().__init__()
        self.validator, self.method, self.shape = validator, method, shape
        self.extra = extra or {}

    def after_report(self, run_context, metrics, checkpoint):
        from xbt_ray.train.distributed import WEIGHTS

        merged = dict(metrics[0]) | self.extra
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                psi = load_psi_weights(Path(d) / WEIGHTS, self.shape)
            merged |= summarise(self.validator.report({self.method: psi}), self.method)
        super().after_report(run_context, [merged], checkpoint)

    def after_exception(self, run_context, worker_exceptions):
        """A non-finite loss will not go away on a retry: end the run now (the controller
        routes a callback's error through its failure policy, which shuts the run down)."""
        lines = [line.strip() for error in worker_exceptions.values()
                 for line in str(error).splitlines() if "non-finite loss" in line]
        if lines:
            raise TrainingDiverged(lines[0][:300])


class TrainingDiverged(RuntimeError):
    """A training run hit a non-finite loss (its message says so); retrying cannot help."""


class Divergence:
    """`with Divergence(stage, method) as diverged:` around a training run. A run that failed on
    a non-finite loss is a result, not an error: the trial reports the worst primary metric
    (-inf), `diverged` becomes true and the trial ends; ASHA stops it at a rung. (Stage 1 ends at
    the first such loss, through ValidationReport; stage 2 after Ray Train's retries.) The report
    comes after the run has shut down, so such a stop never interrupts a live Train run."""

    def __init__(self, stage: int, method: str):
        self.stage, self.method, self.diverged = stage, method, False

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        chain = [error, getattr(error, "controller_failure", None), error and error.__cause__]
        if kind is None or not any("non-finite loss" in str(e) for e in chain if e is not None):
            return False
        log.warning("stage %d diverged: %s", self.stage, str(error).splitlines()[0][:300])
        self.diverged = True
        tune.report({PRIMARY: float("-inf"), "diverged": 1, "stage": self.stage,
                     "method": self.method})
        return True

    def __bool__(self) -> bool:
        return self.diverged


# --- one trial -----------------------------------------------------------------------------

@ray.remote(num_cpus=0)
def prepare_trial_data(caches: dict, train_caches: dict, config: Config, recipe,
                       stage1_dir: Path, stage2_dir: Path) -> None:
    """The Ray Data work of a trial (the joins into paired caches, Procrustes' cross-covariance),
    run as a task OUTSIDE the trial's placement group: Ray Data's shuffle tasks set no
    scheduling strategy, so inside the trial they would be captured by its CPU-less bundle and
    never scheduled. The trial's train_stage1 / train_stage2 then reuse what this wrote."""
    from xbt_ray.train.stage1 import caption_pairs, cross_covariance
    from xbt_ray.train.stage2 import psi_only_pairs

    texts = caption_pairs(caches["new_text"], caches["old_text"], stage1_dir / "pairs",
                          "stage 1 captions: old ~ new")
    if config.projector.procrustes_init:
        cross_covariance(texts)
    if not config.sweep.stage2:
        return
    anchored = bool(recipe.anchor_weights())
    psi_only_pairs((train_caches["new_pair_images"], train_caches["new_pair_texts"]),
                   ((train_caches["old_pair_images"], train_caches["old_pair_texts"])
                    if anchored else None), stage2_dir)
    if recipe.text_weight > 0:
        caption_pairs(caches["new_text"], caches["old_text"], stage2_dir / "text_pairs",
                      "stage 2 text regulariser")


def run_trial(params: dict, base: Config, caches: dict[str, str], train_caches: dict[str, str],
              val_keys: np.ndarray, sweep_dir: str) -> None:
    """Tune function trainable: stage 1 (and a psi-only stage 2) of one sampled config, on the
    sweep's embedding caches only (`caches`: every role; `train_caches`: the pair roles less the
    validation pairs, written once by the sweep driver). Results reach Tune once per stage-1
    epoch (ValidationReport) and once after stage 2."""
    from xbt_ray.train.stage1 import load_projector, train_stage1
    from xbt_ray.train.stage2 import train_stage2

    config = trial_config(base, params)
    trial_dir = Path(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, trial_dir / "config.yaml")
    split = split_pairs({r: cache.read_embeddings(caches[r]) for r in PAIR_ROLES}, val_keys)
    validator = Validator(split.validation, config.eval)
    dims = {r: cache.read_meta(Path(cache_files(caches[r])[0]))["dim"]
            for r in ("new_text", "old_text")}
    shape = {"d_in": dims["new_text"], "d_out": dims["old_text"],
             "depth": config.projector.depth, "width": config.projector.width}
    stage1_dir = trial_dir.absolute() / "stage1"
    recipe = stage2_recipe(config)
    stage2_dir = trial_dir.absolute() / "stage2"
    ray.get(prepare_trial_data.options(  # outside the trial's placement group (see below)
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)).remote(
        caches, train_caches, config, recipe, stage1_dir, stage2_dir))
    with Divergence(1, STAGE1_METHOD) as diverged:
        train_stage1(caches["new_text"], caches["old_text"], config.projector, config.stage1,
                     config.trainer, run_name="stage1", storage_path=trial_dir / "ray-train",
                     out_dir=stage1_dir, seed=config.seed,
                     callbacks=[ValidationReport(validator, STAGE1_METHOD, shape, {"stage": 1})])
    if diverged or not config.sweep.stage2:
        return
    train = train_caches
    method = stage2_method(config)
    with Divergence(2, method) as diverged:
        train_stage2(config.new, stage1_dir, recipe, config.lora, config.stage1, config.trainer,
                     run_name="stage2", storage_path=trial_dir / "ray-train", out_dir=stage2_dir,
                     seed=config.seed,
                     pair_embeddings=(train["new_pair_images"], train["new_pair_texts"]),
                     text_pairs=((caches["new_text"], caches["old_text"])
                                 if recipe.text_weight > 0 else None),
                     anchor_embeddings=((train["old_pair_images"], train["old_pair_texts"])
                                        if recipe.objective == "anchored" else None),
                     export_encoder=False)  # psi is all a psi-only stage 2 changes
    if diverged:
        return
    report = validator.report({STAGE1_METHOD: load_projector(stage1_dir),
                               method: load_projector(stage2_dir)})
    tune.report(summarise(report, method) | {
        "stage": 2, "stage1_primary": primary_metric(report, STAGE1_METHOD)})


# --- the sweep driver ----------------------------------------------------------------------

def max_concurrent_trials(config: Config, resources: dict) -> int:
    """Trials that fit the cluster at once: CPUs (minus `sweep.data_cpus` kept for Ray Data) over
    each trial's trainer workers plus its driver; GPUs over trainer workers; at least 1."""
    trainer, sweep = config.trainer, config.sweep
    per_trial = trainer.num_workers * trainer.cpus_per_worker + sweep.trial_cpus
    n = math.floor((resources.get("CPU", 0) - sweep.data_cpus) / per_trial + 1e-9)
    if trainer.use_gpu:
        n = min(n, math.floor(resources.get("GPU", 0) / trainer.num_workers + 1e-9))
    if sweep.max_concurrent > 0:
        n = min(n, sweep.max_concurrent)
    return max(1, n)


def trial_resources(config: Config) -> dict:
    """The trial driver's own bundle (its trainer's workers get their own placement group)."""
    return {"cpu": config.sweep.trial_cpus,
            "memory": config.sweep.trial_memory_mib * 1024 * 1024}


def total_reports(config: Config) -> int:
    """Reports of a trial that runs to the end: one per stage-1 epoch, one after stage 2."""
    return config.stage1.epochs + (1 if config.sweep.stage2 else 0)


def _check_sweep(config: Config) -> None:
    sweep = config.sweep
    checks = [(sweep.num_samples >= 1, "sweep.num_samples must be >= 1"),
              (sweep.grace_period >= 1, "sweep.grace_period must be >= 1"),
              (sweep.reduction_factor >= 2, "sweep.reduction_factor must be >= 2"),
              (sweep.data_cpus >= 0 and sweep.trial_cpus >= 0,
               "sweep.data_cpus and sweep.trial_cpus must be >= 0"),
              (sweep.trial_cpus > 0 or sweep.trial_memory_mib > 0,
               "sweep.trial_cpus or sweep.trial_memory_mib must be > 0 (a Tune trial needs a "
               "resource)"),
              (sweep.stage2_psi_lr > 0, "sweep.stage2_psi_lr must be > 0")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


class RecordingASHA(ASHAScheduler):
    """ASHA that remembers the trials it stopped before their last report (id -> report)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stopped: dict[str, int] = {}

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        reports = int(result.get("training_iteration", 0))
        if action == TrialScheduler.STOP and reports < self._max_t:
            self.stopped[trial.trial_id] = reports
        return action


class TrialRuns(Callback):
    """Tune callback (driver side): one nested MLflow run per trial under the sweep's run.
    Params = the trial's sampled values; metrics = every report (step = training_iteration),
    then the compatibility table of its last report (tracking.log_report names) and report.json.
    Only the driver writes to the tracking store."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 sweep_name: str, sweep_dir: Path, full: int, scheduler: RecordingASHA):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.experiment_id, self.parent = experiment_id, parent_run_id
        self.sweep_name, self.sweep_dir, self.full = sweep_name, sweep_dir, full
        self.scheduler = scheduler
        self.runs: dict[str, str] = {}
        self.reports: dict[str, dict] = {}  # per trial: its last result that holds a report

    def on_trial_start(self, iteration, trials, trial, **info):
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        if trial.trial_id in self.runs:
            return
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.sweep_name}-{trial.trial_id}",
            tags={MLFLOW_PARENT_RUN_ID: self.parent, "xbt.sweep": self.sweep_name,
                  "xbt.trial_id": trial.trial_id})
        self.runs[trial.trial_id] = run.info.run_id
        self.client.log_batch(run.info.run_id, params=[
            Param(k, str(_plain(v))[:500]) for k, v in sorted(trial.config.items())])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        if "report" in result:
            self.reports[trial.trial_id] = result
        step = int(result.get("training_iteration", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(tracking.metric_name(k), float(v), now, step)
                   for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) and (k in SERIES or k in _TRAIN_METRICS)]
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "FAILED")

    def _finish(self, trial, status: str):
        import mlflow

        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        result = trial.last_result or {}
        reports = int(result.get("training_iteration", 0))
        state = ("error" if status == "FAILED" else
                 "stopped_early" if trial.trial_id in self.scheduler.stopped else
                 "completed" if reports >= self.full else "ended_early")
        mlflow.start_run(run_id=run_id, nested=True)
        try:
            mlflow.set_tags({"xbt.status": state, "xbt.reports": str(reports),
                             "xbt.diverged": str(bool(result.get("diverged"))).lower()})
            last = self.reports.get(trial.trial_id)
            if last is not None:  # the compatibility table of the trial's last scored report
                report = json.loads(last["report"])
                tracking.log_report(report)
                mlflow.log_dict(report, "report.json")
            config_file = self.sweep_dir / "trials" / trial.trial_id / "config.yaml"
            if config_file.is_file():
                mlflow.log_artifact(str(config_file))
        finally:
            mlflow.end_run(status=status)  # ends this trial's run only


_TRAIN_METRICS = ("loss", "info_nce", "cosine", "pair", "text_reg", "stage", "epoch",
                  "stage1_primary")


@dataclass
class SweepResult:
    leaderboard: list[dict]
    best: dict
    best_config: Path
    run_id: str
    encoded: list[str]
    embed_jobs: int
    sweep_dir: Path


def leaderboard(results, space_keys: list[str], full: int, stopped: dict[str, int]) -> list[dict]:
    """One row per trial, best first: trials that ran to the end before stopped, diverged or
    failed ones, each by its last primary metric. `stopped`: trials ASHA stopped early."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial = metrics.get("trial_id") or Path(result.path).name
        reports = int(metrics.get("training_iteration", 0))
        status = ("error" if result.error else f"stopped@{stopped[trial]}" if trial in stopped
                  else "completed" if reports >= full else f"ended@{reports}")
        value = metrics.get(PRIMARY)
        rows.append({"trial": trial,
                     "status": status, "reports": reports,
                     "diverged": bool(metrics.get("diverged")),
                     PRIMARY: float(value) if value is not None else float("nan"),
                     "method": metrics.get("method", ""),
                     "params": {k: _plain(result.config.get(k)) for k in space_keys},
                     "config": dict(result.config)})

    def key(row):
        primary = row[PRIMARY]
        return (row["status"] != "completed", row["status"] == "error",
                -primary if not math.isnan(primary) else math.inf)

    return sorted(rows, key=key)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_leaderboard(rows: list[dict]) -> str:
    keys = list(rows[0]["params"]) if rows else []
    header = ["#", "trial", "status", PRIMARY, "method"] + keys
    body = [[str(i + 1), r["trial"], r["status"] + (" (diverged)" if r["diverged"] else ""),
             _fmt(r[PRIMARY]), r["method"]]
            + [_fmt(r["params"][k]) for k in keys] for i, r in enumerate(rows)]
    return "\n".join(markdown_table(header, body))


def _leaderboard_csv(rows: list[dict]) -> str:
    keys = list(rows[0]["params"]) if rows else []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "status", "diverged", "reports", PRIMARY, "method"] + keys)
    for r in rows:
        writer.writerow([r["trial"], r["status"], r["diverged"], r["reports"], r[PRIMARY],
                         r["method"]]
                        + [r["params"][k] for k in keys])
    return out.getvalue()


def run_sweep(config: Config, space_path: str | Path, num_samples: int | None = None,
              verbose: int = 1) -> SweepResult:
    """Embed once (caches reused), then a Tune sweep of stage 1 (+ psi-only stage 2) trials with
    ASHA on the primary metric; writes leaderboard, best config and summary to run_dir and
    MLflow. Returns the leaderboard and where the best config is."""
    import mlflow
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from xbt_ray.pipeline import init_ray, inputs_step, need, timed

    if num_samples is not None:
        config = dataclasses.replace(config, sweep=dataclasses.replace(config.sweep,
                                                                       num_samples=num_samples))
    _check_sweep(config)
    space = load_space(space_path, config)
    sweep_dir = config.run_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, sweep_dir / "config.yaml")
    shutil.copyfile(space_path, sweep_dir / "space.yaml")
    init_ray(config)
    timings: dict = {}
    with tracking.start_run(config) as parent:
        mlflow.set_tag("xbt.kind", "sweep")
        mlflow.log_artifact(str(sweep_dir / "config.yaml"))
        mlflow.log_artifact(str(sweep_dir / "space.yaml"))
        if not (config.data.embeddings or config.data.image_text or not (
                config.data.text or config.data.eval)):
            raise ConfigError("a sweep validates on held-out training pairs: set data.image_text")
        # the only place encoders may run in a sweep: once per (model, data), caches reused;
        # the caption corpus and the training pairs only (trials never read the eval split).
        # With data.embeddings (bring your own) nothing is encoded: the exports are imported.
        _, embedded = inputs_step(config, timings, TEXT_ROLES + PAIR_ROLES)
        need(embedded, TEXT_ROLES + PAIR_ROLES, "a sweep")
        encoded = sorted(name for name, r in embedded.items() if not r.reused)
        caches = {name: str(embedded[name].directory) for name in TEXT_ROLES + PAIR_ROLES}
        pairs = {role: cache.read_embeddings(caches[role]) for role in PAIR_ROLES}
        val_keys = choose_validation(pairs, config.sweep.val_fraction, config.seed)
        split = split_pairs(pairs, val_keys)
        train_caches = {}   # what a trial's stage 2 trains on, written once for every trial
        for role, table in split.train.items():
            train_caches[role] = str(sweep_dir / "train-split" / role)
            cache.write_embeddings(Path(train_caches[role]), table.keys, table.image_ids,
                                   table.emb, table.meta)
        tracking.log_counts("data.validation", split.validation.data())
        gap = Validator(split.validation, config.eval).reference_gap()
        floored = sorted(d for d, g in gap.items() if g < GAIN_FLOOR)
        if floored:
            log.warning("validation split: new->new is not %.1f R@1 points ahead of old->old in "
                        "%s (%s); the primary metric's denominator is floored there", GAIN_FLOOR,
                        "/".join(floored), gap)
        concurrent = max_concurrent_trials(config, ray.cluster_resources())
        full = total_reports(config)
        log.info("sweep: %d validation images (%d captions), %d training-pair images; "
                 "%d concurrent trial(s); %d reports per full trial", len(val_keys),
                 len(split.validation.old_captions), len(split.train["old_pair_images"]),
                 concurrent, full)
        mlflow.log_params({"sweep.validation_images": len(val_keys),
                           "sweep.max_concurrent_trials": concurrent,
                           "sweep.space": json.dumps(space)[:500]})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=config, caches=caches, train_caches=train_caches,
                                 val_keys=val_keys, sweep_dir=str(sweep_dir)),
            trial_resources(config))
        scheduler = RecordingASHA(time_attr="training_iteration", max_t=full,
                                  grace_period=config.sweep.grace_period,
                                  reduction_factor=config.sweep.reduction_factor)
        callback = TrialRuns(tracking.tracking_uri(config), parent.info.experiment_id,
                             parent.info.run_id, config.run_name, sweep_dir, full, scheduler)
        tuner = tune.Tuner(
            trainable, param_space=param_space(space),
            tune_config=tune.TuneConfig(
                metric=PRIMARY, mode="max", num_samples=config.sweep.num_samples,
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(max_concurrent=concurrent,
                                                 random_state=config.seed)),
            run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(sweep_dir), callbacks=[callback],
                                      verbose=verbose))
        with timed(timings, "tune"):
            results = tuner.fit()
        rows = leaderboard(results, list(space), full, scheduler.stopped)
        usable = [r for r in rows if r["status"] != "error" and math.isfinite(r[PRIMARY])]
        if not usable:
            raise RuntimeError(f"no trial of the sweep produced a primary metric "
                               f"(see {sweep_dir})")
        best = usable[0]
        best_config = dataclasses.replace(trial_config(config, best["config"]),
                                          run_name=f"{config.run_name}-best")
        board = format_leaderboard(rows)
        summary = {"primary": "mean of the R@1 update gains (I2T, T2I) of the trial's latest "
                              "method on the validation split",
                   "validation": {"images": len(val_keys),
                                  "captions": len(split.validation.old_captions),
                                  "dataset": DATASET, "protocol": PROTOCOL,
                                  "reference_gap_R1": gap, "gain_floor": GAIN_FLOOR,
                                  "floored": floored},
                   "embedding": {"jobs": len(embedded), "encoded": encoded},
                   "max_concurrent_trials": concurrent, "reports_per_trial": full,
                   "best": {k: best[k] for k in ("trial", "status", PRIMARY, "method", "params")},
                   "trials": [{k: r[k] for k in ("trial", "status", "diverged", "reports",
                                                 PRIMARY, "method", "params")} for r in rows],
                   "timings_s": timings}
        save_config(best_config, sweep_dir / "best.yaml")
        (sweep_dir / "leaderboard.md").write_text(board + "\n")
        (sweep_dir / "leaderboard.csv").write_text(_leaderboard_csv(rows))
        (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2, default=_plain) + "\n")
        for name in ("best.yaml", "leaderboard.md", "leaderboard.csv", "sweep.json"):
            mlflow.log_artifact(str(sweep_dir / name))
        mlflow.log_metrics({"best_primary": best[PRIMARY], "trials": len(rows),
                            "trials_stopped_early": sum(r["status"].startswith("stopped")
                                                        for r in rows),
                            "encoders_run": len(encoded)}
                           | {tracking.metric_name("time", k): v for k, v in timings.items()})
        run_id = parent.info.run_id
    print(board)
    print(f"\nbest: trial {best['trial']} ({PRIMARY} {best[PRIMARY]:.4f}) -> "
          f"{sweep_dir / 'best.yaml'}\nMLflow run {run_id} in {tracking.tracking_uri(config)}")
    return SweepResult(rows, best, sweep_dir / "best.yaml", run_id, encoded, len(embedded),
                       sweep_dir)


# --- comparing runs ------------------------------------------------------------------------

def find_run(client, ref: str, experiment: str | None = None):
    """An MLflow run by id, or the latest run of that name (in `experiment`, else anywhere)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"no MLflow experiment named '{experiment}'")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    quoted = ref.replace("'", "\\'")
    runs = client.search_runs(ids, f"attributes.run_name = '{quoted}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"no MLflow run with id or name '{ref}'"
                          + (f" in experiment '{experiment}'" if experiment else ""))
    return runs[0]


def _rows_from_metrics(metrics: dict) -> list[dict]:
    """Report rows rebuilt from a run's logged metrics (tracking.log_report's names)."""
    import re

    pattern = re.compile(r"^(?P<method>.+)\.(?P<d>i2t|t2i)\.(?P<m>R\d+)$")
    rows: dict[str, dict] = {}
    for name, value in metrics.items():
        match = pattern.match(name)
        if not match or "." in match["method"]:  # e.g. xbt_to_old.gain.i2t.R1
            continue
        row = rows.setdefault(match["method"], {"method": match["method"].replace("_to_", "->"),
                                                 "i2t": {}, "t2i": {}})
        row[match["d"]][match["m"]] = value
    out = []
    for key, row in rows.items():
        row["rsum"] = metrics.get(f"{key}.rsum")
        cells = metrics.get(f"{key}.cells_passed")
        row["cells_passed"] = None if cells is None else int(cells)
        gains = [metrics.get(f"{key}.gain.{d}.R1") for d in ("i2t", "t2i")]
        row["primary"] = None if None in gains else float(np.mean(gains))
        out.append(row)
    return out


def _rows_from_report(report: dict) -> list[dict]:
    from xbt_ray.eval.report import cells_passed

    rows = []
    for row in report["rows"]:
        gain = row.get("update_gain") or {}
        gains = [gain.get(d, {}).get("R1") for d in ("i2t", "t2i")]
        rows.append({"method": row["method"], "i2t": row["i2t"], "t2i": row["t2i"],
                     "rsum": row.get("rsum"), "cells_passed": cells_passed(row),
                     "primary": (None if not gain or None in gains else float(np.mean(gains)))})
    return rows


def _report_artifact(run_id: str, tracking_uri: str) -> dict:
    import os

    import mlflow

    key, before = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[key] = "false"  # no progress bar on stderr for one small file
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report.json",
                                                   tracking_uri=tracking_uri)
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    return json.loads(Path(path).read_text())


def compare_runs(refs: list[str], tracking_uri: str, experiment: str | None = None) -> list[dict]:
    """[{run, run_id, source, rows}] per run: its report.json artifact when it has one, else its
    logged metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    tables = []
    for ref in refs:
        run = find_run(client, ref, experiment)
        run_id = run.info.run_id
        names = {a.path for a in client.list_artifacts(run_id)}
        if "report.json" in names:
            rows, source = _rows_from_report(_report_artifact(run_id, tracking_uri)), "report.json"
        else:
            rows, source = _rows_from_metrics(run.data.metrics), "metrics"
        if not rows:
            raise ConfigError(f"MLflow run '{ref}' ({run_id}) has no compatibility table")
        tables.append({"run": run.info.run_name or run_id, "run_id": run_id, "source": source,
                       "rows": rows})
    return tables


def format_comparison(tables: list[dict]) -> str:
    """Markdown: per method, one line per run (in the order given): R@1/5/10 both directions,
    RSUM, cells passing the strict criterion, and the primary metric (mean R@1 gain)."""
    methods: list[str] = []
    for table in tables:
        methods += [r["method"] for r in table["rows"] if r["method"] not in methods]
    metrics = ["R1", "R5", "R10"]
    header = (["method", "run"] + [f"{d.upper()} {m}" for d in ("i2t", "t2i") for m in metrics]
              + ["RSUM", "cells ✓", "gain R1"])

    def num(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    body = []
    for method in methods:
        for table in tables:
            row = next((r for r in table["rows"] if r["method"] == method), None)
            if row is None:
                continue
            body.append([method, table["run"]]
                        + [num(row[d].get(m)) for d in ("i2t", "t2i") for m in metrics]
                        + [num(row["rsum"]),
                           "-" if row["cells_passed"] is None
                           else f"{row['cells_passed']}/{len(row['i2t']) + len(row['t2i'])}",
                           num(row["primary"], 3)])
    return "\n".join(markdown_table(header, body))
