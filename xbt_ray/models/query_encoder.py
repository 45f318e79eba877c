"""The exported upgraded query encoder: new model (LoRA merged) + psi, in ONE safetensors file.

It embeds images and texts straight into the OLD embedding space, so it serves queries against
the old gallery on day one. The file's safetensors metadata carries the small config
(`xbt.kind`, the open_clip model name, psi's shape); `load_query_encoder(path)` is the one call.
Anywhere a `ModelConfig` is accepted, `pretrained=<this file>` selects it (see `load_encoder`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xbt_ray.config import ConfigError, ModelConfig
from xbt_ray.models import clip
from xbt_ray.models.projector import Projector

KIND = "xbt-query-encoder"


class QueryEncoder(torch.nn.Module):
    """norm(psi(new tower(x))) for images and texts."""

    def __init__(self, clip_model: torch.nn.Module, psi: Projector):
        super().__init__()
        self.clip = clip_model
        self.psi = psi
        self.visual = clip_model.visual  # preprocess_cfg lives here, as on open_clip models

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.psi(self.clip.encode_image(images, normalize=True)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.psi(self.clip.encode_text(tokens, normalize=True)), dim=-1)


def export_query_encoder(clip_model: torch.nn.Module, model_name: str, psi: Projector,
                         path: Path, info: dict | None = None) -> Path:
    """Write merged new-model weights + psi weights and their config as one file."""
    tensors = {f"clip.{k}": v for k, v in clip_model.state_dict().items()}
    tensors |= {f"psi.{k}": v for k, v in psi.state_dict().items()}
    metadata = {"xbt.kind": KIND, "xbt.model": model_name, "xbt.psi": json.dumps(psi.config()),
                "xbt.info": json.dumps(info or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata=metadata)
    return path


def _metadata(path: str) -> dict:
    if not (path and os.path.isfile(path) and path.endswith(".safetensors")):
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def is_query_encoder(path: str) -> bool:
    return _metadata(path).get("xbt.kind") == KIND


def as_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig that selects an exported query encoder file."""
    meta = _metadata(str(path))
    if meta.get("xbt.kind") != KIND:
        raise ConfigError(f"{path} is not an exported xbt query encoder")
    return ModelConfig(name=meta["xbt.model"], pretrained=str(Path(path).absolute()))


def encoder_identity(model: ModelConfig) -> tuple[str, int]:
    """(model name recorded in the embedding cache, output dim), without loading weights."""
    meta = _metadata(model.pretrained)
    if meta.get("xbt.kind") == KIND:
        return f"xbt-query:{model.name}", json.loads(meta["xbt.psi"])["d_out"]
    return model.name, clip.embed_dim(model.name)


def load_query_encoder(path: str | Path, device: str | torch.device = "cpu") -> QueryEncoder:
    """The one call: an exported file -> a QueryEncoder in eval mode."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("xbt.kind") != KIND:
        raise ValueError(f"{path} is not an exported xbt query encoder")
    tensors = load_file(str(path), device=str(device))
    clip.register(meta["xbt.model"])
    # the architecture only (a pretrained text tower is not loaded): the file holds every weight
    clip_model = open_clip.create_model(meta["xbt.model"], device=device, pretrained_text=False)
    clip_model.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("clip.")})
    psi = Projector(**json.loads(meta["xbt.psi"])).to(device)
    psi.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("psi.")})
    return QueryEncoder(clip_model, psi).eval()


def load_encoder(model: ModelConfig, device: str | torch.device = "cpu"):
    """(encoder, output dim) for a plain open_clip model or an exported query encoder."""
    if is_query_encoder(model.pretrained):
        encoder = load_query_encoder(model.pretrained, device)
    else:
        encoder, _ = clip.load_clip(model, device=device)
    return encoder, encoder_identity(model)[1]
