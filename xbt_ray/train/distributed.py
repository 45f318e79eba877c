"""Ray Train + DeepSpeed plumbing shared by every training recipe.

A recipe is a per-worker function `loop(config)` run by `fit(...)` in a TorchTrainer. Inside it,
`make_engine` wraps the trainable module in a DeepSpeed engine (ZeRO stage and precision from
`TrainerConfig`; CPU accelerator here, CUDA on a GPU cluster), and `report_epoch` reports metrics
with a checkpoint that holds only the trained tensors (safetensors) plus a small JSON state.

Contrastive recipes need fresh negatives every epoch without a global all-to-all shuffle: their
datasets randomise file and block order per epoch, and `epoch_batches` shuffles rows within a
bounded local buffer (`trainer.shuffle_buffer_rows`), seeded by (seed, epoch, rank).
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


def make_engine(module: torch.nn.Module, params, trainer: TrainerConfig, micro_batch: int,
                lr: float, weight_decay: float, total_steps: int, warmup_steps: int,
                start_step: int = 0):
    """A DeepSpeed engine with AdamW and a linear-warmup cosine schedule (from `start_step`).

    `params`: parameter groups (each may set its own lr), or None for all trainable parameters.
    """
    import deepspeed

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
    record `optimizer_steps` = those + `engine.global_steps` in each checkpoint's info.
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


def fit(loop, loop_config: dict, trainer: TrainerConfig, run_name: str, storage_path: Path,
        datasets: dict | None = None, callbacks=None):
    """Run `loop` on `trainer.num_workers` Ray Train workers; re-running the same name resumes."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": trainer.cpus_per_worker}
    if trainer.use_gpu:
        resources["GPU"] = 1
    result = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=trainer.num_workers, use_gpu=trainer.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=str(Path(storage_path).absolute()),
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks),
        datasets=datasets or {},
    ).fit()
    if result.error:
        raise RuntimeError(f"training run {run_name} failed: {result.error}")
    return result
