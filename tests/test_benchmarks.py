"""The benchmark's pure-compute parts (no Ray) on the micro preset: they run end to end and write
latest.json / latest.md with the documented schema. No timing assertions: this machine is shared."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder, not part of the package

from benchmarks import bench  # noqa: E402
from benchmarks.presets import PRESETS  # noqa: E402


def test_micro_benchmark_writes_the_schema(tmp_path):
    out = tmp_path / "results"
    bench.run(PRESETS["micro"], out, use_ray=False, work=tmp_path / "work")
    res = json.loads((out / "latest.json").read_text())

    assert res["schema_version"] == 1 and res["preset"] == "micro"
    for key in ("device", "cpu", "cores", "torch"):
        assert res["device"][key]
    for key in bench.HEADLINE:
        assert key in res
    # measured without Ray: positive plain numbers
    for key in ("train_fraction_of_matmul", "eval_fraction_of_matmul", "eval_peak_rss_gib",
                "xbt_over_backfill_1b"):
        assert isinstance(res[key], float) and res[key] > 0, key
    # the Ray parts are reported as skipped, not guessed
    assert res["pipeline_efficiency"] is None and res["encoder_runs_per_sweep"] is None
    assert set(res["skipped"]) == {"pipeline", "train.ray_train", "sweep"}
    assert res["pipeline"]["bare_images_per_s"] > 0

    # the raw measurements behind each ratio
    case = res["train"]["cases"][0]
    assert case["flops_per_pair"] > 2 * case["flops_forward_per_pair"]  # ~3x forward
    assert len(case["fraction_of_matmul"].__class__.__name__) and case["rounds"] >= 3
    assert case["upper_bound_pairs_per_s"] > 0 and case["pairs_per_s"] > 0
    ev = res["eval"]
    assert ev["queries_timed"] == PRESETS["micro"].eval_queries
    assert len(ev["floor_s"]) == len(ev["query_ranks_s"]) >= 3
    assert ev["peak_rss_gib"] >= ev["rss_data_gib"] > 0
    econ = res["economics"]
    ratios = [g["xbt_over_backfill"] for g in econ["galleries"]]
    assert [g["gallery_items"] for g in econ["galleries"]] == [10**6, 10**8, 10**9]
    assert ratios[0] > ratios[1] > ratios[2] == res["xbt_over_backfill_1b"]
    assert set(econ["rates"]) >= {"old_image_per_s", "new_image_per_s", "old_text_per_s",
                                  "new_text_per_s", "stage1_pairs_per_s", "stage2_pairs_per_s"}

    table = (out / "latest.md").read_text()
    assert "| metric | value | goal | met |" in table
    for key in bench.HEADLINE:
        assert f"| {key} |" in table
