"""The demo world: determinism, shard layout, broken rows, captions that name every object."""
import dataclasses
import io
import json
import random
import re

import pyarrow.parquet as pq
import pytest
from PIL import Image

from xbt_ray.config import WorldConfig
from xbt_ray.data import world

TINY = WorldConfig(n_train_images=20, n_text_captions=50, n_eval_images=10,
                   rows_per_shard=25, broken_fraction=0.3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, world.build_world(TINY, out)


def _read(directory):
    return pq.read_table(sorted(directory.glob("part-*.parquet"))).to_pylist()


def _mentions(text: str, words) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words)


def test_deterministic(built, tmp_path):
    out, manifest = built
    again = world.build_world(TINY, tmp_path)
    assert again == manifest
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_rebuild_overwrites(tmp_path):
    world.build_world(dataclasses.replace(TINY, n_train_images=80), tmp_path)
    manifest = world.build_world(TINY, tmp_path)
    assert len(list((tmp_path / "image_text").glob("*.parquet"))) == \
        manifest["shards"]["image_text"] == -(-manifest["counts"]["image_text"] // 25)


def test_fingerprint():
    fp = world.world_fingerprint(TINY)
    assert fp == world.world_fingerprint(dataclasses.replace(TINY))
    for change in [dict(seed=1), dict(image_size=32), dict(broken_fraction=0.2)]:
        assert world.world_fingerprint(dataclasses.replace(TINY, **change)) != fp


def test_seed_changes_world(built, tmp_path):
    out, manifest = built
    other = world.build_world(dataclasses.replace(TINY, seed=1), tmp_path)
    assert other["fingerprint"] != manifest["fingerprint"]
    assert [r["txt"] for r in _read(tmp_path / "text")] != [r["txt"] for r in _read(out / "text")]


def test_streams_are_independent(built, tmp_path):
    """More train images leave the text corpus and the held-out split unchanged."""
    out, _ = built
    world.build_world(dataclasses.replace(TINY, n_train_images=90), tmp_path)
    assert _read(tmp_path / "text") == _read(out / "text")
    for f in [out / "eval" / world.EVAL_ANNOTATIONS, *(out / "eval" / "images").iterdir()]:
        assert (tmp_path / f.relative_to(out)).read_bytes() == f.read_bytes(), f


def test_counts_and_shards(built):
    out, manifest = built
    assert manifest["fingerprint"] == world.world_fingerprint(TINY)
    assert manifest["config"] == dataclasses.asdict(TINY)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    pair_rows = manifest["counts"]["image_text"]
    expected = {"image_text": (pair_rows, -(-pair_rows // 25)), "text": (50, 2)}
    for split, (n_rows, n_shards) in expected.items():
        shards = sorted((out / split).glob("part-*.parquet"))
        assert [s.name for s in shards] == [f"part-{i:05d}.parquet" for i in range(n_shards)]
        assert [pq.read_metadata(s).num_rows for s in shards][:-1] == [25] * (n_shards - 1)
        keys = [r["key"] for r in _read(out / split)]
        assert len(keys) == n_rows == len(set(keys))
    assert manifest["counts"] == {"image_text": pair_rows, "image_text_images": 20, "text": 50,
                                  "eval_images": 10, "eval_captions": 50}
    assert manifest["shards"] == {"image_text": expected["image_text"][1], "text": 2}
    assert manifest["eval"] == {"annotations": "eval/dataset_demo.json", "images": "eval/images",
                                "format": "karpathy", "split": "test", "protocol": "standard"}
    assert sorted(p.name for p in (out / "eval" / "images").iterdir()) == [
        f"eval-{i:06d}.jpg" for i in range(10)]
    schema = pq.read_schema(out / "image_text" / "part-00000.parquet")
    assert schema.names == ["key", "jpg", "txt", "status", "error_message", "width", "height",
                            "image_id"]
    assert str(schema.field("width").type) == "int32"


def test_broken_rows_are_broken(built):
    out, manifest = built
    assert manifest["broken"] == {"undecodable": 2, "null_image": 2, "empty_caption": 2}
    found = {kind: [] for kind in world.BROKEN_KINDS}
    for row in _read(out / "image_text"):
        assert row["status"] == "success" and row["error_message"] is None
        assert row["image_id"] != row["key"]
        if row["jpg"] is None:
            found["null_image"].append(row["key"])
            continue
        try:
            image = Image.open(io.BytesIO(row["jpg"]))
            image.load()
        except Exception:
            found["undecodable"].append(row["key"])
            continue
        assert image.mode == "RGB" and image.size == (TINY.image_size,) * 2
        assert (row["width"], row["height"]) == image.size
        if row["txt"] == "":
            found["empty_caption"].append(row["key"])
        else:
            assert row["txt"]
    assert found == manifest["broken_keys"]


def test_training_pairs_in_coco_layout(built):
    """3-5 captions per image, one row each: rows of an image share its bytes and image_id,
    keys are unique per row and differ from image ids, captions of an image differ."""
    out, manifest = built
    by_image = {}
    for row in _read(out / "image_text"):
        by_image.setdefault(row["image_id"], []).append(row)
    assert len(by_image) == TINY.n_train_images
    for rows in by_image.values():
        assert TINY.train_captions_min <= len(rows) <= TINY.train_captions_max
        assert len({r["jpg"] for r in rows}) == 1
        assert len({r["txt"] for r in rows}) > 1
    assert sum(len(r) for r in by_image.values()) == manifest["counts"]["image_text"]


def test_no_broken_rows_when_fraction_zero(tmp_path):
    manifest = world.build_world(dataclasses.replace(TINY, broken_fraction=0.0), tmp_path)
    assert sum(manifest["broken"].values()) == 0
    assert all(r["jpg"] and r["txt"] for r in _read(tmp_path / "image_text"))


def test_scenes_and_captions():
    rng = random.Random(0)
    for _ in range(300):
        scene = world.draw_scene(rng, TINY)
        assert TINY.objects_min <= len(scene.objects) <= TINY.objects_max
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        text = world.caption(scene, rng)
        for o in scene.objects:
            assert _mentions(text, world.SHAPES[o.shape]), (text, o.shape)
            assert _mentions(text, world.COLOURS[o.colour]), (text, o.colour)
        image = world.render(scene, TINY.image_size)
        assert image.mode == "RGB" and image.size == (TINY.image_size,) * 2


def test_vocabulary_is_unambiguous():
    assert len(world.SHAPES) >= 6 and len(world.COLOURS) >= 8
    words = [w for group in (world.SHAPES, world.COLOURS, world.SIZES) for ws in group.values()
             for w in ws]
    assert len(words) == len(set(words))


def test_heldout_is_a_karpathy_file_with_jpegs(built):
    """eval/: Flickr30k's layout, every image in the "test" split, several distinct captions."""
    out, _ = built
    doc = json.loads((out / "eval" / "dataset_demo.json").read_text())
    assert doc["dataset"] == "demo"
    images = doc["images"]
    assert [im["imgid"] for im in images] == list(range(TINY.n_eval_images))
    sentids = []
    for im in images:
        assert im["split"] == "test" and im["filename"] == f"eval-{im['imgid']:06d}.jpg"
        with Image.open(out / "eval" / "images" / im["filename"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (TINY.image_size,) * 2
        texts = [s["raw"] for s in im["sentences"]]
        assert len(texts) == TINY.captions_per_eval_image and len(set(texts)) > 1
        assert all(s["imgid"] == im["imgid"] for s in im["sentences"])
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
        sentids += im["sentids"]
        for s in im["sentences"]:
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower()) and s["tokens"]
    assert sentids == list(range(TINY.n_eval_images * TINY.captions_per_eval_image))


def test_demo_eval_split_is_prepared_by_the_karpathy_loader(built, tmp_path):
    """demo_eval_split = `xbt eval-data --format karpathy` on eval/: every held-out image and
    caption, reused when prepared, prepared again when the world has moved."""
    import shutil

    from xbt_ray.data import eval_sets

    out = shutil.copytree(built[0], tmp_path / "world")  # the shared world stays as built
    split = eval_sets.demo_eval_split(out)
    assert split == out / "eval_split"
    doc = json.loads((split / "manifest.json").read_text())
    assert (doc["dataset"], doc["protocol"]) == ("demo", "standard")
    assert doc["selected"] == {"images": 10, "captions": 50}
    assert (doc["images"], doc["captions"]) == (10, 50)
    assert doc["skipped"] == {"images": {}, "captions": {}}
    assert doc["source"]["format"] == "karpathy"
    images = _read(split / "images")
    captions = pq.read_table(split / "captions.parquet").to_pylist()
    heldout = json.loads((out / "eval" / "dataset_demo.json").read_text())["images"]
    assert [r["key"] for r in images] == [f"demo-{im['imgid']}" for im in heldout]
    for r, im in zip(images, heldout):
        assert r["jpg"] == (out / "eval" / "images" / im["filename"]).read_bytes()
        assert r["image_id"] == r["key"] and r["txt"] == im["sentences"][0]["raw"]
        assert [c["txt"] for c in captions if c["image_id"] == r["key"]] == [
            s["raw"] for s in im["sentences"]]
    assert {c["image_id"] for c in captions} == {r["key"] for r in images}

    stamp = (split / "captions.parquet").stat().st_mtime_ns
    assert eval_sets.demo_eval_split(out) == split
    assert (split / "captions.parquet").stat().st_mtime_ns == stamp  # reused

    moved = shutil.copytree(out, tmp_path / "moved")
    again = eval_sets.demo_eval_split(moved)
    assert json.loads((again / "manifest.json").read_text())["source"]["annotations"] == str(
        (moved / "eval" / "dataset_demo.json").resolve())
    assert _read(again / "images") == images
