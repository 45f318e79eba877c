"""Stage 1 on a cache a user brings (no encoder): Ray Train + DeepSpeed fits psi."""
from pathlib import Path

import numpy as np
import pytest
import torch

from xbt_ray.config import ProjectorConfig, Stage1Config, TrainerConfig
from xbt_ray.data import cache
from xbt_ray.train.stage1 import load_projector, project, train_stage1


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def user_caches(tmp_path_factory):
    """'Vector store exports': new text 24-d; old text 16-d = a fixed nonlinear map of new."""
    rng = np.random.default_rng(0)
    new = _unit(rng.normal(size=(1024, 24)).astype(np.float32))
    mix = rng.normal(size=(24, 16)).astype(np.float32)
    old = _unit(np.tanh(new @ mix) + 0.05 * rng.normal(size=(1024, 16)).astype(np.float32))
    keys = np.array([f"cap{i:05d}" for i in range(1024)], dtype=object)
    root = tmp_path_factory.mktemp("byo")
    dirs = {}
    for name, emb in (("new", new), ("old", old)):
        dirs[name] = root / name
        meta = cache.make_meta(f"{name}-model", "exported", emb.shape[1], "captions", "text")
        cache.write_embeddings(dirs[name], keys, keys, emb, meta, rows_per_file=300)
    return dirs


PROJECTOR = ProjectorConfig(depth=1, width=32, procrustes_init=True)
RECIPE = Stage1Config(epochs=4, batch_size=128, lr=3e-3, noise_sigma=0.05)


def _fit(caches, out: Path, run_name: str, zero_stage: int = 1, log_every_steps: int = 50):
    trainer = TrainerConfig(num_workers=2, cpus_per_worker=0.5, zero_stage=zero_stage,
                            log_every_steps=log_every_steps)
    return train_stage1(caches["new"], caches["old"], PROJECTOR, RECIPE, trainer,
                        run_name=run_name, storage_path=out / "ray", out_dir=out / "stage1",
                        seed=0)


def _assert_psi_fits(out: Path, caches) -> None:
    new, old = (cache.read_embeddings(caches[k]) for k in ("new", "old"))
    psi = load_projector(out)
    assert (psi.d_in, psi.d_out, psi.depth) == (24, 16, 1)
    mapped = project(psi, new.emb)
    cos_trained = (mapped * old.emb).sum(1).mean()
    fresh = torch.nn.functional.normalize(torch.randn(1024, 16), dim=1).numpy()
    cos_random = (fresh * old.emb).sum(1).mean()
    assert cos_trained > 0.8 > cos_random + 0.5
    # text->text retrieval through psi finds the right old caption for most queries
    top1 = (mapped @ old.emb.T).argmax(1)
    assert (top1 == np.arange(1024)).mean() > 0.5


def test_stage1_with_zero1_fits_projector_and_a_rerun_gives_identical_weights(
        ray_session, user_caches, tmp_path):
    """Two runs from scratch with the same seed (each writes its own paired cache: the hash
    join's rows arrive in a different order each time) end with bit-identical psi weights."""
    from safetensors.torch import load_file

    from xbt_ray.train.stage1 import PROJECTOR_WEIGHTS

    first = _fit(user_caches, tmp_path / "a", "byo-z1")
    _assert_psi_fits(first, user_caches)
    second = _fit(user_caches, tmp_path / "b", "byo-z1-rerun")
    a, b = (load_file(str(out / PROJECTOR_WEIGHTS)) for out in (first, second))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_stage1_with_zero2_fits_and_sends_progress_and_epoch_metrics_to_the_open_mlflow_run(
        ray_session, user_caches, tmp_path, mlflow_uri):
    """ZeRO 2, run inside an open MLflow run (as the pipeline does): psi fits, and rank 0's
    progress every 2 steps and each epoch's metrics arrive in that run, with their steps."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("test-stage1-progress")
    with mlflow.start_run() as run:
        out = _fit(user_caches, tmp_path, "byo-progress", zero_stage=2, log_every_steps=2)
    _assert_psi_fits(out, user_caches)
    client = mlflow.MlflowClient(mlflow_uri)
    epochs = client.get_metric_history(run.info.run_id, "train.byo-progress.loss")
    assert [m.step for m in epochs] == list(range(RECIPE.epochs))
    steps_per_epoch = 1024 // RECIPE.batch_size
    progress = client.get_metric_history(run.info.run_id, "train.byo-progress.step.loss")
    assert [m.step for m in progress] == list(range(2, RECIPE.epochs * steps_per_epoch + 1, 2))
    for name in ("info_nce", "cosine", "steps"):
        assert client.get_metric_history(run.info.run_id, f"train.byo-progress.{name}")
    rates = client.get_metric_history(run.info.run_id, "train.byo-progress.step.rows_per_s")
    assert rates and all(m.value > 0 for m in rates)
