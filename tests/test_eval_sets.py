"""Benchmark loaders: protocol selection, counts that add up, keys, atomic reuse, clear errors."""
import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xbt_ray.config import ConfigError
from xbt_ray.data import eval_sets
from xbt_ray.data.world import CAPTION_SCHEMA, IMAGE_SCHEMA


def jpeg(colour, size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def read_split(out):
    images = pq.read_table(sorted((out / "images").glob("part-*.parquet"))).to_pylist()
    captions = pq.read_table(out / "captions.parquet").to_pylist()
    return images, captions


def check_consistent(out, manifest):
    """Counts add up, keys are unique, every caption refers to a written image and back."""
    images, captions = read_split(out)
    assert pq.read_schema(next((out / "images").glob("*.parquet"))) == IMAGE_SCHEMA
    assert pq.read_schema(out / "captions.parquet") == CAPTION_SCHEMA
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["images"] == len(images) and manifest["captions"] == len(captions)
    for what in ("images", "captions"):
        assert manifest["selected"][what] == (manifest[what]
                                              + sum(manifest["skipped"][what].values()))
    keys = [r["key"] for r in images]
    assert len(set(keys)) == len(keys) and len({r["key"] for r in captions}) == len(captions)
    assert {r["image_id"] for r in captions} == set(keys)
    assert all(r["image_id"] == r["key"] and r["status"] == "success" for r in images)
    assert all(r["txt"].strip() for r in captions)
    return images, captions


# -----------------------------------------------------------------------------
# fixtures: a Flickr30k-like and a COCO-like Karpathy file, NoCaps, manifests


def sentences(*texts):
    return [{"raw": t, "tokens": t.split()} for t in texts]


@pytest.fixture
def flickr(tmp_path):
    """6 images: 2 train, 1 val, 3 test (one file missing, one undecodable); one empty caption."""
    root = tmp_path / "flickr-images"
    root.mkdir()
    specs = [("train", "red"), ("train", "green"), ("val", "blue"),
             ("test", "white"), ("test", None), ("test", "garbage")]
    images = []
    for i, (split, colour) in enumerate(specs):
        name = f"{1000 + i}.jpg"
        if colour == "garbage":
            (root / name).write_bytes(b"not a jpeg")
        elif colour:
            (root / name).write_bytes(jpeg(colour))
        caps = [f"a {colour} thing number {i}", f"picture {i}", "  " if i == 3 else f"shot {i}"]
        images.append({"filename": name, "split": split, "imgid": i, "sentids": [3 * i, 3 * i + 1,
                       3 * i + 2], "sentences": sentences(*caps)})
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path, root


@pytest.fixture
def coco(tmp_path):
    """One image per split, in val2014/ or train2014/ like COCO, with cocoid."""
    root = tmp_path / "coco-images"
    images = []
    for i, (split, folder) in enumerate([("train", "train2014"), ("val", "val2014"),
                                         ("restval", "val2014"), ("test", "val2014")]):
        (root / folder).mkdir(parents=True, exist_ok=True)
        name = f"COCO_{folder}_{i:012d}.jpg"
        (root / folder / name).write_bytes(jpeg((40 * i, 80, 120)))
        images.append({"filepath": folder, "filename": name, "split": split, "imgid": i,
                       "cocoid": 500 + i, "sentences": sentences(f"coco {i} a", f"coco {i} b")})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return path, root


def test_flickr_standard(flickr, tmp_path):
    path, root = flickr
    out = tmp_path / "split"
    m = eval_sets.prepare_eval_split("karpathy", path, root, "standard", out)
    assert (m["dataset"], m["protocol"]) == ("flickr30k", "standard")
    images, captions = check_consistent(out, m)
    assert [r["key"] for r in images] == ["flickr30k-3"]
    assert [r["key"] for r in captions] == ["flickr30k-3-0", "flickr30k-3-1"]  # -2 was empty
    assert images[0]["jpg"] == (root / "1003.jpg").read_bytes()  # bytes as they are
    assert (images[0]["width"], images[0]["height"]) == (8, 6)
    assert images[0]["txt"] == "a white thing number 3"
    assert m["selected"] == {"images": 3, "captions": 9}
    assert m["skipped"] == {"images": {"missing_file": 1, "undecodable_image": 1},
                            "captions": {"empty_caption": 1, "image_skipped": 6}}
    assert not list(tmp_path.glob(".split.tmp-*"))


def test_flickr_large_scale_takes_every_split(flickr, tmp_path):
    path, root = flickr
    out = tmp_path / "split"
    m = eval_sets.prepare_eval_split("karpathy", path, root, "large-scale", out,
                                     rows_per_shard=2)
    images, captions = check_consistent(out, m)
    assert [r["key"] for r in images] == [f"flickr30k-{i}" for i in (0, 1, 2, 3)]
    assert m["shards"] == 2 and len(list((out / "images").glob("part-*.parquet"))) == 2
    assert all(pq.read_metadata(p).num_rows <= 2 for p in (out / "images").glob("*.parquet"))
    assert m["selected"] == {"images": 6, "captions": 18}
    assert m["skipped"]["images"] == {"missing_file": 1, "undecodable_image": 1}


def test_coco_protocols(coco, tmp_path):
    path, root = coco
    standard = eval_sets.prepare_eval_split("karpathy", path, root, "standard", tmp_path / "s")
    large = eval_sets.prepare_eval_split("karpathy", path, root, "large-scale", tmp_path / "l")
    assert standard["dataset"] == "coco"
    assert [r["key"] for r in check_consistent(tmp_path / "s", standard)[0]] == ["coco-503"]
    assert [r["key"] for r in check_consistent(tmp_path / "l", large)[0]] == ["coco-501",
                                                                               "coco-502"]
    assert large["skipped"] == {"images": {}, "captions": {}}


def test_nocaps(tmp_path):
    root = tmp_path / "nocaps"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg("red"))
    (root / "b.jpg").write_bytes(jpeg("blue"))
    ann = {"images": [{"id": 0, "file_name": "a.jpg", "domain": "in-domain"},
                      {"id": 1, "file_name": "b.jpg", "domain": "near-domain"},
                      {"id": 2, "file_name": "gone.jpg", "domain": "out-domain"}],
           "annotations": [{"image_id": 0, "caption": "red one", "id": 10},
                           {"image_id": 1, "caption": "", "id": 11},
                           {"image_id": 0, "caption": "red two", "id": 12},
                           {"image_id": 1, "caption": "blue one", "id": 13},
                           {"image_id": 2, "caption": "lost", "id": 14},
                           {"image_id": 9, "caption": "orphan", "id": 15}]}
    path = tmp_path / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps(ann))
    m = eval_sets.prepare_eval_split("nocaps", path, root, "standard", tmp_path / "s")
    images, captions = check_consistent(tmp_path / "s", m)
    assert [r["key"] for r in images] == ["nocaps-0", "nocaps-1"]
    assert [(r["key"], r["txt"]) for r in captions] == [
        ("nocaps-0-0", "red one"), ("nocaps-0-1", "red two"), ("nocaps-1-1", "blue one")]
    assert m["skipped"] == {"images": {"missing_file": 1},
                            "captions": {"empty_caption": 1, "image_skipped": 1,
                                         "unknown_image": 1}}
    large = eval_sets.prepare_eval_split("nocaps", path, root, "large-scale", tmp_path / "l")
    assert read_split(tmp_path / "l") == (images, captions)
    assert large["selected"] == m["selected"] == {"images": 3, "captions": 6}


def test_manifest_jsonl_and_parquet(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.jpg").write_bytes(jpeg("red"))
    absolute = tmp_path / "y.jpg"
    absolute.write_bytes(jpeg("green"))
    inline = jpeg("blue")
    rows = [{"image_id": "x", "image": "imgs/x.jpg", "caption": "red x"},
            {"image_id": "x", "image": "imgs/x.jpg", "caption": "red x again"},
            {"image_id": "y", "image": str(absolute), "caption": "green y"},
            {"image_id": "z", "image_bytes": inline, "caption": "blue z"},
            {"image_id": "z", "image_bytes": inline, "caption": None},
            {"image_id": "w", "image": "imgs/missing.jpg", "caption": "nothing"},
            {"image_id": "v", "image": "imgs/x.jpg", "caption": " \n"}]
    columns = {c: [r.get(c) for r in rows] for c in ("image_id", "image", "image_bytes", "caption")}
    pq.write_table(pa.table(columns), tmp_path / "mine.parquet")
    with open(tmp_path / "mine.jsonl", "w") as f:
        for r in rows:
            if "image_bytes" in r:
                r = {**r, "image_bytes": base64.b64encode(r["image_bytes"]).decode()}
            f.write(json.dumps(r) + "\n")
    for name in ("mine.parquet", "mine.jsonl"):
        out = tmp_path / f"out-{name}"
        m = eval_sets.prepare_eval_split("manifest", tmp_path / name, None, "all", out)
        images, captions = check_consistent(out, m)
        assert m["dataset"] == "mine"
        assert [r["key"] for r in images] == ["mine-x", "mine-y", "mine-z"]
        assert images[2]["jpg"] == inline
        assert [r["key"] for r in captions] == ["mine-x-0", "mine-x-1", "mine-y-0", "mine-z-0"]
        assert m["selected"] == {"images": 5, "captions": 7}
        assert m["skipped"] == {"images": {"missing_file": 1, "no_captions": 1},
                                "captions": {"empty_caption": 2, "image_skipped": 1}}


def test_written_split_decodes_like_the_embedding_stage(flickr, tmp_path):
    from xbt_ray.data import shards

    assert eval_sets.MAX_IMAGE_PIXELS == shards.MAX_IMAGE_PIXELS
    path, root = flickr
    out = tmp_path / "split"
    eval_sets.prepare_eval_split("karpathy", path, root, "large-scale", out)
    assert shards.list_shards(str(out / "images"))
    images, captions = read_split(out)
    assert all(shards.decode_image(r["jpg"], 16)[1] == "" for r in images)
    assert all(shards.check_caption(r["txt"]) == (r["txt"], "") for r in captions)


# -----------------------------------------------------------------------------
# reuse and refusal, errors


def test_reuse_and_refuse(flickr, tmp_path):
    path, root = flickr
    out = tmp_path / "split"
    first = eval_sets.prepare_eval_split("karpathy", path, root, "standard", out)
    stamp = (out / "captions.parquet").stat().st_mtime_ns
    assert eval_sets.prepare_eval_split("karpathy", path, root, "standard", out) == first
    assert (out / "captions.parquet").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(ConfigError, match="not empty"):
        eval_sets.prepare_eval_split("karpathy", path, root, "large-scale", out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        eval_sets.prepare_eval_split("karpathy", path, root, "standard", tmp_path / "other")
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert eval_sets.prepare_eval_split("karpathy", path, root, "standard",
                                        tmp_path / "empty")["images"] == 1


def test_errors(flickr, tmp_path):
    path, root = flickr
    out = tmp_path / "split"
    cases = [
        (("coco-json", path, root, "standard"), "unknown eval set format"),
        (("karpathy", path, root, "1k"), "unknown protocol '1k'"),
        (("nocaps", path, root, "all"), "unknown protocol 'all'"),
        (("manifest", path, root, "standard"), "unknown protocol 'standard'"),
        (("karpathy", tmp_path / "nope.json", root, "standard"), "annotation file not found"),
        (("karpathy", path, tmp_path / "no-dir", "standard"), "image directory not found"),
        (("nocaps", path, root, "standard"), "needs 'images' and 'annotations'"),
        (("manifest", path, root, "all"), "must be .parquet or .jsonl"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            eval_sets.prepare_eval_split(*args, out)
    no_test = json.loads(path.read_text())
    no_test["images"] = [im for im in no_test["images"] if im["split"] != "test"]
    (tmp_path / "no_test.json").write_text(json.dumps(no_test))
    with pytest.raises(ConfigError, match="selects 0 images"):
        eval_sets.prepare_eval_split("karpathy", tmp_path / "no_test.json", root, "standard", out)
    broken = {"images": [im for im in json.loads(path.read_text())["images"]
                         if im["imgid"] in (4, 5)]}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="none of the 2 selected images"):
        eval_sets.prepare_eval_split("karpathy", tmp_path / "broken.json", root, "large-scale",
                                     out)
    (tmp_path / "m.jsonl").write_text('{"image_id": 1, "image": "a.jpg", "caption": "x"}\n'
                                      '{"image_id": 1, "image": "b.jpg", "caption": "y"}\n')
    with pytest.raises(ConfigError, match="two different images"):
        eval_sets.prepare_eval_split("manifest", tmp_path / "m.jsonl", None, "all", out)
    (tmp_path / "n.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n')
    with pytest.raises(ConfigError, match="needs columns"):
        eval_sets.prepare_eval_split("manifest", tmp_path / "n.jsonl", None, "all", out)
    assert not out.exists() and not list(tmp_path.glob(".split.tmp-*"))  # nothing half-written
