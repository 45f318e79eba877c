"""The evaluation suite on embeddings a user brings (no encoder, no Ray): directory layout and
manifest, every baseline, flips, backfill, report files and MLflow, via `xbt report`."""
import json

import numpy as np
import pytest

from xbt_ray.cli import main
from xbt_ray.data.cache import make_meta, write_embeddings
from xbt_ray.eval.suite import evaluate, load_inputs, write_manifest
from xbt_ray.config import EvalConfig

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
