"""Bring-your-own embeddings: every accepted export layout is imported into the cache contract
with exact counts and the normalised source vectors; bad inputs are one-line ConfigErrors."""
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xbt_ray.config import ConfigError
from xbt_ray.data import byo, cache

DIM = 6
FLOAT = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}


def _vectors(n, dim=DIM, seed=0, scale=3.0):
    """Non-unit vectors (norms around `scale`), float64."""
    return np.random.default_rng(seed).standard_normal((n, dim)) * scale / np.sqrt(dim)


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fixed(emb, value_type=pa.float32()):
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=value_type),
                                             emb.shape[1])


def _write(path, columns):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def _keys(n, prefix="k", start=0):
    return [f"{prefix}{i:04d}" for i in range(start, start + n)]


def _error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def _check(out, keys, source, counts, dtype="float16", image_ids=None):
    """The imported directory reads back with exactly these rows and the normalised vectors."""
    got = cache.read_embeddings(out)
    assert got.keys.tolist() == list(keys)
    assert got.image_ids.tolist() == list(image_ids if image_ids is not None else keys)
    atol = 2e-3 if dtype == "float16" else 1e-6
    np.testing.assert_allclose(got.emb, _unit(source), atol=atol)
    np.testing.assert_allclose(np.linalg.norm(got.emb, axis=1), 1.0, atol=atol)
    assert cache.completed_counts(out) == counts
    assert counts["rows_in"] == counts["rows_embedded"] + sum(counts["skipped"].values())
    return got


# ------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("source_dtype", ["float16", "float32", "float64"])
def test_fixed_size_list(tmp_path, source_dtype):
    emb = _vectors(10).astype(source_dtype)
    src = _write(tmp_path / "export.parquet",
                 {"key": _keys(10), "emb": _fixed(emb, FLOAT[source_dtype])})
    out = tmp_path / "out"
    counts = byo.import_embeddings(byo.Entry(str(src)), out, "old_text")
    assert counts == {"rows_in": 10, "rows_embedded": 10, "skipped": {}, "renormalized": 10}
    got = _check(out, _keys(10), emb, counts)
    assert got.meta == {"model": "old-byo", "pretrained": str(src), "dim": DIM,
                        "normalized": True, "dataset": got.meta["dataset"], "modality": "text"}
    assert len(got.meta["dataset"]) == 16   # the source fingerprint


@pytest.mark.parametrize("list_type", [pa.list_, pa.large_list])
@pytest.mark.parametrize("source_dtype", ["float16", "float32", "float64"])
def test_variable_length_list(tmp_path, list_type, source_dtype):
    emb = _vectors(7, seed=1).astype(source_dtype)
    column = pa.array(list(emb), type=list_type(FLOAT[source_dtype]))
    src = _write(tmp_path / "export.parquet", {"key": _keys(7), "emb": column})
    counts = byo.import_embeddings(byo.Entry(str(src)), tmp_path / "out", "new_pair_images",
                                   dtype="float32")
    assert counts == {"rows_in": 7, "rows_embedded": 7, "skipped": {}, "renormalized": 7}
    got = _check(tmp_path / "out", _keys(7), emb, counts, dtype="float32")
    assert got.meta["modality"] == "image" and got.meta["model"] == "new-byo"


def test_variable_length_wrong_length_refused(tmp_path):
    rows = [list(v) for v in _vectors(3)] + [[1.0, 2.0]]
    src = _write(tmp_path / "bad.parquet",
                 {"key": _keys(4), "emb": pa.array(rows, pa.list_(pa.float32()))})
    message = _error(byo.import_embeddings, byo.Entry(str(src)), tmp_path / "out", "old_text")
    assert str(src) in message and "length" in message
    assert cache.completed_counts(tmp_path / "out") is None


def test_ray_tensor_column(tmp_path):
    from ray.data.extensions import ArrowTensorArray  # does not start Ray

    emb = _vectors(9, seed=2).astype(np.float32)
    tensor = ArrowTensorArray.from_numpy(emb)
    assert isinstance(tensor.type, pa.ExtensionType)
    src = _write(tmp_path / "ray.parquet", {"id": _keys(9), "embedding": tensor})
    assert isinstance(pq.read_schema(src).field("embedding").type, pa.ExtensionType)
    entry = byo.Entry(str(src), id_column="id", vector_column="embedding")
    counts = byo.import_embeddings(entry, tmp_path / "out", "new_text", dtype="float32")
    assert counts == {"rows_in": 9, "rows_embedded": 9, "skipped": {}, "renormalized": 9}
    _check(tmp_path / "out", _keys(9), emb, counts, dtype="float32")


def test_ray_tensor_column_of_matrices_refused(tmp_path):
    from ray.data.extensions import ArrowTensorArray

    src = _write(tmp_path / "ray.parquet", {"key": _keys(2), "emb": ArrowTensorArray.from_numpy(
        np.ones((2, 3, 2), np.float32))})
    message = _error(byo.import_embeddings, byo.Entry(str(src)), tmp_path / "out", "old_text")
    assert "(3, 2)" in message and str(src) in message


def _laion(root, sizes, seed=0):
    """clip-retrieval layout: img_emb/img_emb_<i>.npy + metadata/metadata_<i>.parquet."""
    keys, embs = [], []
    start = 0
    for i, n in enumerate(sizes):
        emb = _vectors(n, seed=seed + i).astype(np.float16)
        (root / "img_emb").mkdir(parents=True, exist_ok=True)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", emb)
        ids = list(range(start, start + n))
        _write(root / "metadata" / f"metadata_{i}.parquet",
               {"key": pa.array(ids, pa.int64()), "caption": [f"c{j}" for j in ids]})
        keys += [str(j) for j in ids]
        embs.append(emb)
        start += n
    return keys, np.concatenate(embs)


def test_npy_beside_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(byo, "CHUNK_ROWS", 4)   # several chunks per file
    # 11 files: natural order pairs img_emb_10 with metadata_10 (and writes them last)
    keys, emb = _laion(tmp_path, [5, 3, 9, 1, 2, 2, 2, 2, 2, 2, 7])
    entry = byo.Entry(str(tmp_path / "metadata"), npy=str(tmp_path / "img_emb"))
    out = tmp_path / "out"
    counts = byo.import_embeddings(entry, out, "old_pair_images")
    assert counts == {"rows_in": 37, "rows_embedded": 37, "skipped": {}, "renormalized": 37}
    got = _check(out, keys, emb, counts)
    assert len(list(out.glob("part-*.parquet"))) == 11   # one part per input file
    assert got.meta["pretrained"] == str(tmp_path / "img_emb")


def test_npy_row_count_mismatch_refused(tmp_path):
    _laion(tmp_path, [4, 3])
    np.save(tmp_path / "img_emb" / "img_emb_1.npy", _vectors(2).astype(np.float32))
    entry = byo.Entry(str(tmp_path / "metadata"), npy=str(tmp_path / "img_emb" / "*.npy"))
    message = _error(byo.import_embeddings, entry, tmp_path / "out", "old_pair_images")
    assert "img_emb_1.npy has 2 rows" in message and "metadata_1.parquet have 3" in message

    np.save(tmp_path / "img_emb" / "img_emb_2.npy", _vectors(2).astype(np.float32))
    message = _error(byo.import_embeddings, entry, tmp_path / "out", "old_pair_images")
    assert "3 npy files" in message and "2 id parquet files" in message


def test_integer_ids_join_string_image_ids(tmp_path):
    image_emb = _vectors(3, seed=3)
    images = _write(tmp_path / "images.parquet", {
        "key": pa.array([42, 7, -1], pa.int64()), "emb": _fixed(image_emb)})
    text_emb = _vectors(4, seed=4)
    texts = _write(tmp_path / "texts.parquet", {
        "caption_id": pa.array([1000, 1001, 1002, 1003], pa.int32()),
        "image_id": ["42", "42", "7", "-1"], "emb": _fixed(text_emb)})
    byo.import_embeddings(byo.Entry(str(images)), tmp_path / "img", "new_eval_images")
    byo.import_embeddings(byo.Entry(str(texts), id_column="caption_id"), tmp_path / "txt",
                          "new_eval_captions")
    img = _check(tmp_path / "img", ["42", "7", "-1"], image_emb,
                 cache.completed_counts(tmp_path / "img"))
    txt = _check(tmp_path / "txt", ["1000", "1001", "1002", "1003"], text_emb,
                 cache.completed_counts(tmp_path / "txt"), image_ids=["42", "42", "7", "-1"])
    assert set(txt.image_ids) == set(img.keys)   # captions join their images


def test_explicit_image_id_column(tmp_path):
    src = _write(tmp_path / "pairs.parquet", {"key": _keys(3), "img": ["a", "b", None],
                                              "emb": _fixed(_vectors(3))})
    entry = byo.Entry(str(src), image_id_column="img")
    counts = byo.import_embeddings(entry, tmp_path / "out", "old_pair_texts")
    assert counts["skipped"] == {"null_image_id": 1}
    _check(tmp_path / "out", _keys(2), _vectors(3)[:2], counts, image_ids=["a", "b"])
    message = _error(byo.import_embeddings, byo.Entry(str(src), image_id_column="image"),
                     tmp_path / "out2", "old_pair_texts")
    assert "'image'" in message and str(src) in message


def test_renormalized_counts_only_off_norm_rows(tmp_path):
    emb = _unit(_vectors(6, seed=5))
    emb[[1, 4]] *= 1.01            # off by 1e-2: renormalised
    emb[2] *= 1.0005               # within the 1e-3 tolerance
    src = _write(tmp_path / "x.parquet", {"key": _keys(6), "emb": _fixed(emb, pa.float64())})
    counts = byo.import_embeddings(byo.Entry(str(src)), tmp_path / "out", "old_text",
                                   dtype="float32")
    assert counts == {"rows_in": 6, "rows_embedded": 6, "skipped": {}, "renormalized": 2}
    _check(tmp_path / "out", _keys(6), emb, counts, dtype="float32")


def test_bad_rows_skipped_and_counted(tmp_path):
    emb = _vectors(10, seed=6)
    emb[1] = 0.0                   # failed to embed
    emb[2, 3] = np.nan
    emb[3, 0] = np.inf
    rows = [list(v) for v in emb]
    rows[4] = None                 # null vector
    rows[5][2] = None              # null element: non-finite
    keys = _keys(10)
    keys[6] = None                 # null id
    src = _write(tmp_path / "x.parquet", {"key": keys, "emb": pa.array(rows, pa.list_(
        pa.float32()))})
    counts = byo.import_embeddings(byo.Entry(str(src)), tmp_path / "out", "new_text")
    assert counts == {"rows_in": 10, "rows_embedded": 4,
                      "skipped": {"zero_vector": 1, "non_finite": 3, "null_vector": 1,
                                  "null_id": 1},
                      "renormalized": 4}
    kept = [0, 7, 8, 9]
    _check(tmp_path / "out", [keys[i] for i in kept], emb[kept], counts)


def test_fixed_size_null_rows(tmp_path):
    emb = _vectors(4, seed=7).astype(np.float32)
    column = pa.array([list(emb[0]), None, list(emb[2]), list(emb[3])],
                      pa.list_(pa.float32(), DIM))
    src = _write(tmp_path / "x.parquet", {"key": _keys(4), "emb": column})
    try:
        pq.read_table(src)
    except pa.ArrowInvalid:   # apache/arrow#35692: pyarrow <= 25 cannot read these rows back
        message = _error(byo.import_embeddings, byo.Entry(str(src)), tmp_path / "out",
                         "old_text")
        assert str(src) in message and "35692" in message and "zero vectors" in message
        return
    counts = byo.import_embeddings(byo.Entry(str(src)), tmp_path / "out", "old_text")
    assert counts["skipped"] == {"null_vector": 1} and counts["rows_embedded"] == 3
    _check(tmp_path / "out", [_keys(4)[i] for i in (0, 2, 3)], emb[[0, 2, 3]], counts)


def test_no_usable_rows_refused(tmp_path):
    src = _write(tmp_path / "x.parquet", {"key": _keys(2), "emb": _fixed(np.zeros((2, DIM)))})
    message = _error(byo.import_embeddings, byo.Entry(str(src)), tmp_path / "out", "old_text")
    assert "no usable rows" in message and "zero_vector" in message


def test_duplicate_ids_refused(tmp_path):
    src = _write(tmp_path / "one.parquet", {"key": ["a", "b", "a"], "emb": _fixed(_vectors(3))})
    message = _error(byo.import_embeddings, byo.Entry(str(src)), tmp_path / "o1", "old_text")
    assert "'a'" in message and "duplicate" in message

    _write(tmp_path / "many" / "p0.parquet", {"key": ["a", "b"], "emb": _fixed(_vectors(2))})
    _write(tmp_path / "many" / "p1.parquet", {"key": ["c", "b"], "emb": _fixed(_vectors(2))})
    message = _error(byo.import_embeddings, byo.Entry(str(tmp_path / "many")), tmp_path / "o2",
                     "old_text")
    assert "'b'" in message and "duplicate" in message
    assert not list((tmp_path / "o2").glob("part-*"))   # no half-written directory left


def test_missing_column_refused(tmp_path):
    src = _write(tmp_path / "x.parquet", {"id": _keys(2), "vec": _fixed(_vectors(2))})
    message = _error(byo.import_embeddings, byo.Entry(str(src)), tmp_path / "out", "old_text")
    assert str(src) in message and "'key'" in message and "id, vec" in message
    message = _error(byo.import_embeddings, byo.Entry(str(src), id_column="id"),
                     tmp_path / "out", "old_text")
    assert "'emb'" in message and "id, vec" in message


def test_dim_change_between_files_refused(tmp_path):
    _write(tmp_path / "d" / "a.parquet", {"key": ["a"], "emb": _fixed(_vectors(1))})
    _write(tmp_path / "d" / "b.parquet", {"key": ["b"], "emb": _fixed(_vectors(1, dim=4))})
    message = _error(byo.import_embeddings, byo.Entry(str(tmp_path / "d")), tmp_path / "out",
                     "old_text")
    assert "dim 4" in message and "b.parquet" in message


def test_unsupported_types_refused(tmp_path):
    src = _write(tmp_path / "x.parquet", {"key": [1.5], "emb": _fixed(_vectors(1))})
    assert "ids must be strings or integers" in _error(
        byo.import_embeddings, byo.Entry(str(src)), tmp_path / "out", "old_text")
    src = _write(tmp_path / "y.parquet", {"key": ["a"], "emb": pa.array([[1, 2]])})
    assert "float16/32/64" in _error(
        byo.import_embeddings, byo.Entry(str(src)), tmp_path / "out", "old_text")
    assert "unknown BYO role 'old_texts'" in _error(
        byo.import_embeddings, byo.Entry(str(src)), tmp_path / "out", "old_texts")
    assert "no .parquet files" in _error(
        byo.import_embeddings, byo.Entry(str(tmp_path / "none")), tmp_path / "out", "old_text")


def test_reuse_unchanged_source(tmp_path):
    emb = _vectors(5)
    src = _write(tmp_path / "x.parquet", {"key": _keys(5), "emb": _fixed(emb)})
    out = tmp_path / "out"
    counts = byo.import_embeddings(byo.Entry(str(src)), out, "old_text", dataset="coco")
    part = out / "part-00000.parquet"
    before = part.stat().st_mtime_ns
    assert byo.import_embeddings(byo.Entry(str(src)), out, "old_text", dataset="coco") == counts
    assert part.stat().st_mtime_ns == before                       # reused, not rewritten
    assert cache.read_embeddings(out).meta["dataset"] == "coco"

    emb2 = _vectors(3, seed=9)
    _write(src, {"key": _keys(3), "emb": _fixed(emb2)})
    os.utime(src, ns=(before + 10**9, before + 10**9))
    counts2 = byo.import_embeddings(byo.Entry(str(src)), out, "old_text", dataset="coco")
    assert counts2["rows_in"] == 3
    _check(out, _keys(3), emb2, counts2)


# ------------------------------------------------------------------------------- manifest

def test_load_manifest(tmp_path):
    (tmp_path / "m.yaml").write_text(
        "dataset: coco\nprotocol: coco-5k\nold_text: exports/old/\n"
        "new_pair_images:\n  path: meta/*.parquet\n  npy: /abs/emb\n  id_column: id\n"
        "  model: vit-l\n")
    manifest = byo.load_manifest(tmp_path / "m.yaml")
    assert manifest.dataset == "coco" and manifest.protocol == "coco-5k"
    assert manifest == {
        "old_text": byo.Entry(str(tmp_path / "exports/old/")),
        "new_pair_images": byo.Entry(str(tmp_path / "meta/*.parquet"), id_column="id",
                                     npy="/abs/emb", model="vit-l")}

    (tmp_path / "bad.yaml").write_text("old_txt: x.parquet\n")
    message = _error(byo.load_manifest, tmp_path / "bad.yaml")
    assert "'old_txt'" in message and "new_eval_captions" in message
    (tmp_path / "bad2.yaml").write_text("old_text: {path: x, idcol: key}\n")
    assert "'idcol'" in _error(byo.load_manifest, tmp_path / "bad2.yaml")
    (tmp_path / "bad3.yaml").write_text("old_text: {npy: x}\n")
    assert "no path" in _error(byo.load_manifest, tmp_path / "bad3.yaml")
    assert "not found" in _error(byo.load_manifest, tmp_path / "missing.yaml")


def test_import_manifest(tmp_path, caplog):
    exports = tmp_path / "exports"
    old_text, new_text = _vectors(8, seed=10), _vectors(8, seed=11)
    _write(exports / "old_text.parquet", {"key": _keys(8), "emb": _fixed(old_text)})
    _write(exports / "new_text" / "a.parquet", {"key": _keys(5), "emb": _fixed(new_text[:5])})
    _write(exports / "new_text" / "b.parquet", {"key": _keys(3, start=5),
                                                "emb": _fixed(new_text[5:])})
    laion_keys, laion_emb = _laion(exports / "laion", [4, 2])
    manifest = tmp_path / "byo.yaml"
    manifest.write_text(
        "dataset: demo\nold_text: exports/old_text.parquet\nnew_text: exports/new_text\n"
        "old_eval_images: {path: exports/laion/metadata, npy: exports/laion/img_emb, "
        "model: clip-l}\n")
    with caplog.at_level("INFO", logger="xbt_ray.data.byo"):
        results = byo.import_manifest(manifest, tmp_path / "cache")
    assert set(results) == {"old_text", "new_text", "old_eval_images"}
    for role, result in results.items():
        assert result.directory.parent == tmp_path / "cache" / "embeddings" / "byo"
        assert result.directory.name.startswith(f"{role}-") and not result.reused
        assert f"BYO {role}" in caplog.text
    _check(results["old_text"].directory, _keys(8), old_text, results["old_text"].counts)
    _check(results["new_text"].directory, _keys(8), new_text, results["new_text"].counts)
    got = _check(results["old_eval_images"].directory, laion_keys, laion_emb,
                 results["old_eval_images"].counts)
    assert got.meta["model"] == "clip-l" and got.meta["modality"] == "image"
    assert got.meta["dataset"] == "demo"
    assert results["new_text"].counts == {"rows_in": 8, "rows_embedded": 8, "skipped": {},
                                          "renormalized": 8}
    assert len(list(results["new_text"].directory.glob("part-*.parquet"))) == 2

    again = byo.import_manifest(manifest, tmp_path / "cache")
    for role, result in again.items():
        assert result.reused and result.directory == results[role].directory
        assert result.counts == results[role].counts
    json.loads((results["old_text"].directory / cache.SUCCESS).read_text())
