"""Faults: a Ray Train worker killed mid-stage-1 (restart from the last checkpoint, same number
of optimizer steps), a re-run under the same name (resumes, trains nothing), and the guard that
stops a step on a non-finite loss."""
import json
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from xbt_ray.config import ProjectorConfig, Stage1Config, TrainerConfig
from xbt_ray.data import cache
from xbt_ray.train.distributed import NonFiniteLoss, check_finite
from xbt_ray.train.stage1 import PROJECTOR_WEIGHTS, train_stage1

ROWS, BATCH, EPOCHS = 16384, 128, 6


def _caches(root):
    """Bring-your-own caches of ROWS captions: new 24-d, old 16-d; returns their directories."""
    rng = np.random.default_rng(0)
    new = rng.normal(size=(ROWS, 24)).astype(np.float32)
    old = np.tanh(new @ rng.normal(size=(24, 16))).astype(np.float32)
    keys = np.array([f"k{i}" for i in range(ROWS)], dtype=object)
    dirs = []
    for name, emb in (("new", new), ("old", old)):
        dirs.append(root / name)
        cache.write_embeddings(dirs[-1], keys, keys, emb,
                               cache.make_meta(name, "x", emb.shape[1], "faults", "text"))
    return dirs


def _checkpoints(run_dir):
    """Ray Train's checkpoint directories of a run (not its checkpoint_manager_snapshot.json)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def _kill_a_worker_after_first_checkpoint(run_dir, address, killed: list, timeout=300):
    """Wait until the first checkpoint is surely committed (a second one is being written),
    then SIGKILL one Ray Train worker of OUR cluster."""
    deadline = time.time() + timeout
    while time.time() < deadline and len(_checkpoints(run_dir)) < 2:
        time.sleep(0.1)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if ("RayTrainWorker" in " ".join(proc.info["cmdline"] or ())
                    and proc.environ().get("RAY_ADDRESS") == address):
                killed.append((proc.pid, len(_checkpoints(run_dir))))
                proc.kill()
                return
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def test_killed_worker_restarts_from_checkpoint_and_rerun_resumes(ray_session, tmp_path):
    new, old = _caches(tmp_path)
    storage, run = tmp_path / "ray", "faulty-stage1"
    args = dict(projector=ProjectorConfig(depth=1, width=32, procrustes_init=True),
                recipe=Stage1Config(epochs=EPOCHS, batch_size=BATCH, lr=1e-3),
                trainer=TrainerConfig(num_workers=2, cpus_per_worker=0.5, zero_stage=1),
                run_name=run, storage_path=storage, seed=0)
    killed: list = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(storage / run, ray_session.address, killed), daemon=True)
    killer.start()
    train_stage1(new, old, out_dir=tmp_path / "first", **args)
    killer.join()
    assert killed and 2 <= killed[0][1] < EPOCHS, "no worker was killed mid-run"

    final = _checkpoints(storage / run)[-1]
    info = json.loads((final / "state.json").read_text())
    assert info["epoch"] == EPOCHS - 1
    # every optimizer step of every epoch, once: none lost, none repeated after the restart
    assert info["optimizer_steps"] == EPOCHS * (ROWS // BATCH)
    # and the attempt that finished started from a checkpoint, not from scratch
    steps_per_epoch = ROWS // BATCH
    assert 0 < info["resumed_from_step"] < info["optimizer_steps"]
    assert info["resumed_from_step"] % steps_per_epoch == 0

    # the driver re-runs under the same name: it resumes at the end and trains nothing (no new
    # checkpoint: the same directories with the same files, untouched)
    def snapshot():
        return {str(p.relative_to(storage)): p.stat().st_mtime_ns
                for c in _checkpoints(storage / run) for p in c.rglob("*")}

    before = snapshot()
    train_stage1(new, old, out_dir=tmp_path / "again", **args)
    assert snapshot() == before
    first = load_file(str(tmp_path / "first" / PROJECTOR_WEIGHTS))
    again = load_file(str(tmp_path / "again" / PROJECTOR_WEIGHTS))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_non_finite_loss_stops_the_step_with_one_line():
    check_finite(torch.tensor(1.5), epoch=0, step=0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteLoss, match="non-finite loss .* at epoch 2 step 7; no step"):
            check_finite(torch.tensor(bad), epoch=2, step=7)
