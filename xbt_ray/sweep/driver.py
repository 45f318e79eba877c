"""The sweep driver (`run_sweep`, `xbt sweep`): embed once, split off the validation pairs, run
the Tune trials with ASHA on the primary metric, and write the leaderboard and the best config.

MLflow: one parent run per sweep (config, search space, leaderboard, best config), one nested run
per trial (`TrialRuns`: its params, the per-report metrics, the compatibility table of its last
report). Only the driver writes to the tracking store.
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

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from xbt_ray import tracking
from xbt_ray.config import Config, ConfigError, save_config
from xbt_ray.data import cache
from xbt_ray.eval.report import markdown_table
from xbt_ray.sweep.space import _plain, load_space, param_space, trial_config
from xbt_ray.sweep.trial import run_trial
from xbt_ray.sweep.validation import (
    DATASET,
    GAIN_FLOOR,
    PAIR_ROLES,
    PRIMARY,
    PROTOCOL,
    Validator,
    choose_validation,
    split_pairs,
)

log = logging.getLogger(__name__)

TEXT_ROLES = ("old_text", "new_text")
# per-report values worth a time series in MLflow (besides every numeric training metric)
SERIES = ("primary", "i2t_R1", "t2i_R1", "gain_i2t_R1", "gain_t2i_R1", "rsum")


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


# the last report's method row on the validation split, beside the primary metric
RESULT_COLUMNS = ("i2t_R1", "t2i_R1", "rsum", "cells")


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
                     **{name: metrics.get(name) for name in RESULT_COLUMNS},
                     "params": {k: _plain(result.config.get(k)) for k in space_keys},
                     "config": dict(result.config)})

    def key(row):
        primary = row[PRIMARY]
        return (row["status"] != "completed", row["status"] == "error",
                -primary if not math.isnan(primary) else math.inf)

    return sorted(rows, key=key)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_leaderboard(rows: list[dict]) -> str:
    keys = list(rows[0]["params"]) if rows else []
    header = (["#", "trial", "status", PRIMARY, "method", "I2T R1", "T2I R1", "RSUM", "cells ✓"]
              + keys)
    body = [[str(i + 1), r["trial"], r["status"] + (" (diverged)" if r["diverged"] else ""),
             _fmt(r[PRIMARY]), r["method"]] + [_fmt(r[c]) for c in RESULT_COLUMNS]
            + [_fmt(r["params"][k]) for k in keys] for i, r in enumerate(rows)]
    return "\n".join(markdown_table(header, body))


def _leaderboard_csv(rows: list[dict]) -> str:
    keys = list(rows[0]["params"]) if rows else []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "status", "diverged", "reports", PRIMARY, "method",
                     *RESULT_COLUMNS] + keys)
    for r in rows:
        writer.writerow([r["trial"], r["status"], r["diverged"], r["reports"], r[PRIMARY],
                         r["method"], *(r[c] for c in RESULT_COLUMNS)]
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
