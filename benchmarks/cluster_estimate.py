"""GPU-hours of the cluster upgrade in docs/cluster.md (CLIP ViT-B/32 -> ViT-L/14), next to a
full backfill, from throughputs measured on this machine.

    python -m benchmarks.cluster_estimate [--config configs/clip-b32-to-l14.yaml] [--gpu a10g]
        [--precision bf16]

Measured here, with the config's real architectures (seeded random weights: same compute as the
OpenAI ones, nothing downloaded): items/s of the four encoder towers (forward), pairs/s of a
stage-2 step (LoRA on the new image tower, frozen text tower and psi), rows/s of a stage-1 step
(psi of the config's depth and width), FLOPs per item of each (torch's FlopCounterMode) and this
device's fp32 matmul rate.

Every encoder pass is priced at ONE precision, `--precision` (default bf16: what
`embed.precision: auto` runs on a GPU): XBT's own embedding jobs and the full backfill alike,
so the break-even gallery is not flattered by an fp32 backfill. Training runs at the config's
`trainer.precision`. On a GPU the encoders are timed at that precision (torch.autocast, as the
embedding job runs them) and the measured rates are the estimate. On a CPU everything is timed
in fp32 and the GPU's rate is projected: each step is assumed to reach the same fraction of the
GPU's datasheet peak at its precision as it reached here of the measured fp32 matmul rate. That
is an assumption, marked as such in the output; run this script on one GPU node to replace it.

Writes benchmarks/results/cluster.json and cluster.md and rewrites the table between the
`cluster-estimate` markers in docs/cluster.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from pathlib import Path

import torch
from torch.utils import flop_counter

from benchmarks.measure import (
    RESULTS,
    WORK,
    device_info,
    encoder_rates,
    random_model,
    stage1_rate,
    stage2_rate,
    timed,
    train_step_fn,
)
from benchmarks.presets import PRESETS
from xbt_ray.config import ModelConfig, ProjectorConfig, load_config
from xbt_ray.models import clip
from xbt_ray.models.projector import Projector

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cluster.md"
BEGIN, END = "<!-- cluster-estimate:begin -->", "<!-- cluster-estimate:end -->"

# Datasheet peaks (dense TFLOP/s, tensor cores for bf16 / fp16) of the GPUs the cluster files name.
GPU_PEAKS = {"a10g": {"name": "NVIDIA A10G", "fp32": 31.2, "bf16": 125.0, "fp16": 125.0},
             "a100": {"name": "NVIDIA A100 40GB", "fp32": 19.5, "bf16": 312.0, "fp16": 312.0}}
# Precision of every encoder pass on the cluster (XBT's and the full backfill's): `--precision`
ENCODER_PRECISION = "bf16"

# The datasets of docs/cluster.md, section 3 (published sizes).
CAPTIONS = 3_732_446          # stage-1 text corpus
PAIRS = 414_113               # stage-2 image-text rows (COCO Karpathy train, one per caption)
EVAL_IMAGES = 71_018          # Flickr30k + COCO val/restval + NoCaps val
EVAL_CAPTIONS = 377_714
SWEEP_TRIALS = 32             # `jobs/sweep.py --num-samples 32` in docs/cluster.md
GALLERIES = (1_000_000, 100_000_000, 1_000_000_000)

# The measured rates each piece of work runs at: key -> what was timed.
RATES = {"old_text": "old text tower", "new_text": "new text tower",
         "old_image": "old image tower", "new_image": "new image tower",
         "stage1": "psi step", "stage2": "LoRA step, new image tower"}
ENCODERS = ("old_text", "new_text", "old_image", "new_image")


def precisions(config, encoder_precision: str) -> dict[str, str]:
    """Precision of each RATES key on the cluster: `encoder_precision` for every encoder (XBT's
    embedding jobs and the backfill alike), the config's trainer.precision for stages 1 and 2."""
    return {k: encoder_precision if k in ENCODERS else config.trainer.precision for k in RATES}


def workload(config) -> list[dict]:
    """The run of docs/cluster.md as rows of (items, rate key); stage epochs from the config."""
    e1, e2 = config.stage1.epochs, config.stage2.epochs
    return [
        {"work": "embed stage-1 captions, old", "items": CAPTIONS, "rate": "old_text"},
        {"work": "embed stage-1 captions, new", "items": CAPTIONS, "rate": "new_text"},
        {"work": "embed stage-2 pair images, old", "items": PAIRS, "rate": "old_image"},
        {"work": "embed stage-2 pair images, new", "items": PAIRS, "rate": "new_image"},
        {"work": "embed stage-2 pair captions, old", "items": PAIRS, "rate": "old_text"},
        {"work": "embed stage-2 pair captions, new", "items": PAIRS, "rate": "new_text"},
        {"work": "embed eval images, old (3 sets)", "items": EVAL_IMAGES, "rate": "old_image"},
        {"work": "embed eval images, new (3 sets)", "items": EVAL_IMAGES, "rate": "new_image"},
        {"work": "embed eval captions, old (3 sets)", "items": EVAL_CAPTIONS, "rate": "old_text"},
        {"work": "embed eval captions, new (3 sets)", "items": EVAL_CAPTIONS, "rate": "new_text"},
        {"work": f"stage 1, {e1} epochs", "items": e1 * CAPTIONS, "rate": "stage1"},
        {"work": f"stage 2 faithful, {e2} epochs", "items": e2 * PAIRS, "rate": "stage2"},
        {"work": f"stage 2 anchored, {e2} epochs", "items": e2 * PAIRS, "rate": "stage2"},
        {"work": "eval image queries, 2 exported encoders", "items": 2 * EVAL_IMAGES,
         "rate": "new_image"},
        {"work": "eval caption queries, 2 exported encoders", "items": 2 * EVAL_CAPTIONS,
         "rate": "new_text"},
    ]


def sweep_work(config) -> dict:
    return {"work": f"sweep, {SWEEP_TRIALS} stage-1 trials (upper bound: ASHA stops most early)",
            "items": SWEEP_TRIALS * config.stage1.epochs * CAPTIONS, "rate": "stage1"}


def gpu_rates(measured: dict, gpu: dict, on_gpu: bool, precision: dict[str, str]) -> dict:
    """items/s per GPU for each rate key: the measured rate on a GPU, else the projection
    utilisation x peak(precision[key]) / FLOPs per item."""
    if on_gpu:
        return {k: m["items_per_s"] for k, m in measured.items()}
    return {k: m["utilisation"] * gpu[precision[k]] * 1e12 / m["flops_per_item"]
            for k, m in measured.items()}


def estimate(rows: list[dict], sweep: dict, rates: dict, here: dict) -> dict:
    """Hours per row on one GPU (`rates`) and on this device (`here`); totals; backfills."""
    def hours(row, r):
        return row["items"] / r[row["rate"]] / 3600

    out_rows = [row | {"gpu_items_per_s": rates[row["rate"]], "gpu_hours": hours(row, rates),
                       "here_hours": hours(row, here)} for row in rows + [sweep]]
    run = out_rows[:-1]
    total = sum(r["gpu_hours"] for r in run)
    total_here = sum(r["here_hours"] for r in run)
    backfills = [{"gallery_images": g, "gpu_hours": g / rates["new_image"] / 3600,
                  "xbt_over_backfill": total / (g / rates["new_image"] / 3600),
                  "xbt_over_backfill_here": total_here / (g / here["new_image"] / 3600)}
                 for g in GALLERIES]
    return {"rows": out_rows, "total_gpu_hours": total, "total_here_hours": total_here,
            "sweep_gpu_hours": out_rows[-1]["gpu_hours"], "backfills": backfills,
            "break_even_gallery_images": total * 3600 * rates["new_image"]}


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts the CUDA attention kernels but has no formula for the CPU ones (the same math)
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count_flops(fn) -> int:
    """FLOPs of fn() as torch's FlopCounterMode counts them (matmuls and attention).
    nn.MultiheadAttention's inference fast path is one fused op the counter has no formula for
    (it counts 0), so the fast path is off while counting: the same math, unfused."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with flop_counter.FlopCounterMode(display=False,
                                          custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops()


def matmul_gflops(device: str, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device)[0] for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def measure(config, preset, device: str, work: Path, encoder_precision: str) -> dict:
    """Rates and FLOPs per item of every RATES key on this device, and the matmul rate. On a
    GPU the encoders run at `encoder_precision` (torch.autocast, as the embedding job runs
    them); on a CPU in fp32 (projected to the GPU's peak at that precision later)."""
    old = random_model(config.old.name, work)
    new = random_model(config.new.name, work)
    captions = ["a photo of a dog running on the grass next to a red ball"]
    matmul_before = matmul_gflops(device)
    with clip.encoder_autocast(encoder_precision if device == "cuda" else "fp32", device):
        rates = encoder_rates(preset, old, new, captions, device)
    rates |= stage2_rate(preset, old, new, captions, device)
    rates["stage1_pairs_per_s"] = stage1_rate(preset, old, new, device, config.projector)
    matmul = (matmul_before + matmul_gflops(device)) / 2
    flops = per_item_flops(old, new, config.projector, preset, device)
    measured = {}
    for key in RATES:
        per_s = rates[f"{key}_per_s" if key in ENCODERS else f"{key}_pairs_per_s"]
        measured[key] = {"items_per_s": per_s, "flops_per_item": flops[key],
                         "utilisation": per_s * flops[key] / (matmul * 1e9)}
    return {"matmul_gflops": matmul, "rates": measured}


def per_item_flops(old: ModelConfig, new: ModelConfig, proj: ProjectorConfig, preset,
                   device: str) -> dict:
    """FLOPs per item of each tower's forward, the stage-2 step and the stage-1 step."""
    flops = {}
    with torch.no_grad():
        for which, cfg in (("old", old), ("new", new)):
            model, tokenizer = clip.load_clip(cfg, device)
            size = clip.image_size(cfg.name)
            x = torch.randn(1, 3, size, size, device=device)
            flops[f"{which}_image"] = count_flops(lambda: model.encode_image(x))
            tokens = tokenizer(["a photo"]).to(device)
            flops[f"{which}_text"] = count_flops(lambda: model.encode_text(tokens))
    one_pair = dataclasses.replace(preset, stage2_batch=2, stage2_window=1, repeats=1)
    flops["stage2"] = count_flops(
        lambda: stage2_rate(one_pair, old, new, ["a photo"], device)) // (2 * 2)
    psi = Projector(clip.embed_dim(new.name), clip.embed_dim(old.name), proj.depth,
                    proj.width).to(device)
    batch = preset.train_batch  # as timed: the B x B logits grow with the batch
    flops["stage1"] = count_flops(train_step_fn(psi, batch, device, pool=2 * batch)) // batch
    return flops


def to_markdown(res: dict) -> str:
    est, gpu, dev, precision = res["estimate"], res["gpu"], res["device"], res["precisions"]
    projected = not res["on_gpu"]
    here = (f"{dev.get('cpu', 'cpu')}, {dev['cores']} cores" if projected else dev["gpu"])
    kind = "projected" if projected else "measured"
    lines = [
        f"Measured {res['started'][:10]} with `python -m benchmarks.cluster_estimate` on {here}"
        f" (torch {dev['torch']}); models {res['models']['old']} -> {res['models']['new']}"
        " with random weights (the compute of the real ones).",
        "",
        f"| # | work | items | {gpu['name']} items/s ({kind}) | {gpu['name']} GPU-hours | "
        "hours on the measuring machine |",
        "| --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(est["rows"], 1):
        label = str(i) if i < len(est["rows"]) else "opt."
        lines.append(f"| {label} | {row['work']} | {row['items']:,} | "
                     f"{row['gpu_items_per_s']:,.0f} | {row['gpu_hours']:,.1f} | "
                     f"{row['here_hours']:,.0f} |")
    lines += [f"| | **total, without the sweep** | | | **{est['total_gpu_hours']:,.1f}** | "
              f"{est['total_here_hours']:,.0f} |", "",
              "The same upgrade against re-embedding the gallery with the new image tower "
              f"(a full backfill), at the same {precision['new_image']} as XBT's own encoder "
              "passes:", "",
              f"| gallery images | backfill {gpu['name']} GPU-hours | XBT / backfill | "
              "XBT / backfill, measured rates only |", "| --- | --- | --- | --- |"]
    for b in est["backfills"]:
        lines.append(f"| {b['gallery_images']:,} | {b['gpu_hours']:,.1f} | "
                     f"{b['xbt_over_backfill']:.3g} | {b['xbt_over_backfill_here']:.3g} |")
    lines += ["", f"Break-even: a gallery of {est['break_even_gallery_images']:,.0f} images. "
              "Rates per item (FLOPs counted by torch, utilisation = achieved FLOP/s over the "
              f"measured matmul rate, {res['matmul_gflops']:.0f} GFLOP/s fp32):", "",
              "| step | measured items/s | GFLOP / item | utilisation | runs on the cluster in |",
              "| --- | --- | --- | --- | --- |"]
    for key, m in res["measured"].items():
        lines.append(f"| {RATES[key]} ({key}) | {m['items_per_s']:,.1f} | "
                     f"{m['flops_per_item'] / 1e9:.2f} | {m['utilisation']:.2f} | "
                     f"{precision[key]} |")
    if not projected:
        lines += ["", f"Encoders were timed at {precision['new_image']} (torch.autocast). "
                  "Training steps were timed in fp32; where the config trains in bf16, rows 11 "
                  "to 13 and the sweep are upper bounds."]
    if projected:
        peaks = " / ".join(f"{gpu[p]} {p}" for p in dict.fromkeys(precision.values()))
        lines += ["", f"**Projection, not a GPU measurement:** every step was timed here in "
                  f"fp32; {gpu['name']} rates assume each step reaches the same fraction of the "
                  f"GPU's datasheet peak at its precision ({peaks} dense TFLOP/s) as it reached "
                  "here of this CPU's fp32 matmul rate; the FLOP counts cancel, so it is the "
                  "measured rate "
                  "times the GPU's peak over the measured matmul rate. Decoding JPEGs, data "
                  "loading, node start-up and "
                  "image pulls are not included. The last column of the backfill table needs "
                  "no projection: both sides ran on the same machine."]
    return "\n".join(lines) + "\n"


def update_doc(table: str, doc: Path = DOC) -> None:
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(text[:start] + "\n" + table + text[end:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "clip-b32-to-l14.yaml"))
    p.add_argument("--gpu", default="a10g", choices=sorted(GPU_PEAKS),
                   help="GPU to project to when measuring on a CPU")
    p.add_argument("--precision", default=ENCODER_PRECISION, choices=("bf16", "fp16", "fp32"),
                   help="precision of every encoder pass on the cluster: XBT's embedding jobs "
                   "and the full backfill alike")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--doc", default=str(DOC), help="markdown file whose marked table to rewrite")
    p.add_argument("--work", default=str(WORK), help="where the random-weight models go")
    args = p.parse_args(argv)
    config = load_config(args.config)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    # CPU: small batches (ViT-L/14 runs at about one image a second on 2 cores)
    preset = (dataclasses.replace(PRESETS["gpu"], encoder_batch=512, stage2_batch=32)
              if on_gpu else dataclasses.replace(
                  PRESETS["small"], encoder_batch=16, encoder_window=1, stage2_batch=4,
                  stage2_window=1, train_batch=512, train_window=4))
    started = datetime.datetime.now().isoformat(timespec="seconds")
    got = measure(config, preset, device, Path(args.work), args.precision)
    gpu = GPU_PEAKS[args.gpu] if not on_gpu else {
        "name": torch.cuda.get_device_name(0), "fp32": None, "bf16": None, "fp16": None}
    precision = precisions(config, args.precision)
    here = {k: m["items_per_s"] for k, m in got["rates"].items()}
    res = {"started": started, "device": device_info(device, cores), "on_gpu": on_gpu,
           "config": args.config, "models": {"old": config.old.name, "new": config.new.name},
           "gpu": gpu, "precisions": precision, "matmul_gflops": got["matmul_gflops"],
           "measured": got["rates"],
           "batches": {"encoder": preset.encoder_batch, "stage2": preset.stage2_batch,
                       "stage1": preset.train_batch},
           "estimate": estimate(workload(config), sweep_work(config),
                                gpu_rates(got["rates"], gpu, on_gpu, precision), here)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(res, indent=2) + "\n")
    table = to_markdown(res)
    (out / "cluster.md").write_text(table)
    update_doc(table, Path(args.doc))
    print(table)
    return res


if __name__ == "__main__":
    main()
