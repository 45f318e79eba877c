"""The embedding cache: parquet files, one directory per (model, dataset, modality).

Columns: `key` (string), `image_id` (string), `emb` (fixed-size list of float16/float32).
Schema metadata (every file): `xbt.model`, `xbt.pretrained`, `xbt.dim`, `xbt.normalized`,
`xbt.dataset`, `xbt.modality`. A directory is complete once `_SUCCESS.json` (the row counts) is
written; readers refuse files whose metadata disagrees with what they expect. A user can bring
embeddings exported from a vector store in this format (see `write_embeddings`).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xbt_ray.config import ConfigError

log = logging.getLogger(__name__)
META_FIELDS = ("model", "pretrained", "dim", "normalized", "dataset", "modality")
SUCCESS = "_SUCCESS.json"


@dataclass
class Embeddings:
    """Rows of one embedding set. Ids are str (an int64 id 42 reads as "42")."""

    keys: np.ndarray        # (N,) object array of str: unique row ids
    image_ids: np.ndarray   # (N,) object array of str: the image a row shows or describes
    emb: np.ndarray         # (N, dim) float32
    meta: dict
    source: str = ""        # where the rows came from (a directory), for error messages
    counts: dict = field(default_factory=dict)  # read counts: rows_in, rows_used, skipped

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray) -> "Embeddings":
        """The rows at integer indices `rows`, in that order."""
        return Embeddings(self.keys[rows], self.image_ids[rows], self.emb[rows], self.meta,
                          self.source, self.counts)


def as_ids(values) -> np.ndarray:
    """Ids as an object array of str, whatever their stored type (int64, bytes, str)."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return values.astype(str).astype(object)
    return np.array([v.decode() if isinstance(v, bytes) else None if v is None else str(v)
                     for v in values], dtype=object)


def cache_path(root: str | Path, model_fp: str, dataset_fp: str, modality: str) -> Path:
    return Path(root).absolute() / "embeddings" / model_fp / dataset_fp / modality


def make_meta(model: str, pretrained: str, dim: int, dataset: str, modality: str,
              normalized: bool = True) -> dict:
    return {"model": model, "pretrained": pretrained, "dim": int(dim),
            "normalized": bool(normalized), "dataset": dataset, "modality": modality}


def write_part(directory: Path, index: int | str, keys, image_ids, emb: np.ndarray, meta: dict,
               dtype: str = "float16") -> Path:
    """Write one parquet part of the cache with the contract's schema and metadata, named
    `part-<index:05d>.parquet` (or `part-<index>.parquet` for a str index)."""
    directory.mkdir(parents=True, exist_ok=True)
    emb = np.ascontiguousarray(emb, dtype=np.dtype(dtype))
    if not np.isfinite(emb).all():
        raise ConfigError(f"refusing to write non-finite embeddings (NaN/inf, or beyond {dtype}) "
                          f"to {directory}")
    dim = emb.shape[1]
    value_type = pa.float16() if emb.dtype == np.float16 else pa.float32()
    emb_col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=value_type), dim)
    table = pa.table({"key": pa.array(list(keys), pa.string()),
                      "image_id": pa.array(list(image_ids), pa.string()),
                      "emb": emb_col})
    table = table.replace_schema_metadata({f"xbt.{k}": json.dumps(v) for k, v in meta.items()})
    path = directory / (f"part-{index:05d}.parquet" if isinstance(index, int)
                        else f"part-{index}.parquet")
    pq.write_table(table, path)
    return path


def parquet_rows(files: list[str]) -> list[int]:
    """Rows of each parquet file, from its footer (no data read; threads, for many files on
    shared storage)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda f: pq.read_metadata(f).num_rows, files))


def write_embeddings(directory: Path, keys, image_ids, emb: np.ndarray, meta: dict,
                     rows_per_file: int = 100_000, dtype: str = "float16") -> None:
    """Write a whole embedding set (e.g. exported from a vector store) as a complete cache dir,
    replacing whatever parts the directory held before."""
    for stale in Path(directory).glob("part-*.parquet"):
        stale.unlink()
    check_keys(keys, f"embeddings for {directory}")
    for i, start in enumerate(range(0, len(keys), rows_per_file)):
        end = start + rows_per_file
        write_part(directory, i, keys[start:end], image_ids[start:end], emb[start:end], meta, dtype)
    mark_complete(directory, {"rows_in": len(keys), "rows_embedded": len(keys), "skipped": {}})


def mark_complete(directory: Path, counts: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SUCCESS).write_text(json.dumps(counts, indent=2))


def completed_counts(directory: Path) -> dict | None:
    """The row counts of a complete cache directory, or None if it is absent or unfinished."""
    marker = Path(directory) / SUCCESS
    return json.loads(marker.read_text()) if marker.is_file() else None


def read_meta(path: Path) -> dict:
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path} is not a readable parquet file ({_one_line(e)})") from None
    meta = {}
    for name in META_FIELDS:
        value = raw.get(f"xbt.{name}".encode())
        if value is None:
            raise ConfigError(f"{path} is not an xbt embedding file: metadata 'xbt.{name}' missing")
        try:
            meta[name] = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{path} has metadata 'xbt.{name}' that is not JSON: "
                              f"{value[:40]!r}") from None
    return meta


def read_embeddings(directory: str | Path, expect: dict | None = None) -> Embeddings:
    """Read every part of a cache directory (ours, or one a user exported in this format).

    `expect` maps metadata fields to required values; any mismatch is a one-line ConfigError, as
    are a malformed file, a null embedding, a null or duplicate key, or a row count that differs
    from the one `_SUCCESS.json` recorded. Rows whose vector is all zeros (how some vector
    stores export items that failed to embed) or holds NaN/inf cannot be searched: they are
    skipped and counted (`zero_vector`, `non_finite`) in the result's `counts` and logged.
    Ids are returned as str, whatever their stored type.
    """
    directory = Path(directory)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise ConfigError(f"no embedding files (part-*.parquet) in {directory}")
    meta = read_meta(files[0])
    for field_name, wanted in (expect or {}).items():
        if meta.get(field_name) != wanted:
            raise ConfigError(f"embedding cache {directory} has {field_name}="
                              f"{meta.get(field_name)!r}, expected {wanted!r}")
    keys, image_ids, embs = [], [], []
    for f in files:
        if read_meta(f) != meta:
            raise ConfigError(f"embedding file {f} has metadata that differs from {files[0].name}")
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"embedding file {f} cannot be read ({_one_line(e)})") from None
        missing = [c for c in ("key", "emb") if c not in table.column_names]
        if missing:
            raise ConfigError(f"embedding file {f} lacks columns {missing}")
        emb_col = table.column("emb").combine_chunks()
        if not (pa.types.is_fixed_size_list(emb_col.type)
                and pa.types.is_floating(emb_col.type.value_type)):
            raise ConfigError(f"embedding file {f} has emb of type {emb_col.type}, expected a "
                              "fixed-size list of float16/float32")
        if emb_col.null_count:   # flatten() would drop these rows and shift every later one
            raise ConfigError(f"embedding file {f} has {emb_col.null_count} rows with a null emb")
        dim = emb_col.type.list_size
        if dim != meta["dim"]:
            raise ConfigError(f"embedding file {f} has dim {dim}, metadata says {meta['dim']}")
        emb = emb_col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
        keys.append(as_ids(table.column("key").to_numpy(zero_copy_only=False)))
        ids = table.column("image_id") if "image_id" in table.column_names else table.column("key")
        image_ids.append(as_ids(ids.to_numpy(zero_copy_only=False)))
        embs.append(emb)
    keys, image_ids, emb = np.concatenate(keys), np.concatenate(image_ids), np.concatenate(embs)
    check_keys(keys, f"embedding cache {directory}")
    counts = completed_counts(directory)
    if counts is not None and counts.get("rows_embedded", len(keys)) != len(keys):
        raise ConfigError(f"embedding cache {directory} holds {len(keys)} rows but its {SUCCESS} "
                          f"says {counts['rows_embedded']}: parts were added or removed")
    usable, skipped = searchable_rows(emb)
    if skipped:
        log.warning("embedding cache %s: skipped %s of %d rows (unsearchable vectors)",
                    directory, skipped, len(keys))
    read_counts = {"rows_in": int(len(keys)), "rows_used": int(usable.sum()), "skipped": skipped}
    return Embeddings(keys[usable], image_ids[usable], emb[usable], meta, str(directory),
                      read_counts)


def searchable_rows(emb: np.ndarray) -> tuple[np.ndarray, dict]:
    """Which rows of (N, dim) vectors can be searched: (usable (N,) bool, skipped counts by
    reason). A row holding NaN/inf is `non_finite`; an all-zero row (how some vector stores
    export items that failed to embed) is `zero_vector`."""
    finite = np.isfinite(emb).all(axis=1)
    nonzero = np.abs(np.where(finite[:, None], emb, 0)).max(axis=1, initial=0) > 0
    skipped = {r: int(n) for r, n in (("non_finite", (~finite).sum()),
                                      ("zero_vector", (finite & ~nonzero).sum())) if n}
    return finite & nonzero, skipped


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def check_keys(keys: np.ndarray, where: str) -> None:
    """Keys identify rows across caches: a null or repeated key is a one-line ConfigError."""
    keys = np.asarray(keys).tolist()
    distinct = set(keys)
    if None in distinct:
        raise ConfigError(f"{where} has null keys")
    if len(distinct) != len(keys):
        repeated = [k for k, n in Counter(keys).items() if n > 1]
        raise ConfigError(f"{where} has {len(repeated)} duplicate keys (e.g. {repeated[0]!r}); "
                          "keys must be unique, deduplicate the source shards")
