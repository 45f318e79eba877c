"""Real photographs that ship with scikit-image, scikit-learn and matplotlib: the split's files and
captions, decoding as a person viewing each photo sees it (greyscale, EXIF orientation), and the
chain `xbt eval-data` -> embedding job -> report on them."""
import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from xbt_ray.cli import main
from xbt_ray.config import ConfigError, EmbedConfig, EvalConfig, ModelConfig
from xbt_ray.data import cache, eval_sets, photos, shards
from xbt_ray.data.embed import embed_shards
from xbt_ray.eval.suite import evaluate, load_inputs, write_manifest
from xbt_ray.models import clip

SIZES = (32, 224)   # the tiny test models' input, and a real CLIP's
EXIF_VARIANT = "chelsea_exif6.jpg"


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    return photos.write_photo_split(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def exif_variant(split_files):
    """chelsea stored turned 90 degrees anticlockwise, with EXIF Orientation 6 (= turn it back
    clockwise to show it), as a phone camera writes a portrait JPEG."""
    _, images = split_files
    with Image.open(images / "chelsea.png") as upright:
        stored = upright.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[eval_sets.EXIF_ORIENTATION] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _photo_bytes(split_files, exif_variant):
    _, images = split_files
    return {p.name: p.read_bytes() for p in sorted(images.iterdir())} | {
        EXIF_VARIANT: exif_variant}


def reference(data: bytes, size: int) -> np.ndarray:
    """What a viewer shows, resized and centre-cropped, independently of shards.decode_image:
    EXIF orientation applied, RGB, shortest side to `size` (bicubic), centre crop."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    scale = size / min(img.size)
    w, h = (size, int(img.height * scale)) if img.width <= img.height else (
        int(img.width * scale), size)
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = round((w - size) / 2), round((h - size) / 2)
    return np.asarray(img.crop((left, top, left + size, top + size)))


# ---------------------------------------------------------------- the split's files


def test_photos_are_copied_as_they_ship(split_files):
    annotations, images = split_files
    doc = json.loads(annotations.read_text())
    assert doc == photos.photo_captions() and doc["dataset"] == "photos"
    sources = photos.photo_sources()
    names = [im["filename"] for im in doc["images"]]
    assert len(names) == len(set(names)) >= 15
    assert sorted(p.name for p in images.iterdir()) == sorted(names) == sorted(sources)
    formats, modes = set(), set()
    for name in names:
        assert (images / name).read_bytes() == sources[name].read_bytes(), name
        with Image.open(images / name) as img:
            formats.add(img.format)
            modes.add(img.mode)
    assert formats == {"PNG", "JPEG"} and {"L", "RGB"} <= modes
    packages = {im["source"]["package"] for im in doc["images"]}
    assert packages == {"skimage", "sklearn", "matplotlib"}
    assert {"astronaut.png", "camera.png", "coffee.png", "china.jpg", "flower.jpg",
            "grace_hopper.jpg"} <= set(names)


def test_captions_are_karpathy_sentences():
    doc = photos.photo_captions()
    sentids = []
    for i, im in enumerate(doc["images"]):
        assert im["imgid"] == i and im["split"] == "test"
        texts = [s["raw"] for s in im["sentences"]]
        assert 2 <= len(texts) <= 5 and len(set(texts)) == len(texts)
        for s in im["sentences"]:
            assert s["imgid"] == i and s["tokens"] and s["raw"].strip() == s["raw"]
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
        sentids += im["sentids"]
    assert sentids == list(range(len(sentids)))
    # captions are specific: no caption is shared between two photos
    all_texts = [s["raw"].lower() for im in doc["images"] for s in im["sentences"]]
    assert len(all_texts) == len(set(all_texts))


def test_missing_package_is_a_one_line_error(monkeypatch):
    real = photos.importlib.util.find_spec
    monkeypatch.setattr(photos.importlib.util, "find_spec",
                        lambda name: None if name == "sklearn" else real(name))
    with pytest.raises(ConfigError, match="pip install scikit-learn$"):
        photos.photo_sources()


# ---------------------------------------------------------------- decoding as a viewer sees it


def test_every_photo_decodes_as_a_viewer_sees_it(split_files, exif_variant):
    for name, data in _photo_bytes(split_files, exif_variant).items():
        with Image.open(io.BytesIO(data)) as img:
            grey = img.mode in ("L", "I;16", "I")
        for size in SIZES:
            pixels, reason = shards.decode_image(data, size)
            assert reason == "" and pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
            diff = np.abs(pixels.astype(int) - reference(data, size).astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.25, (name, size, diff.max(), diff.mean())
            if grey:
                assert (pixels[..., 0] == pixels[..., 1]).all(), name
                assert (pixels[..., 1] == pixels[..., 2]).all(), name
            else:
                assert not (pixels[..., 0] == pixels[..., 2]).all(), name


def test_exif_orientation_is_honoured(split_files, exif_variant):
    """The EXIF-turned copy decodes like the upright original, not like its stored pixels."""
    _, images = split_files
    original = (images / "chelsea.png").read_bytes()
    with Image.open(io.BytesIO(exif_variant)) as img:
        assert img.size == (300, 451) and img.getexif()[eval_sets.EXIF_ORIENTATION] == 6
        stored = io.BytesIO()
        img.convert("RGB").save(stored, format="PNG")   # the same pixels, no EXIF
    for size in SIZES:
        upright = shards.decode_image(original, size)[0].astype(int)
        turned = shards.decode_image(exif_variant, size)[0].astype(int)
        ignored = shards.decode_image(stored.getvalue(), size)[0].astype(int)
        assert np.abs(turned - upright).mean() < 3            # JPEG loss only
        assert np.abs(ignored - upright).mean() > 10          # what ignoring EXIF would give
    # every turning orientation, losslessly (PNG with an eXIf chunk): exactly the upright pixels
    with Image.open(images / "chelsea.png") as img:
        upright_img = img.convert("RGB")
    for orientation, stored_as in ((3, Image.Transpose.ROTATE_180),
                                   (6, Image.Transpose.ROTATE_90),
                                   (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[eval_sets.EXIF_ORIENTATION] = orientation
        buffer = io.BytesIO()
        upright_img.transpose(stored_as).save(buffer, format="PNG", exif=exif)
        for size in SIZES:
            np.testing.assert_array_equal(shards.decode_image(buffer.getvalue(), size)[0],
                                          shards.decode_image(original, size)[0])
    # the eval split records the size a viewer sees
    _, width, height, reason = eval_sets.read_image(exif_variant)
    assert (width, height, reason) == (451, 300, "")


# ---------------------------------------------------------------- eval-data -> embed -> report


def test_photo_split_through_eval_data_embedding_and_report(ray_session, split_files,
                                                            tmp_path):
    annotations, images = split_files
    out = tmp_path / "split"
    assert main(["eval-data", "--format", "karpathy", "--annotations", str(annotations),
                 "--images", str(images), "--protocol", "standard", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    doc = photos.photo_captions()
    n_images = len(doc["images"])
    n_captions = sum(len(im["sentences"]) for im in doc["images"])
    assert (manifest["dataset"], manifest["protocol"]) == ("photos", "standard")
    assert manifest["selected"] == {"images": n_images, "captions": n_captions}
    for what in ("images", "captions"):
        assert manifest["selected"][what] == (manifest[what]
                                              + sum(manifest["skipped"][what].values()))
    assert (manifest["images"], manifest["captions"]) == (n_images, n_captions)  # all usable
    rows = pq.read_table(sorted((out / "images").glob("part-*.parquet"))).to_pylist()
    for row, im in zip(rows, doc["images"]):   # bytes as they ship, size as shown
        assert row["key"] == f"photos-{im['imgid']}"
        assert row["jpg"] == (images / im["filename"]).read_bytes()
        with Image.open(images / im["filename"]) as img:
            assert (row["width"], row["height"]) == img.size

    image_files = shards.list_shards(str(out / "images"))
    caption_files = shards.list_shards(str(out / "captions.parquet"))
    cfg = EmbedConfig(batch_size=8)
    # one model serves as old and new: this test is about the photos, not about compatibility
    model_path = clip.save_clip(clip.load_clip(ModelConfig(name="xbt-test-old"))[0],
                                tmp_path / "model.safetensors")
    model = ModelConfig(name="xbt-test-old", pretrained=str(model_path))
    split = {}
    for role, files, modality, n in (("images", image_files, "image", manifest["images"]),
                                     ("captions", caption_files, "text", manifest["captions"])):
        result = embed_shards(files, modality, model, tmp_path / "cache", cfg)
        counts = result.counts
        assert (counts["rows_in"], counts["rows_embedded"], counts["skipped"]) == (n, n, {})
        assert len(cache.read_embeddings(result.directory).keys) == n
        split[f"old_{role}"] = split[f"new_{role}"] = result.directory

    inputs = write_manifest(tmp_path / "eval_inputs.json", split, {}, None,
                            manifest["dataset"], manifest["protocol"])
    report = evaluate(load_inputs(inputs), EvalConfig(backfill_points=0))
    assert (report["n_images"], report["n_captions"]) == (n_images, n_captions)
    assert [r["method"] for r in report["rows"]] == ["old->old", "new->new"]
    assert report["dataset"] == "photos"
