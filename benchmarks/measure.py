"""Measuring helpers shared by the benchmarks (benchmarks.bench, benchmarks.cluster_estimate).

Timing (`timed`, with a CUDA sync around the call; `median`), the machine's description
(`device_info`), seeded random-weight models saved once (`random_model`), and the throughputs
both scripts time: the stage-1 step (`train_step_fn`, `stage1_rate`), the stage-2 LoRA step
(`stage2_rate`) and the encoder towers (`encoder_rates`). `RESULTS` and `WORK` are the default
output and work directories.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.presets import Preset
from xbt_ray.config import LoraConfig, ModelConfig, ProjectorConfig, Stage1Config
from xbt_ray.models import clip
from xbt_ray.models.projector import Projector
from xbt_ray.train.losses import add_noise, stage1_loss, stage2_loss

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / ".cache" / "xbt-bench"


def median(xs) -> float:
    return float(statistics.median(xs))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of fn()."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def device_info(device: str, cores: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import open_clip
    import ray

    info = {"device": device, "cpu": cpu, "cores": cores, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "load_average_start": os.getloadavg()}
    if device == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                 "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
    return info


def random_model(name: str, work: Path) -> ModelConfig:
    """An open_clip config with seeded random weights, saved once to a local file (no download)."""
    path = work / "models" / f"{name}-random-seed0.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model, _ = clip.load_clip(ModelConfig(name=name))
        clip.save_clip(model, path)
    return ModelConfig(name=name, pretrained=str(path))


def train_step_fn(psi: torch.nn.Module, batch: int, device: str, pool: int = 8192):
    """The stage-1 step on cached embeddings (a plain torch loop): noise, psi, stage1_loss
    (InfoNCE + cosine), AdamW; batches are slices of an in-memory pool, as from a cache."""
    a_pool = torch.nn.functional.normalize(torch.randn(pool, psi.d_in, device=device), dim=-1)
    b_pool = torch.nn.functional.normalize(torch.randn(pool, psi.d_out, device=device), dim=-1)
    opt = torch.optim.AdamW(psi.parameters(), lr=1e-3)
    recipe = Stage1Config()
    state = {"k": 0}

    def step():
        start = (state["k"] * batch) % (pool - batch)
        state["k"] += 1
        a = add_noise(a_pool[start:start + batch], recipe.noise_sigma)
        loss, _ = stage1_loss(psi(a), b_pool[start:start + batch], recipe.temperature,
                              recipe.cosine_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # the real loop reads the loss every step
    return step


def encoder_rates(preset: Preset, old: ModelConfig, new: ModelConfig, captions: list[str],
                  device: str) -> dict:
    """images/s and texts/s of both models' towers (forward only, preprocessed inputs),
    interleaved rounds, medians."""
    models = {}
    for which, cfg in (("old", old), ("new", new)):
        model, tokenizer = clip.load_clip(cfg, device)
        size = clip.image_size(cfg.name)
        pixels = torch.randint(0, 256, (preset.encoder_batch, size, size, 3), dtype=torch.uint8)
        x = clip.pixels_to_input(pixels.to(device), model.visual.preprocess_cfg)
        tokens = tokenizer((captions * preset.encoder_batch)[:preset.encoder_batch]).to(device)
        models[which] = (model, x, tokens)
    times = {f"{w}_{m}": [] for w in models for m in ("image", "text")}
    with torch.no_grad():
        for _ in range(preset.repeats):
            for which, (model, x, tokens) in models.items():
                for modality, fn in (("image", lambda: model.encode_image(x, normalize=True)),
                                     ("text", lambda: model.encode_text(tokens, normalize=True))):
                    fn()  # warm
                    wall, _ = timed(lambda: [fn() for _ in range(preset.encoder_window)], device)
                    times[f"{which}_{modality}"].append(wall / preset.encoder_window)
    del models
    return {f"{k}_per_s": preset.encoder_batch / median(v) for k, v in times.items()}


def stage2_rate(preset: Preset, old: ModelConfig, new: ModelConfig, captions: list[str],
                device: str) -> dict:
    """Pairs/s of a stage-2 step (LoRA on the new image tower, frozen psi and text tower, the
    faithful loss), single process: what the LoRA stage costs per training pair."""
    from xbt_ray.models import lora
    from xbt_ray.train.stage2 import AdaptedTowers

    torch.manual_seed(0)
    model, tokenizer = clip.load_clip(new, device)
    model.logit_scale.requires_grad_(False)
    psi = Projector(clip.embed_dim(new.name), clip.embed_dim(old.name), 2, 512).to(device)
    psi.requires_grad_(False)
    towers = AdaptedTowers(lora.add_lora(model, LoraConfig()), psi, text_trainable=False).train()
    opt = torch.optim.AdamW([p for p in towers.parameters() if p.requires_grad], lr=5e-4)
    B, size = preset.stage2_batch, clip.image_size(new.name)
    pixels = torch.randint(0, 256, (B, size, size, 3), dtype=torch.uint8, device=device)
    tokens = tokenizer((captions * B)[:B]).to(device)
    ids = torch.arange(B, device=device)

    def step():
        images = clip.pixels_to_input(pixels, model.visual.preprocess_cfg)
        u, v = towers(images, tokens)
        loss, _ = stage2_loss(u, v, ids, 0.05, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    step()
    times = [timed(lambda: [step() for _ in range(preset.stage2_window)], device)[0]
             / preset.stage2_window for _ in range(preset.repeats)]
    return {"stage2_pairs_per_s": B / median(times), "stage2_batch": B}


def stage1_rate(preset: Preset, old: ModelConfig, new: ModelConfig, device: str,
                proj: ProjectorConfig = ProjectorConfig()) -> float:
    """Pairs/s of the stage-1 step for these models' dims and psi's depth and width."""
    psi = Projector(clip.embed_dim(new.name), clip.embed_dim(old.name), proj.depth,
                    proj.width).to(device)
    step = train_step_fn(psi, preset.train_batch, device)
    step()
    times = [timed(lambda: [step() for _ in range(preset.train_window)], device)[0]
             / preset.train_window for _ in range(preset.repeats)]
    return preset.train_batch / median(times)
