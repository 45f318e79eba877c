"""The evaluation suite on embeddings a user brings (no encoder, no Ray): directory layout and
manifest, every baseline, flips, backfill, report files and MLflow, via `xbt report`."""
import json

import numpy as np
import pytest

from xbt_ray.cli import main
from xbt_ray.config import ConfigError, EvalConfig
from xbt_ray.data.cache import make_meta, write_embeddings
from xbt_ray.eval.report import format_table
from xbt_ray.eval.suite import evaluate, load_inputs, write_manifest

N_IMG, CAPS, D_OLD, D_NEW = 40, 3, 8, 12


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _world(seed=0):
    """Latent concepts seen by an 'old' (noisy, 8-d) and a 'new' (clean, 12-d) model."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((N_IMG, 16))
    old_view, new_view = rng.standard_normal((16, D_OLD)), rng.standard_normal((16, D_NEW))

    def embed(x, view, noise):
        return _unit(x @ view + noise * rng.standard_normal((len(x), view.shape[1])))

    cap_latent = np.repeat(latent, CAPS, axis=0) + 0.3 * rng.standard_normal((N_IMG * CAPS, 16))
    return {"old_images": embed(latent, old_view, 2.0), "new_images": embed(latent, new_view, 0.3),
            "old_captions": embed(cap_latent, old_view, 2.0),
            "new_captions": embed(cap_latent, new_view, 0.3)}


def _write(directory, keys, image_ids, emb, name):
    write_embeddings(directory, np.array(keys), np.array(image_ids), emb,
                     make_meta(name, "byo", emb.shape[1], "byo-split", "x"), dtype="float32")


def _layout(root):
    image_keys = [f"img{i}" for i in range(N_IMG)]
    cap_keys = [f"img{i}-{j}" for i in range(N_IMG) for j in range(CAPS)]
    cap_ids = [f"img{i}" for i in range(N_IMG) for _ in range(CAPS)]
    split, support = _world(0), _world(1)  # support: other items seen by the same models
    for role, emb in split.items():
        keys, ids = (image_keys, image_keys) if "images" in role else (cap_keys, cap_ids)
        _write(root / "eval" / role, keys, ids, emb, role.split("_")[0])
        s_keys = [f"s-{k}" for k in keys]
        s_ids = [f"s-{i}" for i in ids]
        _write(root / "support" / role, s_keys, s_ids, support[role], role.split("_")[0])
    # an upgraded query encoder exported from a vector store: here the old view itself
    _write(root / "queries" / "mine" / "images", image_keys, image_keys, split["old_images"], "q")
    _write(root / "queries" / "mine" / "captions", cap_keys, cap_ids, split["old_captions"], "q")
    return root


def test_directory_layout_report_and_mlflow(tmp_path, capsys):
    root = _layout(tmp_path / "byo")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["report", "--inputs", str(root), "--out", str(tmp_path / "out"),
                 "--run-name", "byo", f"tracking.tracking_uri={uri}", "eval.backfill_points=3",
                 "eval.support_holdout=0.5"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert methods == ["old->old", "new->new", "mine->old", "procrustes-text->old",
                       "procrustes-image->old", "procrustes-both->old", "ridge->old",
                       "slerp->old", "slerp-mid->old"]
    rows = {r["method"]: r for r in report["rows"]}
    # the query set identical to the old gallery's own embeddings reproduces old->old exactly
    assert rows["mine->old"]["i2t"] == rows["old->old"]["i2t"]
    assert rows["mine->old"]["flips"] == {d: {"PFR": 0.0, "NFR": 0.0} for d in ("i2t", "t2i")}
    assert rows["slerp->old"]["needs_old_encoder"] and not rows["ridge->old"]["needs_old_encoder"]
    assert report["n_images"] == N_IMG and report["n_captions"] == N_IMG * CAPS
    assert set(report["backfill"]) == {"procrustes-both->old"}
    for name in ("report.md", "report.csv", "compatibility.png", "backfill.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "procrustes-both->old" in capsys.readouterr().out

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("xbt-ray").experiment_id])
    assert "slerp_to_old.i2t.R1" in run.data.metrics
    assert "procrustes-both_to_old.backfill_auc.t2i.distance" in run.data.metrics
    assert "ridge_to_old.i2t.PFR" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.csv", "compatibility.png", "backfill.png"} <= artifacts


def test_manifest_with_lists_and_costs_equals_directory(tmp_path):
    root = _layout(tmp_path / "byo")
    manifest = write_manifest(
        tmp_path / "inputs.json",
        {r: root / "eval" / r for r in ("old_images", "new_images", "old_captions",
                                        "new_captions")},
        {"mine": {"images": root / "queries/mine/images",
                  "captions": root / "queries/mine/captions"}},
        {"old_captions": [root / "support/old_captions"],
         "new_captions": [root / "support/new_captions"],
         "old_images": root / "support/old_images", "new_images": root / "support/new_images"},
        "byo", "custom", {"mine->old": {"old_forward_passes": 7}})
    cfg = EvalConfig(backfill_points=0, support_holdout=0.5)
    from_manifest = evaluate(load_inputs(manifest), cfg)
    from_dir = evaluate(load_inputs(root), cfg)
    strip = lambda r: {k: v for k, v in r.items() if k != "cost"}  # noqa: E731
    assert [strip(r) for r in from_manifest["rows"]] == [strip(r) for r in from_dir["rows"]]
    assert from_manifest["rows"][2]["cost"] == {"old_forward_passes": 7}
    assert "backfill" not in from_manifest


def test_no_support_skips_baselines_and_errors_are_one_line(tmp_path):
    root = _layout(tmp_path / "byo")
    import shutil

    shutil.rmtree(root / "support")
    report = evaluate(load_inputs(root), EvalConfig(backfill_points=0))
    assert [r["method"] for r in report["rows"]] == ["old->old", "new->new", "mine->old"]
    from xbt_ray.config import ConfigError

    with pytest.raises(ConfigError, match="no eval/"):
        load_inputs(tmp_path)
    with pytest.raises(ConfigError, match="no evaluation inputs"):
        load_inputs(tmp_path / "missing")
    assert main(["report", "--inputs", str(tmp_path / "missing")]) == 2


# --- the split through xbt_ray.data.join: dropped rows, skipped vectors, id types ---------------

def _layout_without(root, drop_captions_of=(), zero_new_images=()):
    """`_layout`, then rewrite: the captions of some images removed from every caption cache
    (split and queries), some new image vectors set to zero (how vector stores export failures)."""
    _layout(root)
    image_keys = [f"img{i}" for i in range(N_IMG)]
    cap_keys = [f"img{i}-{j}" for i in range(N_IMG) for j in range(CAPS)]
    cap_ids = [f"img{i}" for i in range(N_IMG) for _ in range(CAPS)]
    split = _world(0)
    keep = [n for n, i in enumerate(cap_ids) if i not in drop_captions_of]
    for role, directory in (("old_captions", root / "eval/old_captions"),
                            ("new_captions", root / "eval/new_captions"),
                            ("old_captions", root / "queries/mine/captions")):
        _write(directory, [cap_keys[n] for n in keep], [cap_ids[n] for n in keep],
               split[role][keep], role.split("_")[0] if "eval" in str(directory) else "q")
    new_images = split["new_images"].copy()
    new_images[[image_keys.index(k) for k in zero_new_images]] = 0
    _write(root / "eval/new_images", image_keys, image_keys, new_images, "new")
    return root


def test_an_image_without_captions_is_dropped_and_counted_not_a_crash(tmp_path):
    root = _layout_without(tmp_path / "byo", drop_captions_of=("img3",))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["report", "--inputs", str(root), "--out", str(tmp_path / "out"),
                 "--run-name", "orphan", f"tracking.tracking_uri={uri}",
                 "eval.backfill_points=0", "eval.support_holdout=0.5"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n_images"] == N_IMG - 1 and report["n_captions"] == (N_IMG - 1) * CAPS
    data = report["data"]
    assert data["dropped"] == {"images_without_caption": 1, "captions_without_image": 0}
    link = data["joins"]["old_captions->old_images"]
    assert link == {"left_rows": (N_IMG - 1) * CAPS, "right_rows": N_IMG,
                    "joined": (N_IMG - 1) * CAPS, "unmatched_left": 0, "unmatched_right": 1}
    assert data["joins"]["mine->old:images"]["unmatched_right"] == 1  # its query is unused
    assert data["joins"]["support:old_captions->old_images"]["joined"] == N_IMG * CAPS
    assert "1 images without caption" in (tmp_path / "out" / "report.md").read_text()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("xbt-ray").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data.eval.dropped.images_without_caption"] == 1
    assert run.data.metrics["data.eval.joins.old_captions_to_old_images.unmatched_right"] == 1


def test_zero_vectors_in_an_eval_role_are_skipped_and_counted(tmp_path):
    root = _layout_without(tmp_path / "byo", zero_new_images=("img1", "img5"))
    report = evaluate(load_inputs(root), EvalConfig(backfill_points=0, support_holdout=0.5))
    data = report["data"]
    assert data["read"]["new_images"] == {"rows_in": N_IMG, "rows_used": N_IMG - 2,
                                          "skipped": {"zero_vector": 2}}
    assert data["read"]["old_images"]["skipped"] == {}
    assert data["joins"]["old_images~new_images"]["unmatched_left"] == 2
    # the two images left the split, and with them their captions (no gallery item to find)
    assert data["dropped"] == {"images_without_caption": 0, "captions_without_image": 2 * CAPS}
    assert report["n_images"] == N_IMG - 2 and report["n_captions"] == (N_IMG - 2) * CAPS
    assert "2 new_images rows skipped (zero vector)" in format_table(report)


def _write_int_keys(directory, keys, emb, name):
    """An image cache as some vector stores export it: int64 keys and image ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    meta = make_meta(name, "byo", emb.shape[1], "byo-split", "image")
    table = pa.table({"key": pa.array(keys, pa.int64()), "image_id": pa.array(keys, pa.int64()),
                      "emb": pa.FixedSizeListArray.from_arrays(
                          pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])})
    pq.write_table(table.replace_schema_metadata({f"xbt.{k}": json.dumps(v)
                                                  for k, v in meta.items()}),
                   directory / "part-00000.parquet")


def test_int64_image_keys_join_string_caption_image_ids(tmp_path):
    split = _world(0)
    ids = [1000 + i for i in range(N_IMG)]
    cap_keys = [f"ann-{n}" for n in range(N_IMG * CAPS)]
    cap_ids = [str(i) for i in ids for _ in range(CAPS)]
    for role in ("old_images", "new_images"):
        _write_int_keys(tmp_path / "eval" / role, ids, split[role], role.split("_")[0])
    for role in ("old_captions", "new_captions"):
        _write(tmp_path / "eval" / role, cap_keys, cap_ids, split[role], role.split("_")[0])
    _write_int_keys(tmp_path / "queries/mine/images", ids, split["old_images"], "q")
    _write(tmp_path / "queries/mine/captions", cap_keys, cap_ids, split["old_captions"], "q")
    report = evaluate(load_inputs(tmp_path), EvalConfig(backfill_points=0))
    assert report["n_images"] == N_IMG and report["n_captions"] == N_IMG * CAPS
    assert report["data"]["joins"]["old_captions->old_images"]["joined"] == N_IMG * CAPS
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["mine->old"]["i2t"] == rows["old->old"]["i2t"]


def test_split_in_memory_aligns_old_and_new_and_keeps_split_order():
    from xbt_ray.data.cache import Embeddings
    from xbt_ray.eval.compat import EvalSplit

    def table(keys, ids, values):
        return Embeddings(np.asarray(keys), np.asarray(ids, dtype=object),
                          np.asarray(values, np.float32)[:, None], {})

    split = EvalSplit(table(np.array([7, 42, 9], np.int64), [7, 42, 9], [1, 2, 3]),
                      table(np.array([9, 7, 42], np.int64), [9, 7, 42], [30, 10, 20]),
                      table(["c0", "c1", "c2", "c3"], ["42", "7", "42", "5"], [1, 2, 3, 4]),
                      table(["c3", "c2", "c1", "c0"], ["5", "42", "7", "42"], [40, 30, 20, 10]))
    assert split.image_ids.tolist() == ["7", "42"]             # 9 has no caption
    assert split.new_images.emb[:, 0].tolist() == [10, 20]
    assert split.old_captions.keys.tolist() == ["c0", "c1", "c2"]  # c3's image 5 is absent
    assert split.new_captions.emb[:, 0].tolist() == [10, 20, 30]
    assert split.dropped == {"images_without_caption": 1, "captions_without_image": 1}
    with pytest.raises(ConfigError, match=r"1 of 3 captions of the split have no embedding .*"
                                          r"'c2'"):
        split.rows_of(table(["c0", "c1"], ["42", "7"], [1, 2]), "caption", "mine->old")
