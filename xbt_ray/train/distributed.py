"""Ray Train + DeepSpeed plumbing shared by every training recipe.

A recipe is a per-worker function `loop(job, reporting)` run by `fit(...)` in a TorchTrainer:
`job` is the recipe's own frozen dataclass (what every worker needs: trainer layout, seed, row
count, recipe), `reporting` says where rank 0 reports. Inside it, `make_engine` wraps the
trainable module in a DeepSpeed engine (ZeRO stage and precision from `TrainerConfig`; CPU
accelerator here, CUDA on a GPU cluster), and `report_epoch` reports metrics with a checkpoint
that holds only the trained tensors (safetensors) plus a small JSON state.

Contrastive recipes need fresh negatives every epoch without a global all-to-all shuffle: their
datasets randomise file and block order per epoch, and `epoch_batches` shuffles rows within a
bounded local buffer (`trainer.shuffle_buffer_rows`), seeded by (seed, epoch, rank).

Progress (`Progress`): rank 0 logs a line every `trainer.log_every_steps` optimizer steps (step /
total, loss and its parts, learning rate, rows/s, ETA) and sends those and every epoch's mean
metrics to the driver's MLflow run, when the driver has one open (`fit` passes its id), from a
background thread. Losses are summed on the device; progress reads them only at those steps and
at the epoch's end (`check_finite` still reads each step's loss before backward).
Gradient clipping is explicit (`trainer.grad_clip`, 0 = off) because DeepSpeed's own default
clips at 1.0, which slowed the from-scratch demo CLIPs badly (old model, 6 epochs, I2T R@1
2.4 with clipping at 1.0 vs 11.0 without, same data and seed).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xbt_ray.config import TrainerConfig

WEIGHTS = "weights.safetensors"
STATE = "state.json"

log = logging.getLogger(__name__)


def deepspeed_config(trainer: TrainerConfig, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": {"stage": trainer.zero_stage},
        "bf16": {"enabled": trainer.precision == "bf16"},
        "steps_per_print": 1_000_000_000,
    }


def worker_setup(trainer: TrainerConfig, seed: int) -> tuple[int, int]:
    """Threads and seeds for this worker; returns (rank, world_size)."""
    import ray.train

    from xbt_ray import console

    console.worker_logging()
    torch.set_num_threads(max(1, int(trainer.cpus_per_worker)))
    torch.manual_seed(seed)
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def epoch_batches(shard, batch_size: int, trainer: TrainerConfig, seed: int, epoch: int,
                  rank: int):
    """This worker's torch batches of one epoch (`drop_last`), rows shuffled in a local buffer
    of `trainer.shuffle_buffer_rows` rows (0: stream order) seeded by (seed, epoch, rank), so
    batches differ from epoch to epoch and a rerun repeats them."""
    buffer = trainer.shuffle_buffer_rows or None
    return shard.iter_torch_batches(
        batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=buffer,
        local_shuffle_seed=(seed * 1_000_003 + epoch * 1_009 + rank) if buffer else None)


@dataclass(frozen=True)
class Reporting:
    """Where rank 0 of a training run reports. `label` names the run in log lines and MLflow
    metric names (`train.<label>.<metric>`); `every_steps` optimizer steps between progress
    lines (0: epoch ends only); `tracking_uri` / `mlflow_run_id`: the driver's open MLflow run
    (None: no MLflow logging, e.g. a sweep trial, which Tune's MLflow callback records)."""

    label: str
    every_steps: int
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


class Progress:
    """Step and epoch bookkeeping of one worker's loop; rank 0 reports (see the module doc).

    `steps_per_epoch` / `epochs` / `start_epoch` give step / total and the ETA; `global_batch`
    (rows per optimizer step over all workers) gives rows/s. Call `step(engine, loss=..., **parts)`
    after each optimizer step with 0-dim tensors (detached here, summed on their device) and
    `end_epoch(epoch)` for the epoch's means (a dict of floats, plus `epoch` and `steps`).
    """

    def __init__(self, reporting: Reporting, rank: int, steps_per_epoch: int, epochs: int,
                 start_epoch: int, global_batch: int):
        self.reporting, self.rank, self.global_batch = reporting, rank, global_batch
        self.total = steps_per_epoch * epochs
        self.done = steps_per_epoch * start_epoch
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0                      # in this epoch
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_sums: dict[str, torch.Tensor] = {}
        self.mlflow = (_MlflowSender(reporting) if rank == 0 and reporting.mlflow_run_id
                       else None)

    def step(self, engine, **values: torch.Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums.get(name, 0) + value
            self.window_sums[name] = self.window_sums.get(name, 0) + value
        self.steps += 1
        self.done += 1
        self.window_steps += 1
        every = self.reporting.every_steps
        if self.rank == 0 and every and self.done % every == 0:
            self._report_window(engine)

    def _report_window(self, engine) -> None:
        elapsed = time.perf_counter() - self.window_start
        means = {k: float(v) / self.window_steps for k, v in self.window_sums.items()}
        lr = engine.get_lr()[0] if engine.get_lr() else float("nan")
        rate = self.window_steps * self.global_batch / max(elapsed, 1e-9)
        eta = max(0, self.total - self.done) * elapsed / self.window_steps
        parts = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        log.info("%s step %d/%d %s lr %.2e %.0f rows/s ETA %s", self.reporting.label, self.done,
                 self.total, parts, lr, rate, _duration(eta))
        self._log_mlflow({f"step.{k}": v for k, v in means.items()}
                         | {"step.lr": lr, "step.rows_per_s": rate}, self.done)
        self.window_start, self.window_steps, self.window_sums = time.perf_counter(), 0, {}

    def end_epoch(self, epoch: int) -> dict:
        metrics = {k: float(v) / max(1, self.steps) for k, v in self.sums.items()}
        metrics |= {"epoch": epoch, "steps": self.steps}
        if self.rank == 0:
            log.info("%s epoch %d: %s over %d steps", self.reporting.label, epoch,
                     " ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                              if k not in ("epoch", "steps")), self.steps)
            self._log_mlflow({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        self.sums, self.steps = {}, 0
        # the next window starts with the next epoch (not with this epoch's checkpoint write)
        self.window_start, self.window_steps, self.window_sums = time.perf_counter(), 0, {}
        return metrics

    def _log_mlflow(self, values: dict, step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.send(values, step)

    def close(self) -> None:
        """Wait (at most 60 s) for the MLflow metrics still queued; call after the last epoch."""
        if self.mlflow is not None:
            self.mlflow.close()


class _MlflowSender:
    """Rank 0's metrics to the driver's MLflow run from a background thread, so a slow or
    unreachable tracking server never holds up a training step (the other ranks would wait for
    rank 0 at the next collective). The first failure (store unreachable from this node, run
    not found, credentials missing) turns it off with one warning; training goes on."""

    def __init__(self, reporting: Reporting):
        import queue

        self.reporting = reporting
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="xbt-mlflow", daemon=True)
        self.thread.start()

    def send(self, values: dict, step: int) -> None:
        self.queue.put((dict(values), step, int(time.time() * 1000)))

    def close(self, timeout: float = 60) -> None:
        self.queue.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        from xbt_ray.tracking import metric_name

        label, run_id = self.reporting.label, self.reporting.mlflow_run_id
        try:
            import mlflow
            from mlflow.entities import Metric

            client = mlflow.MlflowClient(self.reporting.tracking_uri)
            client.get_run(run_id)   # reachable, and the run exists in this store
        except Exception as err:
            log.warning("%s: MLflow logging off (run %s not reachable from this worker: %s)",
                        label, run_id, err)
            return
        while (item := self.queue.get()) is not None:
            values, step, now = item
            try:
                client.log_batch(run_id, metrics=[
                    Metric(metric_name("train", label, k), float(v), now, step)
                    for k, v in values.items()])
            except Exception as err:  # MLflow down: training goes on, the log says so once
                log.warning("%s: MLflow logging off after an error: %s", label, err)
                return


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def make_engine(module: torch.nn.Module, params, trainer: TrainerConfig, micro_batch: int,
                lr: float, weight_decay: float, total_steps: int, warmup_steps: int,
                start_step: int = 0):
    """A DeepSpeed engine with AdamW and a linear-warmup cosine schedule (from `start_step`).

    `params`: parameter groups (each may set its own lr), or None for all trainable parameters.
    """
    import deepspeed

    _skip_inference_comm_op()
    _lift_scalar_parameters(module)
    if params is None:  # every trainable parameter, looked up after the lift above
        params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps = max(1, total_steps)

    def schedule(step: int) -> float:
        step += start_step
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(trainer, micro_batch))
    return engine


SHM_COMM_OP = "deepspeed_shm_comm"


def _skip_inference_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce op.

    On the CPU accelerator, DeepSpeed's torch comm backend builds `deepspeed_shm_comm` (a C++
    extension, compiled by the host's g++ through ninja) whenever it starts: about 40 s on
    2 cores, once per Python environment, and again when the environment's path changes. The op
    serves only `inference_all_reduce` (deepspeed/comm/torch.py, DeepSpeed 0.19). Training's
    collectives go through torch.distributed either way, so weights do not change. Marking the
    op incompatible in DeepSpeed's probe table, which that module caches for edits, makes
    `build_shm_op` return None. Accelerators without the builder (CUDA) are left alone, so
    their processes do not run the probe.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        return
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible[SHM_COMM_OP] = False


def _lift_scalar_parameters(module: torch.nn.Module) -> None:
    """0-dim parameters (open_clip's logit_scale) become shape (1,): DeepSpeed broadcasts
    parameters as byte views, which a 0-dim tensor cannot give. Values are unchanged."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.dim() == 0:
                lifted = torch.nn.Parameter(param.detach().reshape(1),
                                            requires_grad=param.requires_grad)
                setattr(sub, name, lifted)


def engine_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def trained_state(engine, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the module's parameters (gathered under ZeRO-3); all ranks call this."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    wanted = [n for n in params if names is None or n in names]
    with deepspeed.zero.GatheredParameters([params[n] for n in wanted],
                                           enabled=engine.zero_optimization_stage() == 3):
        return {n: params[n].detach().float().cpu().clone() for n in wanted}


class NonFiniteLoss(FloatingPointError):
    """Raised instead of a backward pass on a NaN/inf loss: the step is not taken and no
    checkpoint is written from the corrupted state; the run fails with this one line (after Ray
    Train's restarts from the last good checkpoint)."""


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop before backward when the (global-batch) loss is NaN or inf."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at epoch {epoch} step {step}; "
                            "no step taken, last good checkpoint kept (check lr, temperature "
                            "and the input embeddings)")


def report_epoch(metrics: dict, state: dict[str, torch.Tensor], info: dict, rank: int) -> None:
    """Every rank calls this once per epoch; rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, WEIGHTS))
        Path(tmp, STATE).write_text(json.dumps(info))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(module: torch.nn.Module) -> tuple[int, int]:
    """Load the run's latest checkpoint (the trained tensors) into `module`, when Ray Train
    restored one (re-run under the same name, or a worker restart).

    Returns (epoch to start, optimizer steps already taken), (0, 0) without a checkpoint. Loops
    record `optimizer_steps` = those + `engine.global_steps` in each checkpoint's info, and
    `resumed_from_step` = those (0 for an attempt that started from scratch).
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as d:
        weights = load_file(os.path.join(d, WEIGHTS))
        info = json.loads(Path(d, STATE).read_text())
    params = dict(module.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise RuntimeError(f"checkpoint has tensors the model lacks, e.g. {unknown[0]}")
    with torch.no_grad():
        for name, value in weights.items():  # reshape: 0-dim params are lifted to (1,)
            params[name].copy_(value.reshape(params[name].shape))
    log.info("resumed from the checkpoint of epoch %d (%d optimizer steps)", info["epoch"],
             info.get("optimizer_steps", 0))
    return info["epoch"] + 1, info.get("optimizer_steps", 0)


def load_result_checkpoint(result) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, info) of a finished TorchTrainer result's last checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError(f"training run produced no checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        return load_file(os.path.join(d, WEIGHTS)), json.loads(Path(d, STATE).read_text())


def _worker(config: dict) -> None:
    """The TorchTrainer's per-worker entry point: the recipe's loop with its typed job."""
    config["loop"](config["job"], config["reporting"])


def driver_reporting(label: str, trainer: TrainerConfig) -> Reporting:
    """`Reporting` for a run started by this driver: its active MLflow run, if any."""
    import sys

    run_id = uri = None
    if "mlflow" in sys.modules:   # the pipeline opened a run; a sweep trial has none
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            run_id, uri = active.info.run_id, _absolute_store_uri(mlflow.get_tracking_uri())
    if run_id and uri.split(":", 1)[0] in ("sqlite", "file") and _alive_nodes() > 1:
        log.info("%s: training curves not sent to MLflow: the local store %s is not reachable "
                 "from the other nodes' workers (use a tracking server)", label, uri)
        run_id = uri = None
    return Reporting(label, trainer.log_every_steps, uri, run_id)


def _absolute_store_uri(uri: str) -> str:
    """A local store's URI with an absolute path: Ray Train workers run in other directories.
    `sqlite:///mlflow.db` -> `sqlite:////abs/mlflow.db`, `./mlruns` -> `file:///abs/mlruns`."""
    from pathlib import Path

    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    if "://" not in uri:
        return Path(uri).absolute().as_uri()
    return uri


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def fit(loop, job, trainer: TrainerConfig, run_name: str, storage_path: Path,
        datasets: dict | None = None, callbacks=None, label: str | None = None):
    """Run `loop(job, reporting)` on `trainer.num_workers` Ray Train workers; re-running the
    same name resumes. `label` (default `run_name`) names the run in progress lines and MLflow
    metrics."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Blocks reach the workers in stream order, so the split between workers (and with it each
    # rank's batches) is the same in every run with the same seed; costs some overlap of reads.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True

    resources = {"CPU": trainer.cpus_per_worker}
    if trainer.use_gpu:
        resources["GPU"] = 1
    result = TorchTrainer(
        _worker,
        train_loop_config={"loop": loop, "job": job,
                           "reporting": driver_reporting(label or run_name, trainer)},
        scaling_config=ScalingConfig(num_workers=trainer.num_workers, use_gpu=trainer.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=str(Path(storage_path).absolute()),
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks),
        datasets=datasets or {},
        dataset_config=DataConfig(execution_options=ingest),
    ).fit()
    if result.error:
        raise RuntimeError(f"training run {run_name} failed: {result.error}")
    return result
