"""Benchmark presets: how big each measurement is. `small` fits a 2-core laptop in < 15 minutes,
`gpu` uses real CLIP architectures (random weights, nothing downloaded), `micro` is the test's.

Every measurement is a ratio against a baseline timed in the same run, interleaved with it and
repeated `repeats` times; the median is quoted (see benchmarks/README.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    old_model: str                   # open_clip config names; random weights, saved to a file
    new_model: str
    repeats: int = 3                 # paired (baseline, measured) repetitions; median quoted
    # a. embedding pipeline vs a bare encode loop
    world_image_size: int = 64       # JPEG side of the generated demo-world images
    pipeline_images: int = 24576     # images per pipeline / bare-loop run (fixed costs ~6 s)
    rows_per_shard: int = 1024       # the small "overhead" run embeds one shard
    embed_batch: int = 256
    embed_actors: int = 1
    actor_cpus: float = 1.0          # Ray CPUs of the encoder actor; the CPU stage gets the rest
    encoder_threads: int = 0         # the actor's torch threads (0: its CPUs); small: every core
    block_images: int = 891          # Ray Data block = this many decoded images (891 x 224^2 x 3
                                     # bytes = Ray's default 128 MiB); scaled for small images
    # b. projector training vs the matmul floor
    train_cases: tuple = ((768, 512), (1024, 512))
    train_depth: int = 2
    train_width: int = 1024
    train_batch: int = 512
    train_window: int = 6            # steps per timed window
    train_ray: bool = True           # also through train_stage1 (Ray Train + DeepSpeed)
    ray_train_rows: int = 16384
    ray_train_epochs: int = 4
    ray_train_workers: int = 2
    # c. exact search (large-scale COCO I2T protocol) vs the matmul floor
    eval_images: int = 35_504        # image queries
    eval_captions: int = 177_644     # caption gallery
    eval_queries: int = 4096         # queries timed (0: all eval_images); full time extrapolated
    eval_dim: int = 512
    eval_chunk_mib: float = 256
    # d. sweep: K trials over one embedding cache vs K x (embed + train)
    sweep_trials: int = 2            # each trial is a full Ray Train run: 30-100 s on 2 busy cores
    sweep_captions: int = 4096
    sweep_epochs: int = 2
    # e. upgrade economics (throughputs measured here, sizes of a real upgrade)
    encoder_batch: int = 256
    encoder_window: int = 3          # batches per timed window
    stage2_batch: int = 128
    stage2_window: int = 3
    n_text: int = 1_000_000          # caption corpus embedded by old and new text towers
    n_pairs: int = 400_000           # image-text training pairs (old + new, both modalities)
    stage1_epochs: int = 20          # Stage1Config default
    stage2_epochs: int = 3           # Stage2Config default
    galleries: tuple = (1_000_000, 100_000_000, 1_000_000_000)
    # scaling: driver peak RSS, object-store peak and seconds per row of the embedding job and
    # of stage 1 at sizes N, 4N, 16N (benchmarks/scaling.py), each in a fresh driver process
    scaling_rows: int = 100_000      # N; the largest size is N x factor^(sizes - 1) = 1.6M
    scaling_factor: int = 4
    scaling_sizes: int = 3
    scaling_cases: str = "embed,stage1"
    scaling_model: str = "xbt-test-old"  # the smallest text tower registered here (embed case)
    scaling_stage1_batch: int = 4096     # capped at N/4 so that a small N still has steps
    scaling_object_store_gib: float = 4.0  # the local head's fixed object store
    scaling_sample_s: float = 0.5    # object store sampling interval
    scaling_timeout_s: float = 3600  # per driver process
    use_ray: bool = True             # a (pipeline), b (Ray Train row), d and scaling need Ray

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "small": Preset(name="small", old_model="xbt-demo-old", new_model="xbt-demo-new",
                    encoder_threads=2),
    "gpu": Preset(name="gpu", old_model="ViT-B-32", new_model="ViT-L-14",
                  world_image_size=256, pipeline_images=16384, embed_actors=1, actor_cpus=4.0,
                  ray_train_rows=262_144, ray_train_epochs=4, ray_train_workers=1,
                  eval_queries=0, sweep_trials=3, sweep_captions=16384, sweep_epochs=2,
                  encoder_window=5, stage2_window=5),
    # the test's: tiny models, a tiny gallery, no Ray
    "micro": Preset(name="micro", old_model="xbt-test-old", new_model="xbt-test-new", repeats=3,
                    world_image_size=32, pipeline_images=256, rows_per_shard=128,
                    embed_batch=64, train_cases=((96, 64),), train_width=128, train_batch=64,
                    train_window=2, train_ray=False, eval_images=500, eval_captions=2500,
                    eval_queries=200, eval_dim=64, eval_chunk_mib=1, sweep_trials=2,
                    sweep_captions=256, encoder_batch=32, encoder_window=1, stage2_batch=16,
                    stage2_window=1, use_ray=False),
}
