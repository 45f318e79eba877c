"""MLflow names and data accounting (xbt_ray.tracking)."""
import pytest

from xbt_ray import tracking
from xbt_ray.eval.report import build_report, make_row

CELL = {"i2t": {"R1": 40.0}, "t2i": {"R1": 20.0}}


def test_metric_name_replaces_characters_mlflow_refuses():
    assert tracking.metric_name("xbt->old", "i2t", "R@1") == "xbt_to_old.i2t.R1"
    assert tracking.metric_name("data", "a~b", "n") == "data.a_b.n"


def test_long_metric_names_are_shortened_deterministically_and_stay_distinct():
    method = "xbt-" + "very-long-method-name-" * 20 + "->old"
    names = {tracking.metric_name(method, d, "R1") for d in ("i2t", "t2i")}
    assert len(names) == 2
    for name in names:
        assert len(name) == tracking.MAX_METRIC_NAME
        assert name.startswith("xbt-very-long-method-name-") and name.endswith(".R1")
    assert tracking.metric_name(method, "i2t", "R1") == tracking.metric_name(method, "i2t", "R1")
    # names that share the kept head and tail still differ (the hash of the whole name)
    a = tracking.metric_name("m" * 300 + "a" + "x" * 100)
    b = tracking.metric_name("m" * 300 + "b" + "x" * 100)
    assert a != b and len(a) == len(b) == 250
    assert len(tracking.metric_name("short")) == 5


def test_count_metrics_flattens_nested_join_counts():
    counts = {"joins": {"old_captions->old_images": {"joined": 5, "unmatched_right": 1}},
              "read": {"new_images": {"rows_in": 6, "skipped": {"zero_vector": 2}}},
              "reused": True, "source": "somewhere"}
    assert tracking.count_metrics("data.eval", counts) == {
        "data.eval.joins.old_captions_to_old_images.joined": 5,
        "data.eval.joins.old_captions_to_old_images.unmatched_right": 1,
        "data.eval.read.new_images.rows_in": 6,
        "data.eval.read.new_images.skipped.zero_vector": 2}


def test_a_very_long_method_name_does_not_fail_logging(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    method = "mine-" + "x" * 300 + "->old"
    rows = [make_row("old->old", "old", "old", True, CELL),
            make_row("new->new", "new", "new", False, CELL),
            make_row(method, "mine", "old", False, CELL, CELL, CELL)]
    report = build_report("demo", "custom", 6, 30, rows)
    report["data"] = {"joins": {"a->b": {"joined": 5}}, "dropped": {"images_without_caption": 1},
                      "read": {"old_images": {"rows_in": 6, "skipped": {"zero_vector": 1}}}}
    report["precision"] = {"max_abs_difference": {"R1": 0.4}}   # eval.precision_check
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("names")
    with mlflow.start_run() as run:
        tracking.log_report(report)
        tracking.log_counts("data.nested", {"x": {"y": {"z": 3}}})
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert tracking.metric_name(method, "i2t", "R1") in metrics
    assert max(len(name) for name in metrics) <= 250
    assert metrics["data.eval.dropped.images_without_caption"] == 1
    assert metrics["data.eval.read.old_images.skipped.zero_vector"] == 1
    assert metrics["data.nested.x.y.z"] == 3
    assert metrics["precision.max_abs_difference.R1"] == 0.4
