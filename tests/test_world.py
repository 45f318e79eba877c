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

TINY = WorldConfig(n_train_images=60, n_text_captions=50, n_eval_images=10,
                   rows_per_shard=25, broken_fraction=0.1)


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
    files = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_rebuild_overwrites(tmp_path):
    world.build_world(dataclasses.replace(TINY, n_train_images=80), tmp_path)
    world.build_world(TINY, tmp_path)
    assert len(list((tmp_path / "image_text").glob("*.parquet"))) == 3


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
    assert _read(tmp_path / "eval" / "images") == _read(out / "eval" / "images")


def test_counts_and_shards(built):
    out, manifest = built
    assert manifest["fingerprint"] == world.world_fingerprint(TINY)
    assert manifest["config"] == dataclasses.asdict(TINY)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    expected = {"image_text": (60, 3), "text": (50, 2), "eval/images": (10, 1)}
    for split, (n_rows, n_shards) in expected.items():
        shards = sorted((out / split).glob("part-*.parquet"))
        assert [s.name for s in shards] == [f"part-{i:05d}.parquet" for i in range(n_shards)]
        assert [pq.read_metadata(s).num_rows for s in shards][:-1] == [25] * (n_shards - 1)
        keys = [r["key"] for r in _read(out / split)]
        assert len(keys) == n_rows == len(set(keys))
    assert manifest["counts"] == {"image_text": 60, "text": 50, "eval_images": 10,
                                  "eval_captions": 50}
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
        assert row["image_id"] == row["key"]
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


def test_eval_captions(built):
    out, _ = built
    images = _read(out / "eval" / "images")
    captions = pq.read_table(out / "eval" / "captions.parquet").to_pylist()
    assert all(r["jpg"] and r["txt"] for r in images)
    keys = [r["key"] for r in captions]
    assert len(keys) == len(set(keys)) == TINY.n_eval_images * TINY.captions_per_eval_image
    by_image = {}
    for r in captions:
        by_image.setdefault(r["image_id"], []).append(r["txt"])
    assert set(by_image) == {r["key"] for r in images}
    for r in images:
        texts = by_image[r["key"]]
        assert len(texts) == TINY.captions_per_eval_image and texts[0] == r["txt"]
        assert len(set(texts)) > 1
