"""Encoder precision: `embed.precision`, its dtype on a device, the cache identity, an Encoder at
bf16 against fp32, and the report's `precision` section (all without Ray)."""
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from xbt_ray.config import ConfigError, EmbedConfig, ModelConfig, load_config
from xbt_ray.data.embed import Encoder, encoder_fingerprint, encoder_precision
from xbt_ray.eval.report import format_table, precision_section
from xbt_ray.models import clip

NAME = "xbt-test-old"   # embed_dim 32, image 32 px, context 40


def test_encoder_dtype_on_cpu():
    assert clip.encoder_dtype("auto", "cpu") == torch.float32
    assert clip.encoder_dtype("fp32", "cpu") == torch.float32
    assert clip.encoder_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert clip.encoder_dtype("fp16", "cuda") == torch.float16   # explicit: no GPU asked
    with pytest.raises(ConfigError) as info:
        clip.encoder_dtype("fp16", "cpu")
    assert "embed.precision=fp16" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        clip.encoder_dtype("int8", "cpu")


def test_precision_config_key():
    assert load_config().embed.precision == "auto"
    assert load_config(overrides=["embed.precision=bf16"]).embed.precision == "bf16"
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["embed.precision=fp8"])
    assert "embed.precision" in str(info.value) and "\n" not in str(info.value)
    assert load_config().eval.precision_check is False


def test_precision_is_part_of_the_cache_identity():
    model = ModelConfig(name=NAME)
    cpu = {p: EmbedConfig(num_gpus=0, precision=p) for p in ("auto", "fp32", "bf16")}
    assert encoder_precision(cpu["auto"]) == "fp32"
    fingerprints = {p: encoder_fingerprint(model, cfg) for p, cfg in cpu.items()}
    assert fingerprints["auto"] == fingerprints["fp32"] != fingerprints["bf16"]
    assert fingerprints["bf16"].startswith(clip.model_fingerprint(model))
    with pytest.raises(ConfigError):
        encoder_precision(EmbedConfig(num_gpus=0, precision="fp16"))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_encoder_at_bf16_close_to_fp32(tmp_path):
    torch.manual_seed(0)
    model, _ = clip.load_clip(ModelConfig(name=NAME))
    weights = ModelConfig(name=NAME,
                          pretrained=str(clip.save_clip(model, tmp_path / "m.safetensors")))
    rng = np.random.default_rng(0)
    n = 16
    skip = np.array([""] * (n - 1) + ["undecodable_image"], dtype=object)
    ids = np.array([f"k{i}" for i in range(n)], dtype=object)
    batches = {
        "image": {"key": ids, "image_id": ids, "skip_reason": skip,
                  "pixels": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)},
        "text": {"key": ids, "image_id": ids, "skip_reason": skip,
                 "tokens": open_clip.get_tokenizer(NAME)(
                     [f"{i} red circles next to a blue square" for i in range(n)]).numpy()}}
    for modality, batch in batches.items():
        out = {p: Encoder(weights, modality, threads=1, precision=p)(batch)["emb"]
               for p in ("fp32", "bf16")}
        assert out["bf16"].dtype == np.float32 and out["bf16"].shape == (n, 32)
        np.testing.assert_allclose(np.linalg.norm(out["bf16"][:-1], axis=1), 1, atol=1e-5)
        assert (out["bf16"][-1] == 0).all()                 # the skipped row stays zero
        assert not np.array_equal(out["bf16"], out["fp32"])  # it really ran at bf16
        assert _cosines(out["bf16"][:-1], out["fp32"][:-1]).min() > 0.99, modality


def _report(r1: float) -> dict:
    cell = {"i2t": {"R1": r1, "R5": 50.0}, "t2i": {"R1": 10.0, "R5": 40.0}}
    return {"dataset": "d", "protocol": "p", "n_images": 2, "n_captions": 4,
            "rows": [{"method": "old->old", "query": "old", "gallery": "old",
                      "needs_old_encoder": True, **cell, "rsum": 0.0}]}


def test_precision_section_by_hand():
    section = precision_section(_report(20.0), _report(19.6), "fp32", "bf16")
    got = section["cells"]["old->old"]["i2t"]["R1"]
    assert got["fp32"] == 20.0 and got["bf16"] == 19.6
    assert got["difference"] == pytest.approx(-0.4)
    assert section["max_abs_difference"] == {"R1": pytest.approx(0.4), "R5": 0.0}
    # a bf16 run checked at fp32: the difference is still bf16 - fp32
    flipped = precision_section(_report(19.6), _report(20.0), "bf16", "fp32")
    assert flipped["cells"]["old->old"]["i2t"]["R1"]["difference"] == pytest.approx(-0.4)
    report = _report(20.0) | {"precision": section}
    text = format_table(report)
    assert "Largest |bf16 - fp32|: 0.40 R1 points" in text and "-0.40" in text


def test_demo_checks_precision_and_tiny_does_not():
    root = Path(__file__).resolve().parents[1]
    assert load_config(root / "configs" / "demo.yaml").eval.precision_check is True
    assert load_config(root / "xbt_ray" / "configs" / "tiny.yaml").eval.precision_check is False
