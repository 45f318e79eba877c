"""Shared fixtures: a local Ray cluster per test module, one MLflow SQLite store and one run of
the whole chain per test session."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_cluster import auth_env, start_cluster, stop_cluster

auth_env()  # before any test module imports ray

from xbt_ray.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    """A real local Ray (2 logical CPUs, like this machine): `ray start --head` on 127.0.0.1,
    one per test module, stopped after it (only its own processes).

    One cluster per module, not per session: on Ray 2.60, after about five Ray Train runs in one
    cluster a new TrainController can hang at "Requesting resources" with every CPU free.
    RAY_ADDRESS goes into this process's environment, so the pipeline's own `init_ray` (and any
    `xbt` call in-process) connects to this cluster.
    """
    import ray

    cluster = start_cluster(num_cpus=2)
    keys = ("RAY_ADDRESS", "RAY_TRAIN_V2_ENABLED")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: cluster.env[k] for k in keys})
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield cluster
    finally:
        ray.shutdown()
        stop_cluster(cluster)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real MLflow SQLite store, created once (schema migrations take ~20 s)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def tiny_run(mlflow_uri, tmp_path_factory):
    """The whole chain once on xbt_ray/configs/tiny.yaml, as a user runs it: `xbt run` in a
    process of its own, which starts (and ends) its own local Ray. Returns (config, report)."""
    work = tmp_path_factory.mktemp("chain")
    overrides = [f"cache_dir={work / 'cache'}", f"output_dir={work / 'runs'}", "run_name=tiny",
                 f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=test-chain"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = work / "xbt-run.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "xbt_ray.cli", "run", "--config",
                               str(ROOT / "xbt_ray" / "configs" / "tiny.yaml"), *overrides],
                              env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT, timeout=2400)
    if done.returncode != 0:
        raise RuntimeError(f"xbt run failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    config = load_config(ROOT / "xbt_ray" / "configs" / "tiny.yaml", overrides)
    return config, json.loads((config.run_dir / "report.json").read_text())
