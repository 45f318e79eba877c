"""DeepSpeed engines of xbt_ray.train.distributed on CPU, two gloo ranks, no Ray."""
import os

import torch
from gloo_ranks import run_ranks

from xbt_ray.config import TrainerConfig


def _engine_step(rank, world):
    os.environ["DS_ACCELERATOR"] = "cpu"   # before DeepSpeed is imported
    torch.set_num_threads(1)
    import deepspeed.comm.comm as ds_comm

    from xbt_ray.train.distributed import make_engine

    torch.manual_seed(0)
    engine = make_engine(torch.nn.Linear(4, 2), None, TrainerConfig(zero_stage=1), 2,
                         lr=0.1, weight_decay=0.0, total_steps=1, warmup_steps=0)
    # the ranks' gradients have opposite signs; their mean (-2 per weight) is negative
    x = torch.full((2, 4), 1.0 if rank == 0 else -3.0)
    engine.backward(engine(x).sum())
    engine.step()
    return {"shm_op_built": ds_comm.cdb.shm_comm_op is not None,
            "op_registered": hasattr(torch.ops.deepspeed, "inference_all_reduce_"),
            "weight": engine.module.weight.detach().clone()}


def test_cpu_engine_trains_without_building_the_shared_memory_comm_op():
    """make_engine keeps DeepSpeed from compiling (or loading) `deepspeed_shm_comm`, which only
    inference_all_reduce uses, and the engine still takes a data-parallel step. The loss is the
    sum of the outputs, so each weight's gradient is the sum of its input column: +2 on rank 0,
    -6 on rank 1, mean -2. AdamW's first step moves a weight by lr against the sign of its
    (averaged) gradient, so every weight on both ranks is its start + 0.1; unaveraged gradients
    would move rank 0's by -0.1. Without the skip, DeepSpeed's comm backend builds the op with g++
    and registers torch.ops.deepspeed.inference_all_reduce_."""
    out = run_ranks(_engine_step, 2)
    for rank in range(2):
        assert out[rank]["shm_op_built"] is False
        assert out[rank]["op_registered"] is False
    torch.manual_seed(0)
    start = torch.nn.Linear(4, 2).weight.detach()
    for rank in range(2):
        torch.testing.assert_close(out[rank]["weight"], start + 0.1, rtol=0, atol=1e-5)
