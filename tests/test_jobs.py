"""`ray job submit` against a real `ray start --head` cluster on 127.0.0.1: a step's entrypoint in
smoke mode as a job (working_dir + runtime_env, a Ray Train run inside it), then the same run name
again, which reuses its work. The step is stage 1 (the embeddings come from the session's chain);
every entrypoint in jobs/ is the same thin `main(argv)` over the CLI."""
import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from local_cluster import RAY, start_cluster, stop_cluster


@pytest.fixture(scope="module")
def job_cluster():
    cluster = start_cluster(num_cpus=2)
    yield cluster
    stop_cluster(cluster)


def _submit(cluster, entrypoint: str, args: list[str], timeout: float = 900) -> str:
    """Submit, wait for the end, return the job's logs; fails unless the job SUCCEEDED."""
    for _ in range(30):  # the head's job agent comes up a little after `ray start` returns
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", cluster.dashboard_url, "--no-wait",
             "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "infra" / "runtime_env.yaml"),
             "--", sys.executable, entrypoint, *args],
            env=cluster.env, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in submit.stderr:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = next(line.split("'")[1] for line in submit.stdout.splitlines()
                  if "submitted successfully" in line)
    deadline = time.time() + timeout
    status, verdict = "", f"job '{job_id.lower()}'"
    while time.time() < deadline:
        done = subprocess.run([RAY, "job", "status", "--address", cluster.dashboard_url, job_id],
                              env=cluster.env, capture_output=True, text=True)
        status = (done.stdout + done.stderr).lower()  # the CLI logs its verdict to stderr
        if any(f"{verdict} {word}" in status for word in ("succeeded", "failed", "was stopped")):
            break
        time.sleep(5)
    logs = subprocess.run([RAY, "job", "logs", "--address", cluster.dashboard_url, job_id],
                          env=cluster.env, capture_output=True, text=True).stdout
    assert f"{verdict} succeeded" in status, f"job {job_id}: {status[-500:]}\n{logs[-3000:]}"
    return logs


def test_stage1_job_succeeds_then_resubmission_reuses(job_cluster, tiny_run, mlflow_uri,
                                                      tmp_path):
    import mlflow

    config, _ = tiny_run  # its world, models and embeddings are reused by the job
    args = ["--smoke", "--run-name", "smoke-job", f"cache_dir={config.cache_dir}",
            f"output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_uri}",
            "tracking.experiment=test-jobs"]
    _submit(job_cluster, "jobs/stage1.py", args)
    stage1 = tmp_path / "runs" / "smoke-job" / "stage1"
    assert (stage1 / "projector.safetensors").is_file()
    summary = json.loads((stage1 / "stage1.json").read_text())
    assert summary["data"]["rows_used"] == 700   # the tiny world's caption corpus
    mtime_before = (stage1 / "projector.safetensors").stat().st_mtime_ns
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("test-jobs")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'smoke-job'")
    assert run.info.status == "FINISHED"
    assert any(name.startswith("train.stage1.") for name in run.data.metrics)

    logs = _submit(job_cluster, "jobs/stage1.py", args)  # same run name: stage 1 is reused
    assert "stage 1 already finished" in logs
    assert (stage1 / "projector.safetensors").stat().st_mtime_ns == mtime_before
