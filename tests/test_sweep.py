"""Sweeps (Ray Tune + ASHA over stage 1 and a psi-only stage 2) and `xbt compare`.

Unit tests need no Ray. The integration tests share one 4-trial sweep on the tiny world of the
session's `tiny_run` (its caches, config and MLflow store: nothing is embedded again), run in
the module's local Ray cluster (`ray_session`, 2 CPUs).
"""
import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from xbt_ray import sweep
from xbt_ray.config import Config, ConfigError, EvalConfig, load_config
from xbt_ray.data.cache import Embeddings

ROOT = Path(__file__).resolve().parents[1]
SPACE_TINY = ROOT / "tune" / "space-tiny.yaml"


# --- search space, trial configs, concurrency ------------------------------------------------

def test_space_files_are_checked_against_the_schema():
    for path in (*sorted((ROOT / "tune").glob("space-oldfree*.yaml")), ROOT / "tune" / "space.yaml",
                 SPACE_TINY):
        space = sweep.load_space(path)
        assert space and all("." in key for key in space)
    full = sweep.load_space(ROOT / "tune" / "space.yaml")
    for key in ("projector.depth", "projector.width", "stage1.noise_sigma", "stage1.temperature",
                "stage1.lr", "stage1.cosine_weight", "stage2.objective",
                "stage2.image_to_old_text", "stage2.text_to_old_image"):
        assert key in full, key
    params = sweep.param_space(full)
    assert set(params) == set(full)


@pytest.mark.parametrize("text, needle", [
    ("stage1.lrr: {choice: [0.1]}\n", "stage1.lrr"),
    ("stage1.lr: {normal: [0, 1]}\n", "stage1.lr"),
    ("stage1.lr: {loguniform: [0, 1]}\n", "low > 0"),
    ("stage1.lr: {uniform: [1, 0]}\n", "low < high"),
    ("projector.depth: {choice: [1, two]}\n", "projector.depth"),
    ("[1, 2]\n", "must map"),
    # each key fits the schema, but a grid point is not a valid trial config
    ("stage2.text_weight: {grid: [0.0, 1.0]}\nstage2.psi_lr: 0.0\n", "stage2.psi_lr > 0"),
])
def test_space_errors_are_one_line_and_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        sweep.load_space(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_trial_config_applies_sampled_values_and_validates():
    base = Config()
    config = sweep.trial_config(base, {"stage1.lr": np.float64(3e-4),
                                       "projector.depth": np.int64(3),
                                       "stage2.objective": "anchored"})
    assert config.stage1.lr == 3e-4 and config.projector.depth == 3
    assert config.stage2.objective == "anchored" and base.projector.depth == 2
    recipe = sweep.stage2_recipe(config)
    assert recipe.mode == "psi-only" and recipe.psi_lr == config.sweep.stage2_psi_lr
    assert sweep.stage2_method(config) == "xbt-anchored-psi->old"
    with pytest.raises(ConfigError, match="objective"):
        sweep.trial_config(base, {"stage2.objective": "other"})


def test_max_concurrent_trials_leaves_cpus_for_ray_data():
    config = Config()  # trainer: 2 workers x 0.5 CPU; sweep.data_cpus 1
    assert sweep.max_concurrent_trials(config, {"CPU": 2.0}) == 1
    assert sweep.max_concurrent_trials(config, {"CPU": 16.0}) == 15
    assert sweep.max_concurrent_trials(config, {"CPU": 0.5}) == 1  # never less than 1
    capped = dataclasses.replace(config, sweep=dataclasses.replace(config.sweep, max_concurrent=4))
    assert sweep.max_concurrent_trials(capped, {"CPU": 64.0}) == 4
    gpu = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, use_gpu=True,
                                                                  cpus_per_worker=2.0))
    assert sweep.max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    driver = dataclasses.replace(config, sweep=dataclasses.replace(config.sweep, trial_cpus=1.0))
    assert sweep.max_concurrent_trials(driver, {"CPU": 9.0}) == 4
    assert sweep.trial_resources(config) == {"cpu": 0.0, "memory": 256 * 1024 * 1024}


# --- validation split and the primary metric -------------------------------------------------

def _pairs(n: int = 60, seed: int = 0) -> dict[str, Embeddings]:
    rng = np.random.default_rng(seed)
    keys = np.array([f"{i:04d}" for i in range(n)])
    cap_keys = np.array([f"{k}-{j}" for k in keys for j in range(2)])
    cap_ids = np.repeat(keys, 2)

    def table(k, ids, dim):
        return Embeddings(k, ids, rng.normal(size=(len(k), dim)).astype(np.float32), {})

    return {"old_pair_images": table(keys, keys, 4), "new_pair_images": table(keys, keys, 6),
            "old_pair_texts": table(cap_keys, cap_ids, 4),
            "new_pair_texts": table(cap_keys, cap_ids, 6)}


def test_validation_split_is_seeded_and_disjoint_from_training_pairs():
    pairs = _pairs()
    val = sweep.choose_validation(pairs, 0.25, seed=3)
    assert len(val) == 15 and np.array_equal(val, sweep.choose_validation(pairs, 0.25, seed=3))
    assert not np.array_equal(val, sweep.choose_validation(pairs, 0.25, seed=4))
    split = sweep.split_pairs(pairs, val)
    assert sorted(split.validation.image_ids) == sorted(val)
    assert set(split.validation.caption_image_ids) == set(val)
    assert len(split.validation.old_captions) == 30
    for role, table in split.train.items():
        ids = table.keys if role.endswith("images") else table.image_ids
        assert not set(ids) & set(val), role
        assert len(table) == len(pairs[role]) * 45 // 60
    with pytest.raises(ConfigError, match="val_fraction"):
        sweep.choose_validation(pairs, 1.0, 0)


def test_validation_split_in_coco_layout_goes_through_the_join():
    # 40 images with 5 captions each; caption keys are annotation ids, image keys int64 ids;
    # the new image cache is in another order and misses one image (failed to embed)
    rng = np.random.default_rng(0)
    ids = np.arange(500, 540).astype(np.int64)
    cap_ids = np.repeat(ids.astype(str), 5).astype(object)
    cap_keys = np.array([f"ann-{n}" for n in range(len(cap_ids))], dtype=object)
    shuffled = rng.permutation(40)
    order, missing = shuffled[1:], shuffled[0]

    def table(keys, image_ids, dim):
        return Embeddings(keys, image_ids, rng.normal(size=(len(keys), dim)).astype(np.float32),
                          {})

    pairs = {"old_pair_images": table(ids, ids, 4), "new_pair_images": table(ids[order],
                                                                            ids[order], 6),
             "old_pair_texts": table(cap_keys, cap_ids, 4),
             "new_pair_texts": table(cap_keys[::-1], cap_ids[::-1], 6)}
    keys = sweep.pair_image_keys(pairs)
    assert len(keys) == 39 and str(ids[missing]) not in keys and str(ids[order[0]]) in keys
    val = sweep.choose_validation(pairs, 0.5, seed=1)
    split = sweep.split_pairs(pairs, val)
    v = split.validation
    assert set(v.image_ids) == set(val) and set(v.caption_image_ids) == set(val)
    assert len(v.old_captions) == 5 * len(val)
    assert v.joins["old_captions->old_images"]["unmatched_right"] == 0
    assert split.counts["old_pair_texts"]["joined"] == 5 * len(val)
    assert not set(split.train["old_pair_texts"].image_ids) & set(val)
    report = sweep.Validator(v, EvalConfig(ks=[1])).report({})
    assert report["n_images"] == len(val) and report["data"]["dropped"] == {
        "images_without_caption": 0, "captions_without_image": 0}


def _report(old, new, method):
    def row(name, i2t, t2i):
        return {"method": name, "i2t": {"R1": i2t}, "t2i": {"R1": t2i}}
    return {"rows": [row("old->old", *old), row("new->new", *new), row("m->old", *method)]}


def test_primary_metric_is_the_mean_r1_update_gain_with_a_floored_denominator():
    assert sweep.primary_metric(_report((20, 10), (40, 30), (30, 20)), "m->old") == 0.5
    assert sweep.primary_metric(_report((20, 10), (40, 30), (40, 10)), "m->old") == 0.5
    # new->new not ahead of old->old: the denominator is floored at 1 point
    assert sweep.primary_metric(_report((5, 5), (4, 5), (7, 4)), "m->old") == 0.5


def test_summary_and_leaderboard_carry_the_method_rows_r1_rsum_and_passing_cells():
    from xbt_ray.sweep.driver import _leaderboard_csv, format_leaderboard

    report = _report((20, 10), (40, 30), (30, 9))
    method = report["rows"][2]
    method["rsum"] = 150.0
    method["update_gain"] = {"i2t": {"R1": 0.5}, "t2i": {"R1": -0.05}}
    # hand-set strict-criterion flags: 4 of 6 cells pass
    method["compatible"] = {"i2t": {"R1": True, "R5": True, "R10": True},
                            "t2i": {"R1": False, "R5": True, "R10": False}}
    summary = sweep.summarise(report, "m->old")
    assert (summary["i2t_R1"], summary["t2i_R1"], summary["rsum"], summary["cells"]) == (
        30, 9, 150.0, 4)
    assert summary["primary"] == pytest.approx((0.5 - 0.05) / 2)
    rows = [{"trial": "t1", "status": "completed", "diverged": False, "reports": 3,
             "primary": summary["primary"], "method": "m->old", "i2t_R1": 30.0,
             "t2i_R1": 9.0, "rsum": 150.0, "cells": 4, "params": {"stage1.noise_sigma": 0.1}},
            {"trial": "t2", "status": "error", "diverged": False, "reports": 0,
             "primary": float("nan"), "method": "", "i2t_R1": None, "t2i_R1": None,
             "rsum": None, "cells": None, "params": {"stage1.noise_sigma": 0.2}}]
    board = format_leaderboard(rows).splitlines()
    assert [c.strip() for c in board[0].split("|")[6:10]] == ["I2T R1", "T2I R1", "RSUM", "cells ✓"]
    assert [c.strip() for c in board[2].split("|")[6:10]] == ["30", "9", "150", "4"]
    assert [c.strip() for c in board[3].split("|")[6:10]] == ["-", "-", "-", "-"]
    csv_lines = _leaderboard_csv(rows).splitlines()
    assert csv_lines[0].startswith("trial,status,diverged,reports,primary,method,i2t_R1,t2i_R1,"
                                   "rsum,cells,stage1.noise_sigma")
    assert csv_lines[1].endswith(",30.0,9.0,150.0,4,0.1")


def test_validator_reports_old_new_and_the_projected_method():
    from xbt_ray.models.projector import Projector

    pairs = _pairs()
    split = sweep.split_pairs(pairs, sweep.choose_validation(pairs, 0.5, 0))
    validator = sweep.Validator(split.validation, EvalConfig(ks=[1, 5]))
    psi = Projector(6, 4, 0, 8)
    report = validator.report({"xbt-stage1->old": psi})
    assert [r["method"] for r in report["rows"]] == ["old->old", "new->new", "xbt-stage1->old"]
    summary = sweep.summarise(report, "xbt-stage1->old")
    assert math.isfinite(summary["primary"]) and json.loads(summary["report"]) == report
    assert set(validator.reference_gap()) == {"i2t", "t2i"}
    with pytest.raises(ConfigError, match="R@1"):
        sweep.Validator(split.validation, EvalConfig(ks=[5, 10]))


# --- the sweep on the tiny world -------------------------------------------------------------

def _cache_dirs(cache_root: Path) -> dict[str, float]:
    """Every complete embedding cache directory and the time its _SUCCESS.json was written."""
    return {str(p.parent): p.stat().st_mtime
            for p in (cache_root / "embeddings").glob("*/*/*/_SUCCESS.json")}


@pytest.fixture(scope="module")
def tiny_sweep(tiny_run, ray_session, mlflow_uri):
    """`xbt sweep` (2 trials) on the tiny chain's config and caches, in this module's 2-CPU
    cluster, counting the embedding calls."""
    from xbt_ray.cli import main
    from xbt_ray.data import embed

    config, _ = tiny_run
    cache_root = Path(config.cache_dir)
    before = _cache_dirs(cache_root)
    calls = []
    original = embed.embed_shards

    def counting(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result)
        return result

    embed.embed_shards = counting
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["sweep", "--config", str(config.run_dir / "config.yaml"),
                         "--space", str(SPACE_TINY), "--num-samples", "1",
                         "--run-name", "tiny-sweep", f"tracking.tracking_uri={mlflow_uri}",
                         "tracking.experiment=test-sweep", "sweep.reduction_factor=4"])
    finally:
        embed.embed_shards = original
    assert code == 0
    sweep_dir = config.run_dir.parent / "tiny-sweep"
    return {"config": config, "dir": sweep_dir, "stdout": out.getvalue(), "calls": calls,
            "before": before, "after": _cache_dirs(cache_root),
            "summary": json.loads((sweep_dir / "sweep.json").read_text())}


# the first test to use the sweep may also build the session's tiny chain (when run alone)
@pytest.mark.timeout(1500)
def test_sweep_finishes_with_a_leaderboard_and_asha_stops_the_diverging_trials(tiny_sweep):
    summary = tiny_sweep["summary"]
    trials = summary["trials"]
    assert len(trials) == 2
    by_lr = {}
    for trial in trials:
        by_lr.setdefault(trial["params"]["stage1.lr"], []).append(trial)
    good, bad = by_lr[1e-3], by_lr[1e30]
    assert len(good) == 1 and len(bad) == 1
    # the first trial (good lr) always runs to the end: stage-1 epochs + stage 2
    assert all(t["status"] == "completed" and t["reports"] == summary["reports_per_trial"]
               and math.isfinite(t["primary"]) for t in good)
    # a diverging lr reports -inf once its run has shut down, and ASHA stops it at rung 1
    assert all(t["diverged"] and t["primary"] == -math.inf for t in bad)
    assert sum(t["status"].startswith("stopped@") for t in bad) >= 1
    assert {t["method"] for t in good} == {"xbt-anchored-psi->old"}
    assert summary["best"]["params"]["stage1.lr"] == 1e-3
    assert summary["max_concurrent_trials"] == 1  # 2 CPUs: 1 for the trainer, 1 for Ray Data
    board = tiny_sweep["stdout"]
    assert "| # " in board and "primary" in board and "stage1.lr" in board
    assert board.count("stopped@") >= 1 and "best.yaml" in board


def test_encoders_run_once_per_model_and_dataset_not_per_trial(tiny_sweep):
    calls, summary = tiny_sweep["calls"], tiny_sweep["summary"]
    # the driver's single embed step: one call per (model, dataset, modality) the trials read
    # (caption corpus and training pairs, not the eval split), all reused
    directories = [str(c.directory) for c in calls]
    assert len(calls) == summary["embedding"]["jobs"] == len(set(directories)) == 6
    assert [c for c in calls if not c.reused] == [] and summary["embedding"]["encoded"] == []
    # nothing was embedded anywhere (driver or trials): no cache directory appeared or changed
    assert tiny_sweep["after"] == tiny_sweep["before"]
    assert set(directories) <= set(tiny_sweep["after"])


def test_best_config_loads_and_the_stage_jobs_accept_it(tiny_sweep):
    from xbt_ray.cli import _parser

    best = tiny_sweep["dir"] / "best.yaml"
    config = load_config(best)
    base = tiny_sweep["config"]
    assert config.run_name == "tiny-sweep-best" and config.stage1.lr == 1e-3
    assert config.cache_dir == base.cache_dir and config.stage2.mode == base.stage2.mode
    winner = tiny_sweep["summary"]["best"]["params"]
    assert config.stage2.objective == winner["stage2.objective"]
    assert config.stage1.noise_sigma == pytest.approx(winner["stage1.noise_sigma"])
    args = _parser().parse_args(["stage1", "--config", str(best)])
    assert args.command == "stage1" and load_config(args.config) == config


def test_sweep_runs_are_nested_in_mlflow(tiny_sweep, mlflow_uri):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("test-sweep")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   "attributes.run_name = 'tiny-sweep'")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "space.yaml", "best.yaml", "leaderboard.md", "sweep.json"} <= artifacts
    assert parent.data.metrics["trials"] == 2 and parent.data.metrics["encoders_run"] == 0
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    statuses = {}
    for child in children:
        assert child.data.params["stage1.lr"] in ("0.001", "1e+30")
        assert all("@" not in m and ">" not in m for m in child.data.metrics)
        statuses[child.info.run_name] = child.data.tags["xbt.status"]
        if child.data.params["stage1.lr"] == "0.001":
            assert child.info.status == "FINISHED"
            assert math.isfinite(child.data.metrics["primary"])
            assert "xbt-stage1_to_old.i2t.R1" in child.data.metrics
            assert "old_to_old.t2i.R1" in child.data.metrics
            assert any(m.endswith("-psi_to_old.cells_passed") for m in child.data.metrics)
            names = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"report.json", "config.yaml"} <= names
            history = client.get_metric_history(child.info.run_id, "primary")
            assert len(history) == tiny_sweep["summary"]["reports_per_trial"]
    assert "stopped_early" in statuses.values()


# --- comparing runs ----------------------------------------------------------------------------

def test_compare_lines_up_runs_from_report_artifacts_and_from_metrics(tiny_run, tiny_sweep,
                                                                      mlflow_uri, capsys):
    import mlflow

    from xbt_ray import tracking
    from xbt_ray.cli import main
    from xbt_ray.compare import compare_runs

    _, report = tiny_run
    # a run with the table in its metrics only (no report.json artifact)
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("test-compare")
    with mlflow.start_run(run_name="metrics-only") as run:
        tracking.log_report(report)
    metrics_only = run.info.run_id
    trial = tiny_sweep["summary"]["best"]["trial"]

    code = main(["compare", "tiny", metrics_only, f"tiny-sweep-{trial}",
                 "--tracking-uri", mlflow_uri])
    assert code == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| xbt-stage1->old ")]
    assert len(lines) == 3  # one per run, side by side
    assert any(line.startswith("| xbt-anchored->old ") for line in out.splitlines())

    tables = compare_runs(["tiny", metrics_only], mlflow_uri)
    assert [t["source"] for t in tables] == ["report.json", "metrics"]
    from_report = {r["method"]: r for r in tables[0]["rows"]}
    from_metrics = {r["method"]: r for r in tables[1]["rows"]}
    assert set(from_metrics) == set(from_report)
    for method, row in from_report.items():
        for d in ("i2t", "t2i"):
            assert from_metrics[method][d] == pytest.approx(row[d]), method
        assert from_metrics[method]["cells_passed"] == row["cells_passed"]
        assert from_metrics[method]["rsum"] == pytest.approx(row["rsum"])

    assert main(["compare", "no-such-run", "--tracking-uri", mlflow_uri]) == 2
