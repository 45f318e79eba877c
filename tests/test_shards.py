"""The CPU stage on real shard files (no Ray): decode, validate, count; shard listing."""
import io
import os
import tarfile
from collections import Counter

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xbt_ray.config import ConfigError, WorldConfig
from xbt_ray.data import shards, world

TINY = WorldConfig(n_train_images=40, n_text_captions=20, n_eval_images=4,
                   captions_per_eval_image=2, rows_per_shard=20, broken_fraction=0.1)
MODEL = "xbt-test-old"        # context_length 40
REASON = {"undecodable": "undecodable_image", "null_image": "null_image",
          "empty_caption": "empty_caption"}
SOT, EOT = 49406, 49407       # open_clip's start / end of text tokens


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    manifest = world.build_world(TINY, out)
    files = sorted((out / "image_text").glob("part-*.parquet"))
    table = pq.read_table(files)
    # what Ray Data hands a numpy-format batch UDF: one object array per column
    batch = {name: np.array(table.column(name).to_pylist(), dtype=object)
             for name in table.column_names}
    return out, manifest, batch


def _expected_reasons(manifest, keys):
    by_key = {k: REASON[kind] for kind, ks in manifest["broken_keys"].items() for k in ks}
    return [by_key.get(k, "") for k in keys]


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- whole shards


def test_world_has_the_broken_rows_the_test_relies_on(built):
    _, manifest, batch = built
    # round(0.1 * 40) = 4 broken images, kinds cycled: undecodable, null_image, empty_caption;
    # a broken image is broken in every caption row that shows it (COCO layout)
    assert manifest["broken"] == {"undecodable": 2, "null_image": 1, "empty_caption": 1}
    assert len(batch["key"]) == manifest["counts"]["image_text"] > 40
    assert len(manifest["broken_keys"]["undecodable"]) >= 6


def test_decode_images_with_captions(built):
    _, manifest, batch = built
    out = shards.decode_images(batch, size=32, with_captions=True)
    keys = list(out["key"])
    assert keys == list(batch["key"])
    assert list(out["image_id"]) == list(batch["image_id"])
    expected = _expected_reasons(manifest, keys)
    assert list(out["skip_reason"]) == expected
    n = len(keys)
    assert out["pixels"].shape == (n, 32, 32, 3) and out["pixels"].dtype == np.uint8

    counts = Counter(out["skip_reason"])
    broken = {REASON[kind]: len(ks) for kind, ks in manifest["broken_keys"].items()}
    assert counts == {"": n - sum(broken.values()), **broken}
    assert sum(counts.values()) == len(batch["key"])   # rows in = ok + skipped

    for i, reason in enumerate(expected):
        pixels = out["pixels"][i]
        # the cleaned caption travels with the row; an empty caption becomes ""
        assert out["txt"][i] == ("" if reason == "empty_caption" else batch["txt"][i])
        if reason:
            assert not pixels.any(), keys[i]        # skipped rows carry blank pixels
        else:
            assert pixels.any(), keys[i]
            # a 64 px scene shrunk to 32 px keeps its mean colour
            original = np.asarray(Image.open(io.BytesIO(batch["jpg"][i])).convert("RGB"))
            assert np.abs(pixels.mean((0, 1)) - original.mean((0, 1))).max() < 3.0


def test_decode_images_without_captions_ignores_empty_caption(built):
    _, manifest, batch = built
    out = shards.decode_images(batch, size=32)
    assert "txt" not in out
    expected = ["" if r == "empty_caption" else r
                for r in _expected_reasons(manifest, list(batch["key"]))]
    assert list(out["skip_reason"]) == expected
    (empty_key,) = manifest["broken_keys"]["empty_caption"]
    assert out["pixels"][list(out["key"]).index(empty_key)].any()


def test_decode_pairs(built):
    _, manifest, batch = built
    out = shards.decode_pairs(batch, size=32, model_name=MODEL)
    expected = _expected_reasons(manifest, list(out["key"]))
    assert list(out["skip_reason"]) == expected
    assert "txt" not in out
    assert out["tokens"].shape == (len(batch["key"]), 40)
    tokenizer = open_clip.get_tokenizer(MODEL)
    for i, reason in enumerate(expected):
        tokens = out["tokens"][i]
        assert tokens[0] == SOT
        if reason == "empty_caption":
            assert list(tokens[:3]) == [SOT, EOT, 0]     # the empty string
        else:   # good rows, and broken-image rows whose caption is fine
            assert tokens[1] != EOT
            assert np.array_equal(tokens, tokenizer([batch["txt"][i]])[0].numpy())


def test_prepare_texts(built):
    _, manifest, batch = built
    out = shards.prepare_texts(batch, MODEL)
    keys = list(out["key"])
    (empty_key,) = manifest["broken_keys"]["empty_caption"]
    # only the caption matters here: broken images still have good captions
    assert list(out["skip_reason"]) == ["empty_caption" if k == empty_key else "" for k in keys]
    assert out["tokens"].shape == (len(keys), 40)
    assert list(out["tokens"][keys.index(empty_key)][:3]) == [SOT, EOT, 0]


def test_prepare_texts_bytes_keys_and_captions():
    batch = {"key": np.array([b"a", b"b"], dtype=object),
             "image_id": np.array([b"i", b"j"], dtype=object),
             "txt": np.array(["a  red\tcircle".encode(), b"\xff\xfe"], dtype=object)}
    out = shards.prepare_texts(batch, MODEL)
    assert list(out["key"]) == ["a", "b"] and list(out["image_id"]) == ["i", "j"]
    assert list(out["skip_reason"]) == ["", "non_utf8_caption"]
    tokenizer = open_clip.get_tokenizer(MODEL)
    assert np.array_equal(out["tokens"][0], tokenizer(["a red circle"])[0].numpy())


# ---------------------------------------------------------------- decode_image


def test_decode_image_none_and_empty():
    assert shards.decode_image(None, 32) == (None, "null_image")
    assert shards.decode_image(b"", 32) == (None, "empty_image")


def test_decode_image_truncated_jpeg():
    rng = np.random.default_rng(0)
    data = _jpeg(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    array, reason = shards.decode_image(data, 32)
    assert reason == "" and array.shape == (32, 32, 3)
    assert shards.decode_image(data[: len(data) // 2], 32) == (None, "undecodable_image")


def test_decode_image_html():
    html = b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>"
    assert shards.decode_image(html, 32) == (None, "undecodable_image")


def test_decode_image_greyscale():
    array, reason = shards.decode_image(_png(Image.new("L", (40, 40), 100)), 32)
    assert reason == ""
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert (array == 100).all()


def test_decode_image_rgba_drops_alpha():
    array, reason = shards.decode_image(_png(Image.new("RGBA", (32, 32), (10, 20, 30, 0))), 32)
    assert reason == "" and array.shape == (32, 32, 3)
    assert (array == [10, 20, 30]).all()


def test_decode_image_cmyk_jpeg():
    data = _jpeg(Image.new("CMYK", (40, 40), (0, 255, 255, 0)))   # cyan 0, magenta+yellow: red
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    array, reason = shards.decode_image(data, 32)
    assert reason == "" and array.shape == (32, 32, 3)
    r, g, b = array.reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


def test_decode_image_resizes_shortest_side_and_centre_crops():
    # 200 x 100: left half red, right half blue. Shortest side 100 -> 50, so 100 x 50,
    # then the centre 50 x 50 crop spans resized columns 25..74: red 25..49, blue 50..74.
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))
    array, reason = shards.decode_image(_png(image), 50)
    assert reason == "" and array.shape == (50, 50, 3)
    assert (array[:, :20] == [255, 0, 0]).all()      # away from the bicubic seam
    assert (array[:, 30:] == [0, 0, 255]).all()


def test_decode_image_crop_without_resize_is_exact():
    # tall 32 x 96 (w x h): already 32 on the shortest side; the centre crop is the middle band
    bands = np.zeros((96, 32, 3), dtype=np.uint8)
    bands[:32] = [255, 0, 0]
    bands[32:64] = [0, 255, 0]
    bands[64:] = [0, 0, 255]
    array, reason = shards.decode_image(_png(Image.fromarray(bands)), 32)
    assert reason == ""
    assert (array == [0, 255, 0]).all()


def test_decode_image_upscales_small_images():
    array, reason = shards.decode_image(_png(Image.new("RGB", (8, 16), (1, 2, 3))), 32)
    assert reason == "" and array.shape == (32, 32, 3)
    assert (array == [1, 2, 3]).all()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_image_decompression_bomb():
    side = 9000                       # 81 M pixels > MAX_IMAGE_PIXELS (64 M)
    assert side * side > shards.MAX_IMAGE_PIXELS
    data = _png(Image.new("1", (side, side)))
    assert len(data) < 100_000        # tiny file, huge image
    assert shards.decode_image(data, 32) == (None, "image_too_large")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_image_far_beyond_limit():
    # over 2 x MAX_IMAGE_PIXELS, PIL itself raises DecompressionBombError on open
    data = _png(Image.new("1", (12000, 12000)))
    assert shards.decode_image(data, 32) == (None, "image_too_large")


# ---------------------------------------------------------------- check_caption


@pytest.mark.parametrize("txt, expected", [
    (None, (None, "null_caption")),
    ("", (None, "empty_caption")),
    ("   ", (None, "empty_caption")),
    (" \t\n ", (None, "empty_caption")),
    (b"\xff\xfe", (None, "non_utf8_caption")),
    (b"", (None, "empty_caption")),
    ("a red circle", ("a red circle", "")),
    ("  a \t red\n\ncircle  ", ("a red circle", "")),
    ("caf\u00e9 au lait".encode("utf-8"), ("caf\u00e9 au lait", "")),
    (bytearray(b"a  blue star"), ("a blue star", "")),
])
def test_check_caption(txt, expected):
    assert shards.check_caption(txt) == expected


# ---------------------------------------------------------------- list_shards / fingerprint


def test_list_shards_dir_and_glob(built):
    out, manifest, _ = built
    directory = out / "image_text"
    (directory / "notes.txt").write_text("not a shard")
    expected = [str((directory / f"part-{i:05d}.parquet").absolute())
                for i in range(manifest["shards"]["image_text"])]
    assert shards.list_shards(str(directory)) == expected
    assert shards.list_shards(str(directory / "part-*.parquet")) == expected
    assert shards.list_shards(str(directory / "*")) == expected
    assert shards.list_shards(str(directory / "part-00001.parquet")) == expected[1:2]
    (directory / "notes.txt").unlink()


def test_list_shards_tar(tmp_path):
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    assert shards.list_shards(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


def test_list_shards_empty_dir(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ConfigError) as info:
        shards.list_shards(str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_list_shards_glob_matching_nothing(tmp_path):
    with pytest.raises(ConfigError) as info:
        shards.list_shards(str(tmp_path / "*.parquet"))
    assert "\n" not in str(info.value)


def test_list_shards_mixed_kinds(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"")
    for source in (str(tmp_path), str(tmp_path / "*")):
        with pytest.raises(ConfigError) as info:
            shards.list_shards(source)
        assert "\n" not in str(info.value) and "mixes" in str(info.value)


def test_dataset_fingerprint_tracks_size(tmp_path):
    a, b = tmp_path / "part-00000.parquet", tmp_path / "part-00001.parquet"
    a.write_bytes(b"12345")
    b.write_bytes(b"abc")
    files = [str(a), str(b)]
    fp = shards.dataset_fingerprint(files)
    assert len(fp) == 12
    assert shards.dataset_fingerprint(files) == fp
    assert shards.dataset_fingerprint(files[:1]) != fp

    st = os.stat(a)
    a.write_bytes(b"123456")              # one byte more ...
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))   # ... same modification time
    assert shards.dataset_fingerprint(files) != fp

    a.write_bytes(b"12345")               # size back, modification time back: same identity
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shards.dataset_fingerprint(files) == fp


# ------------------------------------------------------------ decode_image: extreme aspect ratios


def _reference_resize_crop(image: Image.Image, size: int) -> np.ndarray:
    """torchvision's Resize(size) + CenterCrop(size), spelled out on the whole image."""
    short, long = sorted(image.size)
    long = int(size * long / short)
    image = image.resize((size, long) if image.width <= image.height else (long, size),
                         Image.Resampling.BICUBIC)
    left, top = int(round((image.width - size) / 2.0)), int(round((image.height - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _smooth(width: int, height: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    bands = [127 + 100 * np.sin(0.013 * xx + 0.021 * yy + i) for i in range(3)]
    return Image.fromarray(np.stack(bands, -1).astype(np.uint8))


@pytest.mark.parametrize("shape", [(1, 20_000), (20_000, 1)])
def test_decode_image_sliver_is_cheap_and_right(shape):
    # a ~150-byte 1 x 20000 PNG: resizing it whole to 224 on the short side would make
    # 224 x 4,480,000 pixels (4 GiB); only the centre square is resized. The middle 21 pixels
    # are green, the rest red: the centre crop sees green only.
    row = np.zeros((20_000, 3), np.uint8)
    row[:] = (255, 0, 0)
    row[9_990:10_011] = (0, 200, 0)
    image = Image.fromarray(row.reshape((20_000, 1, 3) if shape[0] == 1 else (1, 20_000, 3)))
    assert image.size == shape
    data = _png(image)
    assert len(data) < 1_000 and shape[0] * shape[1] < shards.MAX_IMAGE_PIXELS
    array, reason = shards.decode_image(data, 224)
    assert reason == "" and array.shape == (224, 224, 3) and array.dtype == np.uint8
    assert (array == [0, 200, 0]).all()


@pytest.mark.parametrize("width, height, size", [(12, 480, 32), (480, 12, 32), (7, 333, 33),
                                                 (30, 1_500, 224), (1_500, 30, 224)])
def test_decode_image_extreme_aspect_matches_resize_then_crop(width, height, size):
    """Past MAX_RESIZE_ASPECT_RATIO the crop comes from the source region only; on a smooth
    image it gives what resizing the whole image and cropping gives (to PIL's 8-bit rounding)."""
    image = _smooth(width, height)
    assert max(width, height) / min(width, height) > shards.MAX_RESIZE_ASPECT_RATIO
    array, reason = shards.decode_image(_png(image), size)
    assert reason == "" and array.shape == (size, size, 3)
    expected = _reference_resize_crop(image, size).astype(int)
    assert np.abs(array.astype(int) - expected).max() <= 2
    assert expected.std() > 20           # not a flat patch: the crop position matters


@pytest.mark.parametrize("width, height, size", [(300, 200, 224), (200, 300, 32), (64, 48, 32),
                                                 (10, 160, 32), (160, 10, 32), (31, 29, 32)])
def test_decode_image_ordinary_aspect_is_resize_then_crop_exactly(width, height, size):
    # up to MAX_RESIZE_ASPECT_RATIO (10 x 160 at 32 px: exactly 16) the whole image is resized
    assert max(width, height) / min(width, height) <= shards.MAX_RESIZE_ASPECT_RATIO
    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    array, reason = shards.decode_image(_png(image), size)
    assert reason == ""
    assert np.array_equal(array, _reference_resize_crop(image, size))


# ---------------------------------------------------------------- webdataset tars (no Ray)


def _tar(path, members) -> str:
    """A tar with `members` in this order: (name, bytes), or (name, None) for a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _samples(path, **kw) -> dict:
    """{key: (jpg, txt)} of a tar, checking the key order and column types on the way."""
    import pyarrow as pa

    rows = {}
    for table in shards.tar_samples(path, **kw):
        assert table.schema == pa.schema([("key", pa.string()), ("jpg", pa.large_binary()),
                                          ("txt", pa.large_binary())])
        for key, jpg, txt in zip(*(table.column(c).to_pylist() for c in ("key", "jpg", "txt"))):
            assert key not in rows
            rows[key] = (jpg, txt)
    return rows


def _colour(rgb, fmt="JPEG", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name, expected", [
    ("000003.jpg", ("000003", "jpg")),
    ("photo.2023.06.01.jpg", ("photo.2023.06.01", "jpg")),
    ("photo.2023.06.01.txt", ("photo.2023.06.01", "txt")),
    ("a.JPG", ("a", "jpg")), ("a.Jpeg", ("a", "jpg")), ("a.png", ("a", "jpg")),
    ("a.webp", ("a", "jpg")), ("a.bmp", ("a", "jpg")), ("a.gif", ("a", "jpg")),
    ("a.tif", ("a", "jpg")), ("a.TIFF", ("a", "jpg")), ("a.TXT", ("a", "txt")),
    ("dir/sub/abc.jpg", ("dir/sub/abc", "jpg")), ("dir.v2/abc.txt", ("dir.v2/abc", "txt")),
    ("a.json", None), ("a.cls", None), ("a.jpg.json", None), ("README", None),
    ("dir/.jpg", None), (".txt", None), ("dir.v2/readme", None),
])
def test_tar_member_kind(name, expected):
    assert shards._tar_member_kind(name) == expected


def test_tar_keys_with_dots(tmp_path):
    # webdataset's first-dot rule makes both photos key "photo": 2 rows for 3 samples
    red, green, blue = _colour((255, 0, 0)), _colour((0, 255, 0)), _colour((0, 0, 255))
    path = _tar(tmp_path / "dots.tar", [
        ("photo.2023.06.01.jpg", red), ("photo.2023.06.01.txt", b"a red photo"),
        ("photo.2023.06.02.jpg", green), ("photo.2023.06.02.txt", b"a green photo"),
        ("000003.jpg", blue), ("000003.txt", b"a blue photo")])
    assert _samples(path) == {"photo.2023.06.01": (red, b"a red photo"),
                              "photo.2023.06.02": (green, b"a green photo"),
                              "000003": (blue, b"a blue photo")}


def test_tar_every_image_extension(tmp_path):
    formats = {"a.jpeg": "JPEG", "b.png": "PNG", "c.webp": "WEBP", "d.JPG": "JPEG",
               "e.bmp": "BMP", "f.gif": "GIF", "g.tiff": "TIFF", "h.Tif": "TIFF"}
    members, expected = [], {}
    for i, (name, fmt) in enumerate(formats.items()):
        colour = (30 * i, 255 - 30 * i, 100)
        image = _colour(colour, fmt, size=(32, 32))
        caption_name = name.split(".")[0] + (".TXT" if i % 2 else ".txt")
        members += [(name, image), (caption_name, f"caption {i}".encode())]
        expected[name.split(".")[0]] = (image, f"caption {i}".encode(), colour, fmt)
    rows = _samples(_tar(tmp_path / "formats.tar", members))
    assert rows.keys() == expected.keys()
    for key, (image, caption, colour, fmt) in expected.items():
        assert rows[key] == (image, caption), key
        array, reason = shards.decode_image(rows[key][0], 32)
        assert reason == "", key
        tolerance = 40 if fmt in ("JPEG", "WEBP", "GIF") else 0    # lossy / palette formats
        assert np.abs(array.reshape(-1, 3).mean(0) - colour).max() <= tolerance, (key, fmt)


def test_tar_members_not_grouped_by_sample(tmp_path):
    red, blue = _colour((255, 0, 0)), _colour((0, 0, 255))
    path = _tar(tmp_path / "scattered.tar", [
        ("a.jpg", red), ("b.jpg", blue), ("c.txt", b"c first"), ("a.txt", b"red"),
        ("b.txt", b"blue"), ("c.png", red)])
    assert _samples(path) == {"a": (red, b"red"), "b": (blue, b"blue"), "c": (red, b"c first")}
    assert list(_samples(path)) == ["a", "b", "c"]      # order of first member


def test_tar_subdirectories_other_members_and_missing_halves(tmp_path):
    red, blue = _colour((255, 0, 0)), _colour((0, 0, 255))
    path = _tar(tmp_path / "mixed.tar", [
        ("dir", None), ("dir/abc.jpg", red), ("dir/abc.txt", b"in dir"), ("dir/abc.json", b"{}"),
        ("abc.jpg", blue), ("abc.txt", b"at top"), ("abc.cls", b"3"),
        ("only.json", b"{}"), ("only.cls", b"1"),              # neither image nor text: no row
        ("no_image.txt", b"a caption without an image"),
        ("no_caption.jpg", red),
        ("twice.jpg", red), ("twice.png", blue), ("twice.txt", b"first image kept")])
    assert _samples(path) == {
        "dir/abc": (red, b"in dir"), "abc": (blue, b"at top"),
        "no_image": (None, b"a caption without an image"), "no_caption": (red, None),
        "twice": (red, b"first image kept")}
    assert shards.decode_image(None, 32) == (None, "null_image")
    assert shards.check_caption(None) == (None, "null_caption")


def test_tar_samples_come_in_blocks(tmp_path):
    path = _tar(tmp_path / "blocks.tar",
                [(f"{i:03d}.{ext}", b"x" * 10) for i in range(5) for ext in ("jpg", "txt")])
    assert [t.num_rows for t in shards.tar_samples(path, block_rows=2)] == [2, 2, 1]
    assert [t.num_rows for t in shards.tar_samples(path, block_bytes=45)] == [3, 2]
    assert list(_samples(path, block_rows=2)) == [f"{i:03d}" for i in range(5)]


def test_tar_without_samples(tmp_path):
    assert _samples(_tar(tmp_path / "empty.tar", [("notes.md", b"hi")])) == {}
