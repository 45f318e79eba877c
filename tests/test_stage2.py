"""Stage 2: global-batch loss across workers, LoRA with the old model absent, export, resume."""
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks
from safetensors.torch import load_file

from xbt_ray.config import ModelConfig
from xbt_ray.data import shards
from xbt_ray.models import clip, lora
from xbt_ray.models.query_encoder import load_query_encoder
from xbt_ray.train.losses import contrastive_loss
from xbt_ray.train.stage1 import load_projector
from xbt_ray.train.stage2 import ADAPTERS, QUERY_ENCODER, SUMMARY, AdaptedTowers, train_stage2

# ---------------------------------------------------------------- global batch equivalence


def _batch_and_model():
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randn(8, 5)
    tower_x, tower_y = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    return x, y, tower_x, tower_y


def _loss_and_grads(x, y, tower_x, tower_y):
    loss = contrastive_loss(tower_x(x), tower_y(y), temperature=0.1)
    loss.backward()
    grads = [p.grad.clone() for p in (*tower_x.parameters(), *tower_y.parameters())]
    return loss.detach(), grads


def _half_batch_step(rank, world):
    x, y, tower_x, tower_y = _batch_and_model()
    half = slice(4 * rank, 4 * rank + 4)
    loss, grads = _loss_and_grads(x[half], y[half], tower_x, tower_y)
    for g in grads:  # what DeepSpeed / DDP do with data-parallel gradients: average
        dist.all_reduce(g)
        g /= world
    return loss, grads


def test_two_workers_with_half_batches_match_one_worker_with_the_whole_batch():
    whole_loss, whole_grads = _loss_and_grads(*_batch_and_model())
    out = run_ranks(_half_batch_step, 2)
    for rank in range(2):
        loss, grads = out[rank]
        torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-6)
        for g, expected in zip(grads, whole_grads):
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the chain's stage 2


def test_stage2_trained_only_adapters_and_kept_the_base_weights(tiny_run):
    config, _ = tiny_run
    out = config.run_dir / "stage2"
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["models_built"] == config.new.name
    assert summary["base_checksum_start"] == summary["base_checksum_end"]
    new = ModelConfig(**summary["new_model"])
    base, _ = clip.load_clip(new)
    assert summary["base_checksum_start"] == lora.base_checksum(base)  # == the file's weights
    assert all("lora_" in name for name in summary["trained_tensors"])  # psi frozen by default
    adapters = load_file(str(out / ADAPTERS))
    assert adapters and all("lora_" in k for k in adapters)
    assert any(k.startswith("base_model.model.visual.") for k in adapters)
    assert not any(k.startswith("base_model.model.transformer.") for k in adapters)  # text off
    assert summary["data"]["rows_in"] == summary["data"]["rows_used"] + sum(
        summary["data"]["skipped"].values())
    # the tiny world's broken images are broken in every caption row that shows them
    world_dir = next((Path(config.cache_dir) / "world").iterdir())
    manifest = json.loads((world_dir / "manifest.json").read_text())
    expected = {{"undecodable": "undecodable_image"}.get(k, k): len(v)
                for k, v in manifest["broken_keys"].items() if v}
    assert summary["data"]["skipped"] == expected
    assert summary["data"]["rows_in"] == manifest["counts"]["image_text"]


def test_exported_encoder_reproduces_training_time_embeddings(tiny_run):
    config, _ = tiny_run
    out = config.run_dir / "stage2"
    summary = json.loads((out / SUMMARY).read_text())
    new = ModelConfig(**summary["new_model"])
    adapted = lora.add_lora(clip.load_clip(new)[0], config.lora)
    adapted.load_state_dict(load_file(str(out / ADAPTERS)), strict=False)
    towers = AdaptedTowers(adapted, load_projector(out), text_trainable=False).eval()
    exported = load_query_encoder(out / QUERY_ENCODER)

    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    images = clip.pixels_to_input(pixels, exported.visual.preprocess_cfg)
    tokens = torch.from_numpy(shards.tokenize(["a red box", "two tiny stars", "a disc"],
                                              new.name))
    with torch.no_grad():
        u, v = towers(images, tokens)
        torch.testing.assert_close(exported.encode_image(images),
                                   torch.nn.functional.normalize(u, dim=-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(exported.encode_text(tokens),
                                   torch.nn.functional.normalize(v, dim=-1), atol=1e-5, rtol=0)
    assert exported.encode_image(images).shape[1] == clip.embed_dim(config.old.name)


def test_stage2_runs_with_the_old_models_weights_out_of_reach(ray_session, tiny_run, tmp_path):
    """A LoRA stage 2 (the faithful objective) trains and exports its query encoder while
    every file of the old model's weights is moved away: nothing of the old model is read.
    (Its entry point also has no parameter through which an old model could arrive.)"""
    import inspect

    config, _ = tiny_run
    assert not [name for name in inspect.signature(train_stage2).parameters if "old" in name]
    models = Path(config.cache_dir) / "models"
    old_files = sorted(models.glob(f"{config.old.name}-*.safetensors"))
    assert old_files, f"the tiny chain's old model is not under {models}"
    assert not [p for p in models.iterdir() if p not in old_files
                and not p.name.startswith(config.new.name)]
    away = tmp_path / "out-of-reach"
    away.mkdir()
    for path in old_files:
        path.rename(away / path.name)
    try:
        from xbt_ray.config import Stage2Config

        recipe = Stage2Config(epochs=1, batch_size=64, lr=1e-3)
        summary = train_stage2(
            ModelConfig(**json.loads((config.run_dir / "stage2" / SUMMARY).read_text())
                        ["new_model"]),
            config.run_dir / "stage1", recipe, config.lora, config.stage1, config.trainer,
            run_name="stage2-old-away", storage_path=tmp_path / "ray-train",
            out_dir=tmp_path / "stage2", seed=0,
            pair_files=shards.list_shards(str(next((Path(config.cache_dir) / "world").iterdir())
                                              / "image_text")))
        assert not list(models.glob(f"{config.old.name}-*"))   # still away at the end
    finally:
        for path in old_files:
            (away / path.name).rename(path)
    assert summary["models_built"] == config.new.name
    assert any("lora_" in n for n in summary["trained_tensors"])
    assert (tmp_path / "stage2" / QUERY_ENCODER).is_file()


# ---------------------------------------------------------------- the anchored objective


def test_anchored_stage2_in_the_chain_trained_lora_and_psi_on_cached_targets(tiny_run):
    config, _ = tiny_run
    faithful = json.loads((config.run_dir / "stage2" / SUMMARY).read_text())
    summary = json.loads((config.run_dir / "stage2_anchored" / SUMMARY).read_text())
    assert summary["objective"] == "anchored" and summary["mode"] == "lora"
    assert summary["models_built"] == config.new.name
    assert summary["base_checksum_start"] == summary["base_checksum_end"]
    trained = summary["trained_tensors"]
    assert any("lora_" in n for n in trained) and any(n.startswith("psi.") for n in trained)
    # the same pairs: a row whose image or caption the embedding job skipped has no cached old
    # target (counted `no_old_target`, joined away before decoding), every other row has one
    data, plain = summary["data"], faithful["data"]
    assert (data["rows_in"], data["rows_used"]) == (plain["rows_in"], plain["rows_used"])
    assert data["skipped"] == {"no_old_target": sum(plain["skipped"].values())}
    targets = summary["data"]["joins"]["old_pair_texts->old_pair_images"]
    assert targets["joined"] == targets["left_rows"] - targets["unmatched_left"] > 0
    assert (config.run_dir / "stage2_anchored" / QUERY_ENCODER).is_file()


def test_training_pairs_get_image_codes_and_carry_their_old_targets():
    import io

    from PIL import Image

    from xbt_ray.data.paired import image_codes
    from xbt_ray.data.shards import decode_training_pairs
    from xbt_ray.train.stage2 import OLD_IMAGES, OLD_TEXTS

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    targets = np.arange(6, dtype=np.float32).reshape(3, 2)
    batch = {"key": np.array(["k2", "k9", "k1"], dtype=object),
             "image_id": np.array(["a", "b", "a"], dtype=object),
             "jpg": np.array([buf.getvalue()] * 3, dtype=object),
             "txt": np.array([b"a red box", b"a blue ring", b""], dtype=object),
             OLD_IMAGES: targets, OLD_TEXTS: targets + 10}
    out = decode_training_pairs(batch, 16, "xbt-test-new", carry=[OLD_IMAGES, OLD_TEXTS])
    assert out["skip_reason"].tolist() == ["", "", "empty_caption"]
    np.testing.assert_array_equal(out[OLD_IMAGES], targets)        # row for row
    np.testing.assert_array_equal(out[OLD_TEXTS], targets + 10)
    codes = out["image_code"]
    assert codes[0] == codes[2] != codes[1]
    assert image_codes(["a"])[0] == codes[0]  # stable across calls and processes
    assert image_codes(np.array([7]))[0] == image_codes(["7"])[0]  # int ids hash as their str
