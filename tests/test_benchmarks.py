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
    assert res["pipeline_efficiency"] is None and res["sweep_time_ratio"] is None
    assert set(res["skipped"]) == {"pipeline", "train.ray_train", "sweep", "scaling"}
    assert res["pipeline"]["bare_images_per_s"] > 0

    # the raw measurements behind each ratio
    case = res["train"]["cases"][0]
    assert case["flops_per_pair"] > 2 * case["flops_forward_per_pair"]  # ~3x forward
    assert isinstance(case["fraction_of_matmul"], float) and case["rounds"] >= 3
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


# ----------------------------------------------------------------------------- scaling (no Ray)

from benchmarks import scaling  # noqa: E402


def test_scaling_inputs_are_whole_shards_and_valid_caches(tmp_path):
    """The synthetic inputs of the scaling part: caption shards in the img2dataset text layout
    and bring-your-own caches that the cache reader accepts, one directory per size."""
    import pyarrow.parquet as pq

    from xbt_ray.data import cache

    n = 200
    assert scaling.sizes(n) == [200, 800, 3200] and scaling.shard_rows(n) == 100
    assert scaling.shard_rows(100_000) == 50_000
    files = scaling.caption_corpus(tmp_path, 100, 8)
    assert len(files) == 8 and scaling.caption_corpus(tmp_path, 100, 8) == files  # built once
    table = pq.read_table(files[0])
    assert table.column_names == ["key", "txt"] and len(table) == 100
    assert all(5 <= len(t.split()) <= 15 for t in table.column("txt").to_pylist())
    keys = [k for f in files for k in pq.read_table(f).column("key").to_pylist()]
    assert len(set(keys)) == 800

    dirs = scaling.byo_caches(tmp_path, 100, 8, [200, 800])
    new, old = (cache.read_embeddings(d) for d in dirs[800])
    assert new.emb.shape == (800, scaling.NEW_DIM) and old.emb.shape == (800, scaling.OLD_DIM)
    assert list(new.keys) == list(old.keys) == keys
    assert len(cache.read_embeddings(dirs[200][0])) == 200


def test_scaling_growth_by_hand():
    def row(rows, rss, store, seconds):
        return {"rows": rows, "driver_peak_rss_gib": rss, "object_store_peak_gib": store,
                "seconds": seconds, "seconds_per_row": seconds / rows}

    got = scaling.summarise([row(100, 1.0, 0.5, 20.0), row(400, 1.1, 0.5, 50.0),
                             row(1600, 1.3, 0.6, 170.0)])
    assert got["driver_rss_growth"] == 1.3 and got["object_store_growth"] == 0.6 / 0.5
    assert got["seconds_per_row_growth"] == (170 / 1600) / (20 / 100)
    assert got["marginal_seconds_per_row"] == [30 / 300, 120 / 1200]
    assert got["goals"]["driver_rss_growth"] == {"value": 1.3, "goal": "<= 1.2", "met": False}
    assert got["goals"]["seconds_per_row_growth"]["met"] is True


# ----------------------------------------------------------------------------- cluster estimate

from benchmarks import cluster_estimate as ce  # noqa: E402


def test_flop_count_of_a_linear_layer_and_of_attention():
    import torch

    lin = torch.nn.Linear(8, 4, bias=False)
    assert ce.count_flops(lambda: lin(torch.randn(3, 8))) == 2 * 3 * 8 * 4
    # nn.MultiheadAttention in inference (its fused fast path, as in open_clip's image towers):
    # q, k, v and out projections (4 x 2 x n x d^2) plus the scores and the weighted sum
    # (2 x 2 x n^2 x d), for n tokens of width d
    n, d = 5, 8
    mha = torch.nn.MultiheadAttention(d, 2, batch_first=True).eval()
    x = torch.randn(1, n, d)
    with torch.no_grad():
        got = ce.count_flops(lambda: mha(x, x, x, need_weights=False))
    assert got == 4 * 2 * n * d * d + 2 * 2 * n * n * d
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    # attention forward + backward (torch's formula: 2 matmuls forward, 5 backward, as the CPU
    # kernel recomputes the scores), h heads of width d
    h = 2
    q = torch.randn(1, h, n, d, requires_grad=True)
    both = ce.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, q, q).sum().backward())
    assert both == (2 + 5) * 2 * h * n * n * d


def test_estimate_by_hand():
    rows = [{"work": "embed", "items": 7200, "rate": "new_image"},
            {"work": "train", "items": 3600, "rate": "stage1"}]
    sweep = {"work": "sweep", "items": 36000, "rate": "stage1"}
    gpu = {"new_image": 2.0, "stage1": 10.0}       # items/s
    here = {"new_image": 0.5, "stage1": 1.0}
    est = ce.estimate(rows, sweep, gpu, here)
    assert [r["gpu_hours"] for r in est["rows"]] == [1.0, 0.1, 1.0]
    assert est["total_gpu_hours"] == 1.1 and est["sweep_gpu_hours"] == 1.0
    assert est["total_here_hours"] == 4.0 + 1.0
    b = est["backfills"][0]                         # 1M images at 2 / s
    assert b["gallery_images"] == 10**6
    assert b["gpu_hours"] == 10**6 / 2 / 3600
    assert b["xbt_over_backfill"] == 1.1 / (10**6 / 2 / 3600)
    assert b["xbt_over_backfill_here"] == 5.0 / (10**6 / 0.5 / 3600)
    assert est["break_even_gallery_images"] == 1.1 * 3600 * 2


def test_gpu_projection_by_hand():
    measured = {"new_image": {"items_per_s": 1.0, "flops_per_item": 1e11, "utilisation": 0.5},
                "stage2": {"items_per_s": 0.1, "flops_per_item": 3e11, "utilisation": 0.25}}
    gpu = {"name": "G", "fp32": 20.0, "bf16": 100.0}
    precision = {"new_image": "bf16", "stage2": "fp32"}
    rates = ce.gpu_rates(measured, gpu, False, precision)
    assert rates["new_image"] == 0.5 * 100e12 / 1e11      # encoders at the cluster's precision
    assert rates["stage2"] == 0.25 * 20e12 / 3e11        # training at trainer.precision
    assert ce.gpu_rates(measured, gpu, True, precision)["stage2"] == 0.1  # measured on a GPU


def test_every_encoder_pass_at_one_precision():
    """XBT's encoder passes and the full backfill (priced at the new image tower's rate) share
    the cluster precision; training follows trainer.precision."""
    config = ce.load_config(ROOT / "configs" / "clip-b32-to-l14.yaml")
    for encoders in ("bf16", "fp16", "fp32"):
        got = ce.precisions(config, encoders)
        assert {got[k] for k in ce.ENCODERS} == {encoders}
        assert got["stage1"] == got["stage2"] == config.trainer.precision


def test_cluster_estimate_runs_on_the_tiny_models(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text(f"before\n{ce.BEGIN}\nold table\n{ce.END}\nafter\n")
    tiny = ROOT / "xbt_ray" / "configs" / "tiny.yaml"
    res = ce.main(["--config", str(tiny), "--out", str(tmp_path),
                   "--doc", str(doc), "--work", str(tmp_path / "work")])
    assert res["on_gpu"] is False
    for key, m in res["measured"].items():
        assert m["items_per_s"] > 0 and m["flops_per_item"] > 0 and m["utilisation"] > 0, key
    assert res["measured"]["stage2"]["flops_per_item"] > res["measured"]["new_image"][
        "flops_per_item"]                            # forward + backward through the tower
    est = res["estimate"]
    assert len(est["rows"]) == len(ce.workload(ce.load_config(tiny))) + 1
    assert est["total_gpu_hours"] > 0
    text = doc.read_text()
    assert "old table" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "Projection, not a GPU measurement" in text
    assert json.loads((tmp_path / "cluster.json").read_text())["estimate"] == json.loads(
        json.dumps(est))


def test_query_headroom_fit_learns_a_map_it_can_learn():
    """`fit_map` (psi's architecture, multi-positive InfoNCE) recovers a hidden rotation: the
    fitted queries find their own targets among 200 (R@1 100), a shuffled target set does not
    (chance is 0.5%). Captions of one image share its id and are all positives."""
    import numpy as np
    import torch

    from benchmarks.query_headroom import fit_map
    from xbt_ray.eval.retrieval import recall_at_k

    rng = np.random.default_rng(0)
    images = rng.normal(size=(200, 8)).astype(np.float32)
    ids = np.repeat(np.arange(200), 2)                      # 2 captions per image
    source = images[ids] + 0.01 * rng.normal(size=(400, 8)).astype(np.float32)
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0].astype(np.float32)
    target = images @ rotation
    for targets, low, high in ((target, 99.0, 100.0), (rng.permutation(target), 0.0, 10.0)):
        net = fit_map(source, targets[ids], ids, depth=0, width=16, epochs=300,
                      temperature=0.05, seed=0, batch=100)
        with torch.no_grad():
            query = net(torch.nn.functional.normalize(torch.from_numpy(source), dim=-1))
        r1 = recall_at_k(query.numpy(), targets, ids, np.arange(200), ks=(1,))[1]
        assert low <= r1 <= high, r1


def test_modality_gap_hand_computed():
    import numpy as np
    import pytest

    from benchmarks.modality_gap import modality_gap
    from xbt_ray.data.cache import Embeddings, as_ids

    images = Embeddings(as_ids(["a", "b"]), as_ids(["a", "b"]),
                        np.array([[1, 0], [0, 1]], np.float32), {})
    # c1 -> a at cosine 1, c2 -> a at cosine 0, c3 -> b at cosine 1 (not unit length: normalised)
    captions = Embeddings(as_ids(["c1", "c2", "c3"]), as_ids(["a", "a", "b"]),
                          np.array([[1, 0], [0, 1], [0, 2]], np.float32), {})
    gap = modality_gap(images, captions)
    assert gap["caption_rows"] == 3 and gap["dim"] == 2
    assert gap["paired_cosine"] == pytest.approx(2 / 3, abs=1e-4)
    # caption mean (1/3, 2/3); the mean of each caption's image (2/3, 1/3)
    assert gap["text_mean_norm"] == pytest.approx(5 ** 0.5 / 3, abs=1e-4)
    assert gap["gap_vector_norm"] == pytest.approx(2 ** 0.5 / 3, abs=1e-4)
    # sigma = sqrt((1 / (4/9) - 1) / 2) = sqrt(0.625)
    assert gap["matched_noise_sigma"] == pytest.approx(0.625 ** 0.5, abs=1e-4)


def test_demo_clip_floor_counts_the_recipes_steps_on_the_tiny_world(tmp_path):
    """benchmarks.demo_clip_floor on the tiny world and models: the optimizer steps are the
    recipe's (rows // batch x epochs, as clip_loop counts them), the floor is steps x the
    measured step, the fraction is floor / the measured time given, and the JSON is written.
    No timing assertion."""
    from benchmarks import demo_clip_floor
    from xbt_ray.data import shards

    out = tmp_path / "floor.json"
    demo_clip_floor.main(["--config", str(ROOT / "xbt_ray" / "configs" / "tiny.yaml"),
                          "--repeats", "1", "--window", "1", "--measured", "old=100",
                          "--out", str(out), f"cache_dir={tmp_path / 'cache'}",
                          "train_new.epochs=3", "train_new.batch_size=32"])
    res = json.loads(out.read_text())
    files = shards.list_shards(str(next((tmp_path / "cache" / "world").iterdir()) / "image_text"))
    rows = shards.shard_rows(files)
    assert res["image_text_rows"] == rows
    old, new = res["models"]["old"], res["models"]["new"]
    assert old["optimizer_steps"] == rows // 64 and new["optimizer_steps"] == rows // 32 * 3
    for m in (old, new):
        assert m["step_s"] > 0 and m["decode_s_per_row"] > 0
        assert m["train_floor_s"] == m["optimizer_steps"] * m["step_s"]
    assert old["floor_fraction"] == old["train_floor_s"] / 100 and "measured_s" not in new
    assert res["train_floor_s"] == old["train_floor_s"] + new["train_floor_s"]
