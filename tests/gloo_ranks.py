"""Run a function on N gloo ranks in spawned processes, no Ray: the data-parallel checks.

`run_ranks(fn, world, *args)` starts `world` processes (torch.multiprocessing.spawn). Each one
joins a gloo process group on 127.0.0.1 at a free port, calls `fn(rank, world, *args)`, and
leaves the group. The result is {rank: what fn returned}. `fn` must be a module-level function
and return something picklable. RANK, LOCAL_RANK and WORLD_SIZE are set as a launcher sets
them (DeepSpeed reads them).
"""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, world, port, fn, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank_main, args=(world, port, fn, args, out), nprocs=world, join=True)
    return dict(out)
