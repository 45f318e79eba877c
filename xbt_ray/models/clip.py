"""open_clip models by `name` + `pretrained`, and the project's tiny demo configs.

`pretrained` is an open_clip tag (e.g. "openai", downloads in the real world), a local checkpoint
file (.safetensors / .bin / .pt, loaded with weights_only), or empty (random init: only the demo
world's models start that way, before the pipeline trains them).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from xbt_ray.config import ConfigError, ModelConfig
from xbt_ray.models import hf_text

CONFIG_DIR = Path(__file__).parent / "configs"
# configs whose text tower is a real pretrained sentence encoder (text_cfg.minilm_layers)
HF_CONFIG_DIR = CONFIG_DIR / "hf"
log = logging.getLogger(__name__)


@functools.cache
def _register_demo_dir() -> None:
    open_clip.add_model_config(CONFIG_DIR)


def project_config(name: str) -> dict | None:
    """The config this project ships under `name`, as written (a pretrained text tower named by
    its layer count, not by a local path), or None for any other open_clip model."""
    for directory in (CONFIG_DIR, HF_CONFIG_DIR):
        path = directory / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def is_project_config(name: str) -> bool:
    """True for the configs this project ships (image towers trained on the demo world; never
    downloaded)."""
    return project_config(name) is not None


@functools.cache
def register(name: str) -> None:
    """Make open_clip know `name` when it is a project config. A config with a pretrained
    sentence-encoder text tower is registered with that tower's local directory filled in
    (`hf_text.resolve_text_cfg`; ConfigError when its weights package is missing). Every
    process that builds or tokenizes for a model calls this first; other names pass through."""
    _register_demo_dir()
    cfg = project_config(name)
    if cfg is None or "minilm_layers" not in cfg.get("text_cfg", {}):
        return
    resolved = cfg | {"text_cfg": hf_text.resolve_text_cfg(cfg["text_cfg"])}
    path = hf_text.hf_home() / "open_clip" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(resolved, indent=2))
    tmp.replace(path)
    open_clip.add_model_config(path)


def model_config(name: str) -> dict:
    register(name)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown open_clip model '{name}' (see open_clip.list_models())")
    return cfg


def image_size(name: str) -> int:
    size = model_config(name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def load_clip(model: ModelConfig, device: str | torch.device = "cpu"):
    """Build an open_clip model; returns (model in eval mode, tokenizer)."""
    model_config(model.name)
    pretrained = model.pretrained or None
    if pretrained and not os.path.isfile(pretrained) \
            and not open_clip.get_pretrained_cfg(model.name, pretrained):
        raise ConfigError(f"pretrained '{pretrained}' is neither a checkpoint file nor an "
                          f"open_clip tag of {model.name}")
    clip = open_clip.create_model(model.name, pretrained=pretrained, device=device)
    clip.eval()
    return clip, open_clip.get_tokenizer(model.name)


def save_clip(clip: torch.nn.Module, path: Path) -> Path:
    """Write the model's weights as a safetensors file open_clip can load as `pretrained`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.rename(path)
    return path


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_id(model: ModelConfig) -> str:
    """The pretrained tag, or `sha256:<hex>` of a local checkpoint file."""
    if model.pretrained and os.path.isfile(model.pretrained):
        st = os.stat(model.pretrained)
        return "sha256:" + _file_sha256(os.path.abspath(model.pretrained), st.st_size,
                                        st.st_mtime_ns)
    return model.pretrained or "random-init"


def model_fingerprint(model: ModelConfig) -> str:
    """Short id of (architecture, weights); names the model's embedding cache directory."""
    ident = f"{model.name}|{pretrained_id(model)}"
    return f"{model.name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def pixels_to_input(pixels: torch.Tensor, preprocess_cfg: dict) -> torch.Tensor:
    """uint8 images (B, H, W, 3) from the CPU stage -> the normalised float input of the tower."""
    mean = torch.tensor(preprocess_cfg["mean"], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float().div(255) - mean) / std


def embed_dim(name: str) -> int:
    return model_config(name)["embed_dim"]


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """`embed.precision` on `device` as fp32 | bf16 | fp16. auto: fp32 on CPU; bf16 on CUDA, or
    fp16 where the GPU has no native bf16 (before Ampere; emulated bf16 is slow). fp16 on CPU is a
    one-line ConfigError (CPU kernels have no fast fp16), as is an unknown precision."""
    kind = torch.device(device).type
    if precision == "auto":
        if kind != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision not in PRECISIONS:
        raise ConfigError(f"embed.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and kind == "cpu":
        raise ConfigError("embed.precision=fp16 needs a GPU: on CPU use bf16 or fp32")
    return precision


def encoder_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The torch dtype the encoder towers compute in on `device` for `embed.precision`
    (auto | fp32 | bf16 | fp16, see `resolve_precision`; same one-line ConfigErrors)."""
    return PRECISIONS[resolve_precision(precision, device)]


def encoder_autocast(precision: str, device: str | torch.device):
    """A context that runs a tower at `encoder_dtype(precision, device)`: torch.autocast (matmuls
    and convolutions in bf16/fp16, layer norms and softmax in fp32), or nothing at fp32."""
    dtype = encoder_dtype(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
