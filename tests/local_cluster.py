"""A real local Ray cluster for tests: `ray start --head` on 127.0.0.1, stopped by its own
processes only (never `ray stop`, which would stop every Ray on the machine).

Every process of the cluster (raylet, GCS, dashboard, workers) inherits RAY_ADDRESS, so Ray's own
state-API lookups inside workers (Ray Train V2's placement-group cleaner) find THIS cluster even
when another Ray runs on the same machine.

The ports and the stop are shared with benchmarks/scaling.py's head (benchmarks/local_ray.py).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: a top-level folder

from benchmarks.local_ray import free_port, stop_head  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")


def auth_env() -> dict:
    """Token authentication for this process and the clusters it starts. Ray reads it once, at
    import: call this before anything imports ray (conftest does)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    return {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}


@dataclass
class LocalCluster:
    address: str          # GCS address, host:port
    dashboard_url: str    # job submission / state API
    temp_dir: Path
    env: dict             # environment that talks to this cluster (address and token set)


def start_cluster(num_cpus: int = 2) -> LocalCluster:
    port, dashboard_port = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="xr", dir="/tmp"))  # short: unix socket paths
    address = f"127.0.0.1:{port}"
    # Ray 2.60 turns token authentication on for `ray start`; clients need the same token
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_TRAIN_V2_ENABLED": "1",
           "RAY_USAGE_STATS_ENABLED": "0", **auth_env()}
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    f"--num-cpus={num_cpus}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats",
                    # the agents' default ports are fixed: a second Ray on the machine would
                    # leave this cluster without a job agent ("No available agent")
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}",
                    f"--metrics-export-port={free_port()}"],
                   env=env, check=True, capture_output=True, timeout=180)
    return LocalCluster(address, f"http://127.0.0.1:{dashboard_port}", temp_dir, env)


def stop_cluster(cluster: LocalCluster, timeout: float = 3) -> None:
    """Terminate (then, after `timeout` s, kill) exactly the processes of this cluster. A test
    cluster's state is thrown away, so a process slow to exit is not waited for long (with 10 s,
    every module's teardown took 11 s)."""
    stop_head(cluster.temp_dir, timeout)
    time.sleep(1)
