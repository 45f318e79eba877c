"""MLflow: one run per pipeline run; params, metrics, the resolved config and the reports.

Default store: SQLite `mlflow.db` in the working directory, artifacts beside it in `mlartifacts/`
(an explicit artifact location, so Ray workers with other working directories agree).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from xbt_ray.config import Config, config_to_dict, flatten

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")
MAX_METRIC_NAME = 250   # MLflow refuses longer metric keys (MAX_ENTITY_KEY_LENGTH)
_KEPT_TAIL = 60         # of a shortened name, the end kept (direction, metric) after the hash


def tracking_uri(config: Config) -> str:
    """`tracking.tracking_uri`, else MLFLOW_TRACKING_URI, else SQLite `mlflow.db` here."""
    return (config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path('mlflow.db').absolute()}")


def metric_name(*parts: str) -> str:
    """'xbt->old', 'i2t', 'R@1' -> 'xbt_to_old.i2t.R1' (MLflow allows no '@' or '>').

    A name over MLflow's 250 characters (e.g. a very long method name) is shortened
    deterministically: its head, '-', 8 hex digits of the full name's SHA-1, '-', its last
    60 characters, so distinct names stay distinct and the metric's suffix stays readable."""
    text = _UNSAFE.sub("_", ".".join(str(p) for p in parts).replace("->", "_to_")
                       .replace("@", ""))
    if len(text) <= MAX_METRIC_NAME:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    head = MAX_METRIC_NAME - _KEPT_TAIL - len(digest) - 2
    return f"{text[:head]}-{digest}-{text[-_KEPT_TAIL:]}"


def start_run(config: Config):
    """Open (or create) the experiment and start this pipeline run; returns the active run."""
    import mlflow

    from xbt_ray import console

    console.quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri(config))
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        if mlflow.get_tracking_uri().startswith("sqlite:"):  # local store: artifacts beside it
            artifacts = Path("mlartifacts").absolute() / config.tracking.experiment
            mlflow.create_experiment(config.tracking.experiment,
                                     artifact_location=artifacts.as_uri())
        else:  # a tracking server decides where artifacts go (its artifact store)
            mlflow.create_experiment(config.tracking.experiment)
    mlflow.set_experiment(config.tracking.experiment)
    run = mlflow.start_run(run_name=config.run_name)
    params = {k: str(v)[:500] for k, v in flatten(config_to_dict(config)).items()}
    mlflow.log_params(params)
    return run


def log_report(report: dict) -> None:
    """Every recall, gain, RSUM, flip rate, cost, backfill AUC and precision difference of a report
    as metrics."""
    import mlflow

    from xbt_ray.eval.report import cells_passed

    metrics = {}
    for row in report["rows"]:
        for direction in ("i2t", "t2i"):
            for name, value in row[direction].items():
                metrics[metric_name(row["method"], direction, name)] = value
            for name, value in (row.get("update_gain") or {}).get(direction, {}).items():
                if value is not None:
                    metrics[metric_name(row["method"], "gain", direction, name)] = value
        metrics[metric_name(row["method"], "rsum")] = row["rsum"]
        for direction, flips in (row.get("flips") or {}).items():
            for name, value in flips.items():
                metrics[metric_name(row["method"], direction, name)] = value
        passed = cells_passed(row)
        if passed is not None:
            metrics[metric_name(row["method"], "cells_passed")] = passed
        if "cost" in row:
            metrics[metric_name(row["method"], "old_forward_passes")] = \
                row["cost"]["old_forward_passes"]
    for method, curves in (report.get("backfill") or {}).items():
        for direction, by_order in curves["auc"].items():
            for order, value in by_order.items():
                metrics[metric_name(method, "backfill_auc", direction, order)] = value
    precision = report.get("precision") or {}    # eval.precision_check: largest |bf16 - fp32|
    for name, value in (precision.get("max_abs_difference") or {}).items():
        metrics[metric_name("precision", "max_abs_difference", name)] = value
    data = report.get("data") or {}
    for section in ("joins", "dropped", "read"):   # the evaluation's data accounting
        metrics |= count_metrics(f"data.eval.{section}", data.get(section) or {})
    mlflow.log_metrics(metrics)


def count_metrics(prefix: str, counts: dict, _parts: tuple = ()) -> dict[str, float]:
    """Metric names and values of (possibly nested) counts: {"a": {"b": 3}} -> {prefix.a.b: 3}.
    Booleans and non-numbers are left out."""
    metrics = {}
    for key, value in counts.items():
        parts = _parts + (str(key),)
        if isinstance(value, dict):
            metrics |= count_metrics(prefix, value, parts)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[metric_name(prefix, *parts)] = value
    return metrics


def log_counts(prefix: str, counts: dict) -> None:
    """Data accounting (rows in / used / skipped per reason, join counts; nested dicts at any
    depth) as metrics."""
    import mlflow

    metrics = count_metrics(prefix, counts)
    if metrics:
        mlflow.log_metrics(metrics)
