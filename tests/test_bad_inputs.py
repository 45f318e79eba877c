"""Bad-input catalogue (issue 7): each kind of bad input, on real files, and what happens to it.

A bad row is either skipped and counted under a named reason (it keeps travelling with a
`skip_reason`, so rows in = rows embedded + rows skipped), or the input is refused with one line
(a ConfigError naming the file and the problem). No bad input fails a job with an obscure error.

| Kind of bad input | Behaviour |
|---|---|
| undecodable image bytes | skipped: `undecodable_image` |
| truncated JPEG | skipped: `undecodable_image` |
| HTML saved as .jpg | skipped: `undecodable_image` |
| zero-byte image | skipped: `empty_image` |
| null image (null value, or no image member in a tar) | skipped: `null_image` |
| decompression bomb (header declares > 64 M pixels) | skipped: `image_too_large` (read from the header, never decoded) |
| extreme aspect ratio (a 140-byte 1 x 20000 PNG) | decoded: past 16:1 only the source region under the centre crop is resized (size x size pixels, not size x size*20000) |
| tar keys with dots (`photo.2023.06.01.jpg`), images as `.jpeg/.png/.webp/.JPG/...`, `.TXT` captions, members in sub-directories | read: the extension is split at the last dot, any case; the key keeps the directory |
| tar members not grouped by sample (`a.jpg, b.jpg, a.txt, b.txt`) | read: members are grouped by key within each tar, whatever their order |
| tar members neither image nor text (`.json`, `.cls`) | ignored |
| greyscale (8 and 16 bit), CMYK, RGBA, palette image | decoded and converted to RGB (16 bit scaled to 8, alpha dropped) |
| null caption | skipped: `null_caption` |
| empty or whitespace-only caption | skipped: `empty_caption` |
| caption that is not UTF-8 (binary column, or invalid bytes in a string column) | skipped: `non_utf8_caption` |
| very long caption | embedded: truncated by the tokenizer to the context length (not counted) |
| duplicate keys | refused: the embedding job checks the written keys on a worker (one Ray task; a Ray Data group-by above 5M rows) and raises `shards ... hold 1 duplicate keys (e.g. 'k') ...` before marking the cache complete; `read_embeddings`, `write_embeddings` and every join refuse repeated keys too; null keys likewise |
| parquet shard whose columns or types differ from the first shard | refused: `shard <file> has a different schema than <first>: lacks txt` (or `has image_id, which <first> lacks`, `txt is binary, not string`) |
| shard lacking a required column, `jpg` not binary, or not parquet at all | refused: `shard <file> lacks columns ['jpg']`, `... expected binary image bytes`, `... is not a readable parquet file` |
| embeddings of the wrong dimension | refused: `embedding file <f> has dim 6, metadata says 8`; `expect={"dim": ...}` refuses `has dim=8, expected 16` |
| `emb` not a fixed-size float list, a null `emb` row, a missing `key`/`emb` column, a part that is not parquet | refused: `embedding file <f> has emb of type ...`, `cannot be read (...)` or `has 1 rows with a null emb`, `lacks columns ['key']`, `is not a readable parquet file` |
| NaN / inf embedding values | refused: on write (`refusing to write non-finite embeddings`), on read (`contains NaN or inf values`) |
| cache metadata other than expected | refused: `embedding cache <dir> has model='a', expected 'b'` |
| parts whose metadata differ; metadata missing or not JSON | refused: `embedding file <f> has metadata that differs from part-00000.parquet`, `is not an xbt embedding file`, `has metadata 'xbt.dim' that is not JSON` |
| cache rows differ from its `_SUCCESS.json` count | refused: `embedding cache <dir> holds 7 rows but its _SUCCESS.json says 9` |

Duplicate keys are refused rather than deduplicated: keys join old and new embeddings, and Ray
Data does not keep row order, so "keep the first" could keep different rows in the old and the new
model's cache and misalign them silently.

Function-level tests need no Ray; the single integration test at the end runs the embedding job on
one shard holding every row-level kind.
"""
import io
import struct
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xbt_ray.config import ConfigError, EmbedConfig, ModelConfig
from xbt_ray.data import cache, shards
from xbt_ray.data.embed import embed_shards
from xbt_ray.models import clip

MODEL = "xbt-test-old"        # image size 32, context length 40
SIZE = 32
SOT, EOT = 49406, 49407       # open_clip's start / end of text tokens


def _save(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header claims width x height: tiny file, huge declared image."""
    data = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)           # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))   # IHDR checksum
    return bytes(data)


def _noise_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")


def _palette() -> Image.Image:
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])   # index 1: red
    image.info["transparency"] = 3
    return image


GOOD = _save(Image.new("RGB", (48, 40), (200, 30, 30)), "JPEG")
CAPTION = "a red square on a white table"
HTML = b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>"
LONG_CAPTION = "a red square on a white table " * 10_000       # 300 k characters

# key, image bytes, caption (str or raw bytes), reason in the image job, reason in the text job
ROWS = [
    ("good-0", GOOD, CAPTION, "", ""),
    ("good-1", _save(Image.new("RGB", (30, 60), (20, 200, 30)), "PNG"), "a green bar", "", ""),
    ("good-2", _noise_jpeg(), "noise", "", ""),
    ("grey", _save(Image.new("L", (40, 40), 100), "PNG"), CAPTION, "", ""),
    ("grey16", _save(Image.fromarray(np.full((40, 40), 30000, np.uint16)), "PNG"), CAPTION, "", ""),
    ("cmyk", _save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"), CAPTION, "", ""),
    ("rgba", _save(Image.new("RGBA", (40, 40), (10, 20, 30, 0)), "PNG"), CAPTION, "", ""),
    ("palette", _save(_palette(), "PNG"), CAPTION, "", ""),
    ("undecodable", np.random.default_rng(1).bytes(3000), CAPTION, "undecodable_image", ""),
    ("truncated", _noise_jpeg()[:1000], CAPTION, "undecodable_image", ""),
    ("html", HTML, CAPTION, "undecodable_image", ""),
    ("zero_bytes", b"", CAPTION, "empty_image", ""),
    ("null_image", None, CAPTION, "null_image", ""),
    ("bomb", _bomb(20_000, 20_000), CAPTION, "image_too_large", ""),
    ("null_caption", GOOD, None, "", "null_caption"),
    ("empty_caption", GOOD, "", "", "empty_caption"),
    ("blank_caption", GOOD, " \t\n  ", "", "empty_caption"),
    ("latin1_caption", GOOD, "caf\u00e9 au lait".encode("latin-1"), "", "non_utf8_caption"),
    ("long_caption", GOOD, LONG_CAPTION, "", ""),
    ("good-0", GOOD, "the same key again", "", ""),           # duplicate key
]


def _write_shard(path, rows=ROWS):
    """img2dataset-like parquet: key string, jpg binary, txt string. The caption bytes go in
    unvalidated, as a foreign writer may leave them, so one string value is not UTF-8."""
    captions = [t.encode() if isinstance(t, str) else t for _, _, t, _, _ in rows]
    table = pa.table({"key": pa.array([r[0] for r in rows], pa.string()),
                      "jpg": pa.array([r[1] for r in rows], pa.binary()),
                      "txt": pa.array(captions, pa.binary()).view(pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return _write_shard(tmp_path_factory.mktemp("bad") / "part-00000.parquet")


@pytest.fixture(scope="module")
def batch(shard):
    """The shard as the CPU stage gets it from `read_rows`: a numpy batch of raw values."""
    table = shards._raw_columns(pq.read_table(shard))
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- rows: images


def test_every_image_kind_skipped_or_decoded(batch):
    out = shards.decode_images(batch, SIZE)
    assert list(out["skip_reason"]) == [r[3] for r in ROWS]
    for i, reason in enumerate(out["skip_reason"]):
        assert out["pixels"][i].any() != bool(reason), ROWS[i][0]   # blank only when skipped


@pytest.mark.parametrize("name, data, reason", [
    ("undecodable", np.random.default_rng(2).bytes(500), "undecodable_image"),
    ("truncated", _noise_jpeg()[:1000], "undecodable_image"),
    ("html", HTML, "undecodable_image"),
    ("zero_bytes", b"", "empty_image"),
    ("null", None, "null_image"),
    ("nan", float("nan"), "null_image"),                 # a missing tar member, after pandas
])
def test_unusable_image_bytes(name, data, reason):
    assert shards.decode_image(data, SIZE) == (None, reason)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [10_000, 20_000])   # our guard (> 64 M) and PIL's own (> 128 M)
def test_decompression_bomb_read_from_header(side):
    data = _bomb(side, side)
    assert len(data) < 100
    assert shards.decode_image(data, SIZE) == (None, "image_too_large")


@pytest.mark.parametrize("key, check", [
    ("grey", lambda a: (a == 100).all()),
    ("grey16", lambda a: (a == 30000 >> 8).all()),      # scaled, not clipped to white
    ("cmyk", lambda a: (a[..., 0] > 240).all() and (a[..., 1:] < 15).all()),
    ("rgba", lambda a: (a == [10, 20, 30]).all()),       # alpha dropped, colour kept
    ("palette", lambda a: (a == [255, 0, 0]).all()),
])
def test_other_modes_become_rgb(key, check):
    data = next(r[1] for r in ROWS if r[0] == key)
    assert Image.open(io.BytesIO(data)).mode != "RGB"
    array, reason = shards.decode_image(data, SIZE)
    assert reason == "" and array.shape == (SIZE, SIZE, 3) and array.dtype == np.uint8
    assert check(array.astype(int)), (key, array.reshape(-1, 3).mean(0))


# ---------------------------------------------------------------- rows: captions


def test_every_caption_kind_skipped_or_tokenised(batch):
    out = shards.prepare_texts(batch, MODEL)
    assert list(out["skip_reason"]) == [r[4] for r in ROWS]
    assert out["tokens"].shape == (len(ROWS), 40)


def test_pairs_skip_on_either_side(batch):
    out = shards.decode_images(batch, SIZE, with_captions=True)
    assert list(out["skip_reason"]) == [r[3] or r[4] for r in ROWS]


@pytest.mark.parametrize("txt, reason", [
    (None, "null_caption"),
    ("", "empty_caption"),
    (" \t\n ", "empty_caption"),
    (b"   ", "empty_caption"),
    ("caf\u00e9".encode("latin-1"), "non_utf8_caption"),
    (b"\xff\xfe\x00a", "non_utf8_caption"),
])
def test_unusable_captions(txt, reason):
    assert shards.check_caption(txt) == (None, reason)


def test_invalid_utf8_in_a_string_column_reaches_check_caption(shard):
    table = pq.read_table(shard)
    assert table.schema.field("txt").type == pa.string()
    txt = shards._raw_columns(table).column("txt")
    assert txt.type == pa.binary()
    row = [r[0] for r in ROWS].index("latin1_caption")
    assert shards.check_caption(txt[row].as_py()) == (None, "non_utf8_caption")


def test_long_caption_is_truncated_by_the_tokenizer(batch):
    row = [r[0] for r in ROWS].index("long_caption")
    tokens = shards.prepare_texts({k: v[row:row + 1] for k, v in batch.items()}, MODEL)["tokens"][0]
    assert tokens[0] == SOT and tokens[-1] == EOT and (tokens != 0).all()
    start = shards.tokenize([CAPTION], MODEL)[0]
    n = int(np.argmax(start == EOT)) - 1                 # tokens of one repetition
    assert np.array_equal(tokens[1:1 + n], start[1:1 + n])


# ---------------------------------------------------------------- shards: schema (no Ray runs)


def _shards(tmp_path, *tables):
    files = []
    for i, table in enumerate(tables):
        files.append(str(tmp_path / f"part-{i:05d}.parquet"))
        pq.write_table(table, files[-1])
    return files


def _table(types: dict | None = None, **columns):
    types = {"key": pa.string(), "image_id": pa.string(), "jpg": pa.binary(), "txt": pa.string(),
             **(types or {})}
    return pa.table({name: pa.array(values, types.get(name)) for name, values in columns.items()})


def _refusal(files, columns) -> str:
    with pytest.raises(ConfigError) as info:
        shards.read_rows(files, columns)        # refused before any Ray work is planned
    return _one_line(info)


def test_shard_with_another_schema(tmp_path):
    good = _table(key=["a"], jpg=[GOOD], txt=["x"])
    files = _shards(tmp_path, good, good, _table(key=["c"], jpg=[GOOD], caption=["x"]))
    message = _refusal(files, ["key", "image_id", "jpg", "txt"])
    assert files[2] in message and "part-00000.parquet" in message and "lacks txt" in message


def test_shard_with_another_column_type(tmp_path):
    files = _shards(tmp_path, _table(key=["a"], txt=["x"]),
                    _table({"txt": pa.binary()}, key=["b"], txt=[b"x"]))
    message = _refusal(files, ["key", "image_id", "txt"])
    assert files[1] in message and "txt is binary, not string" in message


def test_shard_with_an_extra_requested_column(tmp_path):
    files = _shards(tmp_path, _table(key=["a"], txt=["x"]),
                    _table(key=["b"], image_id=["i"], txt=["y"]))
    message = _refusal(files, ["key", "image_id", "txt"])
    assert files[1] in message and "has image_id, which part-00000.parquet lacks" in message


def test_shard_lacking_a_column(tmp_path):
    files = _shards(tmp_path, _table(key=["a"], txt=["x"]))
    message = _refusal(files, ["key", "image_id", "jpg"])
    assert files[0] in message and "lacks columns ['jpg']" in message


def test_shard_with_text_images(tmp_path):
    files = _shards(tmp_path, _table({"jpg": pa.string()}, key=["a"], jpg=["base64..."]))
    assert "expected binary image bytes" in _refusal(files, ["key", "image_id", "jpg"])


def test_shard_that_is_not_parquet(tmp_path):
    files = _shards(tmp_path, _table(key=["a"], jpg=[GOOD]))
    (tmp_path / "part-00001.parquet").write_bytes(HTML)
    files.append(str(tmp_path / "part-00001.parquet"))
    message = _refusal(files, ["key", "image_id", "jpg"])
    assert files[1] in message and "not a readable parquet file" in message


def test_extra_unrequested_columns_are_fine(tmp_path):
    files = _shards(tmp_path, _table(key=["a"], txt=["x"]),
                    _table(key=["b"], txt=["y"], status=["success"]))
    assert shards._parquet_columns(files, ["key", "image_id", "txt"]) == ["key", "txt"]


# ---------------------------------------------------------------- embedding caches

DIM = 8


def _meta(**changes):
    return cache.make_meta("xbt-test-old", "sha256:abc", DIM, "ds123", "image") | changes


def _emb(n=6, dim=DIM):
    return np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)


def _keys(n=6):
    return [f"k{i}" for i in range(n)]


def _read_refusal(directory, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        cache.read_embeddings(directory, **kw)
    return _one_line(info)


def _rewrite_emb(path, emb_col):
    table = pq.read_table(path)
    pq.write_table(table.set_column(2, "emb", emb_col).replace_schema_metadata(
        table.schema.metadata), path)


def test_cache_duplicate_keys_across_parts(tmp_path):
    cache.write_part(tmp_path, 0, _keys(3), _keys(3), _emb(3), _meta())
    cache.write_part(tmp_path, 1, ["k9", "k1"], ["k9", "k1"], _emb(2), _meta())
    message = _read_refusal(tmp_path)
    assert str(tmp_path) in message and "1 duplicate keys (e.g. 'k1')" in message


def test_cache_null_keys(tmp_path):
    path = cache.write_part(tmp_path, 0, _keys(2), _keys(2), _emb(2), _meta())
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "key", pa.array(["a", None])), path)
    assert "null keys" in _read_refusal(tmp_path)


def test_write_embeddings_refuses_duplicate_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        cache.write_embeddings(tmp_path, ["a", "b", "a"], ["a", "b", "a"], _emb(3), _meta())
    assert "duplicate keys (e.g. 'a')" in _one_line(info)
    assert not list(tmp_path.iterdir())


def test_join_refuses_duplicate_keys():
    from xbt_ray.data.join import join

    def emb(keys):
        return cache.Embeddings(np.array(keys, dtype=object), np.array(keys, dtype=object),
                                _emb(len(keys)), {}, "cache-x")
    for a, b in ((["a", "b", "a"], ["a", "b"]), (["a", "b"], ["b", "b"])):
        with pytest.raises(ConfigError) as info:
            join(emb(a), emb(b), "old ~ new")
        assert "cache-x has 1 duplicate keys" in _one_line(info)


def test_cache_wrong_dimension(tmp_path):
    cache.write_part(tmp_path, 0, _keys(), _keys(), _emb(dim=6), _meta())
    assert "has dim 6, metadata says 8" in _read_refusal(tmp_path)


def test_cache_unexpected_dimension(tmp_path):
    cache.write_embeddings(tmp_path, _keys(), _keys(), _emb(), _meta())
    assert "has dim=8, expected 16" in _read_refusal(tmp_path, expect={"dim": 16})


def test_cache_emb_not_a_fixed_size_list(tmp_path):
    path = cache.write_part(tmp_path, 0, _keys(2), _keys(2), _emb(2), _meta())
    _rewrite_emb(path, pa.array(_emb(2).tolist(), pa.list_(pa.float32())))
    message = _read_refusal(tmp_path)
    assert str(path) in message and "expected a fixed-size list" in message


def test_cache_null_emb_row(tmp_path):
    path = cache.write_part(tmp_path, 0, _keys(3), _keys(3), _emb(3), _meta())
    rows = _emb(3).tolist()
    rows[1] = None
    _rewrite_emb(path, pa.array(rows, pa.list_(pa.float32(), DIM)))
    message = _read_refusal(tmp_path)
    # pyarrow 25 cannot read such a column back; where it can, the null row is refused itself
    assert str(path) in message and ("cannot be read" in message or "null emb" in message)


def test_cache_part_that_is_not_parquet(tmp_path):
    cache.write_part(tmp_path, 0, _keys(2), _keys(2), _emb(2), _meta())
    (tmp_path / "part-00001.parquet").write_bytes(HTML)
    message = _read_refusal(tmp_path)
    assert "part-00001.parquet is not a readable parquet file" in message


def test_cache_missing_key_column(tmp_path):
    path = cache.write_part(tmp_path, 0, _keys(2), _keys(2), _emb(2), _meta())
    table = pq.read_table(path)
    pq.write_table(table.drop(["key"]), path)
    assert "lacks columns ['key']" in _read_refusal(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_cache_non_finite(tmp_path, bad):
    emb = _emb()
    emb[2, 3] = bad
    with pytest.raises(ConfigError) as info:
        cache.write_part(tmp_path, 0, _keys(), _keys(), emb, _meta())
    assert "non-finite" in _one_line(info)
    path = cache.write_part(tmp_path, 0, _keys(), _keys(), _emb(), _meta())   # a foreign writer
    _rewrite_emb(path, pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM))
    read = cache.read_embeddings(tmp_path)   # skipped and counted on read
    assert read.counts["skipped"] == {"non_finite": 1} and _keys()[2] not in set(read.keys)


@pytest.mark.parametrize("expect, expected", [
    ({"model": "ViT-B-32"}, "has model='xbt-test-old', expected 'ViT-B-32'"),
    ({"modality": "text"}, "has modality='image', expected 'text'"),
    ({"dataset": "other"}, "has dataset='ds123', expected 'other'"),
    ({"normalized": False}, "has normalized=True, expected False"),
])
def test_cache_unexpected_metadata(tmp_path, expect, expected):
    cache.write_embeddings(tmp_path, _keys(), _keys(), _emb(), _meta())
    assert expected in _read_refusal(tmp_path, expect=expect)


def test_cache_parts_with_differing_metadata(tmp_path):
    cache.write_part(tmp_path, 0, _keys(2), _keys(2), _emb(2), _meta())
    cache.write_part(tmp_path, 1, ["x"], ["x"], _emb(1), _meta(model="other"))
    assert "part-00001.parquet has metadata that differs" in _read_refusal(tmp_path)


@pytest.mark.parametrize("edit, expected", [
    (lambda raw: raw.pop(b"xbt.dim"), "metadata 'xbt.dim' missing"),
    (lambda raw: raw.update({b"xbt.dim": b"eight"}), "metadata 'xbt.dim' that is not JSON"),
])
def test_cache_broken_metadata(tmp_path, edit, expected):
    path = cache.write_part(tmp_path, 0, _keys(), _keys(), _emb(), _meta())
    table = pq.read_table(path)
    raw = dict(table.schema.metadata)
    edit(raw)
    pq.write_table(table.replace_schema_metadata(raw), path)
    message = _read_refusal(tmp_path)
    assert str(path) in message and expected in message


def test_cache_rows_differ_from_success_marker(tmp_path):
    cache.write_embeddings(tmp_path, _keys(9), _keys(9), _emb(9), _meta(), rows_per_file=3)
    (tmp_path / "part-00001.parquet").unlink()
    message = _read_refusal(tmp_path)
    assert "holds 6 rows but its _SUCCESS.json says 9" in message


# ---------------------------------------------------------------- the embedding job


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    clip_model, _ = clip.load_clip(ModelConfig(name=MODEL))
    path = clip.save_clip(clip_model, tmp_path_factory.mktemp("models") / "old.safetensors")
    return ModelConfig(name=MODEL, pretrained=str(path))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_embedding_job_counts_every_bad_row(ray_session, shard, model, tmp_path):
    """Every row-level kind: every row is accounted for; the shard that repeats a key is
    refused by the job itself, before its cache is marked complete."""
    unique = [r for i, r in enumerate(ROWS) if r[0] not in {q[0] for q in ROWS[:i]}]
    clean = _write_shard(tmp_path / "clean" / "part-00000.parquet", unique)
    for modality, column in (("image", 3), ("text", 4)):
        result = embed_shards([clean], modality, model, tmp_path, EmbedConfig(batch_size=8))
        reasons = Counter(r[column] for r in unique if r[column])
        counts = result.counts
        assert counts == {"rows_in": len(unique),
                          "rows_embedded": len(unique) - sum(reasons.values()),
                          "deduplicated": 0, "skipped": dict(reasons)}, modality
        parts = pq.read_table(sorted(result.directory.glob("part-*.parquet")))
        assert sorted(parts.column("key").to_pylist()) == sorted(
            r[0] for r in unique if not r[column])
        emb = np.array(parts.column("emb").to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)

        with pytest.raises(ConfigError) as info:
            embed_shards([shard], modality, model, tmp_path / "dup", EmbedConfig(batch_size=8))
        assert "1 duplicate keys (e.g. 'good-0')" in _one_line(info)
        assert not list((tmp_path / "dup").rglob(cache.SUCCESS))


# ---------------------------------------------------------------- webdataset tars (Ray)


def _tar_shard(path, members) -> str:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _sliver() -> bytes:
    """A real 1 x 20000 PNG (~150 bytes): resized whole to 224 on its short side, 4 GiB."""
    return _save(Image.new("RGB", (1, 20_000), (0, 0, 200)), "PNG")


def test_webdataset_tars_give_one_row_per_sample(ray_session, tmp_path):
    """Keys with dots, images other than `.jpg` (any case), `.TXT` captions, sub-directories,
    members not grouped by sample, other members (json, cls), a 1 x 20000 sliver: each sample is
    one row with its own image and caption, and only real defects are skipped."""
    png = _save(Image.new("RGB", (30, 60), (20, 200, 30)), "PNG")
    webp = _save(Image.new("RGB", (40, 40), (30, 30, 200)), "WEBP")
    expected = {   # key: (image bytes, caption bytes, skip reason of an image-text pair)
        "photo.2023.06.01": (GOOD, b"a dotted key", ""),
        "photo.2023.06.02": (png, b"another dotted key", ""),
        "000003": (webp, b"a plain key", ""),
        "upper": (GOOD, b"upper-case extensions", ""),
        "dir/abc": (png, b"in a directory", ""),
        "abc": (GOOD, b"at the top", ""),
        "b": (webp, b"b, scattered", ""),
        "sliver": (_sliver(), b"a 1 x 20000 png", ""),
        "no_image": (None, b"a caption alone", "null_image"),
        "no_caption": (GOOD, None, "null_caption"),
    }
    _tar_shard(tmp_path / "shard-000.tar", [
        ("photo.2023.06.01.jpg", GOOD), ("photo.2023.06.01.txt", b"a dotted key"),
        ("photo.2023.06.01.json", b"{}"),
        ("photo.2023.06.02.png", png), ("photo.2023.06.02.txt", b"another dotted key"),
        ("000003.webp", webp), ("000003.txt", b"a plain key"),
        ("upper.JPEG", GOOD), ("upper.TXT", b"upper-case extensions"),
        ("sliver.png", _sliver()), ("sliver.txt", b"a 1 x 20000 png")])
    _tar_shard(tmp_path / "shard-001.tar", [          # members not grouped by sample
        ("dir/abc.png", png), ("abc.jpg", GOOD), ("b.WEBP", webp), ("no_caption.jpg", GOOD),
        ("abc.cls", b"7"), ("dir/abc.txt", b"in a directory"), ("abc.txt", b"at the top"),
        ("no_image.txt", b"a caption alone"), ("b.txt", b"b, scattered"), ("only.json", b"{}")])

    files = shards.list_shards(str(tmp_path))
    ds = shards.read_rows(files, ["key", "image_id", "jpg", "txt"])
    rows = {r["key"]: r for r in ds.take_all()}
    assert rows.keys() == expected.keys()
    for key, (image, caption, _) in expected.items():
        assert rows[key]["image_id"] == key
        assert (rows[key]["jpg"], rows[key]["txt"]) == (image, caption), key

    decoded = ds.map_batches(shards.decode_images, fn_kwargs={"size": SIZE, "with_captions": True},
                             batch_size=4).take_all()
    reasons = {r["key"]: r["skip_reason"] for r in decoded}
    assert reasons == {key: reason for key, (_, _, reason) in expected.items()}
    sliver = next(r for r in decoded if r["key"] == "sliver")
    assert sliver["pixels"].shape == (SIZE, SIZE, 3) and (sliver["pixels"] == [0, 0, 200]).all()
