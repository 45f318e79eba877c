"""The paired cache: joins on the Ray Data workers, hand-counted; training streams that differ
from epoch to epoch without a global shuffle."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from xbt_ray.config import ConfigError, TrainerConfig
from xbt_ray.data import cache, paired
from xbt_ray.train.distributed import epoch_batches


def _write(directory, keys, image_ids, emb, modality, success=True, rows_per_file=4):
    meta = cache.make_meta("m", "x", emb.shape[1], "d", modality)
    keys = np.array(keys, dtype=object)
    image_ids = np.array(image_ids, dtype=object)
    if success:
        cache.write_embeddings(directory, keys, image_ids, emb, meta, rows_per_file=rows_per_file)
    else:
        for i, start in enumerate(range(0, len(keys), rows_per_file)):
            end = start + rows_per_file
            cache.write_part(directory, i, keys[start:end], image_ids[start:end], emb[start:end],
                             meta)
    return directory


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def coco_caches(tmp_path_factory):
    """COCO layout: 6 images, 3 captions each (caption keys != image ids). New captions: all 18;
    old captions: 16 (c16, c17 missing); new images: img0..img5 with img5's vector all zeros
    (a failed export); old images: img0..img5."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("paired")
    caps = [f"c{i:02d}" for i in range(18)]
    cap_images = [f"img{i // 3}" for i in range(18)]
    imgs = [f"img{i}" for i in range(6)]
    new_images = _unit(rng, 6, 8)
    new_images[5] = 0
    return {
        "new_pair_texts": _write(root / "nt", caps, cap_images, _unit(rng, 18, 8), "text"),
        "old_pair_texts": _write(root / "ot", caps[:16], cap_images[:16], _unit(rng, 16, 4),
                                 "text"),
        "new_pair_images": _write(root / "ni", imgs, imgs, new_images, "image"),
        "old_pair_images": _write(root / "oi", imgs, imgs, _unit(rng, 6, 4), "image"),
    }


def test_pairs_join_on_workers_with_hand_counted_joins(ray_session, coco_caches, tmp_path):
    c = coco_caches
    out = paired.write_pairs({"new_pair_texts": c["new_pair_texts"],
                              "old_pair_texts": c["old_pair_texts"]},
                             {"new_pair_images": c["new_pair_images"],
                              "old_pair_images": c["old_pair_images"]},
                             tmp_path / "pairs", "test pairs")
    # captions c00..c14 survive: c15 (img5, zero vector) and c16, c17 (no old caption) do not
    assert out.rows == 15
    table = pq.read_table(out.files).to_pydict()
    assert sorted(table["key"]) == [f"c{i:02d}" for i in range(15)]
    assert all(table["image_id"][i] == f"img{int(k[1:]) // 3}" for i, k in enumerate(table["key"]))
    codes = {}
    for image_id, code in zip(table["image_id"], table["image_code"]):
        codes.setdefault(image_id, set()).add(code)
    assert all(len(v) == 1 for v in codes.values()) and len({min(v) for v in codes.values()}) == 5
    read, joins = out.counts["read"], out.counts["joins"]
    assert read["new_pair_images"] == {"rows_in": 6, "rows_used": 5,
                                       "skipped": {"zero_vector": 1}}
    assert read["new_pair_texts"] == {"rows_in": 18, "rows_used": 18, "skipped": {}}
    assert joins["new_pair_texts~old_pair_texts"] == {
        "left_rows": 18, "right_rows": 16, "joined": 15, "unmatched_left": 3,
        "unmatched_right": 1}
    assert joins["new_pair_texts->new_pair_images"] == {
        "left_rows": 18, "right_rows": 5, "joined": 15, "unmatched_left": 3,
        "unmatched_right": 0}
    assert joins["new_pair_texts->old_pair_images"]["unmatched_right"] == 1
    # the embedding columns hold the source rows, by key and by image id
    source = cache.read_embeddings(c["old_pair_images"])
    row = table["key"].index("c07")
    np.testing.assert_allclose(table["old_pair_images"][row],
                               source.emb[list(source.keys).index("img2")], atol=1e-3)
    # same inputs: reused, not re-joined
    marker = json.loads((tmp_path / "pairs" / paired.MARKER).read_text())
    again = paired.write_pairs({"new_pair_texts": c["new_pair_texts"],
                                "old_pair_texts": c["old_pair_texts"]},
                               {"new_pair_images": c["new_pair_images"],
                                "old_pair_images": c["old_pair_images"]},
                               tmp_path / "pairs", "test pairs")
    assert again.files == marker["files"] and again.rows == 15


def test_lopsided_and_empty_joins_are_one_line_errors(ray_session, coco_caches, tmp_path):
    rng = np.random.default_rng(1)
    other = _write(tmp_path / "other", [f"x{i}" for i in range(18)], [f"x{i}" for i in range(18)],
                   _unit(rng, 18, 4), "text")
    with pytest.raises(ConfigError, match=r"nothing joined: 0 of 18 rows of new_pair_texts"):
        paired.write_pairs({"new_pair_texts": coco_caches["new_pair_texts"], "o": other}, {},
                           tmp_path / "p1", "test")
    half = _write(tmp_path / "half", [f"c{i:02d}" for i in range(6)],
                  [f"img{i // 3}" for i in range(6)], _unit(rng, 6, 4), "text")
    with pytest.raises(ConfigError, match="a lopsided join: 6 of 18 rows"):
        paired.write_pairs({"new_pair_texts": coco_caches["new_pair_texts"], "o": half}, {},
                           tmp_path / "p2", "test")


def test_repeated_keys_counts_each_repeated_key_once_across_files(tmp_path):
    keys = ["x", "b", "a"]
    a = _write(tmp_path / "a", keys, keys, _unit(np.random.default_rng(4), 3, 4), "text",
               success=False)
    files = paired.cache_files(a)
    assert paired.repeated_keys(files) == (0, None)
    pq.write_table(pq.read_table(files[0]), tmp_path / "a" / "part-9.parquet")  # x, b, a again
    assert paired.repeated_keys(paired.cache_files(a)) == (3, "a")


@pytest.mark.parametrize("one_task_rows", [paired.ONE_TASK_KEY_CHECK_ROWS, 0],
                         ids=["one-task", "group-by"])
def test_hand_written_cache_with_repeated_keys_is_refused(ray_session, tmp_path, monkeypatch,
                                                          one_task_rows):
    monkeypatch.setattr(paired, "ONE_TASK_KEY_CHECK_ROWS", one_task_rows)
    rng = np.random.default_rng(2)
    keys = ["a", "b", "c", "d", "a", "e"]  # "a" in two files
    dup = _write(tmp_path / "dup", keys, keys, _unit(rng, 6, 4), "text", success=False)
    ok = _write(tmp_path / "ok", list("abcde"), list("abcde"), _unit(rng, 5, 4), "text")
    with pytest.raises(ConfigError, match=r"holds 1 duplicate keys \(e.g. 'a'\)"):
        paired.write_pairs({"dup": dup, "ok": ok}, {}, tmp_path / "p", "test")


def test_training_stream_differs_each_epoch_and_covers_every_row(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    keys = [f"k{i:04d}" for i in range(n)]
    emb = _unit(rng, n, 4)
    emb[:, 0] = np.arange(n) / n + 1.0      # the row's index, readable from the vector
    # 100 rows a file (6 files a cache): a few hundred 4-row files only slow Ray Data's reads
    a = _write(tmp_path / "a", keys, keys, emb, "text", rows_per_file=100)
    b = _write(tmp_path / "b", keys, keys, _unit(rng, n, 4), "text", rows_per_file=100)
    pairs = paired.write_pairs({"a": a, "b": b}, {}, tmp_path / "pairs", "test")
    ds = paired.training_dataset(pairs, ["a", "b"], seed=0)
    trainer = TrainerConfig(shuffle_buffer_rows=256)
    epochs = []
    for epoch in range(2):
        rows = [np.rint((batch["a"][:, 0].float().numpy() - 1.0) * n).astype(int)
                for batch in epoch_batches(ds, 50, trainer, seed=0, epoch=epoch, rank=0)]
        epochs.append(rows)
        assert sorted(np.concatenate(rows).tolist()) == list(range(n))  # every row once
    assert any(not np.array_equal(x, y) for x, y in zip(*epochs))   # batches differ by epoch
    assert not np.array_equal(np.concatenate(epochs[0]), np.arange(n))  # not stream order


def test_paired_files_do_not_depend_on_scheduling(ray_session, coco_caches, tmp_path,
                                                  monkeypatch):
    """Each row lands in the file its key's hash names, sorted by key, so two writes of the same
    inputs give the same files row for row (the hash join's arrival order does not show)."""
    monkeypatch.setattr(paired, "ROWS_PER_FILE", 4)    # 18 captions -> 5 files
    c = coco_caches
    tables = []
    for name in ("a", "b"):
        out = paired.write_pairs({"new_pair_texts": c["new_pair_texts"],
                                  "old_pair_texts": c["old_pair_texts"]},
                                 {"new_pair_images": c["new_pair_images"]},
                                 tmp_path / name, "test pairs")
        assert 1 < len(out.files) <= 5 and out.rows == 15
        files = [pq.read_table(f) for f in out.files]
        for f, table in zip(out.files, files):
            keys = table.column("key").to_pylist()
            assert keys == sorted(keys)
            bucket = int(f.rsplit("-", 1)[1].split(".")[0])
            assert set(paired.key_buckets(np.array(keys, dtype=object), 5)) == {bucket}
        tables.append(files)
    assert [t.to_pydict() for t in tables[0]] == [t.to_pydict() for t in tables[1]]


def test_key_buckets_are_a_stable_hash():
    keys = np.array(["c00", "c01", "img7", "c00"], dtype=object)
    buckets = paired.key_buckets(keys, 3)
    assert buckets.dtype == np.int64 and ((0 <= buckets) & (buckets < 3)).all()
    assert buckets[0] == buckets[3]
    # the same keys given as another dtype hash the same (ids are compared as str)
    assert (paired.key_buckets(np.array([7, 7]), 3) ==
            paired.key_buckets(np.array(["7", "7"], dtype=object), 3)).all()
