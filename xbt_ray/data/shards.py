"""LAION-style shards read with Ray Data, and the CPU stage that decodes and validates rows.

Sources are img2dataset parquet (`key`, `jpg` bytes, `txt`, `status`, ...) or webdataset tars
(`<key>.jpg`, `<key>.txt`, read by `tar_samples`). Raw bytes travel through the read; decoding
happens in a CPU stage (`decode_images`, `prepare_texts`) that never drops a row: a bad row is kept
with a non-empty `skip_reason`, so whoever consumes the stream can count it (rows in = rows used +
rows skipped).
"""
from __future__ import annotations

import functools
import glob
import io
import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from xbt_ray.config import ConfigError
from xbt_ray.data import paired

# Decompression-bomb guard: refuse images whose pixel count exceeds this.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Beyond this ratio of long to short side, `decode_image` resizes only the centre square of the
# source (resizing the whole image would make size x size*ratio pixels: 224 x 4.5 M for 1 x 20000)
MAX_RESIZE_ASPECT_RATIO = 16
# Members of a webdataset tar, by extension (any case): the sample's image, its caption; others
# (json, cls, ...) are ignored
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
TEXT_EXTENSIONS = frozenset({"txt"})
# Ray CPUs of a read task (I/O bound: reading one shard's bytes)
READ_NUM_CPUS = 0.25
# Rows (and, for tars, bytes) of one block yielded while reading a shard
READ_BLOCK_ROWS = 256
TAR_BLOCK_BYTES = 64 << 20
# Ray CPUs per task of the CPU stages (decode / tokenise): light next to the encoder, so that on
# a small machine they fit beside encoder actors that take the rest
CPU_STAGE_NUM_CPUS = 0.5


def list_shards(source: str) -> list[str]:
    """Shard files of a directory or glob (parquet or tar), sorted. One-line error if none."""
    if os.path.isdir(source):
        files = [str(p) for p in sorted(Path(source).iterdir()) if p.suffix in (".parquet", ".tar")]
    else:
        files = sorted(f for f in glob.glob(source) if f.endswith((".parquet", ".tar")))
    if not files:
        raise ConfigError(f"no .parquet or .tar shards found at {source}")
    kinds = {Path(f).suffix for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"{source} mixes parquet and tar shards; point at one kind")
    return [os.path.abspath(f) for f in files]


def dataset_fingerprint(files: list[str]) -> str:
    """Identity of a set of shard files (names, sizes, modification times)."""
    import hashlib

    digest = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        digest.update(f"{os.path.basename(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def read_rows(files: list[str], columns: list[str], shuffle_seed: int | None = None,
              shard_of: list[str] | None = None):
    """A Ray Dataset with the requested columns of `key, image_id, jpg, txt` (raw values).

    `files`: parquet shards or webdataset tars (not mixed; as `list_shards` returns them).
    `image_id` defaults to `key` when the shards have none (one caption per image). `txt` arrives
    as bytes, so that a caption that is not valid UTF-8 is a skipped row, not a failed job.
    Parquet shards must agree on the requested columns and their types (one-line ConfigError).
    Tars are read with `tar_samples` (all columns, whatever `columns` asks).

    One read task per file, rows yielded in blocks as they are read (`parquet_samples`,
    `tar_samples`): a shard is the unit of work, so its rows stream out together and a job's
    progress can be kept per shard (Ray's own parquet reader packs small files into one task).
    With `shuffle_seed`, the order in which files are read is re-randomised at every execution of
    the dataset (every training epoch), seeded: only the list of files is shuffled, rows stream.
    With `shard_of` (a list holding every file of `files`), each row gets `shard` (int64), the
    index of its file in that list.
    """
    import ray.data

    tars = files[0].endswith(".tar")
    # Tars: our own reader, not read_webdataset: that one keys a sample by everything before the
    # first dot of the name, knows `jpg` only (case-sensitive), and fails on a tar whose members
    # are not grouped by sample.
    wanted = None if tars else _parquet_columns(files, columns)
    index = {f: i for i, f in enumerate(shard_of or [])}
    ds = ray.data.from_items([{"path": f, "shard": index.get(f, -1)} for f in files],
                             override_num_blocks=len(files))
    if shuffle_seed is not None:   # one block per path: block order = file order
        ds = ds.randomize_block_order(seed=shuffle_seed)
    # one path per task, and READ_NUM_CPUS: a different resource shape keeps Ray Data from fusing
    # the read into the next stage, whose batch size would otherwise bundle many paths per task
    return ds.map_batches(_read_files, fn_kwargs={"columns": wanted,
                                                 "with_shard": shard_of is not None},
                          batch_size=1, batch_format="numpy", num_cpus=READ_NUM_CPUS)


def _read_files(batch: dict, columns: list[str] | None, with_shard: bool):
    """Ray Data batch UDF: file paths in -> their rows out, block by block (a tar when
    `columns` is None, else these columns of a parquet file), with `shard` if asked."""
    import pyarrow as pa

    for path, shard in zip(batch["path"], batch["shard"]):
        blocks = tar_samples(str(path)) if columns is None else parquet_samples(str(path),
                                                                                columns)
        for table in blocks:
            if with_shard:
                table = table.append_column("shard", pa.array([int(shard)] * len(table),
                                                              pa.int64()))
            yield _raw_columns(table)


def parquet_samples(path: str, columns: list[str], block_rows: int = READ_BLOCK_ROWS):
    """The rows of one parquet shard, `columns` only, as pyarrow tables of at most `block_rows`
    rows, read record batch by record batch (one block held at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches(batch_size=block_rows, columns=columns):
            yield pa.Table.from_batches([batch])


def _parquet_columns(files: list[str], columns: list[str]) -> list[str]:
    """The requested columns the shards have, checked: the same names and types in every shard."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    def schema(path):
        try:
            found = pq.read_schema(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            message = " ".join(str(e).split())
            raise ConfigError(f"shard {path} is not a readable parquet file ({message})") from None
        return {c: found.field(c).type for c in columns if c in found.names}

    with ThreadPoolExecutor(16) as pool:   # footers only; many shards on shared storage
        schemas = list(pool.map(schema, files))
    first = schemas[0]
    missing = sorted(set(columns) - set(first) - {"image_id"})
    if missing:
        raise ConfigError(f"shard {files[0]} lacks columns {missing}")
    if "jpg" in first and not (pa.types.is_binary(first["jpg"])
                               or pa.types.is_large_binary(first["jpg"])):
        raise ConfigError(f"shard {files[0]} has column jpg of type {first['jpg']}, "
                          "expected binary image bytes")
    for path, other in zip(files[1:], schemas[1:]):
        if other != first:
            diff = ([f"lacks {c}" for c in first if c not in other]
                    + [f"has {c}, which {Path(files[0]).name} lacks" for c in other
                       if c not in first]
                    + [f"{c} is {other[c]}, not {first[c]}"
                       for c in first if c in other and other[c] != first[c]])
            raise ConfigError(f"shard {path} has a different schema than {Path(files[0]).name}: "
                              + "; ".join(diff))
    return [c for c in columns if c in first]


def _tar_member_kind(name: str) -> tuple[str, str] | None:
    """(key, "jpg" | "txt") of a tar member name, or None for a member that is neither.

    The extension is split at the LAST dot, so `photo.2023.06.01.jpg` is key `photo.2023.06.01`
    (webdataset's own rule, the first dot, would make it `photo`); the key keeps the directory
    (`dir/abc.jpg` -> `dir/abc`). Extensions match in any case (`.JPG`, `.TXT`).
    """
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or stem.endswith("/"):
        return None
    ext = ext.lower()
    if ext in IMAGE_EXTENSIONS:
        return stem, "jpg"
    if ext in TEXT_EXTENSIONS:
        return stem, "txt"
    return None


def tar_samples(path: str, block_rows: int = READ_BLOCK_ROWS, block_bytes: int = TAR_BLOCK_BYTES):
    """The samples of a webdataset tar, as pyarrow tables `key` (string), `jpg`, `txt` (bytes).

    Accepts a local tar (plain, or compressed as tarfile reads it) whose members are
    `<key>.<image extension>` (jpg jpeg png webp bmp gif tif tiff) and `<key>.txt`, in any case
    and in any order: members are grouped by key within the tar, whether or not they are next to
    each other (`_tar_member_kind` says how a name splits). Other members (json, cls,
    directories, links) are ignored. A key with no image member has a null `jpg` (a `null_image`
    row in the CPU stage), one with no caption a null `txt`; of two images (or captions) of one key
    the first in the tar is taken. Samples come in order of their first member, in tables of at
    most `block_rows` rows (and about `block_bytes` bytes), so rows stream: only the member
    headers of the tar and one block are held at a time.

    Raises what `tarfile` raises for a file that is not a tar (`tarfile.ReadError`) or a member cut
    short (`tarfile.ReadError`), and OSError for a file that cannot be read.
    """
    import tarfile

    import pyarrow as pa

    def table(rows):
        return pa.table({"key": pa.array([r[0] for r in rows], pa.string()),
                         "jpg": pa.array([r[1] for r in rows], pa.large_binary()),
                         "txt": pa.array([r[2] for r in rows], pa.large_binary())})

    with tarfile.open(path, "r:*") as tar:
        samples = _tar_index(tar)
        # pass 2: read each sample's members; sequential reads for a tar grouped by sample
        rows, size = [], 0
        for key, members in samples.items():
            values = [tar.extractfile(members[c]).read() if c in members else None
                      for c in ("jpg", "txt")]
            rows.append((key, *values))
            size += sum(len(v) for v in values if v is not None)
            if len(rows) >= block_rows or size >= block_bytes:
                yield table(rows)
                rows, size = [], 0
        if rows:
            yield table(rows)


def _tar_index(tar) -> dict:
    """Pass 1 over an open tar, headers only (tarfile seeks past member data): {key: {"jpg" |
    "txt": TarInfo}}, keys in order of their first member."""
    samples: dict = {}
    for member in tar:
        kind = _tar_member_kind(member.name) if member.isfile() else None
        if kind is not None:
            samples.setdefault(kind[0], {}).setdefault(kind[1], member)
    tar.members = []          # the index lives in `samples`; tarfile need not keep its own
    return samples


def _raw_columns(table):
    """`image_id` defaults to `key`; `txt` as bytes (a string column may hold invalid UTF-8,
    which would fail the conversion to Python strings before `check_caption` could count it)."""
    import pyarrow as pa

    if "image_id" not in table.column_names:
        table = table.append_column("image_id", table.column("key"))
    if "txt" in table.column_names:
        txt = table.column("txt")
        if pa.types.is_string(txt.type) or pa.types.is_large_string(txt.type):
            binary = pa.large_binary() if pa.types.is_large_string(txt.type) else pa.binary()
            table = table.set_column(table.column_names.index("txt"), "txt", txt.cast(binary))
    return table


# ---------------------------------------------------------------- the CPU stage


def decode_image(data, size: int) -> tuple[np.ndarray | None, str]:
    """Raw bytes -> (uint8 array size x size x 3, "") or (None, skip reason).

    Accepts encoded image bytes in any format PIL reads (None or NaN is `null_image`). Resize of
    the shortest side (bicubic) and centre crop, as open_clip's eval transform; normalisation
    happens in the encoder, which knows its model's mean and std. An image more than
    MAX_RESIZE_ASPECT_RATIO times longer than wide (or wider than long) has only the source region
    under the centre crop resized, so a 1 x 20000 sliver costs size x size pixels, not
    size x size*20000. Raises nothing for bad bytes: the reason names them (`empty_image`,
    `undecodable_image`, `image_too_large` past MAX_IMAGE_PIXELS).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):  # None, or NaN from a missing member
        return None, "null_image"
    if len(data) == 0:
        return None, "empty_image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                return None, "image_too_large"
            img.load()
            from PIL import ImageOps  # EXIF Orientation: the pixels as a viewer shows them
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode.startswith("I"):   # 16-bit greyscale: PIL's convert would clip, not scale
                img = Image.fromarray((np.asarray(img).clip(0, 65535) >> 8).astype(np.uint8))
            img = img.convert("RGB")
    except Image.DecompressionBombError:
        return None, "image_too_large"
    except Exception:  # PIL raises many types for bad bytes; all mean the same here
        return None, "undecodable_image"
    # Same arithmetic as torchvision's Resize(size) + CenterCrop(size), open_clip's eval transform.
    short, long = sorted((img.width, img.height))
    if short != size:
        long = int(size * long / short)
        if long > MAX_RESIZE_ASPECT_RATIO * size:
            return _resize_centre(img, size, long), ""
        img = img.resize((size, long) if img.width <= img.height else (long, size),
                         Image.Resampling.BICUBIC)
    left, top = int(round((img.width - size) / 2.0)), int(round((img.height - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8), ""


def _resize_centre(img: Image.Image, size: int, long: int) -> np.ndarray:
    """Resize of `img` to `long` on its long side, then centre crop `size` x `size`, computed on
    the source region under the crop only (PIL's resize `box`: the full resize's scale and sample
    positions, the bicubic kernel still reading the pixels around the box), so it costs
    size x size output pixels. Equal to resize-then-crop up to 8-bit rounding between PIL's two
    passes (a few grey levels, and only where the kernel overshoots, as on noise)."""
    offset = int(round((long - size) / 2.0))
    scale = max(img.width, img.height) / long
    lo, hi = offset * scale, (offset + size) * scale
    box = (lo, 0, hi, img.height) if img.width > img.height else (0, lo, img.width, hi)
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)


def check_caption(txt) -> tuple[str | None, str]:
    """A caption (str or utf-8 bytes) -> (clean text, "") or (None, skip reason)."""
    if not isinstance(txt, (str, bytes, bytearray)):  # None, or NaN from a missing member
        return None, "null_caption"
    if isinstance(txt, (bytes, bytearray)):
        try:
            txt = bytes(txt).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8_caption"
    txt = " ".join(txt.split())
    if not txt:
        return None, "empty_caption"
    return txt, ""


def decode_images(batch: dict, size: int, with_captions: bool = False) -> dict:
    """Ray Data batch UDF: adds `pixels` (B x size x size x 3 uint8) and `skip_reason`.

    With `with_captions`, a row is also skipped when its caption is unusable (image-text pairs).
    """
    n = len(batch["key"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    reasons = []
    captions = []
    for i in range(n):
        array, reason = decode_image(batch["jpg"][i], size)
        caption = None
        if with_captions:
            caption, caption_reason = check_caption(batch["txt"][i])
            reason = reason or caption_reason
        if array is not None and not reason:
            pixels[i] = array
        reasons.append(reason)
        captions.append(caption or "")
    out = {"key": _as_str(batch["key"]), "image_id": _as_str(batch["image_id"]),
           "pixels": pixels, "skip_reason": np.array(reasons, dtype=object)}
    if with_captions:
        out["txt"] = np.array(captions, dtype=object)
    return out


@functools.cache
def _tokenizer(model_name: str):
    from xbt_ray.models.clip import register

    register(model_name)
    import open_clip  # here, not at the top: importing it costs seconds in every Ray worker

    return open_clip.get_tokenizer(model_name)


def tokenize(texts: list[str], model_name: str) -> np.ndarray:
    return _tokenizer(model_name)(list(texts)).numpy()


def prepare_texts(batch: dict, model_name: str) -> dict:
    """Ray Data batch UDF: validates captions and adds `tokens` and `skip_reason`."""
    checked = [check_caption(t) for t in batch["txt"]]
    clean = [c if c is not None else "" for c, _ in checked]
    return {"key": _as_str(batch["key"]), "image_id": _as_str(batch["image_id"]),
            "tokens": tokenize(clean, model_name),
            "skip_reason": np.array([r for _, r in checked], dtype=object)}


def decode_pairs(batch: dict, size: int, model_name: str) -> dict:
    """Ray Data batch UDF for image-text training pairs: pixels, tokens, skip_reason."""
    out = decode_images(batch, size, with_captions=True)
    out["tokens"] = tokenize(list(out.pop("txt")), model_name)
    return out


def decode_training_pairs(batch: dict, size: int, model_name: str, carry=()) -> dict:
    """Ray Data batch UDF for stage 2's pairs: `decode_pairs`, plus `image_code` (a stable int64
    hash of the image id, paired.image_codes: captions of one image are positives of each other)
    and the `carry` columns passed through row for row (the anchored targets)."""
    out = decode_pairs(batch, size, model_name)
    out["image_code"] = paired.image_codes(batch["image_id"])
    for name in carry:
        out[name] = batch[name]
    return out


def drop_skipped(batch: dict, log_dir: str) -> dict:
    """Ray Data batch UDF for training streams: keep usable rows, log skipped ones.

    Skipped rows are appended as `key<TAB>reason` lines to a file of their own under `log_dir`
    (shared storage on a cluster); `skip_counts` reads them back. Epochs re-read the same rows, so
    counts are over unique keys.
    """
    reasons = batch["skip_reason"]
    bad = reasons != ""
    if bad.any():
        lines = "".join(f"{k}\t{r}\n" for k, r in zip(batch["key"][bad], reasons[bad]))
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / f"{uuid.uuid4().hex}.tsv").write_text(lines)
    return {name: values[~bad] for name, values in batch.items()}


def skip_counts(log_dir: str | Path) -> dict[str, int]:
    """{reason: number of distinct skipped keys} from a `drop_skipped` log directory."""
    from collections import Counter

    seen = {}
    for path in Path(log_dir).glob("*.tsv"):
        for line in path.read_text().splitlines():
            key, reason = line.split("\t")
            seen[key] = reason
    return dict(Counter(seen.values()))


def training_stream(files: list[str], udf, fn_kwargs: dict, columns: list[str], log_dir: Path,
                    seed: int, carry: list[str] = ()):
    """Image-text training rows: read (file order re-randomised every epoch, seeded) -> CPU
    stage (udf) -> drop + log skipped -> `columns`. `carry`: further parquet columns read with
    the rows (the udf passes them on). No global shuffle: rows are mixed in each worker's local
    buffer (xbt_ray.train.distributed.epoch_batches). Re-executed every epoch by Ray Train; the
    row count comes from `shard_rows`, not from a pass over the data."""
    return (read_rows(files, ["key", "image_id", "jpg", "txt", *carry], shuffle_seed=seed)
            .map_batches(udf, fn_kwargs=fn_kwargs, batch_size=256, num_cpus=CPU_STAGE_NUM_CPUS)
            .map_batches(drop_skipped, fn_kwargs={"log_dir": str(log_dir)}, batch_size=None)
            .select_columns(columns))


def shard_rows(files: list[str]) -> int:
    """Rows of a set of shards without reading their data (see `rows_per_shard`)."""
    return sum(rows_per_shard(files))


def rows_per_shard(files: list[str]) -> list[int]:
    """Rows of each shard without reading its data: parquet footers (threads, on the driver: a
    few KB per file), tar member headers (one Ray task per tar, on the workers)."""
    if not files[0].endswith(".tar"):
        from xbt_ray.data.cache import parquet_rows

        return parquet_rows(files)
    import ray.data

    counted = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    rows = {r["path"]: r["rows"] for r in counted.map(_count_tar_samples).take_all()}
    return [int(rows[f]) for f in files]


def _count_tar_samples(row: dict) -> dict:
    import tarfile

    with tarfile.open(row["path"], "r:*") as tar:
        return {"path": row["path"], "rows": len(_tar_index(tar))}


def _as_str(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
