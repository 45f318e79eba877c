"""Bring your own embeddings end to end, from the CLI, with no encoder and no model files:
`xbt stage2 --embeddings` (stage 1 + psi-only stage 2, faithful and anchored) then
`xbt report --embeddings`, on exports in the layouts vector stores produce.

The exports are drawn from a small latent world: each image has a latent vector, its 3-5
captions are noisy copies of it, and the old and new models are two different random linear
maps (64-d old, 96-d new) of those latents, the old one seeing them through more noise (old->old
R@1 about 15, new->new about 85). Caption keys differ from image ids (COCO layout).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
LATENT, OLD_DIM, NEW_DIM = 24, 64, 96


def _world(rng, n_images, prefix, int_ids=False):
    images = rng.normal(size=(n_images, LATENT))
    ids = np.arange(n_images) + 1000 if int_ids else np.array(
        [f"{prefix}-img-{i}" for i in range(n_images)], dtype=object)
    caption_keys, caption_ids, captions = [], [], []
    for i in range(n_images):
        for j in range(rng.integers(3, 6)):
            caption_keys.append(f"{prefix}-cap-{i}-{j}")
            caption_ids.append(str(ids[i]))
            captions.append(images[i] + 1.0 * rng.normal(size=LATENT))
    return ids, images, np.array(caption_keys, dtype=object), np.array(caption_ids, dtype=object), \
        np.array(captions)


def _write_parquet(path, ids, emb, image_ids=None, layout="list32", id_name="key"):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {id_name: pa.array(ids.tolist())}
    if image_ids is not None:
        columns["image_id"] = pa.array(image_ids.tolist(), pa.string())
    if layout == "fixed16":
        columns["emb"] = pa.FixedSizeListArray.from_arrays(
            pa.array(emb.astype(np.float16).reshape(-1)), emb.shape[1])
    elif layout == "list64":
        columns["emb"] = pa.array(emb.astype(np.float64).tolist(), pa.list_(pa.float64()))
    else:
        columns["emb"] = pa.array(emb.astype(np.float32).tolist(), pa.list_(pa.float32()))
    pq.write_table(pa.table(columns), path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A manifest and exports in several layouts; the old model's vectors are not unit-norm,
    the new eval images use int64 ids, two eval captions are all-zero vectors."""
    root = tmp_path_factory.mktemp("byo")
    rng = np.random.default_rng(0)
    old_map, new_map = rng.normal(size=(LATENT, OLD_DIM)), rng.normal(size=(LATENT, NEW_DIM))
    shift = rng.normal(size=OLD_DIM) * 0.3      # the modality gap of the old model
    # the old model sees its inputs through more noise than the new one (a weaker model)
    old = lambda x, image=False: ((x + 1.2 * rng.normal(size=x.shape)) @ old_map  # noqa: E731
                                  + (shift if image else 0))
    new = lambda x: (x + 0.3 * rng.normal(size=x.shape)) @ new_map  # noqa: E731
    manifest = {"dataset": "latent-world", "protocol": "held-out"}

    corpus = rng.normal(size=(3000, LATENT))
    keys = np.array([f"txt-{i}" for i in range(len(corpus))], dtype=object)
    _write_parquet(root / "old_text.parquet", keys, 5 * old(corpus), layout="list64")
    _write_parquet(root / "new_text" / "part-0.parquet", keys[:1500], new(corpus[:1500]),
                   layout="fixed16")
    _write_parquet(root / "new_text" / "part-1.parquet", keys[1500:], new(corpus[1500:]),
                   layout="fixed16")
    manifest |= {"old_text": "old_text.parquet", "new_text": "new_text/"}

    ids, images, cap_keys, cap_ids, caps = _world(rng, 400, "pair")
    _write_parquet(root / "old_pair_images.parquet", ids, old(images, image=True))
    (root / "new_img_emb").mkdir()
    np.save(root / "new_img_emb" / "img_emb_0.npy", new(images).astype(np.float16))
    pq.write_table(pa.table({"key": ids.tolist()}), root / "new_img_meta.parquet")
    _write_parquet(root / "old_pair_texts.parquet", cap_keys, old(caps), cap_ids)
    _write_parquet(root / "new_pair_texts.parquet", cap_keys, new(caps), cap_ids)
    manifest |= {"old_pair_images": "old_pair_images.parquet",
                 "new_pair_images": {"path": "new_img_meta.parquet", "npy": "new_img_emb/"},
                 "old_pair_texts": "old_pair_texts.parquet",
                 "new_pair_texts": "new_pair_texts.parquet"}

    ids, images, cap_keys, cap_ids, caps = _world(rng, 120, "eval", int_ids=True)
    _write_parquet(root / "old_eval_images.parquet", ids, old(images, image=True))
    _write_parquet(root / "new_eval_images.parquet", ids, new(images))
    old_caps = old(caps)
    old_caps[:2] = 0   # items the vector store failed to embed
    _write_parquet(root / "old_eval_captions.parquet", cap_keys, old_caps, cap_ids)
    _write_parquet(root / "new_eval_captions.parquet", cap_keys, new(caps), cap_ids)
    manifest |= {f"{w}_eval_{k}": f"{w}_eval_{k}.parquet" for w in ("old", "new")
                 for k in ("images", "captions")}
    path = root / "manifest.yaml"
    path.write_text(json.dumps(manifest))   # JSON is YAML
    return path, len(cap_keys)


def _xbt(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "xbt_ray.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_byo_stage1_stage2_report_without_any_encoder(exports, tmp_path, mlflow_uri):
    manifest, n_eval_captions = exports
    common = [f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}",
              f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=test-byo",
              "trainer.num_workers=1", "projector.depth=1", "projector.width=64",
              "stage1.epochs=3", "stage1.batch_size=256",
              "stage2.mode=psi-only", "stage2.psi_lr=1e-3", "stage2.epochs=2",
              "stage2.batch_size=128", "stage2_anchored.mode=psi-only",
              "stage2_anchored.epochs=2", "stage2_anchored.batch_size=128",
              "eval.backfill_points=0"]
    _xbt("stage2", "--embeddings", str(manifest), "--run-name", "byo", *common, cwd=tmp_path)
    run = tmp_path / "runs" / "byo"
    stage2 = json.loads((run / "stage2_anchored" / "stage2.json").read_text())
    assert stage2["mode"] == "psi-only" and stage2["models_built"] is None
    assert stage2["objective"] == "anchored"
    assert stage2["trained_tensors"] and all(t.startswith("psi.") for t in
                                             stage2["trained_tensors"])
    data = stage2["data"]
    assert data["rows_in"] == data["rows_used"] + sum(data["skipped"].values())
    joins = stage2["data"]["joins"]
    assert joins["new_pair_texts->new_pair_images"]["unmatched_left"] == 0
    assert not (run / "stage2" / "query_encoder.safetensors").exists()   # no model to export

    _xbt("report", "--embeddings", str(manifest), "--run-name", "byo", *common, cwd=tmp_path)
    report = json.loads((run / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert {"old->old", "new->new", "xbt-stage1->old", "xbt->old", "xbt-anchored->old",
            "procrustes-both->old"} <= set(rows)
    assert report["n_images"] == 120
    assert report["n_captions"] == n_eval_captions - 2        # two zero vectors skipped
    data = report["data"]
    assert data["old_eval_captions"]["skipped"] == {"zero_vector": 2}
    assert data["old_text"]["renormalized"] == 3000           # exported without normalising
    assert data["new_pair_images"]["rows_embedded"] == 400
    assert data["stage1"]["joins"]["old_text~new_text"]["joined"] == 3000
    assert rows["new->new"]["i2t"]["R1"] > rows["old->old"]["i2t"]["R1"] + 30
    for method in ("xbt-anchored->old", "procrustes-both->old"):
        for direction in ("i2t", "t2i"):
            assert rows[method][direction]["R1"] > rows["old->old"][direction]["R1"], method
