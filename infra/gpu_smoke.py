"""GPU smoke check for a node: encoder actor UDF on CUDA + one bf16 DeepSpeed stage-2 step.

    python infra/gpu_smoke.py OUT.json

No Ray needed: it runs the same classes the Ray jobs run (the embedding job's `Encoder`, the
stage-2 `AdaptedTowers` in a DeepSpeed engine) in one process, on the first GPU, and writes what
it saw (device, agreement with CPU, losses, base-weight checksums) to OUT.json.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def main(out_path: str) -> None:
    from xbt_ray.config import LoraConfig, ModelConfig, TrainerConfig
    from xbt_ray.data.embed import Encoder
    from xbt_ray.models import clip, lora
    from xbt_ray.models.projector import Projector
    from xbt_ray.train import distributed
    from xbt_ray.train.losses import contrastive_loss
    from xbt_ray.train.stage2 import AdaptedTowers

    assert torch.cuda.is_available(), "no CUDA device"
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    new_model, _ = clip.load_clip(ModelConfig(name="xbt-demo-new"))
    weights = clip.save_clip(new_model, tmp / "new.safetensors")
    new = ModelConfig(name="xbt-demo-new", pretrained=str(weights))

    # 1. the embedding job's encoder actor UDF, on CUDA, against the same model on CPU
    rng = np.random.default_rng(0)
    batch = {"key": np.array([f"k{i}" for i in range(64)], dtype=object),
             "image_id": np.array([f"k{i}" for i in range(64)], dtype=object),
             "pixels": rng.integers(0, 256, (64, 48, 48, 3), dtype=np.uint8),
             "skip_reason": np.array([""] * 63 + ["undecodable_image"], dtype=object)}
    encoder = Encoder(new, "image", threads=4, precision="fp32")
    out = encoder(batch)
    auto = Encoder(new, "image", threads=4)   # embed.precision auto: bf16 (fp16) on a GPU
    with torch.no_grad():
        cpu = new_model.encode_image(clip.pixels_to_input(
            torch.from_numpy(batch["pixels"][:63]), new_model.visual.preprocess_cfg),
            normalize=True).numpy()
    report["encoder"] = {"device": str(encoder.device),
                         "max_abs_diff_vs_cpu": float(np.abs(out["emb"][:63] - cpu).max()),
                         "skipped_row_is_zero": bool((out["emb"][63] == 0).all()),
                         "auto_precision": auto.precision,   # unit rows: dot = cosine
                         "auto_min_cosine_vs_cpu": float((auto(batch)["emb"][:63] * cpu).sum(1)
                                                         .min())}

    # 2. one bf16 DeepSpeed engine, 3 stage-2 steps (LoRA on the image tower, psi frozen)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29555", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    adapted = lora.add_lora(clip.load_clip(new)[0], LoraConfig())
    psi = Projector(96, 64, depth=2, width=256).requires_grad_(False)
    module = AdaptedTowers(adapted, psi, text_trainable=False)
    trainer = TrainerConfig(num_workers=1, use_gpu=True, precision="bf16", zero_stage=1)
    engine = distributed.make_engine(module, None, trainer, 32, 1e-3, 0.0, 10, 1)
    checksum = lora.base_checksum(engine.module.clip)  # after the engine's cast to bf16
    tokens = torch.from_numpy(np.stack([np.arange(40) % 300 + 1] * 32)).cuda()
    losses = []
    for _ in range(3):
        pixels = torch.from_numpy(rng.integers(0, 256, (32, 48, 48, 3), dtype=np.uint8)).cuda()
        images = clip.pixels_to_input(pixels, adapted.base_model.model.visual.preprocess_cfg)
        u, v = engine(images.to(torch.bfloat16), tokens)
        loss = contrastive_loss(u.float(), v.float(), 0.05)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    report["deepspeed_bf16"] = {
        "engine_dtype": str(distributed.engine_dtype(engine)), "losses": losses,
        "finite": bool(np.isfinite(losses).all()),
        "base_weights_unchanged": lora.base_checksum(engine.module.clip) == checksum,
        "peak_gpu_mem_mib": torch.cuda.max_memory_allocated() / 2**20}
    torch.distributed.destroy_process_group()
    Path(out_path).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_smoke.json")
