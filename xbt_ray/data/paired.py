"""Training pairs joined on the Ray Data workers and written once: the paired cache of a stage.

Training reads embedding caches that can hold billions of rows, so nothing here passes rows
through the job driver. A stage names its input caches by role (e.g. `new_text`, `old_text`);
`write_pairs` reads them with Ray Data, drops unsearchable vectors (zero or NaN/inf, counted),
links them with Ray Data's hash join — text caches by `key` (the same captions under two
models), image caches by the captions' `image_id` (the image each caption describes, keyed by
image id in an image cache) — and writes the joined rows with Ray Data's parquet writer into
the stage's directory: one row per caption with one embedding column per role, `image_id`, and
`image_code` (int64, equal for captions of one image: the multi-positive InfoNCE's positives).
The driver sees only counts, parquet footers and file names.

Why a paired cache written once instead of a join inside every epoch: an epoch then reads plain
parquet (file and block order randomised, rows shuffled in a bounded local buffer; see
`training_dataset`), the join's hash shuffle runs once per stage instead of once per epoch, and
the counts of the join are known before training starts (steps per epoch, the lopsided-join
check). It costs one more copy of the joined columns on disk (the stage's inputs, e.g.
2 x 512 float16 per caption for the anchored targets).

The same module turns the image-text shards of LoRA stage 2 into a training stream
(`shard_stream`, `anchored_rows`): raw rows are read with Ray Data, file and block order
randomised every epoch, and (anchored objective) each caption row carries its cached old targets
after a join with the anchor paired cache, so no lookup table travels as one object.

Deterministic files: the hash join emits rows in the order its blocks happen to arrive, so the
joined rows are not written as they come. `write_by_key_bucket` puts each row in the file its
key's stable hash names and sorts every file by key (a Ray Data group-by on the workers). The
same inputs therefore give the same files, row for row, whatever the scheduling; with the seeded
file order, the seeded local shuffle and Ray Train's ingest in stream order
(`xbt_ray.train.distributed.fit`), a rerun of a stage with the same seed sees the same batches.

Counts (`PairedCache.counts`): `read` per cache (rows_in from the parquet footers, rows_used,
skipped by reason), and `joins` per link, named as in `xbt_ray.data.join`
("<base>~<text cache>", "<base>-><image cache>") with `left_rows`, `right_rows`, `joined`,
`unmatched_left`, `unmatched_right` of the FINAL pairs (a caption that some later link drops is
unmatched for every link). An empty join, or one that leaves more than half of either side
unmatched, is a one-line ConfigError naming the caches, as in `xbt_ray.data.join`.
"""
from __future__ import annotations

import glob
import json
import logging
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xbt_ray.config import ConfigError
from xbt_ray.data import cache
from xbt_ray.data.join import MIN_JOINED_FRACTION

log = logging.getLogger(__name__)
MARKER = "_PAIRS.json"
# Mean rows per file of a paired cache (files are filled by key hash, so sizes vary a little):
# files are the unit of the per-epoch file shuffle
ROWS_PER_FILE = 50_000
# Caches of at most this many rows have their keys checked for repeats in one Ray task: a hash
# group-by's fixed cost (its aggregator actors, 10-20 s on a 2-core cluster) dwarfs the check
# there, and the key column (tens of bytes a key) fits one worker's memory
ONE_TASK_KEY_CHECK_ROWS = 5_000_000
ONE_TASK_KEY_CHECK_CPUS = 0.5


@dataclass
class PairedCache:
    """A written paired cache: parquet `files` of `rows` joined rows, one embedding column per
    role in `roles` (fixed-size lists, the source caches' float dtype) plus `key`, `image_id`
    and `image_code`."""

    directory: Path
    files: list[str]
    rows: int
    roles: list[str]
    counts: dict

    def __len__(self) -> int:
        return self.rows


def cache_files(directory: str | Path) -> list[str]:
    """The parquet parts of an embedding cache directory; one-line ConfigError if none."""
    files = sorted(glob.glob(str(Path(directory) / "part-*.parquet")))
    if not files:
        raise ConfigError(f"no embedding files (part-*.parquet) in {directory}")
    return files


def check_cache(directory: str | Path, role: str) -> tuple[list[str], dict]:
    """(files, metadata) of a cache a stage reads: every file's metadata agrees, and a cache
    without `_SUCCESS.json` (hand-written, not from the embedding job or `write_embeddings`,
    which both refuse repeated keys) is checked for repeated keys on the workers."""
    files = cache_files(directory)
    meta = cache.read_meta(Path(files[0]))
    for f in files[1:]:
        if cache.read_meta(Path(f)) != meta:
            raise ConfigError(f"{role}: embedding file {f} has metadata that differs from "
                              f"{Path(files[0]).name}")
    if cache.completed_counts(Path(directory)) is None:
        refuse_duplicate_keys(files, f"{role} ({directory})")
    return files, meta


def refuse_duplicate_keys(files: list[str], where: str) -> None:
    """One-line ConfigError when the `key` column of these parquet files repeats a key. Checked
    on the workers, never in the driver (only the repeated keys' count and one of them come
    back): up to ONE_TASK_KEY_CHECK_ROWS rows (parquet footers) in one Ray task
    (`repeated_keys`), more with a Ray Data group-by on the key."""
    import ray
    import ray.data

    if sum(cache.parquet_rows(files)) <= ONE_TASK_KEY_CHECK_ROWS:
        check = ray.remote(num_cpus=ONE_TASK_KEY_CHECK_CPUS)(repeated_keys)
        n_repeated, sample = ray.get(check.remote(files))
    else:
        repeated = (ray.data.read_parquet(files).select_columns(["key"])
                    .groupby("key", num_partitions=shuffle_partitions()).count()
                    .filter(lambda row: row["count()"] > 1))
        first = repeated.take(1)
        n_repeated, sample = (repeated.count(), first[0]["key"]) if first else (0, None)
    if n_repeated:
        raise ConfigError(f"{where} holds {n_repeated} duplicate keys (e.g. {sample!r}); keys "
                          "must be unique across files: deduplicate or re-key them")


def repeated_keys(files: list[str]) -> tuple[int, str | None]:
    """(how many distinct keys occur more than once, the smallest of them or None) over the
    `key` columns of these parquet files, read in this process. Keys are compared as strings
    (ids are, everywhere in the project)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    keys = pa.chunked_array([pq.read_table(f, columns=["key"]).column("key").cast(pa.string())
                             for f in files], type=pa.string())
    counts = pc.value_counts(keys)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return 0, None
    return len(repeated), pc.min(repeated).as_py()


def shuffle_partitions() -> int:
    """Hash partitions of a shuffle (join, group-by): one per CPU of the cluster, within
    [1, 256] (Ray Data's default of 200 aggregators dwarfs jobs on a small cluster; more
    partitions than CPUs only queue)."""
    import ray

    return max(1, min(256, int(ray.cluster_resources().get("CPU", 1))))


def column_matrix(table, name: str) -> np.ndarray:
    """A fixed-size-list column of a pyarrow table as an (n, dim) array of its float dtype."""
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def _usable_rows(table, role: str, id_column: str, log_dir: str):
    """Ray Data UDF (pyarrow block): ids as str, the `emb` column renamed to `role`, rows whose
    vector is all zeros or not finite dropped and counted in a small JSON file under `log_dir`.
    An image cache's `key` becomes `image_id` (what caption rows name)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    emb = table.column("emb").combine_chunks()
    if emb.null_count:
        raise ConfigError(f"{role}: {emb.null_count} rows with a null emb")
    usable, skipped = cache.searchable_rows(column_matrix(table, "emb"))
    if skipped:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        Path(log_dir, f"{role}-{uuid.uuid4().hex}.json").write_text(json.dumps(skipped))
    ids = {}
    for name in ("key", "image_id"):
        if name in table.column_names:
            ids[name] = pc.cast(table.column(name), pa.string())
    columns = ({"image_id": ids["key"]} if id_column == "image_id"
               else {"key": ids["key"], "image_id": ids.get("image_id", ids["key"])})
    columns[role] = emb
    return pa.table(columns).filter(pa.array(usable))


def _read_cache(directory, role: str, id_column: str, log_dir: Path):
    """A cache's usable rows as a Ray Dataset with columns (key, image_id, <role>) for a text
    cache, (image_id, <role>) for an image cache."""
    import pyarrow.parquet as pq
    import ray.data

    files, meta = check_cache(directory, role)
    wanted = [c for c in ("key", "image_id", "emb") if c in pq.read_schema(files[0]).names]
    missing = {"key", "emb"} - set(wanted)
    if missing:
        raise ConfigError(f"{role}: embedding file {files[0]} lacks columns {sorted(missing)}")
    ds = ray.data.read_parquet(files).select_columns(wanted).map_batches(
        _usable_rows, fn_kwargs={"role": role, "id_column": id_column, "log_dir": str(log_dir)},
        batch_format="pyarrow", batch_size=None)
    return ds, files, meta


def image_codes(image_ids) -> np.ndarray:
    """(N,) int64 codes of image ids, equal for equal ids (a stable 64-bit hash of the id as
    str; collisions between distinct ids have probability ~N^2 / 2^65): the positives of the
    multi-positive InfoNCE, comparable across batches, workers and runs."""
    return stable_hash(image_ids).view(np.int64)


def stable_hash(ids) -> np.ndarray:
    """(N,) uint64 hash of each id as str (pandas' `hash_array`: SipHash with a fixed key), the
    same on every worker, run and machine: image codes and the paired cache's file buckets."""
    from pandas.util import hash_array

    return hash_array(cache.as_ids(ids), categorize=False)


def _add_image_code(table):
    """Ray Data UDF: `image_code` of `image_id`."""
    import pyarrow as pa

    codes = image_codes(table.column("image_id").to_numpy(zero_copy_only=False))
    return table.append_column("image_code", pa.array(codes, pa.int64()))


def write_pairs(texts: dict[str, str | Path], images: dict[str, str | Path], out_dir: Path,
                role: str, min_fraction: float = MIN_JOINED_FRACTION) -> PairedCache:
    """Join caption caches by key (the first one is the base) and image caches by the captions'
    image_id on the Ray Data workers, and write the pairs to `out_dir` (parquet, about
    ROWS_PER_FILE rows per file, filled by key hash and sorted by key: `write_by_key_bucket`).
    `texts` / `images` map a role name to a cache directory; each role becomes an embedding
    column. A directory already written for the same inputs is reused.

    Raises ConfigError (one line) for an empty or lopsided join (see the module docstring), a
    cache with inconsistent metadata, or a hand-written cache with repeated keys.
    """
    import ray.data

    out_dir = Path(out_dir).absolute()
    inputs = {name: str(Path(d).absolute()) for name, d in {**texts, **images}.items()}
    marker = out_dir / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["inputs"] == inputs:
            log.info("%s: paired cache %s reused (%d rows)", role, out_dir, done["rows"])
            return PairedCache(out_dir, done["files"], done["rows"], done["roles"],
                               done["counts"])
    shutil.rmtree(out_dir, ignore_errors=True)
    skip_dir = out_dir.parent / f".{out_dir.name}-skipped"
    shutil.rmtree(skip_dir, ignore_errors=True)

    names = list(texts) + list(images)
    datasets, files, metas = {}, {}, {}
    for name in names:
        id_column = "key" if name in texts else "image_id"
        datasets[name], files[name], metas[name] = _read_cache(inputs[name], name, id_column,
                                                               skip_dir)
    base_name = names[0]
    n_parts = shuffle_partitions()
    joined = datasets[base_name]
    for name in names[1:]:
        right = datasets[name]
        if name in texts:
            right = right.drop_columns(["image_id"])
        on = ("key",) if name in texts else ("image_id",)
        joined = joined.join(right, join_type="inner", num_partitions=n_parts, on=on)
    joined = joined.map_batches(_add_image_code, batch_format="pyarrow", batch_size=None)
    base_rows = sum(cache.parquet_rows(files[base_name]))
    written, rows = write_by_key_bucket(joined, out_dir / "rows",
                                        n_files=-(-base_rows // ROWS_PER_FILE))

    skipped: dict[str, Counter] = {name: Counter() for name in names}
    for path in skip_dir.glob("*.json"):
        skipped[path.name.rsplit("-", 1)[0]].update(json.loads(path.read_text()))
    shutil.rmtree(skip_dir, ignore_errors=True)
    read = {}
    for name in names:
        rows_in = sum(cache.parquet_rows(files[name]))
        read[name] = {"rows_in": rows_in, "rows_used": rows_in - sum(skipped[name].values()),
                      "skipped": dict(skipped[name])}
    matched_images = 0
    if images and rows:
        matched_images = (ray.data.read_parquet(written).select_columns(["image_id"])
                          .groupby("image_id", num_partitions=n_parts).count().count())
    joins = {}
    left_rows = read[base_name]["rows_used"]
    for name in names[1:]:
        arrow = "~" if name in texts else "->"
        right_rows = read[name]["rows_used"]
        matched_right = rows if name in texts else matched_images
        joins[f"{base_name}{arrow}{name}"] = {
            "left_rows": left_rows, "right_rows": right_rows, "joined": rows,
            "unmatched_left": left_rows - rows, "unmatched_right": right_rows - matched_right}
        _check_join(role, base_name, name, "key" if name in texts else "image_id", inputs, rows,
                    left_rows, matched_right, right_rows, min_fraction)
    counts = {"read": read, "joins": joins}
    for link, c in joins.items():
        log.info("join %s: %s: %s", role, link, c)
    marker.write_text(json.dumps({"inputs": inputs, "files": written, "rows": rows,
                                  "roles": names, "counts": counts}, indent=2))
    return PairedCache(out_dir, written, rows, names, counts)


def _check_join(role, left, right, on, inputs, joined, left_rows, matched_right, right_rows,
                min_fraction) -> None:
    left_ok = left_rows and joined >= min_fraction * left_rows
    right_ok = right_rows and matched_right >= min_fraction * right_rows
    if joined and left_ok and right_ok:
        return
    what = "nothing joined" if not joined else "a lopsided join"
    raise ConfigError(
        f"{role}: {what}: {joined} of {left_rows} rows of {left} ({inputs[left]}) matched "
        f"{matched_right} of {right_rows} rows of {right} ({inputs[right]}) by {on} -> key")


def key_buckets(keys, n_files: int) -> np.ndarray:
    """(N,) int64 file index in [0, n_files) of each key: `stable_hash(key) % n_files`."""
    return (stable_hash(keys) % np.uint64(n_files)).astype(np.int64)


def _add_bucket(table, n_files: int):
    """Ray Data UDF: the `bucket` (file index) of each row's key."""
    import pyarrow as pa

    buckets = key_buckets(table.column("key").to_numpy(zero_copy_only=False), n_files)
    return table.append_column("bucket", pa.array(buckets, pa.int64()))


def _write_bucket(table, out_dir: str):
    """Ray Data UDF (one group: every row of one bucket): the rows sorted by key, written as
    `pairs-<bucket>.parquet`. Returns the file's row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bucket = table.column("bucket")[0].as_py()
    rows = table.drop_columns(["bucket"]).sort_by("key")
    pq.write_table(rows, str(Path(out_dir) / f"pairs-{bucket:05d}.parquet"))
    return pa.table({"rows": [len(rows)]})


def write_by_key_bucket(ds, out_dir: Path, n_files: int) -> tuple[list[str], int]:
    """Write the rows of Ray Dataset `ds` (a `key` column, unique per row) as up to `n_files`
    parquet files whose contents do not depend on Ray's scheduling: a row goes to file
    `key_buckets(key, n_files)` and each file is sorted by key. A group-by on the workers (a
    hash shuffle by bucket); each worker holds one file's rows at a time. Returns (the files,
    sorted by name; rows written). A bucket with no rows writes no file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_files = max(1, int(n_files))
    written = (ds.map_batches(_add_bucket, fn_kwargs={"n_files": n_files},
                              batch_format="pyarrow", batch_size=None)
               .groupby("bucket", num_partitions=min(n_files, shuffle_partitions()))
               .map_groups(_write_bucket, fn_kwargs={"out_dir": str(out_dir)},
                           batch_format="pyarrow"))
    rows = sum(int(r["rows"]) for r in written.iter_rows())   # one small row per file
    return sorted(glob.glob(str(out_dir / "pairs-*.parquet"))), rows


def rows_with_targets(pair_files: list[str], targets: PairedCache, out_dir: Path) -> list[str]:
    """Image-text shards whose caption rows carry their cached old targets: the raw rows
    (key, image_id, jpg, txt) inner-joined by key with the anchor paired cache on the workers,
    written once to `out_dir` (parquet, reused for the same inputs). Returns the written files;
    a caption without a target is left out (the caller counts rows in minus rows written as
    `no_old_target`). Costs one copy of the training pairs' bytes on disk, in exchange for
    epochs that read plain parquet instead of re-running a hash join of image bytes."""
    import ray.data

    from xbt_ray.data import shards

    out_dir = Path(out_dir).absolute()
    inputs = {"shards": sorted(pair_files), "targets": str(targets.directory)}
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text())["inputs"] == inputs:
        return json.loads(marker.read_text())["files"]
    shutil.rmtree(out_dir, ignore_errors=True)
    raw = shards.read_rows(pair_files, ["key", "image_id", "jpg", "txt"])
    right = ray.data.read_parquet(targets.files).select_columns(["key"] + targets.roles)
    joined = raw.join(right, join_type="inner", num_partitions=shuffle_partitions(),
                      on=("key",))
    # as many files as input shards: a file holds about one shard's image bytes
    written, _ = write_by_key_bucket(joined, out_dir / "rows", n_files=len(pair_files))
    marker.write_text(json.dumps({"inputs": inputs, "files": written}, indent=2))
    return written


def training_dataset(paired: PairedCache, columns: list[str], seed: int):
    """The paired cache as a training stream, `columns` selected: the order in which its files
    (about ROWS_PER_FILE rows each) are read is re-randomised every epoch (seeded: an epoch's order
    depends on `seed` and the epoch), and rows are shuffled within each worker's local buffer
    (`trainer.shuffle_buffer_rows`) by the loop. There is no global shuffle, and no
    `randomize_block_order` either: that is an all-to-all barrier that holds every block of the
    epoch in the object store before the first batch."""
    import ray.data
    from ray.data import FileShuffleConfig

    return (ray.data.read_parquet(paired.files, shuffle=FileShuffleConfig(seed=seed))
            .select_columns(columns))


def sample_rows(paired_files: list[str], columns: list[str], max_rows: int,
                seed: int) -> dict[str, np.ndarray]:
    """Up to `max_rows` rows of a paired cache, read by the calling worker from randomly chosen
    files (no driver involved): {column: (n, dim) float32}. For regularisers that draw random
    rows beside the main stream."""
    import pyarrow.parquet as pq

    order = np.random.default_rng(seed).permutation(len(paired_files))
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    held = 0
    for i in order:
        table = pq.read_table(paired_files[i], columns=columns)
        for c in columns:
            parts[c].append(column_matrix(table, c).astype(np.float32))
        held += len(table)
        if held >= max_rows:
            break
    return {c: np.concatenate(v)[:max_rows] for c, v in parts.items()}
