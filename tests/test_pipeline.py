"""Integration: the whole chain on a very small world, on the session's real local Ray."""
import dataclasses
import json
from pathlib import Path

from xbt_ray.pipeline import run_pipeline


def test_report_has_every_cell_and_is_written(tiny_run):
    config, report = tiny_run
    methods = [row["method"] for row in report["rows"]]
    assert methods == ["old->old", "new->new", "xbt-stage1->old", "xbt->old"]
    assert report["n_images"] == 40 and report["n_captions"] == 120
    for row in report["rows"]:
        for direction in ("i2t", "t2i"):
            assert set(row[direction]) == {"R1", "R5", "R10"}
            assert all(0 <= v <= 100 for v in row[direction].values())
            assert row[direction]["R1"] <= row[direction]["R5"] <= row[direction]["R10"]
    xbt = report["rows"][3]
    assert xbt["needs_old_encoder"] is False and set(xbt["compatible"]) == {"i2t", "t2i"}
    on_disk = json.loads((config.run_dir / "report.json").read_text())
    assert on_disk["rows"] == report["rows"]
    assert "| xbt-stage1->old" in (config.run_dir / "report.md").read_text()
    assert (config.run_dir / "config.yaml").is_file()
    assert (config.run_dir / "stage1" / "projector.safetensors").is_file()


def test_rows_are_accounted_for(tiny_run):
    _, report = tiny_run
    for name, counts in report["data"].items():
        assert counts["rows_in"] == counts["rows_embedded"] + sum(counts["skipped"].values()), name
    assert report["data"]["old_text"]["rows_in"] == 700
    assert report["data"]["old_eval_images"]["rows_embedded"] == 40


def test_mlflow_run_has_params_metrics_and_artifacts(tiny_run, mlflow_uri):
    import mlflow

    config, _ = tiny_run
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("test-chain")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tiny'")
    assert run.data.params["stage1.noise_sigma"] == str(config.stage1.noise_sigma)
    assert "xbt-stage1_to_old.i2t.R1" in run.data.metrics
    assert "xbt_to_old.t2i.R10" in run.data.metrics
    assert "old_to_old.t2i.R10" in run.data.metrics
    assert all("@" not in name and ">" not in name for name in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "report.json", "report.md"} <= artifacts


def test_second_run_reuses_world_models_and_embeddings(tiny_run, mlflow_uri):
    config, first = tiny_run
    report = run_pipeline(dataclasses.replace(config, run_name="tiny-again"))
    assert all(counts["reused"] for counts in report["data"].values())
    models = sorted(p.name for p in (Path(config.cache_dir) / "models").glob("*.safetensors"))
    assert len(models) == 2  # one old, one new: not retrained
    assert report["rows"][0] == first["rows"][0]  # same old->old from the same cached data
