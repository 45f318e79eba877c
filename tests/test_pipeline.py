"""Integration: the whole chain on a very small world, on the session's real local Ray."""
import dataclasses
import json
from pathlib import Path

import pytest

from xbt_ray.pipeline import embed_step, resolve_sources

ROOT = Path(__file__).resolve().parents[1]


def test_report_has_every_cell_and_is_written(tiny_run):
    config, report = tiny_run
    methods = [row["method"] for row in report["rows"]]
    assert methods == ["old->old", "new->new", "xbt-stage1->old", "xbt->old", "xbt-anchored->old",
                       "procrustes-text->old", "procrustes-image->old", "procrustes-both->old",
                       "ridge->old", "slerp->old", "slerp-mid->old"]
    assert report["n_images"] == 40 and report["n_captions"] == 120
    assert report["dataset"] == "demo"   # the split built from the world's Karpathy JSON
    rows = {row["method"]: row for row in report["rows"]}
    for row in report["rows"]:
        for direction in ("i2t", "t2i"):
            assert set(row[direction]) == {"R1", "R5", "R10"}
            assert all(0 <= v <= 100 for v in row[direction].values())
            assert row[direction]["R1"] <= row[direction]["R5"] <= row[direction]["R10"]
        assert row["needs_old_encoder"] == (row["method"] == "old->old"
                                            or row["method"].startswith("slerp"))
    xbt = rows["xbt->old"]
    assert set(xbt["compatible"]) == {"i2t", "t2i"} and set(xbt["flips"]) == {"i2t", "t2i"}
    # costs: faithful needs the old text tower on the corpus only; anchored adds the pairs
    data = report["data"]
    assert xbt["cost"]["old_forward_passes"] == data["old_text"]["rows_embedded"]
    assert rows["xbt-anchored->old"]["cost"]["old_forward_passes"] == (
        data["old_text"]["rows_embedded"] + data["old_pair_images"]["rows_embedded"]
        + data["old_pair_texts"]["rows_embedded"])
    assert report["full_backfill"] == {"items": 160, "images": 40, "captions": 120}
    assert set(report["backfill"]) == {"xbt->old", "xbt-anchored->old", "procrustes-both->old"}
    # the migration runs from xbt->old to new->new; a direction whose scores cannot be
    # calibrated has no curve and says why. The tiny world's CLIPs are near chance: since its
    # run is deterministic (eb531d9) neither direction calibrates in it, so the ends are checked
    # here only if a curve exists (tests/test_baselines.py checks them by hand)
    migration = report["backfill"]["xbt->old"]["migration"]
    assert set(migration["r1"]) | set(migration["skipped"]) == {"i2t", "t2i"}
    assert not set(migration["r1"]) & set(migration["skipped"])
    assert all("calibrat" in reason for reason in migration["skipped"].values())
    for direction, curve in migration["r1"].items():
        assert curve[-1] == rows["new->new"][direction]["R1"]
        assert curve[0] == xbt[direction]["R1"]   # (the two may coincide on 40 images)
    on_disk = json.loads((config.run_dir / "report.json").read_text())
    assert on_disk["rows"] == report["rows"]
    assert "| xbt-stage1->old" in (config.run_dir / "report.md").read_text()
    for name in ("config.yaml", "report.csv", "compatibility.png", "backfill.png",
                 "eval_inputs.json", "stage1/projector.safetensors"):
        assert (config.run_dir / name).is_file(), name


def test_xbt_report_recomputes_the_report_from_the_recorded_inputs(tiny_run, mlflow_uri,
                                                                   tmp_path):
    from xbt_ray.cli import main

    config, report = tiny_run
    code = main(["report", "--inputs", str(config.run_dir / "eval_inputs.json"),
                 "--out", str(tmp_path), "--config", str(config.run_dir / "config.yaml"),
                 "--run-name", "tiny-report", f"tracking.tracking_uri={mlflow_uri}"])
    assert code == 0
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["rows"] == json.loads(json.dumps(report["rows"]))
    assert again["backfill"] == json.loads(json.dumps(report["backfill"]))


def test_rows_are_accounted_for(tiny_run):
    _, report = tiny_run
    data = report["data"]
    for name, counts in data.items():
        if "rows_embedded" in counts:   # an embedding job (not a training stage's summary)
            assert counts["rows_in"] == (counts["rows_embedded"] + counts["deduplicated"]
                                         + sum(counts["skipped"].values())), name
    assert data["old_text"]["rows_in"] == 700
    assert data["old_eval_images"]["rows_embedded"] == 40
    # COCO-layout pairs: each of the 100 images encoded once, however many caption rows it has
    pairs = data["old_pair_images"]
    assert pairs["rows_in"] == data["old_pair_texts"]["rows_in"] > 300
    assert pairs["deduplicated"] == pairs["rows_in"] - 100
    assert pairs["rows_embedded"] + sum(pairs["skipped"].values()) == 100
    # the joins of every stage are in the report: captions found their images
    targets = data["stage2_anchored"]["joins"]["old_pair_texts->old_pair_images"]
    assert targets["joined"] == targets["left_rows"] - targets["unmatched_left"] > 300
    assert data["stage1"]["joins"]["old_text~new_text"]["joined"] == 700


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
    assert {"config.yaml", "report.json", "report.md", "report.csv", "compatibility.png",
            "backfill.png", "eval_inputs.json"} <= artifacts
    assert "slerp_to_old.i2t.R1" in run.data.metrics
    assert "xbt-anchored_to_old.cells_passed" in run.data.metrics


def _laion_tars(world_dir: Path, out: Path) -> int:
    """The world's training pairs repacked as LAION-layout webdataset tars: one caption per
    image (its first), no image_id, keys with dots and mixed-case extensions."""
    import io
    import tarfile

    import pyarrow.parquet as pq

    rows = pq.read_table(sorted((world_dir / "image_text").glob("part-*.parquet"))).to_pylist()
    first = {}
    for row in rows:
        first.setdefault(row["image_id"], row)
    out.mkdir()
    samples = list(first.values())
    for shard in range(2):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for i, row in enumerate(samples[shard::2]):
                key = f"laion.{shard}.{i:06d}"
                for suffix, data in ((".JPG" if i % 2 else ".jpg", row["jpg"]),
                                     (".txt", (row["txt"] or "").encode())):
                    if data is None:
                        continue
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return len(samples)


@pytest.mark.timeout(1500)   # the steps run inside the test (in a subprocess)
def test_chain_to_stage2_on_laion_layout_webdataset_tars(tiny_run, tmp_path, mlflow_uri):
    """`xbt stage2` with training pairs as webdataset tars in LAION layout (one caption per image,
    image_id = key): the tars embedded with both models, stage 1, and an anchored LoRA stage 2
    whose raw tar rows are joined with their cached old targets. The tiny models come as local
    checkpoint files; the session chain's cache is shared, so its caption corpus and eval split
    embeddings are reused (same checkpoint files, same shards) and only the tars are embedded.
    (The evaluation does not depend on the pairs' layout: the session chain covers it.)"""
    import os
    import subprocess
    import sys

    from xbt_ray.data import cache, shards

    config, _ = tiny_run
    world_dir = next((Path(config.cache_dir) / "world").iterdir())
    n = _laion_tars(world_dir, tmp_path / "tars")
    models = {("old" if "-old-" in p.name else "new"): p
              for p in (Path(config.cache_dir) / "models").glob("*.safetensors")}
    overrides = [f"data.image_text={tmp_path / 'tars'}", f"data.text={world_dir / 'text'}",
                 f"data.eval={world_dir / 'eval_split'}",
                 f"old.pretrained={models['old']}", f"new.pretrained={models['new']}",
                 f"cache_dir={config.cache_dir}", f"output_dir={tmp_path / 'runs'}",
                 "run_name=laion", f"tracking.tracking_uri={mlflow_uri}",
                 "tracking.experiment=test-laion",
                 "stage2.objective=anchored", "compare_anchored=false"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "xbt_ray.cli", "stage2", "--config",
                           str(ROOT / "xbt_ray" / "configs" / "tiny.yaml"), *overrides], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=1400)
    assert done.returncode == 0, done.stderr[-3000:]
    tars = shards.dataset_fingerprint(shards.list_shards(str(tmp_path / "tars")))
    for modality in ("image", "text"):   # one cache per model (old, new) of the tars
        found = sorted((Path(config.cache_dir) / "embeddings").glob(f"*/{tars}/{modality}"))
        assert len(found) == 2, found
        for directory in found:
            counts = cache.completed_counts(directory)
            assert counts["rows_in"] == n and counts["deduplicated"] == 0, directory
    hits = [line for line in (tmp_path / "runs" / "laion" / "logs" / "driver.log")
            .read_text().splitlines() if "embedding cache hit" in line]
    eval_dir = world_dir / "eval_split"
    for files, modality in ((world_dir / "text", "text"), (eval_dir / "images", "image"),
                            (eval_dir / "captions.parquet", "text")):
        reused = f"/{shards.dataset_fingerprint(shards.list_shards(str(files)))}/{modality} ("
        assert sum(reused in line for line in hits) == 2, (files, hits)   # old and new model
    summary = json.loads((tmp_path / "runs" / "laion" / "stage2" / "stage2.json").read_text())
    assert (summary["objective"], summary["mode"]) == ("anchored", "lora")
    data = summary["data"]
    assert data["rows_in"] == n and data["rows_used"] > 0
    assert data["rows_in"] == data["rows_used"] + sum(data["skipped"].values())
    assert any("lora_" in t for t in summary["trained_tensors"])
    assert (tmp_path / "runs" / "laion" / "stage2" / "query_encoder.safetensors").is_file()


def test_second_run_reuses_world_models_and_embeddings(ray_session, tiny_run):
    config, _ = tiny_run
    again = dataclasses.replace(config, run_name="tiny-again")
    timings = {}
    embedded = embed_step(again, resolve_sources(again, timings), timings)
    assert embedded and all(result.reused for result in embedded.values())
    models = sorted(p.name for p in (Path(config.cache_dir) / "models").glob("*.safetensors"))
    assert len(models) == 2  # one old, one new: not retrained
