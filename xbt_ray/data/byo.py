"""Bring-your-own embeddings: import vector-store exports into the embedding cache contract.

A YAML manifest names, per role, where an export is; each role is converted, file by file, into
a complete cache directory (`xbt_ray.data.cache`: parts `part-NNNNN.parquet` with `key`,
`image_id`, `emb`, `xbt.*` metadata, and `_SUCCESS.json` with the counts)::

    dataset: my-corpus            # optional: the `xbt.dataset` of every role (else a fingerprint)
    protocol: coco-5k             # optional, kept on the manifest for the caller
    old_text: exports/old_text/   # a parquet file, folder or glob (relative to this file)
    new_pair_images:
      path: laion/metadata/*.parquet   # ids (and, without `npy`, the vectors)
      npy: laion/img_emb/              # optional: .npy matrices (N, dim), matched in sorted order
      id_column: key                   # string or integer ids (int ids -> decimal strings)
      vector_column: emb               # fixed-size list, list, large_list or a tensor column
      image_id_column: image_id        # optional; the id when absent
      model: openclip-vit-l            # optional `xbt.model`; default "<old|new>-byo"

Layouts read: `emb` as a fixed-size or variable-length list (list/large_list) of
float16/32/64; Ray Data's tensor column (an Arrow extension type, read through its storage) and
Arrow's fixed-shape tensor; `.npy` matrices beside parquet files of ids (LAION / clip-retrieval
dumps, `img_emb/img_emb_0.npy` + `metadata/metadata_0.parquet`), read with mmap in chunks.

Bad rows are SKIPPED and counted, not refused: a vector store exports an item that failed to
embed as a zero vector (`zero_vector`), and NaN/inf rows (`non_finite`, also a null element inside
a vector), null ids (`null_id`), null image ids (`null_image_id`) and null vectors
(`null_vector`) happen. One bad row in a billion-row export should not refuse the export; the
counts (`skipped`, logged per role and written to `_SUCCESS.json`) make them visible. Vectors that
are not unit-norm (|norm - 1| > 1e-3) are normalised and counted in `renormalized`; every kept
vector is divided by its norm. What is refused (one-line `ConfigError`): a missing column,
variable-length vectors of the wrong length, a dim that changes between files, `.npy` and id
files whose row counts (or file counts) differ, and duplicate ids within a role (checked over
every non-null id, kept or skipped: two rows claiming one id would join the wrong rows).

Memory: one input file's converted output (at the cache dtype) plus the set of ids seen so far;
vectors are converted in chunks of `CHUNK_ROWS` rows.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xbt_ray.config import ConfigError, read_yaml
from xbt_ray.data import cache

log = logging.getLogger(__name__)

ROLES = ("old_text", "new_text",
         "old_pair_images", "new_pair_images", "old_pair_texts", "new_pair_texts",
         "old_eval_images", "new_eval_images", "old_eval_captions", "new_eval_captions")
TOP_LEVEL = ("dataset", "protocol")
ENTRY_KEYS = ("path", "id_column", "vector_column", "image_id_column", "npy", "model")
SKIP_REASONS = ("null_id", "null_image_id", "null_vector", "non_finite", "zero_vector")
NORM_TOLERANCE = 1e-3
CHUNK_ROWS = 65_536
SOURCE = "_BYO_SOURCE.json"   # what a complete directory was imported from (for reuse)


@dataclass
class Entry:
    """Where one role's export is.

    `path`: parquet file, folder (every `*.parquet` below it) or glob: the ids, and the vectors
    unless `npy` is set. `npy`: `.npy` file, folder or glob of (N, dim) float matrices, matched to
    the parquet files in sorted (natural) order. `image_id_column`: None means `image_id` when
    the files have it, else the id; a name given explicitly must exist. `model`: the cache's
    `xbt.model` (default "<old|new>-byo").
    """

    path: str
    id_column: str = "key"
    vector_column: str = "emb"
    image_id_column: str | None = None
    npy: str | None = None
    model: str | None = None


@dataclass
class ImportResult:
    """One imported role; same attributes as `xbt_ray.data.embed.EmbedResult`."""

    directory: Path
    counts: dict
    reused: bool


class Manifest(dict):
    """`role -> Entry`, plus the optional top-level `dataset` and `protocol` (None if absent)."""

    def __init__(self, entries: dict, dataset: str | None = None, protocol: str | None = None,
                 path: Path | None = None):
        super().__init__(entries)
        self.dataset = dataset
        self.protocol = protocol
        self.path = path


# ---------------------------------------------------------------------------------- manifest

def load_manifest(path: str | os.PathLike) -> Manifest:
    """Parse a BYO manifest: a `Manifest` (a dict `role -> Entry`, with `.dataset`, `.protocol`).

    Relative paths resolve against the manifest's directory. Raises a one-line ConfigError for a
    missing or invalid YAML file, an unknown role or entry key, a value of the wrong type, an
    `npy` entry without `path` (its ids), or a manifest without roles.
    """
    path = Path(path)
    raw = read_yaml(path, "BYO manifest")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"BYO manifest {path} must be a mapping of role -> export, "
                          f"got {type(raw).__name__}")
    base = path.absolute().parent
    entries: dict[str, Entry] = {}
    extras: dict[str, str | None] = {"dataset": None, "protocol": None}
    for name, value in raw.items():
        if name in TOP_LEVEL:
            if value is not None and not isinstance(value, (str, int, float)):
                raise ConfigError(f"BYO manifest {path}: {name} must be a string, "
                                  f"got {type(value).__name__}")
            extras[name] = None if value is None else str(value)
            continue
        if name not in ROLES:
            raise ConfigError(f"BYO manifest {path}: unknown role {name!r}; valid roles: "
                              f"{', '.join(ROLES)} (and top-level keys {', '.join(TOP_LEVEL)})")
        entries[name] = _entry(value, name, path, base)
    if not entries:
        raise ConfigError(f"BYO manifest {path} names no roles; valid roles: {', '.join(ROLES)}")
    return Manifest(entries, extras["dataset"], extras["protocol"], path.absolute())


def _entry(value, role: str, manifest: Path, base: Path) -> Entry:
    where = f"BYO manifest {manifest}: role {role}"
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a path or a mapping with keys {', '.join(ENTRY_KEYS)}, "
                          f"got {type(value).__name__}")
    unknown = [k for k in value if k not in ENTRY_KEYS]
    if unknown:
        raise ConfigError(f"{where} has unknown key {unknown[0]!r}; valid keys: "
                          f"{', '.join(ENTRY_KEYS)}")
    for key, item in value.items():
        if item is not None and not isinstance(item, str):
            raise ConfigError(f"{where}: {key} must be a string, got {type(item).__name__}")
    if not value.get("path"):
        raise ConfigError(f"{where} has no path" + (" (the parquet files of ids beside the npy "
                                                    "vectors)" if value.get("npy") else ""))
    fields = {k: v for k, v in value.items() if v is not None}
    fields["path"] = _resolve(fields["path"], base)
    if fields.get("npy"):
        fields["npy"] = _resolve(fields["npy"], base)
    return Entry(**fields)


def _resolve(path: str, base: Path) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else str(base / path)


# ------------------------------------------------------------------------------------ import

def import_manifest(path: str | os.PathLike, cache_root: str | os.PathLike,
                    dtype: str = "float16") -> dict[str, ImportResult]:
    """Import every role of a manifest into `<cache_root>/embeddings/byo/<role>-<fp>/`.

    `fp` fingerprints the source files (names, sizes, mtimes) and the entry's settings, so a
    changed export gets a new directory and an unchanged one is reused (`reused=True`). Returns
    `role -> ImportResult(directory, counts, reused)`; raises what `load_manifest` and
    `import_embeddings` raise.
    """
    manifest = load_manifest(path)
    root = Path(cache_root).absolute() / "embeddings" / "byo"
    results = {}
    for role, entry in manifest.items():
        files = _source_files(entry)
        fp = _digest({"sources": _file_stats(files), "entry": asdict(entry), "role": role,
                      "dataset": manifest.dataset, "dtype": dtype})
        directory = root / f"{role}-{fp}"
        counts, reused = _import(entry, directory, role, manifest.dataset, dtype, files)
        results[role] = ImportResult(directory, counts, reused)
    return results


def import_embeddings(entry: Entry, out_dir: str | os.PathLike, role: str,
                      dataset: str | None = None, dtype: str = "float16") -> dict:
    """Convert one role's export into a complete cache directory `out_dir`.

    Writes one part per input file (`emb`: fixed-size list of `dtype`, float16 or float32,
    unit-norm; `key`/`image_id`: strings), then `_SUCCESS.json` with the counts, returned as
    `{"rows_in": int, "rows_embedded": int, "skipped": {reason: int}, "renormalized": int}`
    (only reasons that occurred are listed; rows_in == rows_embedded + sum(skipped)). Metadata:
    model = `entry.model` or "<old|new>-byo", pretrained = the source path, dim from the data,
    dataset = `dataset` or a fingerprint of the source files, modality "image" for `*_images`
    roles else "text", normalized True. An existing complete `out_dir` imported from the same
    unchanged sources and settings is reused (its counts returned). Raises a one-line
    ConfigError for an unknown role, no source files, a missing column, an unsupported column
    type, wrong-length vectors, a dim that changes between files, npy/id row counts that differ,
    duplicate ids, or no usable rows.
    """
    return _import(entry, Path(out_dir), role, dataset, dtype)[0]


def _import(entry: Entry, out_dir: Path, role: str, dataset: str | None, dtype: str,
            files: tuple[list[Path], list[Path] | None] | None = None) -> tuple[dict, bool]:
    if role not in ROLES:
        raise ConfigError(f"unknown BYO role {role!r}; valid roles: {', '.join(ROLES)}")
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"BYO import dtype must be float16 or float32, got {dtype!r}")
    out_dir = Path(out_dir).absolute()
    files = files or _source_files(entry)
    stats = _file_stats(files)
    source = {"sources": stats, "entry": asdict(entry), "role": role, "dataset": dataset,
              "dtype": dtype}
    counts = cache.completed_counts(out_dir)
    marker = out_dir / SOURCE
    if counts is not None and marker.is_file() and json.loads(marker.read_text()) == source:
        _log(role, counts, out_dir, reused=True)
        return counts, True

    (out_dir / cache.SUCCESS).unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    for stale in out_dir.glob("part-*.parquet"):
        stale.unlink()
    importer = _Importer(entry, out_dir, role, dtype,
                         dataset if dataset is not None else _digest(stats))
    try:
        counts = importer.run(*files)
    except BaseException:
        for part in out_dir.glob("part-*.parquet"):
            part.unlink()
        raise
    marker.write_text(json.dumps(source, indent=2))
    cache.mark_complete(out_dir, counts)
    _log(role, counts, out_dir, reused=False)
    return counts, False


def _log(role: str, counts: dict, directory: Path, reused: bool) -> None:
    skipped = {k: v for k, v in counts["skipped"].items() if v}
    log.info("BYO %s%s: %d rows in, %d embedded, skipped %s, renormalized %d -> %s", role,
             " (reused)" if reused else "", counts["rows_in"], counts["rows_embedded"],
             skipped or "none", counts["renormalized"], directory)


class _Importer:
    def __init__(self, entry: Entry, out_dir: Path, role: str, dtype: str, dataset: str):
        self.entry, self.out_dir, self.role, self.dtype = entry, out_dir, role, dtype
        self.model = entry.model or f"{role.split('_')[0]}-byo"
        self.modality = "image" if role.endswith("_images") else "text"
        self.dataset = dataset
        self.dim: int | None = None
        self.dim_file: Path | None = None
        self.seen: set[str] = set()
        self.rows_in = 0
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.renormalized = 0
        self.parts = 0
        self.embedded = 0

    def run(self, parquets: list[Path], npys: list[Path] | None) -> dict:
        if npys is None:
            for f in parquets:
                self._file(f, self._parquet_chunks(f), f)
        else:
            if len(npys) != len(parquets):
                raise ConfigError(f"BYO {self.role}: {len(npys)} npy files ({self.entry.npy}) but "
                                  f"{len(parquets)} id parquet files ({self.entry.path}); they are "
                                  "matched one to one in sorted order")
            for npy, ids in zip(npys, parquets):
                self._file(npy, self._npy_chunks(npy, ids), ids)
        rows_embedded = self.embedded
        counts = {"rows_in": self.rows_in, "rows_embedded": rows_embedded,
                  "skipped": {k: v for k, v in self.skipped.items() if v},
                  "renormalized": self.renormalized}
        if counts["rows_in"] != counts["rows_embedded"] + sum(counts["skipped"].values()):
            raise AssertionError(f"BYO {self.role}: row counts do not add up: {counts}")
        if not rows_embedded:
            raise ConfigError(f"BYO {self.role}: no usable rows in {self._source_name()} "
                              f"({self.rows_in} rows in, skipped {counts['skipped']})")
        return counts

    def _source_name(self) -> str:
        return self.entry.npy or self.entry.path

    # -- readers: each yields (keys, image_ids or None, vectors (n, dim) float64 or None, valid)

    def _columns(self, f: Path, names: list[str], optional: str | None = None) -> list[str]:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"BYO {self.role}: {f} is not a readable parquet file "
                              f"({cache._one_line(e)})") from None
        for name in names:
            if name not in schema.names:
                raise ConfigError(f"BYO {self.role}: {f} has no column {name!r}; its columns: "
                                  f"{', '.join(schema.names)}")
        return names + ([optional] if optional and optional in schema.names else [])

    def _id_columns(self, f: Path) -> tuple[list[str], str | None]:
        e = self.entry
        required = [e.id_column] + ([e.image_id_column] if e.image_id_column else [])
        return required, None if e.image_id_column else "image_id"

    def _parquet_chunks(self, f: Path):
        required, optional = self._id_columns(f)
        vec = self.entry.vector_column
        columns = list(dict.fromkeys(self._columns(f, required + [vec], optional)))
        image_id = self.entry.image_id_column or (optional if optional in columns else None)
        for batch in self._batches(f, columns):
            keys = self._ids(batch.column(self.entry.id_column), f, self.entry.id_column)
            ids = self._ids(batch.column(image_id), f, image_id) if image_id else None
            yield keys, ids, batch.column(vec)

    def _npy_chunks(self, npy: Path, ids_file: Path):
        try:
            matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"BYO {self.role}: {npy} is not a readable .npy file "
                              f"({cache._one_line(e)})") from None
        if matrix.ndim != 2 or matrix.dtype not in (np.float16, np.float32, np.float64):
            raise ConfigError(f"BYO {self.role}: {npy} holds a {matrix.dtype} array of shape "
                              f"{matrix.shape}; expected a float16/32/64 matrix (N, dim)")
        required, optional = self._id_columns(ids_file)
        columns = list(dict.fromkeys(self._columns(ids_file, required, optional)))
        n_ids = pq.ParquetFile(ids_file).metadata.num_rows
        if n_ids != matrix.shape[0]:
            raise ConfigError(f"BYO {self.role}: {npy} has {matrix.shape[0]} rows but its ids "
                              f"{ids_file} have {n_ids}; they must agree")
        image_id = self.entry.image_id_column or (optional if optional in columns else None)
        start = 0
        for batch in self._batches(ids_file, columns):
            end = start + batch.num_rows
            keys = self._ids(batch.column(self.entry.id_column), ids_file, self.entry.id_column)
            ids = self._ids(batch.column(image_id), ids_file, image_id) if image_id else None
            yield keys, ids, np.asarray(matrix[start:end], dtype=np.float64)
            start = end

    def _batches(self, f: Path, columns: list[str]):
        batches = pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                hint = ""
                if "Expected all lists to be of size" in str(e):
                    # apache/arrow#35692: Arrow writes null rows of a fixed-size list to parquet
                    # but (up to at least pyarrow 25) cannot read them back
                    hint = ("; this pyarrow cannot read null rows of a fixed-size list column "
                            "(apache/arrow#35692): export them as zero vectors (skipped and "
                            "counted as zero_vector) or store the vectors as a variable-length "
                            "list")
                raise ConfigError(f"BYO {self.role}: {f} cannot be read "
                                  f"({cache._one_line(e)}){hint}") from None
            yield batch

    def _ids(self, column: pa.Array, f: Path, name: str) -> pa.Array:
        t = column.type
        if pa.types.is_dictionary(t):
            column, t = column.dictionary_decode(), t.value_type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t):
            return pc.cast(column, pa.string())
        raise ConfigError(f"BYO {self.role}: {f} column {name!r} has type {t}; ids must be "
                          "strings or integers")

    # -- conversion

    def _vectors(self, column, f: Path) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (n, dim) float64 with NaN for null elements, null-row mask (n,))."""
        if isinstance(column, np.ndarray):
            self._check_dim(column.shape[1], f)
            return column, np.zeros(len(column), bool)
        name = self.entry.vector_column
        if isinstance(column.type, pa.BaseExtensionType):
            shape = getattr(column.type, "shape", None)
            if shape is not None and len(shape) != 1:
                raise ConfigError(f"BYO {self.role}: {f} column {name!r} holds tensors of shape "
                                  f"{tuple(shape)}; expected 1-D vectors")
            column = column.storage
        t = column.type
        if not ((pa.types.is_fixed_size_list(t) or pa.types.is_list(t)
                 or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type)):
            raise ConfigError(f"BYO {self.role}: {f} column {name!r} has type {t}; expected a "
                              "fixed-size list, list or large_list of float16/32/64 (or a "
                              "Ray/Arrow tensor column)")
        null = column.is_null().to_numpy(zero_copy_only=False)
        valid = column.filter(pa.array(~null)) if null.any() else column
        if pa.types.is_fixed_size_list(t):
            dim = t.list_size
        else:
            lengths = pc.list_value_length(valid).to_numpy(zero_copy_only=False)
            dim = int(lengths[0]) if len(lengths) else (self.dim or 0)
            bad = lengths != dim
            if bad.any():
                raise ConfigError(f"BYO {self.role}: {f} column {name!r} has vectors of lengths "
                                  f"{sorted(set(lengths.tolist()))[:5]}; every vector must have "
                                  f"the same length ({dim})")
        if not len(valid):
            return np.full((len(column), self.dim or 0), np.nan), null
        self._check_dim(dim, f)
        flat = valid.flatten().cast(pa.float64()).to_numpy(zero_copy_only=False)
        out = np.full((len(column), dim), np.nan)
        out[~null] = flat.reshape(-1, dim)
        return out, null

    def _check_dim(self, dim: int, f: Path) -> None:
        if self.dim is None:
            self.dim, self.dim_file = dim, f
        elif dim != self.dim:
            raise ConfigError(f"BYO {self.role}: {f} has vectors of dim {dim} but "
                              f"{self.dim_file} has dim {self.dim}")

    def _file(self, f: Path, chunks, ids_file: Path) -> None:
        out_keys, out_ids, out_emb = [], [], []
        file_keys: list[str] = []
        for keys, image_ids, column in chunks:
            n = len(keys)
            self.rows_in += n
            vectors, null_vec = self._vectors(column, f)
            null_key = keys.is_null().to_numpy(zero_copy_only=False)
            keys = keys.to_numpy(zero_copy_only=False)
            file_keys.extend(keys[~null_key].tolist())
            if image_ids is None:
                image_ids, null_img = keys, np.zeros(n, bool)
            else:
                null_img = image_ids.is_null().to_numpy(zero_copy_only=False)
                image_ids = image_ids.to_numpy(zero_copy_only=False)
            with np.errstate(invalid="ignore", over="ignore"):
                finite = np.isfinite(vectors).all(axis=1)
                scale = np.where(finite, np.abs(vectors).max(axis=1, initial=0.0), 0.0)
                safe = np.where(scale > 0, scale, 1.0)[:, None]
                norm = np.linalg.norm(np.where(finite[:, None], vectors, 0.0) / safe,
                                      axis=1) * scale
            reasons = (("null_id", null_key), ("null_image_id", null_img),
                       ("null_vector", null_vec), ("non_finite", ~finite),
                       ("zero_vector", norm == 0))
            keep = np.ones(n, bool)
            for reason, mask in reasons:
                hit = keep & mask
                self.skipped[reason] += int(hit.sum())
                keep &= ~hit
            if not keep.any():
                continue
            norm = norm[keep]
            self.renormalized += int((np.abs(norm - 1.0) > NORM_TOLERANCE).sum())
            out_keys.append(keys[keep])
            out_ids.append(image_ids[keep])
            out_emb.append((vectors[keep] / norm[:, None]).astype(self.dtype))
            self.embedded += int(keep.sum())
        self._check_unique(file_keys, ids_file)
        if not out_keys:
            return
        meta = cache.make_meta(self.model, self._source_name(), self.dim, self.dataset,
                               self.modality, normalized=True)
        cache.write_part(self.out_dir, self.parts, np.concatenate(out_keys),
                         np.concatenate(out_ids), np.concatenate(out_emb), meta, self.dtype)
        self.parts += 1

    def _check_unique(self, keys: list[str], f: Path) -> None:
        cache.check_keys(np.asarray(keys, dtype=object), f"BYO {self.role} export {f}")
        again = self.seen.intersection(keys)
        if again:
            raise ConfigError(f"BYO {self.role} export has {len(again)} duplicate keys across "
                              f"files (e.g. {next(iter(sorted(again)))!r} in {f} and an earlier "
                              "file); keys must be unique, deduplicate the source shards")
        self.seen.update(keys)


# ----------------------------------------------------------------------------------- sources

def _natural(path: Path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def _expand(pattern: str, suffix: str, what: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        files = [p for p in path.rglob(f"*{suffix}")
                 if p.is_file() and not any(part.startswith(("_", "."))
                                            for part in p.relative_to(path).parts)]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    if not files:
        raise ConfigError(f"BYO {what}: no {suffix} files at {pattern}")
    return sorted((p.absolute() for p in files), key=_natural)


def _source_files(entry: Entry) -> tuple[list[Path], list[Path] | None]:
    """(parquet files, npy files or None), each in natural sorted order."""
    parquets = _expand(entry.path, ".parquet", "export")
    npys = _expand(entry.npy, ".npy", "vectors") if entry.npy else None
    return parquets, npys


def _file_stats(files: tuple[list[Path], list[Path] | None]) -> list:
    stats = []
    for f in files[0] + (files[1] or []):
        st = f.stat()
        stats.append([str(f), st.st_size, st.st_mtime_ns])
    return stats


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
