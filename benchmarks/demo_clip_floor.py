"""The least time a cold `make demo` spends training its two demo CLIPs on this machine.

A cold demo trains the old and the new CLIP from scratch (`xbt_ray.train.demo_clip`, Ray Train
+ DeepSpeed, 2 workers here) before any XBT step runs. This script measures the floor of that:
the recipe's training step as a bare single-process torch loop (all cores' threads, the whole
global batch: forward, CLIP's symmetric InfoNCE at the model's learned temperature, backward,
AdamW, no Ray, no DeepSpeed, no data loading), times the recipe's optimizer steps
(`demo_clip.steps_per_epoch`, as `clip_loop` schedules them: rows in, broken ones included,
so the floor is high by the broken share: 0.8% on the demo world). Beside it,
the CPU work of the data stage (JPEG decode, resize, tokenise: `shards.decode_pairs`, the
pipeline's own UDF) per epoch, which shares the same cores in the pipeline.

Batches are real rows of the demo world's image-text shards (pixels and tokens as training
sees them), so caption lengths are real. Median over `--repeats` windows of `--window` steps,
after one warm-up step. The world is built (a few seconds, no Ray) if the cache lacks it.

    python -m benchmarks.demo_clip_floor --config configs/demo.yaml [--repeats 3 --window 10]
    -> benchmarks/results/demo_clip_floor-<run_name>.json and a table on stdout

Pass the measured cold timings (`--measured old=268.7 --measured new=495.6`, seconds, e.g.
from a cold run's `step train_old_clip done in ...` log lines) to get the fraction of each
that the floor explains.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import torch

from benchmarks.measure import RESULTS, device_info, median
from xbt_ray.config import load_config
from xbt_ray.data import shards
from xbt_ray.models import clip
from xbt_ray.pipeline import build_demo_world
from xbt_ray.train.demo_clip import steps_per_epoch
from xbt_ray.train.losses import contrastive_loss


def real_batch(files: list[str], rows: int, model_name: str) -> tuple[dict, float]:
    """The first `rows` usable training rows of the shards, decoded as training decodes them;
    returns (batch of `pixels` (rows, H, W, 3) uint8 and `tokens` (rows, context) int64 tensors,
    seconds of `decode_pairs` per row)."""
    table = pq.read_table(files[0], columns=["key", "image_id", "jpg", "txt"])
    raw = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    start = time.perf_counter()
    out = shards.decode_pairs(raw, clip.image_size(model_name), model_name)
    decode_s_per_row = (time.perf_counter() - start) / len(table)
    keep = np.flatnonzero(out["skip_reason"] == "")
    if len(keep) < rows:
        raise ValueError(f"{files[0]} has {len(keep)} usable rows, fewer than the batch {rows}")
    keep = keep[:rows]
    return ({"pixels": torch.from_numpy(np.stack(out["pixels"][keep])),
             "tokens": torch.from_numpy(np.stack(out["tokens"][keep]))}, decode_s_per_row)


def step_seconds(model_name: str, lock_text: bool, batch: dict, lr: float, repeats: int,
                 window: int) -> float:
    """Median seconds of one bare training step of `model_name` on `batch` (see module doc)."""
    clip.register(model_name)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name)
    if lock_text:
        model.lock_text_tower()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    images = clip.pixels_to_input(batch["pixels"], model.visual.preprocess_cfg)

    def step():
        image_f, text_f, scale = model(images, batch["tokens"])
        loss = contrastive_loss(image_f, text_f, 1 / scale)   # clip_loop's loss, one rank
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(window):
            step()
        times.append((time.perf_counter() - start) / window)
    return median(times)


def measure(config, repeats: int, window: int, measured: dict[str, float]) -> dict:
    files = shards.list_shards(str(build_demo_world(config) / "image_text"))
    rows = shards.shard_rows(files)
    out = {"config_run_name": config.run_name, "image_text_rows": rows, "models": {},
           "device": device_info("cpu", torch.get_num_threads()),
           "repeats": repeats, "window": window}
    for which in ("old", "new"):
        name, recipe = getattr(config, which).name, getattr(config, f"train_{which}")
        batch, decode_s = real_batch(files, recipe.batch_size, name)
        step_s = step_seconds(name, recipe.lock_text_tower, batch, recipe.lr, repeats, window)
        steps = steps_per_epoch(rows, recipe) * recipe.epochs
        row = {"model": name, "epochs": recipe.epochs, "batch_size": recipe.batch_size,
               "optimizer_steps": steps, "step_s": step_s, "train_floor_s": steps * step_s,
               "decode_s_per_row": decode_s, "decode_cpu_s": decode_s * rows * recipe.epochs}
        if which in measured:
            row["measured_s"] = measured[which]
            row["floor_fraction"] = row["train_floor_s"] / measured[which]
        out["models"][which] = row
    out["train_floor_s"] = sum(m["train_floor_s"] for m in out["models"].values())
    out["device"]["load_average_end"] = os.getloadavg()
    return out


def table(res: dict) -> str:
    lines = ["| model | steps (epochs x rows/batch) | bare step, s | train floor, s | "
             "decode CPU, s | measured cold, s | floor / measured |", "|---" * 7 + "|"]
    for which, m in res["models"].items():
        lines.append(f"| {which} ({m['model']}) | {m['optimizer_steps']} ({m['epochs']} x "
                     f"{res['image_text_rows']}/{m['batch_size']}) | {m['step_s']:.3f} | "
                     f"{m['train_floor_s']:.0f} | {m['decode_cpu_s']:.0f} | "
                     f"{m.get('measured_s', float('nan')):.0f} | "
                     f"{m.get('floor_fraction', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--measured", action="append", default=[], metavar="WHICH=SECONDS",
                   help="a measured cold training time: old=<s> or new=<s> (repeatable)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    config = load_config(args.config, args.overrides)
    measured = {k: float(v) for k, v in (m.split("=", 1) for m in args.measured)}
    res = measure(config, args.repeats, args.window, measured)
    out = args.out or RESULTS / f"demo_clip_floor-{config.run_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"both CLIPs: train floor {res['train_floor_s']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
