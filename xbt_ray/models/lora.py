"""LoRA (peft) on an open_clip model's towers; the base weights stay frozen and untouched."""
from __future__ import annotations

import hashlib

import peft
import torch

from xbt_ray.config import LoraConfig


def target_regex(cfg: LoraConfig) -> str:
    """Module names to adapt: the image tower's, plus the text tower's when `text_tower`."""
    return f"({cfg.image_targets})|({cfg.text_targets})" if cfg.text_tower else cfg.image_targets


def add_lora(clip_model: torch.nn.Module, cfg: LoraConfig) -> peft.PeftModel:
    """Wrap `clip_model` with LoRA adapters; only adapter weights require grad."""
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=target_regex(cfg), bias="none")
    model = peft.get_peft_model(clip_model, config)
    if not adapter_names(model):
        raise ValueError(f"LoRA targets {target_regex(cfg)!r} match no module of the model")
    return model


def adapter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if "lora_" in name]


def base_checksum(model: torch.nn.Module) -> str:
    """sha256 over every non-adapter parameter (names normalised to the plain model's)."""
    digest = hashlib.sha256()
    for name, param in sorted(_base_params(model), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _base_params(model):
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        yield name, param


def merged(model: peft.PeftModel) -> torch.nn.Module:
    """The plain open_clip model with the adapters folded into its weights."""
    return model.merge_and_unload()
