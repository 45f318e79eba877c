"""xbt-ray benchmarks: every figure is a ratio against a baseline timed in the same run.

    python -m benchmarks.bench --preset small      # make bench  (2-core CPU, < 15 minutes)
    python -m benchmarks.bench --preset gpu        # same script on a GPU machine

Writes benchmarks/results/latest.json and latest.md. The parts, each interleaved with its
baseline and repeated (median quoted); see benchmarks/README.md for the method:
  a. pipeline_efficiency       Ray Data embedding job (embed_shards) vs a bare encode loop
  b. train_fraction_of_matmul  projector training (pairs/s) vs the torch.mm rate of its shapes
  c. eval_fraction_of_matmul   query_ranks vs the bare chunked q @ g.T (subprocess: peak RSS)
  d. sweep_time_ratio          K stage-1 trials over one cache vs K x (embed + train)
  e. xbt_over_backfill_1b      XBT's compute vs re-embedding a gallery, from a-d's throughputs
  scaling                      driver peak RSS, object-store peak, seconds per row of the
                               embedding job and stage 1 at N, 4N, 16N rows (benchmarks/scaling.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.measure import (
    RESULTS,
    WORK,
    device_info,
    encoder_rates,
    median,
    random_model,
    stage1_rate,
    stage2_rate,
    timed,
    train_step_fn,
)
from benchmarks.presets import PRESETS, Preset
from xbt_ray.config import (
    EmbedConfig,
    ModelConfig,
    ProjectorConfig,
    Stage1Config,
    TrainerConfig,
    WorldConfig,
)
from xbt_ray.data import cache, shards
from xbt_ray.data.embed import encoder_threads
from xbt_ray.models import clip
from xbt_ray.models.projector import Projector

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ("pipeline_efficiency", "train_fraction_of_matmul", "eval_fraction_of_matmul",
            "eval_peak_rss_gib", "sweep_time_ratio", "xbt_over_backfill_1b")
GOALS = {"pipeline_efficiency": (">=", 0.9), "train_fraction_of_matmul": (">=", 0.5),
         "eval_peak_rss_gib": ("<=", 2.0), "sweep_time_ratio": ("<", 1.0),
         "xbt_over_backfill_1b": ("<", 1.0)}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def demo_world(preset: Preset, work: Path) -> Path:
    """Parquet shards of the demo world (image-text pairs and a caption corpus), built once."""
    from xbt_ray.data.world import build_world, world_fingerprint

    cfg = WorldConfig(image_size=preset.world_image_size, n_train_images=preset.pipeline_images,
                      n_text_captions=preset.sweep_captions, n_eval_images=10,
                      rows_per_shard=preset.rows_per_shard, broken_fraction=0.0)
    out = work / "world" / world_fingerprint(cfg)
    if not (out / "manifest.json").is_file():
        say(f"building the demo world ({preset.pipeline_images} images) in {out}")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_world(cfg, tmp)
        tmp.rename(out)
    return out


# -----------------------------------------------------------------------------
# a. the embedding pipeline vs a bare single-process encode loop

def bare_encode(files: list[str], model: ModelConfig, batch_size: int, device: str) -> dict:
    """Read parquet, decode + preprocess (the pipeline's own functions), encode; one process."""
    start = time.perf_counter()
    clip_model, _ = clip.load_clip(model, device)
    loaded = time.perf_counter()
    size, n = clip.image_size(model.name), 0
    with torch.no_grad():
        for f in files:
            table = pq.read_table(f, columns=["key", "image_id", "jpg"])
            for rb in table.to_batches(max_chunksize=batch_size):
                batch = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}
                out = shards.decode_images(batch, size)
                pixels = torch.from_numpy(out["pixels"]).to(device)
                x = clip.pixels_to_input(pixels, clip_model.visual.preprocess_cfg)
                n += len(clip_model.encode_image(x, normalize=True).float().cpu())
    end = time.perf_counter()
    return {"images": n, "seconds": end - start, "load_s": loaded - start}


def pipeline_embed(files: list[str], model: ModelConfig, preset: Preset, work: Path) -> dict:
    """xbt_ray.data.embed.embed_shards into a fresh cache (so it encodes); seconds include Ray
    Data planning, actor start and model load, not ray.init."""
    from xbt_ray.data.embed import embed_shards

    cfg = EmbedConfig(batch_size=preset.embed_batch, num_actors=preset.embed_actors,
                      actor_num_cpus=preset.actor_cpus, encoder_threads=preset.encoder_threads)
    root = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    try:
        start = time.perf_counter()
        result = embed_shards(files, "image", model, root, cfg)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not result.reused
    return {"images": result.counts["rows_embedded"], "seconds": seconds}


def bench_pipeline(preset: Preset, world: Path, model: ModelConfig, device: str,
                   use_ray: bool, work: Path) -> dict:
    files = shards.list_shards(str(world / "image_text"))
    out = {"model": model.name, "images": preset.pipeline_images, "batch_size": preset.embed_batch,
           "shards": len(files), "rows_per_shard": preset.rows_per_shard,
           "encoder_actors": preset.embed_actors, "actor_cpus": preset.actor_cpus,
           "bare_threads": torch.get_num_threads(), "rounds": []}
    bare_encode(files[:1], model, preset.embed_batch, device)  # warm caches and imports
    if not use_ray:
        runs = [bare_encode(files, model, preset.embed_batch, device)
                for _ in range(preset.repeats)]
        out["bare_images_per_s"] = median(r["images"] / r["seconds"] for r in runs)
        out["skipped"] = "pipeline needs Ray (use_ray off): bare loop only"
        return out
    import ray.data

    # Ray Data sizes blocks in bytes (128 MiB by default). Scale the target so that a block holds
    # as many decoded images as a default block of 224 px images does: tiny demo images would
    # otherwise fit the whole dataset in one block and nothing could stream.
    size = clip.image_size(model.name)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = preset.block_images * size * size * 3
    out["target_max_block_mib"] = ctx.target_max_block_size / 2**20
    threads = torch.get_num_threads()
    actor_threads = encoder_threads(EmbedConfig(actor_num_cpus=preset.actor_cpus,
                                                encoder_threads=preset.encoder_threads))
    out["actor_threads"] = actor_threads
    try:
        # warm-up, as the bare loop had one: the first Ray Data run of a fresh Ray pays one-off
        # costs (worker processes, imports) that a long-running cluster does not
        pipeline_embed(files[:1], model, preset, work)
        for r in range(preset.repeats):
            order = ("bare", "pipeline", "small", "bare_actor_threads")
            got = {}
            for name in order if r % 2 == 0 else order[::-1]:
                if name == "bare":
                    got[name] = bare_encode(files, model, preset.embed_batch, device)
                elif name == "bare_actor_threads":  # diagnostic: the encoder actor's threads
                    torch.set_num_threads(actor_threads)
                    got[name] = bare_encode(files, model, preset.embed_batch, device)
                    torch.set_num_threads(threads)
                else:
                    got[name] = pipeline_embed(files if name == "pipeline" else files[:1], model,
                                               preset, work)
            bare, pipe, small = got["bare"], got["pipeline"], got["small"]
            bare_rate = bare["images"] / bare["seconds"]
            bare_steady = bare["images"] / (bare["seconds"] - bare["load_s"])
            pipe_rate = pipe["images"] / pipe["seconds"]
            # marginal rate: the small run (one shard) pays the same fixed costs
            pipe_steady = (pipe["images"] - small["images"]) / max(1e-9, pipe["seconds"]
                                                                   - small["seconds"])
            row = {"bare_s": bare["seconds"], "bare_load_s": bare["load_s"],
                   "pipeline_s": pipe["seconds"], "small_pipeline_s": small["seconds"],
                   "small_images": small["images"], "bare_images_per_s": bare_rate,
                   "pipeline_images_per_s": pipe_rate, "bare_steady_images_per_s": bare_steady,
                   "pipeline_steady_images_per_s": pipe_steady,
                   "efficiency_end_to_end": pipe_rate / bare_rate,
                   "efficiency_steady": pipe_steady / bare_steady,
                   "bare_actor_threads_steady_images_per_s": got["bare_actor_threads"]["images"]
                   / (got["bare_actor_threads"]["seconds"] - got["bare_actor_threads"]["load_s"])}
            row["efficiency_steady_vs_actor_threads"] = (
                pipe_steady / row["bare_actor_threads_steady_images_per_s"])
            out["rounds"].append(row)
            say(f"a. round {r + 1}/{preset.repeats}: bare {bare_rate:.0f} img/s, pipeline "
                f"{pipe_rate:.0f} img/s end-to-end, steady {pipe_steady:.0f} vs "
                f"{bare_steady:.0f} img/s")
    finally:
        ctx.target_max_block_size = saved
    rounds = out["rounds"]
    for key in ("bare_images_per_s", "pipeline_images_per_s", "bare_steady_images_per_s",
                "pipeline_steady_images_per_s", "efficiency_end_to_end", "efficiency_steady",
                "bare_actor_threads_steady_images_per_s", "efficiency_steady_vs_actor_threads",
                "pipeline_s", "small_pipeline_s"):
        out[key] = median(r[key] for r in rounds)
    out["fixed_overhead_s"] = median(r["small_pipeline_s"] - r["small_images"]
                                     / r["pipeline_steady_images_per_s"] for r in rounds)
    out["pipeline_efficiency"] = out["efficiency_steady"]
    out["headline"] = ("steady state: marginal images/s of the pipeline (full run minus a "
                       "one-shard run, so Ray Data planning, actor start and model load cancel) "
                       "over the bare loop's images/s after its model load")
    return out


# -----------------------------------------------------------------------------
# b. projector training vs the matmul floor of its shapes

def linear_shapes(psi: torch.nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in psi.modules()
            if isinstance(m, torch.nn.Linear)]


def projector_flops(psi: torch.nn.Module) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs per pair of psi's matmuls. Backward = weight
    gradients of every layer + input gradients of every layer but the first (its input, the
    cached embedding, needs none): ~3x forward."""
    shapes = linear_shapes(psi)
    forward = sum(2 * i * o for i, o in shapes)
    first_in, first_out = shapes[0]
    return forward, 3 * forward - 2 * first_in * first_out


def matmul_floor_step(psi: torch.nn.Module, batch: int, device: str):
    """One step's worth of bare torch.mm calls with psi's shapes: forward, input grads (not for
    the first layer) and weight grads."""
    mats = []
    for k, (i, o) in enumerate(linear_shapes(psi)):
        mats.append((torch.randn(batch, i, device=device), torch.randn(o, i, device=device),
                     torch.randn(batch, o, device=device), k > 0))

    def step():
        for x, w, dy, input_grad in mats:
            torch.mm(x, w.t())
            if input_grad:
                torch.mm(dy, w)
            torch.mm(dy.t(), x)
    return step


def paired_rounds(baseline, measured, window: int, rounds: int, device: str) -> dict:
    """Alternate `window` calls of baseline and measured, `rounds` times; per-round ratios
    baseline_time / measured_time (wall and CPU time), medians, and the best-of ratio."""
    for _ in range(2):
        baseline(), measured()
    base_w, meas_w, base_c, meas_c = [], [], [], []
    for r in range(rounds):
        for name in ("base", "meas") if r % 2 == 0 else ("meas", "base"):
            fn = baseline if name == "base" else measured
            wall, cpu = timed(lambda: [fn() for _ in range(window)], device)
            (base_w if name == "base" else meas_w).append(wall / window)
            (base_c if name == "base" else meas_c).append(cpu / window)
    return {"baseline_s": base_w, "measured_s": meas_w,
            "ratio": median(b / m for b, m in zip(base_w, meas_w)),
            "ratio_cpu_time": median(b / m for b, m in zip(base_c, meas_c)),
            "ratio_best_of": min(base_w) / min(meas_w),
            "baseline_step_s": median(base_w), "measured_step_s": median(meas_w)}


def bench_train_case(d_in: int, d_out: int, depth: int, width: int, batch: int, window: int,
                     rounds: int, device: str) -> dict:
    torch.manual_seed(0)
    psi = Projector(d_in, d_out, depth, width).to(device)
    fwd, total = projector_flops(psi)
    got = paired_rounds(matmul_floor_step(psi, batch, device), train_step_fn(psi, batch, device),
                        window, rounds, device)
    return {"d_in": d_in, "d_out": d_out, "depth": depth, "width": width, "batch": batch,
            "flops_forward_per_pair": fwd, "flops_per_pair": total,
            "loss_logit_flops_per_pair": 3 * 2 * batch * d_out,  # B x B logits, fwd + bwd
            "matmul_gflops": total * batch / got["baseline_step_s"] / 1e9,
            "upper_bound_pairs_per_s": batch / got["baseline_step_s"],
            "pairs_per_s": batch / got["measured_step_s"],
            "fraction_of_matmul": got["ratio"], "fraction_cpu_time": got["ratio_cpu_time"],
            "fraction_best_of": got["ratio_best_of"], "rounds": rounds, "window_steps": window}


class EpochClock:
    """Ray Train callback (runs on the controller): appends the wall time of every report."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(f"{time.time()}\n")


def bench_train_ray(preset: Preset, d_in: int, d_out: int, device: str, work: Path) -> dict:
    """Stage 1 through train_stage1 (Ray Train + DeepSpeed): steady pairs/s from the times of
    its epoch reports (epochs 2..E; the first pays worker start and DeepSpeed init)."""
    from ray.train import UserCallback

    from xbt_ray.train.stage1 import train_stage1

    class Clock(EpochClock, UserCallback):
        pass

    rng = np.random.default_rng(0)
    rows = preset.ray_train_rows
    keys = np.array([f"cap{i:07d}" for i in range(rows)], dtype=object)

    def table(name, dim):  # a bring-your-own cache of unit vectors
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        directory = work / f"stage1-{name}-{time.time_ns()}"
        cache.write_embeddings(directory, keys, keys, x / np.linalg.norm(x, axis=1, keepdims=True),
                               cache.make_meta(name, "random", dim, "bench", "text"))
        return directory

    new, old = table("new", d_in), table("old", d_out)
    gpu = device == "cuda"
    trainer = TrainerConfig(num_workers=preset.ray_train_workers, use_gpu=gpu,
                            cpus_per_worker=1.0 if gpu else 0.5)
    recipe = Stage1Config(epochs=preset.ray_train_epochs, batch_size=preset.train_batch)
    clock = work / f"epochs-{time.time_ns()}.txt"
    start = time.time()
    train_stage1(new, old, ProjectorConfig(depth=preset.train_depth, width=preset.train_width),
                 recipe, trainer, run_name=f"bench-stage1-{time.time_ns()}",
                 storage_path=work / "ray-train", out_dir=work / "stage1-out", seed=0,
                 callbacks=[Clock(str(clock))])
    total = time.time() - start
    stamps = [float(x) for x in clock.read_text().split()]
    clock.unlink()
    pairs_per_epoch = (rows // recipe.batch_size) * recipe.batch_size
    steady = pairs_per_epoch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"d_in": d_in, "d_out": d_out, "rows": rows, "epochs": recipe.epochs,
            "batch": recipe.batch_size, "workers": trainer.num_workers,
            "cpus_per_worker": trainer.cpus_per_worker, "zero_stage": trainer.zero_stage,
            "total_s": total, "first_report_s": stamps[0] - start,
            "epoch_s": list(np.diff(stamps)), "pairs_per_s": steady}


def bench_train(preset: Preset, device: str, use_ray: bool, work: Path) -> dict:
    rounds = 2 * preset.repeats + 1
    cases = []
    for d_in, d_out in preset.train_cases:
        case = bench_train_case(d_in, d_out, preset.train_depth, preset.train_width,
                                preset.train_batch, preset.train_window, rounds, device)
        cases.append(case)
        say(f"b. {d_in}->{d_out}: {case['pairs_per_s']:.0f} pairs/s, matmul bound "
            f"{case['upper_bound_pairs_per_s']:.0f} pairs/s ({case['matmul_gflops']:.1f} GFLOP/s)"
            f", fraction {case['fraction_of_matmul']:.2f}")
    out = {"cases": cases, "train_fraction_of_matmul": cases[0]["fraction_of_matmul"],
           "headline_case": f"{cases[0]['d_in']}->{cases[0]['d_out']}"}
    if use_ray and preset.train_ray:
        d_in, d_out = preset.train_cases[0]
        psi = Projector(d_in, d_out, preset.train_depth, preset.train_width).to(device)
        floor = matmul_floor_step(psi, preset.train_batch, device)

        def bound():  # the matmul bound just before / after the Ray run (load drifts)
            times = [timed(lambda: [floor() for _ in range(preset.train_window)], device)[0]
                     / preset.train_window for _ in range(3)]
            return preset.train_batch / median(times)

        before = bound()
        ray_row = bench_train_ray(preset, d_in, d_out, device, work)
        after = bound()
        ray_row["upper_bound_pairs_per_s"] = median([before, after])
        ray_row["fraction_of_matmul"] = ray_row["pairs_per_s"] / ray_row["upper_bound_pairs_per_s"]
        ray_row["over_single_process"] = ray_row["pairs_per_s"] / cases[0]["pairs_per_s"]
        out["ray_train"] = ray_row
        say(f"b. Ray Train + DeepSpeed {d_in}->{d_out}: {ray_row['pairs_per_s']:.0f} pairs/s "
            f"steady, fraction {ray_row['fraction_of_matmul']:.2f} "
            f"(run {ray_row['total_s']:.0f} s)")
    return out


# -----------------------------------------------------------------------------
# c. exact search vs the matmul floor (a subprocess, for its own peak memory)

def bench_eval(preset: Preset, cores: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.eval_search", "--images", str(preset.eval_images),
           "--captions", str(preset.eval_captions), "--queries", str(preset.eval_queries),
           "--dim", str(preset.eval_dim), "--max-chunk-mib", str(preset.eval_chunk_mib),
           "--repeats", str(2 * preset.repeats - 1), "--threads", str(cores)]
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"eval subprocess failed: {done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    say(f"c. query_ranks {out['queries_per_s']:.0f} queries/s, fraction of matmul "
        f"{out['eval_fraction_of_matmul']:.2f}, peak RSS {out['peak_rss_gib']:.2f} GiB, full "
        f"protocol ~{out['full_protocol_s']:.0f} s")
    return out


# -----------------------------------------------------------------------------
# d. a sweep's K trials over one embedding cache vs K x (embed + train)

def bench_sweep(preset: Preset, world: Path, old: ModelConfig, new: ModelConfig, device: str,
                work: Path) -> dict:
    """Each sweep trial resolves its caches through embed_shards on ONE cache root (the first
    trial encodes, later ones reuse) and trains stage 1 (train_stage1); each naive trial embeds
    into a fresh cache root, then trains. Reports the time ratio (the library calls a sweep
    makes, not `run_sweep` itself); that a real `run_sweep` runs no encoder is counted by
    tests/test_sweep.py::test_encoders_run_once_per_model_and_dataset_not_per_trial."""
    from xbt_ray.data.embed import embed_shards
    from xbt_ray.train.stage1 import train_stage1

    files = shards.list_shards(str(world / "text"))
    embed_cfg = EmbedConfig(batch_size=preset.embed_batch, num_actors=1, actor_num_cpus=1.0)
    gpu = device == "cuda"
    trainer = TrainerConfig(num_workers=1 if gpu else 2, use_gpu=gpu,
                            cpus_per_worker=1.0 if gpu else 0.5)
    recipe = Stage1Config(epochs=preset.sweep_epochs, batch_size=min(512, preset.sweep_captions))
    shared = Path(tempfile.mkdtemp(prefix="sweep-cache-", dir=work))
    trials = {"sweep": [], "naive": []}

    def trial(path: str, k: int) -> dict:
        root = shared if path == "sweep" else Path(tempfile.mkdtemp(prefix="naive-", dir=work))
        start = time.perf_counter()
        results = [embed_shards(files, "text", m, root, embed_cfg) for m in (new, old)]
        embedded = time.perf_counter()
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Train resets it
        train_stage1(results[0].directory, results[1].directory, ProjectorConfig(), recipe, trainer,
                     run_name=f"bench-{path}-{k}-{time.time_ns()}", storage_path=work / "ray-train",
                     out_dir=work / f"{path}-{k}", seed=k)
        end = time.perf_counter()
        if path == "naive":
            shutil.rmtree(root, ignore_errors=True)
        return {"embed_s": embedded - start, "train_s": end - embedded, "total_s": end - start,
                "encoded": [not r.reused for r in results]}

    try:
        for k in range(preset.sweep_trials):
            for path in ("sweep", "naive") if k % 2 == 0 else ("naive", "sweep"):
                trials[path].append(trial(path, k))
            say(f"d. trial {k + 1}/{preset.sweep_trials}: "
                f"sweep {trials['sweep'][-1]['total_s']:.1f}"
                f" s, naive {trials['naive'][-1]['total_s']:.1f} s")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    K = preset.sweep_trials
    sweep_s = sum(t["total_s"] for t in trials["sweep"])
    naive_s = sum(t["total_s"] for t in trials["naive"])
    embed = median(t["embed_s"] for t in trials["naive"])   # both encoders, fresh cache
    train = median(t["train_s"] for t in trials["sweep"] + trials["naive"])
    return {"trials": K, "captions": preset.sweep_captions, "stage1_epochs": recipe.epochs,
            "sweep_s": sweep_s, "naive_s": naive_s, "time_ratio": sweep_s / naive_s,
            "embed_both_s_median": embed, "train_s_median": train,
            # (E + K T) / (K (E + T)) from the medians: what the ratio would be without noise
            "time_ratio_model": (embed + K * train) / (K * (embed + train)),
            "trials_detail": trials}


# -----------------------------------------------------------------------------
# e. upgrade economics: XBT's compute vs a full backfill of the gallery

def economics(preset: Preset, rates: dict) -> dict:
    """Seconds of this device: XBT (fixed, independent of the gallery) vs backfill (per item)."""
    r = rates
    text_both = 1 / r["old_text_per_s"] + 1 / r["new_text_per_s"]
    image_both = 1 / r["old_image_per_s"] + 1 / r["new_image_per_s"]
    parts = {"embed_caption_corpus_s": preset.n_text * text_both,
             "embed_training_pairs_s": preset.n_pairs * (text_both + image_both),
             "stage1_s": preset.stage1_epochs * preset.n_text / r["stage1_pairs_per_s"],
             "stage2_s": preset.stage2_epochs * preset.n_pairs / r["stage2_pairs_per_s"]}
    xbt = sum(parts.values())
    galleries = [{"gallery_items": g, "backfill_s": g / r["new_image_per_s"], "xbt_s": xbt,
                  "xbt_over_backfill": xbt / (g / r["new_image_per_s"])}
                 for g in preset.galleries]
    return {"assumptions": {
                "gallery_modality": "images (backfill = new image tower over every gallery item)",
                "n_text_captions": preset.n_text, "n_training_pairs": preset.n_pairs,
                "stage1_epochs": preset.stage1_epochs, "stage2_epochs": preset.stage2_epochs,
                "encoders": "forward only on preprocessed inputs (decode excluded on both sides)",
                "training pairs": "embedded by old and new, image and text (anchored objective; "
                                  "the faithful one needs only the new model there)",
                "single device": "all work on this one device, fp32"},
            "rates": rates, "xbt_parts_s": parts, "xbt_s": xbt, "galleries": galleries,
            "break_even_gallery_items": xbt * r["new_image_per_s"],
            "xbt_over_backfill_1b": next(g["xbt_over_backfill"] for g in galleries
                                         if g["gallery_items"] == 1_000_000_000)}


def bench_economics(preset: Preset, world: Path, old: ModelConfig, new: ModelConfig,
                    device: str) -> dict:
    text_file = shards.list_shards(str(world / "text"))[0]
    captions = [str(t) for t in pq.read_table(text_file, columns=["txt"]).column("txt").to_pylist()]
    rates = encoder_rates(preset, old, new, captions[:preset.encoder_batch], device)
    rates["stage1_pairs_per_s"] = stage1_rate(preset, old, new, device)
    rates |= stage2_rate(preset, old, new, captions, device)
    out = economics(preset, rates)
    out["models"] = {"old": old.name, "new": new.name, "weights": "random (no download)"}
    say("e. XBT/backfill: " + ", ".join(f"{g['gallery_items']:.0e}: {g['xbt_over_backfill']:.3g}"
                                        for g in out["galleries"]))
    return out


# -----------------------------------------------------------------------------
# output

def check_goal(name: str, value) -> bool | None:
    if value is None or name not in GOALS:
        return None
    op, target = GOALS[name]
    return {">=": value >= target, "<=": value <= target, "<": value < target}[op]


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.3e}"
    return str(x)


def to_markdown(res: dict) -> str:
    d = res["device"]
    lines = [f"# xbt-ray benchmark: preset `{res['preset']}`", "",
             f"{res['started']}; {d.get('gpu') or d['cpu']}, {d['cores']} cores, torch "
             f"{d['torch']}; wall time {res['wall_time_s']:.0f} s; load average "
             f"{d['load_average_start'][0]:.1f} at start, {d['load_average_end'][0]:.1f} at end. "
             "Ratios are medians of paired rounds (see benchmarks/README.md).", "",
             "| metric | value | goal | met |", "|---|---|---|---|"]
    for name in HEADLINE:
        goal = GOALS.get(name)
        met = check_goal(name, res[name])
        lines.append(f"| {name} | {fmt(res[name])} | {' '.join(map(str, goal)) if goal else '-'} "
                     f"| {'-' if met is None else ('yes' if met else 'no')} |")
    p = res.get("pipeline") or {}
    if p.get("rounds"):
        lines += ["", "## a. embedding pipeline vs bare loop", "",
                  f"{p['images']} images, model {p['model']}, batch {p['batch_size']}, "
                  f"{p['encoder_actors']} encoder actor(s) x {p['actor_cpus']} CPU "
                  f"({p['actor_threads']} torch threads), bare loop {p['bare_threads']} threads, "
                  "blocks "
                  f"{p['target_max_block_mib']:.1f} MiB.", "",
                  "| | bare loop | pipeline |", "|---|---|---|",
                  f"| images/s end to end | {fmt(p['bare_images_per_s'])} | "
                  f"{fmt(p['pipeline_images_per_s'])} |",
                  f"| images/s steady | {fmt(p['bare_steady_images_per_s'])} | "
                  f"{fmt(p['pipeline_steady_images_per_s'])} |",
                  f"| ratio end to end / steady | | {fmt(p['efficiency_end_to_end'])} / "
                  f"{fmt(p['efficiency_steady'])} |",
                  f"| pipeline fixed overhead (s) | | {fmt(p['fixed_overhead_s'])} |",
                  f"| diagnostic: bare loop with the actor's {p['actor_threads']} thread(s), "
                  f"steady | {fmt(p['bare_actor_threads_steady_images_per_s'])} | ratio "
                  f"{fmt(p['efficiency_steady_vs_actor_threads'])} |"]
    t = res.get("train")
    if t:
        lines += ["", "## b. projector training vs matmul floor", "",
                  "| run | shape | pairs/s | matmul bound pairs/s | GFLOP/s | fraction | "
                  "fraction (CPU time) |", "|---|---|---|---|---|---|---|"]
        for c in t["cases"]:
            lines.append(f"| single process | {c['d_in']}->{c['d_out']} | {fmt(c['pairs_per_s'])} "
                         f"| {fmt(c['upper_bound_pairs_per_s'])} | {fmt(c['matmul_gflops'])} | "
                         f"{fmt(c['fraction_of_matmul'])} | {fmt(c['fraction_cpu_time'])} |")
        if "ray_train" in t:
            r = t["ray_train"]
            lines.append(f"| Ray Train + DeepSpeed, {r['workers']} workers (steady epochs) | "
                         f"{r['d_in']}->{r['d_out']} | {fmt(r['pairs_per_s'])} | "
                         f"{fmt(r['upper_bound_pairs_per_s'])} | - | "
                         f"{fmt(r['fraction_of_matmul'])} | - |")
            lines += ["", f"Ray Train row: {fmt(r['over_single_process'])}x the single-process "
                      f"pairs/s; first report after {fmt(r['first_report_s'])} s (worker start, "
                      "DeepSpeed init). Its bound is timed before and after the run, not "
                      "interleaved: treat it as indicative."]
    e = res.get("eval")
    if e:
        lines += ["", "## c. exact search (I2T, large-scale COCO sizes)", "",
                  f"{e['queries_timed']} of {e['images']} image queries vs {e['captions']} "
                  f"captions, dim {e['dim']}, {e['queries_per_chunk']} queries per chunk.", "",
                  "| queries/s | matmul GFLOP/s | fraction | fraction (CPU time) | "
                  "full protocol s (extrapolated) | peak RSS GiB |", "|---|---|---|---|---|---|",
                  f"| {fmt(e['queries_per_s'])} | {fmt(e['matmul_gflops'])} | "
                  f"{fmt(e['eval_fraction_of_matmul'])} | {fmt(e['fraction_cpu_time'])} | "
                  f"{fmt(e['full_protocol_s'])} | {fmt(e['peak_rss_gib'])} |"]
    s = res.get("sweep")
    if s:
        lines += ["", "## d. sweep over one cache vs K x (embed + train)", "",
                  "| K | sweep s | naive s | ratio | ratio (model) |",
                  "|---|---|---|---|---|",
                  f"| {s['trials']} | {fmt(s['sweep_s'])} | {fmt(s['naive_s'])} | "
                  f"{fmt(s['time_ratio'])} | {fmt(s['time_ratio_model'])} |"]
    x = res.get("economics")
    if x:
        lines += ["", f"## e. XBT vs full backfill ({x['models']['old']} -> {x['models']['new']},"
                  " throughputs measured here)", "",
                  "| gallery items | backfill s | XBT s | XBT / backfill |", "|---|---|---|---|"]
        for g in x["galleries"]:
            lines.append(f"| {g['gallery_items']:.0e} | {fmt(g['backfill_s'])} | "
                         f"{fmt(g['xbt_s'])} | {fmt(g['xbt_over_backfill'])} |")
        rates = ", ".join(f"{k} {fmt(v)}" for k, v in x["rates"].items())
        lines += ["", f"Rates: {rates}. Break-even gallery: {fmt(x['break_even_gallery_items'])} "
                  "items."]
    sc = res.get("scaling")
    if sc:
        st = sc["settings"]
        lines += ["", "## scaling: the embedding job and stage 1 at N, 4N, 16N rows", "",
                  f"One local Ray head ({st['head_num_cpus']} CPUs, object store "
                  f"{st['object_store_capacity_gib']:.1f} GiB); every size in a fresh driver "
                  f"process. Embed: {st['embed']['model']} text tower, caption shards of "
                  f"{st['rows_per_shard']} rows. Stage 1: bring-your-own float16 caches "
                  f"{st['stage1']['new_dim']}->{st['stage1']['old_dim']}, 1 epoch, batch "
                  f"{st['stage1']['batch_size']}. Object store: peak in use while the driver "
                  "ran, minus before.", "",
                  "| case | rows | driver peak RSS GiB | object store peak GiB | spilled GiB | "
                  "s/row (x1e6) | s |", "|---|---|---|---|---|---|---|"]
        for case in ("embed", "stage1"):
            for r in (sc.get(case) or {}).get("sizes", []):
                lines.append(f"| {case} | {r['rows']} | {fmt(r['driver_peak_rss_gib'])} | "
                             f"{fmt(r['object_store_peak_gib'])} | "
                             f"{fmt(r['object_store_spilled_gib'])} | "
                             f"{fmt(r['seconds_per_row'] * 1e6)} | {fmt(r['seconds'])} |")
        lines += ["", "| case | driver RSS growth (goal <= 1.2) | s/row growth (goal <= 1.3) | "
                  "object store growth | marginal s/row growth |", "|---|---|---|---|---|"]
        for case in ("embed", "stage1"):
            g = sc.get(case)
            if g and "goals" in g:
                met = {k: "" if v["met"] is None else (" (met)" if v["met"] else " (not met)")
                       for k, v in g["goals"].items()}
                lines.append(f"| {case} | {fmt(g['driver_rss_growth'])}{met['driver_rss_growth']}"
                             f" | {fmt(g['seconds_per_row_growth'])}"
                             f"{met['seconds_per_row_growth']} | {fmt(g['object_store_growth'])}"
                             f" | {fmt(g['marginal_seconds_per_row_growth'])} |")
    if res["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items())]
    return "\n".join(lines) + "\n"


def run(preset: Preset, out_dir: Path = RESULTS, use_ray: bool | None = None,
        work: Path = WORK, parts: tuple[str, ...] = ()) -> dict:
    """Every part of the benchmark (or only `parts`); writes out_dir/latest.json and latest.md;
    returns the dict."""
    use_ray = preset.use_ray if use_ray is None else use_ray
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"schema_version": 1, "preset": preset.name,
           "started": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": device_info(device, cores), "settings": preset.to_dict()}
    res |= {name: None for name in HEADLINE}
    res |= {"skipped": {}, "part_seconds": {}}
    selected = set(parts) or {"pipeline", "train", "eval", "sweep", "economics", "scaling"}
    world = demo_world(preset, work) if selected & {"pipeline", "sweep", "economics"} else None
    old, new = random_model(preset.old_model, work), random_model(preset.new_model, work)
    # one Ray instance for a, b and d; the scaling part starts a head of its own
    shared_ray = use_ray and bool(selected & {"pipeline", "train", "sweep"})
    if shared_ray:
        import ray

        os.environ.pop("RAY_ADDRESS", None)  # never join another Ray on this machine
        # Train V2's controller polls its workers every 2 s; the epoch clock (b) needs finer
        env = {"PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": env})
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    def part(key, fn, headline: dict) -> None:
        """Run one part; a failure is recorded (and the other parts still run)."""
        if parts and key not in parts:
            res["skipped"][key] = "not selected (--only)"
            return
        start = time.time()
        try:
            res[key] = fn()
        except Exception as e:  # one broken part must not lose the others' measurements
            res["skipped"][key] = f"failed: {type(e).__name__}: {str(e)[:500]}"
            say(f"{key} failed: {type(e).__name__}: {e}")
            return
        finally:
            res["part_seconds"][key] = time.time() - start
        for name, path in headline.items():
            res[name] = res[key].get(path)

    try:
        part("pipeline", lambda: bench_pipeline(preset, world, new, device, use_ray, work),
             {"pipeline_efficiency": "pipeline_efficiency"})
        part("train", lambda: bench_train(preset, device, use_ray, work),
             {"train_fraction_of_matmul": "train_fraction_of_matmul"})
        part("eval", lambda: bench_eval(preset, cores),
             {"eval_fraction_of_matmul": "eval_fraction_of_matmul",
              "eval_peak_rss_gib": "peak_rss_gib"})
        if use_ray:
            part("sweep", lambda: bench_sweep(preset, world, old, new, device, work),
                 {"sweep_time_ratio": "time_ratio"})
        part("economics", lambda: bench_economics(preset, world, old, new, device),
             {"xbt_over_backfill_1b": "xbt_over_backfill_1b"})
    finally:
        if shared_ray:
            import ray

            ray.shutdown()
    if use_ray:  # after the shared instance is gone: its own head, fresh driver processes
        from benchmarks.scaling import bench_scaling

        part("scaling", lambda: bench_scaling(preset, work, random_model(preset.scaling_model,
                                                                          work), device, cores),
             {})
    if not use_ray:
        res["skipped"] = {"pipeline": "needs Ray (bare loop measured only)",
                          "train.ray_train": "needs Ray", "sweep": "needs Ray",
                          "scaling": "needs Ray"} | res["skipped"]
    res["goals_met"] = {k: check_goal(k, res[k]) for k in HEADLINE}
    for case, got in (res.get("scaling") or {}).items():  # scaling.<case>.<growth>: <= goal
        if isinstance(got, dict) and "failed" in got:
            res["skipped"][f"scaling.{case}"] = f"failed: {got['failed'][-500:]}"
        for name, goal in (got.get("goals") or {}).items() if isinstance(got, dict) else ():
            res["goals_met"][f"scaling.{case}.{name}"] = goal["met"]
    res["device"]["load_average_end"] = os.getloadavg()
    res["wall_time_s"] = time.time() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("latest.json", json.dumps(res, indent=2, default=float) + "\n"),
                       ("latest.md", to_markdown(res))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.rename(out_dir / name)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--out", default=str(RESULTS), help="directory for latest.json / latest.md")
    p.add_argument("--no-ray", action="store_true", help="pure-compute parts only")
    p.add_argument("--only", default="", help="comma-separated parts: "
                   "pipeline,train,eval,sweep,economics,scaling (default: all)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override preset fields, e.g. repeats=5 eval_queries=0")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for item in args.set:
        key, value = item.split("=", 1)
        field = type(getattr(preset, key))
        preset = dataclasses.replace(preset, **{key: field(value) if field is not bool
                                                else value.lower() in ("1", "true", "yes")})
    logging.basicConfig(level=logging.WARNING)
    parts = tuple(x for x in args.only.split(",") if x)
    res = run(preset, Path(args.out), use_ray=False if args.no_ray else None, parts=parts)
    print(to_markdown(res))
    print(f"wrote {Path(args.out) / 'latest.json'} and latest.md in {res['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
