"""The embedding cache: parquet round trip, metadata contract, refusals, alignment."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xbt_ray.config import ConfigError
from xbt_ray.data import cache

DIM = 8


def _meta(**changes):
    meta = cache.make_meta("xbt-test-old", "sha256:abc", DIM, "ds123", "image")
    meta.update(changes)
    return meta


def _data(n=7, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    keys = [f"k{i:03d}" for i in range(n)]
    ids = [f"img{i // 2}" for i in range(n)]
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    return keys, ids, emb


def _error(directory, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        cache.read_embeddings(directory, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_make_meta_types():
    meta = cache.make_meta("m", "p", np.int64(16), "d", "text", normalized=0)
    assert meta == {"model": "m", "pretrained": "p", "dim": 16, "normalized": False,
                    "dataset": "d", "modality": "text"}
    assert type(meta["dim"]) is int


def test_cache_path(tmp_path):
    assert cache.cache_path(tmp_path, "mfp", "dfp", "text") == \
        tmp_path / "embeddings" / "mfp" / "dfp" / "text"


def test_round_trip_float16(tmp_path):
    keys, ids, emb = _data()
    directory = tmp_path / "c"
    cache.write_embeddings(directory, keys, ids, emb, _meta(), rows_per_file=3)
    assert sorted(p.name for p in directory.glob("part-*.parquet")) == \
        ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]   # 3 + 3 + 1 rows
    assert pq.read_table(directory / "part-00000.parquet").schema.field("emb").type == \
        pa.list_(pa.float16(), DIM)

    got = cache.read_embeddings(directory)
    assert len(got) == 7
    assert list(got.keys) == keys and list(got.image_ids) == ids
    assert got.emb.dtype == np.float32 and got.emb.shape == (7, DIM)
    assert np.abs(got.emb - emb).max() < 1e-3 * max(1.0, np.abs(emb).max())
    assert not np.array_equal(got.emb, emb)         # really stored as float16
    assert np.array_equal(got.emb, emb.astype(np.float16).astype(np.float32))
    assert got.meta == _meta()


def test_round_trip_float32_exact(tmp_path):
    keys, ids, emb = _data()
    cache.write_embeddings(tmp_path, keys, ids, emb, _meta(), dtype="float32")
    got = cache.read_embeddings(tmp_path)
    assert np.array_equal(got.emb, emb)
    assert list(got.keys) == keys


def test_metadata_round_trip(tmp_path):
    meta = cache.make_meta("ViT-B-32", "openai", DIM, "fp-xyz", "text", normalized=False)
    keys, ids, emb = _data()
    cache.write_embeddings(tmp_path, keys, ids, emb, meta)
    assert cache.read_meta(tmp_path / "part-00000.parquet") == meta
    assert cache.read_embeddings(tmp_path).meta == meta
    raw = pq.read_schema(tmp_path / "part-00000.parquet").metadata
    assert raw[b"xbt.dim"] == b"8" and raw[b"xbt.normalized"] == b"false"


def test_write_embeddings_marks_complete(tmp_path):
    keys, ids, emb = _data()
    cache.write_embeddings(tmp_path, keys, ids, emb, _meta())
    assert cache.completed_counts(tmp_path) == {"rows_in": 7, "rows_embedded": 7, "skipped": {}}


def test_completed_counts_before_and_after_mark(tmp_path):
    directory = tmp_path / "c"
    assert cache.completed_counts(directory) is None               # no directory at all
    keys, ids, emb = _data()
    cache.write_part(directory, 0, keys, ids, emb, _meta())
    assert cache.completed_counts(directory) is None               # parts, no marker
    counts = {"rows_in": 9, "rows_embedded": 7, "skipped": {"null_image": 2}}
    cache.mark_complete(directory, counts)
    assert cache.completed_counts(directory) == counts
    assert json.loads((directory / cache.SUCCESS).read_text()) == counts


def test_expect_match_and_mismatch(tmp_path):
    keys, ids, emb = _data()
    cache.write_embeddings(tmp_path, keys, ids, emb, _meta())
    assert len(cache.read_embeddings(tmp_path, expect={"dim": DIM, "modality": "image"})) == 7
    message = _error(tmp_path, expect={"dim": 99})
    assert "dim=8" in message and "99" in message
    message = _error(tmp_path, expect={"modality": "text"})
    assert "modality" in message and "'text'" in message


def test_no_parts(tmp_path):
    assert "no embedding files" in _error(tmp_path)


def test_width_differs_from_metadata(tmp_path):
    keys, ids, emb = _data(dim=6)
    cache.write_part(tmp_path, 0, keys, ids, emb, _meta(dim=DIM))
    message = _error(tmp_path)
    assert "dim 6" in message and "metadata says 8" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values(tmp_path, bad):
    keys, ids, emb = _data()
    emb[3, 2] = bad
    with pytest.raises(ConfigError, match="non-finite"):
        cache.write_part(tmp_path, 0, keys, ids, emb, _meta())
    # a file exported by another tool, with valid metadata but a NaN/inf value: that row is
    # skipped on read and counted, the others are kept
    path = cache.write_part(tmp_path, 0, keys, ids, np.nan_to_num(emb, posinf=0.0), _meta())
    table = pq.read_table(path)
    flat = emb.astype(np.float16).reshape(-1)
    bad_col = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), emb.shape[1])
    pq.write_table(table.set_column(2, "emb", bad_col).replace_schema_metadata(
        table.schema.metadata), path)
    read = cache.read_embeddings(tmp_path)
    assert read.counts == {"rows_in": len(keys), "rows_used": len(keys) - 1,
                           "skipped": {"non_finite": 1}}
    assert keys[3] not in set(read.keys) and len(read.emb) == len(keys) - 1


def test_zero_vectors_are_skipped_and_counted(tmp_path):
    """All-zero rows (a vector store's export of items that failed to embed) would tie with
    every query: they are skipped and counted, not searched."""
    keys, ids, emb = _data()
    emb[[1, 4]] = 0
    cache.write_part(tmp_path, 0, keys, ids, emb, _meta())
    read = cache.read_embeddings(tmp_path)
    assert read.counts["skipped"] == {"zero_vector": 2}
    assert list(read.keys) == [k for i, k in enumerate(keys) if i not in (1, 4)]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float16_overflow_is_refused(tmp_path):
    # 1e5 is beyond float16's range (65504): the writer refuses it instead of storing inf
    keys, ids, emb = _data()
    emb[0, 0] = 1e5
    with pytest.raises(ConfigError, match="non-finite"):
        cache.write_part(tmp_path, 0, keys, ids, emb, _meta(), dtype="float16")


def test_foreign_parquet(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "emb": [[0.0] * DIM]}), tmp_path / "part-00000.parquet")
    assert "not an xbt embedding file" in _error(tmp_path)


def test_partial_metadata(tmp_path):
    keys, ids, emb = _data()
    path = cache.write_part(tmp_path, 0, keys, ids, emb, _meta())
    table = pq.read_table(path)
    raw = dict(table.schema.metadata)
    del raw[b"xbt.modality"]
    pq.write_table(table.replace_schema_metadata(raw), path)
    message = _error(tmp_path)
    assert "not an xbt embedding file" in message and "xbt.modality" in message


def test_parts_with_differing_metadata(tmp_path):
    keys, ids, emb = _data()
    cache.write_part(tmp_path, 0, keys[:4], ids[:4], emb[:4], _meta())
    cache.write_part(tmp_path, 1, keys[4:], ids[4:], emb[4:], _meta(dataset="other"))
    message = _error(tmp_path)
    assert "part-00001.parquet" in message and "differs" in message


def test_missing_image_id_falls_back_to_key(tmp_path):
    keys, ids, emb = _data()
    path = cache.write_part(tmp_path, 0, keys, ids, emb, _meta())
    table = pq.read_table(path)
    pq.write_table(table.drop(["image_id"]), path)
    got = cache.read_embeddings(tmp_path)
    assert list(got.image_ids) == keys


def _emb(keys, values):
    emb = np.array(values, dtype=np.float32).reshape(len(keys), -1)
    return cache.Embeddings(np.array(keys, dtype=object), np.array(keys, dtype=object), emb, {})
