"""The shared half of the local-Ray-head recipe used by benchmarks/scaling.py (`LocalHead`) and
tests/local_cluster.py (`start_cluster` / `stop_cluster`): free ports for `ray start --head` on
127.0.0.1, and stopping such a head by its own processes only.

A head started with `--temp-dir=<a directory of its own>` is stopped by terminating (then
killing) exactly the processes whose command line names that directory, never with `ray stop`,
which would stop every Ray on the machine. Standard library only at import (psutil, which
ray[default] brings, is imported when stopping), so the benchmark's driver processes and the
tests' conftest can import it cheaply.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: Path, timeout: float = 10) -> None:
    """Terminate, then after `timeout` s kill, every process (but this one) whose command line
    names `temp_dir`; then remove `temp_dir`."""
    import psutil

    marker = str(temp_dir)
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(marker in a for a in p.info["cmdline"] or ()):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
