"""Shared fixtures: one local Ray and one MLflow SQLite store per test session."""
import os
from pathlib import Path

import pytest

from xbt_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 logical CPUs, like this machine), started once for all tests."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # The dashboard (bound to 127.0.0.1) serves the state API that Ray Train V2's placement
    # group cleaner polls; without it a finished run's cleanup can stall the next run's start.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real MLflow SQLite store, created once (schema migrations take ~20 s)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def tiny_run(ray_session, mlflow_uri, tmp_path_factory):
    """The whole chain once on configs/tiny.yaml: (config, report)."""
    from xbt_ray.pipeline import run_pipeline

    work = tmp_path_factory.mktemp("chain")
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"cache_dir={work / 'cache'}", f"output_dir={work / 'runs'}", "run_name=tiny",
        f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=test-chain"])
    return config, run_pipeline(config)
