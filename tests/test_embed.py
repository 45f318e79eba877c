"""The embedding job on real shard files (webdataset tar and parquet) on the session's Ray."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from xbt_ray.config import EmbedConfig, ModelConfig
from xbt_ray.data import cache, shards
from xbt_ray.data.embed import embed_shards
from xbt_ray.models import clip


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tar_shard(tmp_path_factory):
    """6 good samples and 4 broken ones: undecodable image, no image, empty caption, no caption."""
    path = tmp_path_factory.mktemp("wds") / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            _add(tar, f"s{i:03d}.jpg", _jpeg((40 * i, 100, 200)))
            _add(tar, f"s{i:03d}.txt", f"a blue square number {i}".encode())
        _add(tar, "s100.jpg", b"<html>not an image</html>")
        _add(tar, "s100.txt", b"broken bytes")
        _add(tar, "s101.txt", b"a caption without an image")
        _add(tar, "s102.jpg", _jpeg((0, 0, 0)))
        _add(tar, "s102.txt", b"   ")
        _add(tar, "s103.jpg", _jpeg((9, 9, 9)))
    return str(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A project model saved to a local checkpoint file, as a user would pass `pretrained`."""
    clip_model, _ = clip.load_clip(ModelConfig(name="xbt-test-old"))
    path = clip.save_clip(clip_model, tmp_path_factory.mktemp("models") / "old.safetensors")
    return ModelConfig(name="xbt-test-old", pretrained=str(path))


def test_webdataset_images_counted_and_cached(ray_session, tar_shard, model, tmp_path):
    cfg = EmbedConfig(batch_size=4)
    first = embed_shards(shards.list_shards(tar_shard), "image", model, tmp_path, cfg)
    assert not first.reused
    assert first.counts == {"rows_in": 10, "rows_embedded": 8, "deduplicated": 0,
                            "skipped": {"undecodable_image": 1, "null_image": 1}}
    table = cache.read_embeddings(first.directory, expect={"model": "xbt-test-old", "dim": 32,
                                                           "modality": "image"})
    assert sorted(table.keys) == sorted([f"s{i:03d}" for i in range(6)] + ["s102", "s103"])
    np.testing.assert_allclose(np.linalg.norm(table.emb, axis=1), 1.0, atol=2e-3)
    assert table.meta["pretrained"].startswith("sha256:")

    second = embed_shards(shards.list_shards(tar_shard), "image", model, tmp_path, cfg)
    assert second.reused and second.directory == first.directory
    assert second.counts == first.counts


def test_webdataset_texts_skip_empty_captions(ray_session, tar_shard, model, tmp_path):
    result = embed_shards(shards.list_shards(tar_shard), "text", model, tmp_path,
                          EmbedConfig(batch_size=4))
    assert result.counts == {"rows_in": 10, "rows_embedded": 8, "deduplicated": 0,
                             "skipped": {"null_caption": 1, "empty_caption": 1}}


def test_embeddings_match_the_model_run_directly(ray_session, tar_shard, model, tmp_path):
    """The actor pipeline gives the same vectors as calling the model in this process."""
    import torch

    result = embed_shards(shards.list_shards(tar_shard), "image", model, tmp_path,
                          EmbedConfig(batch_size=3, dtype="float32"))
    table = cache.read_embeddings(result.directory)
    clip_model, _ = clip.load_clip(model)
    row = list(table.keys).index("s002")
    pixels, reason = shards.decode_image(_jpeg((80, 100, 200)), clip.image_size(model.name))
    assert reason == ""
    with torch.no_grad():
        x = clip.pixels_to_input(torch.from_numpy(pixels)[None], clip_model.visual.preprocess_cfg)
        direct = clip_model.encode_image(x, normalize=True)[0].numpy()
    np.testing.assert_allclose(table.emb[row], direct, atol=1e-5)


def _coco_shard(path, rows):
    """An img2dataset parquet shard in COCO layout: one row per caption, `image_id` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    colours = {"img-1": (200, 0, 0), "img-2": (0, 200, 0), "img-3": (0, 0, 200)}
    pq.write_table(pa.table({
        "key": [k for k, _ in rows], "image_id": [i for _, i in rows],
        "jpg": [_jpeg(colours[i]) for _, i in rows],
        "txt": [f"caption {k} of {i}" for k, i in rows]}), path)
    return str(path)


def test_coco_layout_encodes_each_image_once(ray_session, model, tmp_path):
    """3 images, 7 caption rows over two shards (img-2's captions in both): the image cache
    holds one row per image, keyed by image id; the caption cache one row per caption."""
    files = [_coco_shard(tmp_path / "a.parquet", [("c0", "img-1"), ("c1", "img-1"),
                                                  ("c2", "img-2"), ("c3", "img-1")]),
             _coco_shard(tmp_path / "b.parquet", [("c4", "img-2"), ("c5", "img-3"),
                                                  ("c6", "img-2")])]
    cfg = EmbedConfig(batch_size=4)
    images = embed_shards(files, "image", model, tmp_path / "cache", cfg)
    assert images.counts == {"rows_in": 7, "rows_embedded": 3, "deduplicated": 4, "skipped": {}}
    table = cache.read_embeddings(images.directory)
    assert sorted(table.keys) == ["img-1", "img-2", "img-3"]
    assert list(table.keys) == list(table.image_ids)
    texts = embed_shards(files, "text", model, tmp_path / "cache", cfg)
    assert texts.counts == {"rows_in": 7, "rows_embedded": 7, "deduplicated": 0, "skipped": {}}
    captions = cache.read_embeddings(texts.directory)
    assert dict(zip(captions.keys, captions.image_ids))["c4"] == "img-2"


def test_shards_reusing_keys_are_refused_and_not_marked_complete(ray_session, model, tmp_path):
    """Two download runs that reuse keys: one line, and the cache stays incomplete."""
    from xbt_ray.config import ConfigError

    files = [_coco_shard(tmp_path / "run1.parquet", [("k0", "img-1"), ("k1", "img-2")]),
             _coco_shard(tmp_path / "run2.parquet", [("k1", "img-3"), ("k2", "img-3")])]
    with pytest.raises(ConfigError) as info:
        embed_shards(files, "text", model, tmp_path / "cache", EmbedConfig(batch_size=4))
    message = str(info.value)
    assert "\n" not in message and "1 duplicate keys (e.g. 'k1')" in message
    assert "run1.parquet" in message
    assert not list((tmp_path / "cache").rglob(cache.SUCCESS))


def test_encoder_threads_default_to_the_actors_cpus():
    from xbt_ray.data.embed import encoder_threads

    assert encoder_threads(EmbedConfig()) == 1
    assert encoder_threads(EmbedConfig(actor_num_cpus=0.5)) == 1
    assert encoder_threads(EmbedConfig(actor_num_cpus=1.5)) == 2
    assert encoder_threads(EmbedConfig(actor_num_cpus=1.0, encoder_threads=2)) == 2


def _text_shard(path, start, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [f"t{start + i:06d}" for i in range(rows)]
    txt = [f"caption number {start + i} of a stopped job" if i % 50 else "" for i in range(rows)]
    pq.write_table(pa.table({"key": keys, "txt": txt}), path)
    return str(path)


STOPPABLE_JOB = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from xbt_ray.config import EmbedConfig, ModelConfig
from xbt_ray.data.embed import embed_shards
import ray
ray.init(address="auto", logging_level="ERROR")
files, root, pretrained = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
embed_shards(files, "text", ModelConfig(name="xbt-test-old", pretrained=pretrained), root,
             EmbedConfig(batch_size=8, rows_per_part=100))
"""


def test_a_stopped_job_resumes_without_encoding_a_shard_twice(ray_session, model, tmp_path):
    """The job is killed (SIGKILL, driver and all) once some shards are done; re-submitted, it
    keeps their parts untouched, embeds only the rest, and the corpus adds up."""
    import os
    import signal
    import subprocess
    import sys
    import time

    files = [_text_shard(tmp_path / f"shard-{i:02d}.parquet", i * 200, 200) for i in range(24)]
    root = tmp_path / "cache"
    job = subprocess.Popen([sys.executable, "-c", STOPPABLE_JOB, ",".join(files), str(root),
                            model.pretrained], env=os.environ.copy(), start_new_session=True)
    deadline = time.time() + 300
    markers: list = []
    while time.time() < deadline and job.poll() is None:
        markers = list(root.rglob("_shards/*.json"))
        if markers:
            break
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert markers, "the job wrote no shard marker before it was stopped"
    directory = markers[0].parent.parent
    assert not (directory / cache.SUCCESS).exists(), \
        "the job finished before it could be stopped: make the corpus larger"
    time.sleep(1.0)   # parts a dying task may still be writing
    done = {int(m.stem) for m in (directory / "_shards").glob("*.json")}
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("part-*.parquet")
              if int(p.name.split("-")[1]) in done}
    assert 0 < len(done) < len(files)

    result = embed_shards(files, "text", model, root, EmbedConfig(batch_size=8, rows_per_part=100))
    after = {p.name: p.stat().st_mtime_ns for p in directory.glob("part-*.parquet")}
    kept = {n: t for n, t in after.items() if int(n.split("-")[1]) in done}
    assert kept == before                       # finished shards: not encoded again
    redone = {int(n.split("-")[1]) for n in after} - done
    assert redone == set(range(len(files))) - done   # every other shard: encoded once, now
    assert result.counts == {"rows_in": 4800, "rows_embedded": 4704, "deduplicated": 0,
                             "skipped": {"empty_caption": 96}}
    assert len(cache.read_embeddings(result.directory)) == 4704

    # stopped after its last shard but before the key check: the rerun only checks and marks
    (result.directory / cache.SUCCESS).unlink()
    parts = {p.name: p.stat().st_mtime_ns for p in directory.glob("part-*.parquet")}
    again = embed_shards(files, "text", model, root, EmbedConfig(batch_size=8, rows_per_part=100))
    assert not again.reused and again.counts == result.counts
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("part-*.parquet")} == parts
